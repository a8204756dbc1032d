"""Phi accrual failure detection (Hayashibara et al., 2004) on heartbeat arrivals.

Theory of operation
-------------------
Every host bumps its ``hb`` gossip key once per gossip interval.  A peer does
not hear those bumps at a steady beat: they arrive through gossip, sometimes
directly, sometimes two hops later, sometimes several at once.  Instead of a
fixed timeout we keep, per peer, an estimate of the inter-arrival time
(mean and standard deviation, as exponentially weighted moving averages so a
record is three floats and no window) and ask: *if the peer were alive, how
unlikely is it that we have heard nothing for this long?*  ``phi`` is
``-log10`` of that probability under a normal model whose mean is shifted by
an ``acceptable_pause`` (a GC pause, a busy host, a lost gossip round) and
whose deviation is never below ``min_std`` (a perfectly regular LAN would
otherwise give a hair trigger).

Why phi accrual rather than SWIM-style probes: gossip already carries
heartbeats to everyone, so no extra probe traffic is needed, and the detector
adapts to how fast heartbeats really arrive in a given mesh (bigger meshes
hear heartbeats later).  Two thresholds give the states the node needs:
``suspect`` (still placed on, but last) at ``phi_suspect`` and ``down`` (left
out of placement) at ``phi_down``.

Because phi grows monotonically with silence, each threshold is also a
deadline: ``last + mean + pause + y * std`` with ``y`` the normal quantile of
the threshold.  The gossip core sweeps thousands of peers per interval, so it
compares deadlines rather than evaluating ``erfc`` per peer.

Defaults, for the lab's 0.5 s gossip interval: ``mean`` ~0.5 s, ``std`` at the
0.5 s floor, pause 2 s.  A host that dies is suspected ~3.9 s and marked down
~5.3 s after the last heartbeat a peer heard (so ~6 s after it died, within
the 10 s target); a healthy peer has to be silent for over 5 s to be marked
down by mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Literal

Status = Literal["up", "suspect", "down"]
UP: Status = "up"
SUSPECT: Status = "suspect"
DOWN: Status = "down"

_PHI_CEILING = 15.0  # 1 - 10**-phi must stay representable in a double


@dataclass(frozen=True)
class DetectorConfig:
    """Tuning of the phi accrual detector (times in seconds)."""

    first_interval: float = 0.5  # assumed inter-arrival before any sample: the gossip interval
    min_std: float = 0.5
    acceptable_pause: float = 2.0
    phi_suspect: float = 3.0
    phi_down: float = 8.0
    alpha: float = 0.1  # EWMA weight of a new inter-arrival sample

    def __post_init__(self) -> None:
        if self.first_interval <= 0 or self.min_std <= 0 or self.acceptable_pause < 0:
            raise ValueError("detector intervals must be positive")
        if not 0 < self.phi_suspect < self.phi_down <= _PHI_CEILING:
            raise ValueError(f"need 0 < phi_suspect < phi_down <= {_PHI_CEILING}")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")

    @cached_property
    def y_suspect(self) -> float:
        """Normal quantile at which phi reaches ``phi_suspect``."""
        return NormalDist().inv_cdf(1.0 - 10.0**-self.phi_suspect)

    @cached_property
    def y_down(self) -> float:
        """Normal quantile at which phi reaches ``phi_down``."""
        return NormalDist().inv_cdf(1.0 - 10.0**-self.phi_down)


class PhiAccrual:
    """Arrival statistics of one peer's heartbeats.

    Starts as if one heartbeat had just arrived at ``now`` (the moment the
    peer became known), so a peer that is learned but never heard goes down
    after the same silence as one that stopped.
    """

    __slots__ = ("cfg", "last", "mean", "std")

    def __init__(self, cfg: DetectorConfig, now: float) -> None:
        self.cfg = cfg
        self.reset(now)

    def reset(self, now: float) -> None:
        """Forget the statistics: used when a peer comes back after being down,
        so the long silence does not inflate its expected interval."""
        self.last = now
        self.mean = self.cfg.first_interval
        self.std = self.cfg.min_std

    def heartbeat(self, now: float) -> None:
        """Record that a newer heartbeat of the peer arrived at ``now``."""
        x = now - self.last
        if x < 0:
            return  # clocks passed in out of order: keep the newer arrival
        a = self.cfg.alpha
        diff = x - self.mean
        self.mean += a * diff
        var = (1.0 - a) * (self.std * self.std + a * diff * diff)
        self.std = math.sqrt(var)
        self.last = now

    def _deadline(self, y: float) -> float:
        cfg = self.cfg
        return self.last + self.mean + cfg.acceptable_pause + y * max(self.std, cfg.min_std)

    @property
    def suspect_at(self) -> float:
        """Time from which the peer counts as suspect if nothing more arrives."""
        return self._deadline(self.cfg.y_suspect)

    @property
    def down_at(self) -> float:
        """Time from which the peer counts as down if nothing more arrives."""
        return self._deadline(self.cfg.y_down)

    def phi(self, now: float) -> float:
        """Suspicion level: -log10 P(a live peer stays silent this long)."""
        cfg = self.cfg
        std = max(self.std, cfg.min_std)
        y = (now - self.last - self.mean - cfg.acceptable_pause) / std
        p_later = 0.5 * math.erfc(y / math.sqrt(2.0))
        return -math.log10(max(p_later, 1e-300))

    def status(self, now: float) -> Status:
        if now < self.suspect_at:
            return UP
        if now < self.down_at:
            return SUSPECT
        return DOWN
