"""What this host has measured: builds and transfers, and the estimates made from them.

Fetch or install (issue 8, thesis §5.3) is decided per case from figures this
host measured, not from constants: each template build records its phases
(boot, ``apt-get update``, download bytes and seconds as apt reports them,
unpack, power-off) and each transfer its bytes, seconds and holders.  The
last ``KEEP`` of each are kept in the store's ``meta`` table, so a restarted
node keeps its experience.

``install_estimate`` is the median boot + update + power-off, plus per
package the median download time (bytes per package over the download rate,
divided among the hosts that download from the same source at once) and the
median unpack time.  ``transfer_rate`` is the median of recent transfers.
Before the first sample the defaults below stand in (figures of a TCG guest
here, the pessimistic side); the answer says which were defaults.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

KEEP = 20
DEFAULT_BOOT = 20.0
DEFAULT_UPDATE = 5.0
DEFAULT_SHUTDOWN = 4.0
DEFAULT_UNPACK_PER_PACKAGE = 6.0
DEFAULT_BYTES_PER_PACKAGE = 1.5e6
DEFAULT_DOWNLOAD_RATE = 5e6
DEFAULT_TRANSFER_RATE = 20e6
TRANSFER_OVERHEAD = 1.0  # seconds: asking, verifying, recording


@dataclass(frozen=True)
class BuildSample:
    """One template build, as measured."""

    boot: float
    update: float
    install: float  # the whole `apt-get install`, download included
    shutdown: float
    packages: int
    download_bytes: int = 0
    download_seconds: float = 0.0
    delta_bytes: int = 0


@dataclass(frozen=True)
class TransferSample:
    """One blob fetched from peers."""

    bytes: int
    seconds: float
    holders: int = 1


@dataclass(frozen=True)
class Estimate:
    seconds: float
    measured: bool  # False: made from defaults, no sample yet


def _median(values: Iterable[float], default: float) -> tuple[float, bool]:
    vals = [v for v in values if v > 0]
    return (statistics.median(vals), True) if vals else (default, False)


def install_estimate(samples: list[BuildSample], packages: int, downloaders: int = 1) -> Estimate:
    """Seconds to build a template installing ``packages`` packages here.

    ``downloaders`` is how many hosts fetch from the package source at once
    (the source's bandwidth is shared among them).
    """
    boot, m1 = _median((s.boot for s in samples), DEFAULT_BOOT)
    update, m2 = _median((s.update for s in samples), DEFAULT_UPDATE)
    shutdown, _ = _median((s.shutdown for s in samples), DEFAULT_SHUTDOWN)
    per_pkg_bytes, _ = _median(
        (s.download_bytes / s.packages for s in samples if s.packages), DEFAULT_BYTES_PER_PACKAGE
    )
    rate, _ = _median(
        (s.download_bytes / s.download_seconds for s in samples if s.download_seconds),
        DEFAULT_DOWNLOAD_RATE,
    )
    unpack, m3 = _median(
        (max(0.0, s.install - s.download_seconds) / s.packages for s in samples if s.packages),
        DEFAULT_UNPACK_PER_PACKAGE,
    )
    download = packages * per_pkg_bytes / (rate / max(1, downloaders))
    seconds = boot + update + download + packages * unpack + shutdown
    return Estimate(seconds, m1 and m2 and m3)


def transfer_rate(samples: list[TransferSample]) -> Estimate:
    """Bytes per second this host gets from its peers (median of recent transfers)."""
    rate, measured = _median(
        (s.bytes / s.seconds for s in samples if s.seconds > 0 and s.bytes > 1 << 20),
        DEFAULT_TRANSFER_RATE,
    )
    return Estimate(rate, measured)


def fetch_estimate(
    samples: list[TransferSample], missing_bytes: int, wait: float = 0.0
) -> Estimate:
    """Seconds to have a template by fetching ``missing_bytes``, after ``wait`` seconds
    (a holder still building it)."""
    rate = transfer_rate(samples)
    return Estimate(wait + TRANSFER_OVERHEAD + missing_bytes / rate.seconds, rate.measured)


class History:
    """The samples, kept in the store's ``meta`` table (``get``/``set`` are ``Store.get_meta``
    and ``Store.set_meta``)."""

    def __init__(self, get: Callable[[str, Any], Any], set_: Callable[[str, Any], None]) -> None:
        self._get = get
        self._set = set_

    def builds(self) -> list[BuildSample]:
        return _load(self._get("build_history", []), BuildSample)

    def transfers(self) -> list[TransferSample]:
        return _load(self._get("transfer_history", []), TransferSample)

    def add_build(self, sample: BuildSample) -> None:
        self._set("build_history", [asdict(s) for s in [*self.builds(), sample][-KEEP:]])

    def add_transfer(self, sample: TransferSample) -> None:
        self._set("transfer_history", [asdict(s) for s in [*self.transfers(), sample][-KEEP:]])


def _load(raw: object, cls: type[Any]) -> list[Any]:
    """Samples from the store, skipping any a schema change made unreadable."""
    names = {f.name for f in fields(cls)}
    out = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict):
            try:
                out.append(cls(**{k: v for k, v in item.items() if k in names}))
            except TypeError:
                continue
    return out
