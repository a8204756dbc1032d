"""An event-driven simulator of many SWIM cores, at the size of a campus.

Theory of operation
-------------------
``N`` ``SwimCore``s share one seeded ``random.Random`` and one event heap
ordered by simulated time, so a run is reproducible.  Each core has its own
timers, started at a random phase (probe, gossip and repair intervals are
staggered as on real hosts): the heap holds one wake-up per core, at the
core's ``next_deadline``, and every message in flight.  A message is lost
with probability ``loss`` and otherwise arrives after half a round trip,
jittered by +-50 % (``rtt``).  Nothing happens in rounds; results are in
seconds, and in gossip intervals as "rounds" for comparison with ``sim``.

Memory is linear in N: the mesh starts converged from one ``Baseline`` (one
immutable record per host and one probe ring) that every core shares, and a
core stores only where it differs from it.  A change that reaches everyone
costs one record per core, which is the news itself.

Traffic is counted by msgpack-encoding (``to_wire``) every message sent by a
sample of hosts (all of them unless ``byte_samples`` says otherwise) while
``counting`` is on.  ``run`` measures what a user waits for: after a warm-up,
a few hosts change one key each (seconds until every live core holds it),
then one host dies (seconds until every live core marks it down); every
"down" of a host that is alive is counted as a false down, over the whole
run.  What can fail: a change or a death not seen everywhere within
``max_wait`` is reported as ``None``, not waited for.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vmmesh.api.gossip import pack_version
from vmmesh.errors import Revoked
from vmmesh.gossip.core import EventKind, GossipEvent
from vmmesh.gossip.sim import node_ids, sample_state
from vmmesh.gossip.swim import Baseline, Record, SwimConfig, SwimCore
from vmmesh.gossip.swim_wire import ALIVE, Message

GENERATION = 1_700_000_000_000
# time, tie-breaker, core index, message (None: a wake-up)
_Event = tuple[float, int, int, Message | None]


@dataclass(frozen=True)
class SwimSimConfig:
    nodes: int
    seed: int = 0
    loss: float = 0.0  # per message
    rtt: float = 0.002  # mean round trip in seconds
    byte_samples: int | None = None  # hosts whose messages are encoded; None: every host
    swim: SwimConfig = field(default_factory=SwimConfig)

    def __post_init__(self) -> None:
        if self.nodes < 2 or not 0 <= self.loss < 1 or self.rtt < 0:
            raise ValueError("need nodes >= 2, 0 <= loss < 1, rtt >= 0")


@dataclass(frozen=True)
class SwimSimResult:
    spread_seconds: list[float | None]  # per change: until every live core held it
    down_seconds: float | None  # from the death until every live core marked it down
    false_downs: int  # downs of live hosts, counted per (observer, host)
    bytes_per_node_second: float
    messages_per_node_second: float
    simulated_seconds: float
    round_seconds: float  # one gossip interval: a "round" for comparison with ``sim``

    @property
    def spread_rounds(self) -> list[float | None]:
        return [None if s is None else s / self.round_seconds for s in self.spread_seconds]


class SwimSimulation:
    def __init__(self, cfg: SwimSimConfig) -> None:
        self.cfg = cfg
        self.rng = rng = random.Random(cfg.seed)
        self.ids = node_ids(cfg.nodes, rng)
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        members: dict[str, Record] = {}
        for i, nid in enumerate(self.ids):
            state = sample_state(i)
            keys = {
                k: (pack_version(GENERATION, j + 1), v) for j, (k, v) in enumerate(state.items())
            }
            version = pack_version(GENERATION, len(keys))
            members[nid] = Record(pack_version(GENERATION, 1), ALIVE, version, keys, 0.0)
        ring = self.ids[:]
        rng.shuffle(ring)
        base = Baseline(members, ring, cfg.nodes)
        self.cores = [
            SwimCore(nid, GENERATION, now=0.0, rng=rng, config=cfg.swim, baseline=base)
            for nid in self.ids
        ]
        self.live = [True] * cfg.nodes
        self.now = 0.0
        self._heap: list[_Event] = []
        self._tie = 0
        self._wake_at = [math.inf] * cfg.nodes
        for i in range(cfg.nodes):
            self._reschedule(i, 0.0)
        n_samples = cfg.nodes if cfg.byte_samples is None else min(cfg.byte_samples, cfg.nodes)
        self._sampled = set(rng.sample(range(cfg.nodes), n_samples))
        self.n_sampled = n_samples
        self.counting = False
        self.bytes_sent = 0
        self.messages_sent = 0
        self.false_downs = 0
        self._watch: tuple[int, int] | None = None  # (origin index, version) of a change
        self._informed: set[int] = set()
        self._victim: int | None = None
        self._downs: set[int] = set()
        self.done_at: float | None = None  # when the watched change or death was seen by all

    # --- the event loop ---------------------------------------------------------

    def _reschedule(self, i: int, now: float) -> None:
        t = self.cores[i].next_deadline()
        if t < self._wake_at[i]:
            self._wake_at[i] = t
            self._tie += 1
            heapq.heappush(self._heap, (max(t, now), self._tie, i, None))

    def run_until(self, until: float) -> None:
        heap = self._heap
        cores, live, wake_at = self.cores, self.live, self._wake_at
        while heap and heap[0][0] <= until:
            t, _, i, msg = heapq.heappop(heap)
            if not live[i]:
                continue
            self.now = t
            core = cores[i]
            if msg is None:
                if wake_at[i] > t:
                    continue  # a wake-up that a later one replaced
                wake_at[i] = math.inf
                out = core.tick(t)
            else:
                try:
                    out = core.receive(msg, t)
                except Revoked:
                    continue
            if out:
                self._send(i, out, t)
            if core.has_events:
                self._observe(i, core.drain_events())
            self._reschedule(i, t)
        self.now = until

    def _send(self, src: int, out: list[tuple[str, Message]], now: float) -> None:
        cfg = self.cfg
        rng = self.rng
        if self.counting and src in self._sampled:
            for _, msg in out:
                self.bytes_sent += len(msgpack.packb(msg.to_wire()))
            self.messages_sent += len(out)
        half = cfg.rtt / 2
        for dst, msg in out:
            if cfg.loss and rng.random() < cfg.loss:
                continue
            j = self.index.get(dst)
            if j is None:
                continue
            self._tie += 1
            heapq.heappush(self._heap, (now + half * (0.5 + rng.random()), self._tie, j, msg))

    def _observe(self, i: int, events: list[GossipEvent]) -> None:
        for ev in events:
            if ev.kind == EventKind.DOWN:
                j = self.index.get(ev.node_id)
                if j is not None and self.live[j]:
                    self.false_downs += 1
                elif j == self._victim:
                    self._downs.add(i)
                    if len(self._downs) == self.live_count and self.done_at is None:
                        self.done_at = self.now
            elif ev.kind == EventKind.CHANGED and self._watch is not None:
                origin, version = self._watch
                if ev.node_id == self.ids[origin]:
                    held = self.cores[i].version_of(ev.node_id)
                    if held is not None and held >= version:
                        self._informed.add(i)
                        if len(self._informed) == self.live_count and self.done_at is None:
                            self.done_at = self.now

    @property
    def live_count(self) -> int:
        return sum(self.live)

    # --- what happens to hosts -------------------------------------------------

    def change(self, i: int, key: str, value: Any) -> None:
        """Host ``i`` publishes a value; watch it until every live core holds it."""
        core = self.cores[i]
        core.set_local(key, value)
        self._watch = (i, core.local_version)
        self._informed = {i}
        self.done_at = None
        self._reschedule(i, self.now)

    def kill(self, i: int) -> None:
        """Host ``i`` stops: it sends nothing and what reaches it is lost."""
        self.live[i] = False
        self._victim = i
        self._downs = set()
        self.done_at = None

    def restart(self, i: int, generation: int, seed: int) -> None:
        """Host ``i`` comes back with a new generation, knowing only host ``seed``."""
        core = SwimCore(self.ids[i], generation, now=self.now, rng=self.rng, config=self.cfg.swim)
        for k, v in sample_state(i).items():
            core.set_local(k, v)
        core.join(self.ids[seed], self.now)
        self.cores[i] = core
        self.live[i] = True
        self._wake_at[i] = math.inf
        self._reschedule(i, self.now)

    def revoke(self, i: int) -> None:
        """Every other host removes host ``i``; it keeps running and talking."""
        for j, core in enumerate(self.cores):
            if j != i:
                core.remove(self.ids[i])
                self._reschedule(j, self.now)

    def _wait(self, deadline: float) -> float | None:
        """Run until the watched change or death is seen by all, or ``deadline``."""
        start = self.now
        step = self.cfg.swim.gossip_interval
        while self.done_at is None and self.now < deadline:
            self.run_until(min(self.now + step, deadline))
        return None if self.done_at is None else self.done_at - start

    def run(
        self, *, warmup: float = 5.0, changes: int = 3, max_wait: float = 20.0, kill: bool = True
    ) -> SwimSimResult:
        """Warm up, make ``changes`` changes one after another, then kill a host."""
        self.run_until(warmup)
        self.counting = True
        start = self.now
        spread: list[float | None] = []
        for c in range(changes):
            self.change(c, "templates", [{"id": f"{c:032x}", "changed_at": self.now}])
            spread.append(self._wait(self.now + max_wait))
            self.run_until(self.now + 1.0)  # the tail of the news, counted in the bytes
        down: float | None = None
        if kill:
            self.kill(self.cfg.nodes - 1)
            down = self._wait(self.now + max_wait)
            self.run_until(self.now + 2.0)
        seconds = self.now - start
        samples = self.n_sampled * seconds
        return SwimSimResult(
            spread_seconds=spread,
            down_seconds=down,
            false_downs=self.false_downs,
            bytes_per_node_second=self.bytes_sent / samples,
            messages_per_node_second=self.messages_sent / samples,
            simulated_seconds=self.now,
            round_seconds=self.cfg.swim.gossip_interval,
        )


def run(cfg: SwimSimConfig) -> SwimSimResult:
    return SwimSimulation(cfg).run()
