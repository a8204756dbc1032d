"""A round-based simulator of many gossip cores, to measure spread and traffic.

Theory of operation
-------------------
``N`` cores share one seeded ``random.Random``, so a run is reproducible.  The
mesh starts converged: every core holds every host's state (the same key dicts
are shared by all cores; still, each (core, host) pair costs ~0.5 KB, so
N = 1000 takes ~0.5 GB and N = 5000 ~13 GB, and the N^2 heartbeat work of a
round is ~2 s of CPU at N = 1000).  Each
round is one gossip interval: every core ticks (heartbeat, liveness), then the
cores open exchanges with ``fanout`` targets from ``pick_targets``.  Rounds
are synchronous (all Syns, then all Acks, then all Ack2s), which is the
conservative model: news learned in a round travels on only in the next one
(with staggered timers, a real host often passes it on within the same
interval).  Every message is lost with probability ``loss`` and otherwise
delivered ``delay`` rounds later; with ``delay = 0`` an exchange completes
within its round, as in a LAN where the round trip is far below the interval.

After ``warmup`` rounds (so heartbeat traffic is in its steady state) one host
changes one key; the result is the number of rounds until every core holds
that change.  Traffic is measured by encoding with msgpack, via ``to_wire()``,
every message sent by a fixed sample of hosts during the measured rounds
(encoding all of them would dominate the run time at N = 5000).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vmmesh.api.gossip import Ack, Ack2, Syn, pack_version
from vmmesh.gossip.core import GossipConfig, GossipCore

_Message = Syn | Ack | Ack2
_Envelope = tuple[str, str, _Message]


@dataclass(frozen=True)
class SimConfig:
    nodes: int
    seed: int = 0
    fanout: int = 3
    loss: float = 0.0  # per message
    delay: int = 0  # rounds a message travels
    interval: float = 0.5  # seconds per round
    warmup: int = 3
    max_rounds: int = 100  # give up after this many rounds past the change
    byte_samples: int = 16  # hosts whose sent messages are encoded and counted
    gossip: GossipConfig = field(default_factory=GossipConfig)

    def __post_init__(self) -> None:
        if self.nodes < 2 or self.fanout < 1 or self.delay < 0 or not 0 <= self.loss < 1:
            raise ValueError("need nodes >= 2, fanout >= 1, delay >= 0, 0 <= loss < 1")


@dataclass(frozen=True)
class SimResult:
    rounds: int | None  # rounds until every core held the change; None: not within max_rounds
    informed: list[int]  # cores holding the change after each round
    bytes_per_node_round: float
    messages_per_node_round: float


def node_ids(n: int, rng: random.Random) -> list[str]:
    """Random 64-bit hex ids, as certificates would give (unordered by index)."""
    ids: set[str] = set()
    while len(ids) < n:
        ids.add(f"{rng.getrandbits(64):016x}")
    return sorted(ids, key=lambda _: rng.random())


def sample_state(i: int) -> dict[str, Any]:
    """A realistic small host state: what a lab host gossips."""
    return {
        "name": f"host-{i}",
        "addr": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7400",
        "capacity": {
            "cores": 8,
            "memory_mb": 16384,
            "storage_quota_mb": 20000,
            "storage_free_mb": 15000,
            "free_vm_slots": 6,
            "free_disk_slots": 14,
            "running_vms": 2,
        },
        "templates": [
            {
                "id": f"{i:08x}{'0' * 24}",
                "base": "ab" * 16,
                "pkgs": ["python3", "perl"],
                "chain": [],
                "sizes": [],
                "parent": None,
            }
        ],
        "vms": [f"job-{i}"],
        "draining": False,
    }


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = node_ids(cfg.nodes, self.rng)
        generation = 1_700_000_000_000
        self.cores = {nid: GossipCore(nid, generation, config=cfg.gossip) for nid in self.ids}
        self.round = 0
        now = 0.0
        for i, nid in enumerate(self.ids):
            own = self.cores[nid]
            state = sample_state(i)
            for key, value in state.items():
                own.set_local(key, value)
            own.tick(now)
            # the same versions set_local and tick just gave, shared by every other core
            keys = {
                k: (pack_version(generation, j + 1), v) for j, (k, v) in enumerate(state.items())
            }
            hb = pack_version(generation, len(keys) + 1)
            for other in self.ids:
                if other != nid:
                    self.cores[other].preload(nid, hb, keys, now)
        # round -> phase (0 syn, 1 ack, 2 ack2) -> (source, destination, message)
        self._queue: dict[int, tuple[list[_Envelope], ...]] = defaultdict(lambda: ([], [], []))
        self._sampled = set(self.rng.sample(self.ids, min(cfg.byte_samples, cfg.nodes)))
        self.bytes_sent = 0
        self.messages_sent = 0
        self.counting = False

    def _send(self, phase: int, src: str, dst: str, msg: _Message) -> None:
        if self.counting and src in self._sampled:
            self.bytes_sent += len(msgpack.packb(msg.to_wire()))
            self.messages_sent += 1
        if self.cfg.loss and self.rng.random() < self.cfg.loss:
            return
        self._queue[self.round + self.cfg.delay][phase].append((src, dst, msg))

    def step(self) -> None:
        """One gossip interval: every core ticks, then opens its exchanges.

        Rounds are synchronous: all Syns go out first, then all Acks are
        answered, then all Ack2s, so what a core learns in this round's Acks
        is not in the Syns it sent in the same round.
        """
        self.round += 1
        now = self.round * self.cfg.interval
        for nid in self.ids:
            self.cores[nid].tick(now)
        order = self.ids[:]
        self.rng.shuffle(order)
        for nid in order:
            core = self.cores[nid]
            for target in core.pick_targets(self.rng, self.cfg.fanout):
                self._send(0, nid, target, core.make_syn())
        syns, acks, ack2s = self._queue[self.round]
        for src, dst, msg in syns:
            assert isinstance(msg, Syn)
            self._send(1, dst, src, self.cores[dst].on_syn(msg, src, now))
        for src, dst, msg in acks:
            assert isinstance(msg, Ack)
            self._send(2, dst, src, self.cores[dst].on_ack(msg, src, now))
        for src, dst, msg in ack2s:
            assert isinstance(msg, Ack2)
            self.cores[dst].on_ack2(msg, src, now)
        del self._queue[self.round]
        for core in self.cores.values():
            core.drain_events()

    def informed(self, origin: str, version: tuple[int, int]) -> int:
        count = 0
        for core in self.cores.values():
            held = core.version_of(origin)
            if held is not None and held >= version:
                count += 1
        return count

    def run_spread(self, key: str = "templates") -> SimResult:
        """Warm up, change ``key`` on one host, count rounds until all hold it."""
        for _ in range(self.cfg.warmup):
            self.step()
        origin = self.ids[0]
        self.cores[origin].set_local(key, [{"id": "f" * 32, "changed_at": self.round}])
        version = self.cores[origin].local_version
        self.counting = True
        informed: list[int] = []
        rounds: int | None = None
        for r in range(1, self.cfg.max_rounds + 1):
            self.step()
            informed.append(self.informed(origin, version))
            if informed[-1] == self.cfg.nodes:
                rounds = r
                break
        n_rounds = len(informed)
        samples = len(self._sampled) * n_rounds
        return SimResult(
            rounds=rounds,
            informed=informed,
            bytes_per_node_round=self.bytes_sent / samples,
            messages_per_node_round=self.messages_sent / samples,
        )


def run_spread(cfg: SimConfig) -> SimResult:
    return Simulation(cfg).run_spread()
