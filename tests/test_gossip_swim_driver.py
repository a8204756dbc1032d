"""The SWIM driver, checked against the simulator: 200 real drivers in one process.

Each driver runs its core over an in-memory datagram net that loses messages
(a seeded ``Random`` per sender) and delivers the rest after half a round
trip, jittered as ``swim_sim`` does it; the driver's own queue to its sender
task is a trio memory channel.  Under trio's autojump clock simulated seconds
cost no wall time, so every figure here is in simulated seconds, comparable
to a ``SwimSimulation`` of the same size, configuration and scenario run
beside it.  The drivers start from a converged baseline built as the
simulator builds its own.  Each core and each sender has a Random of its
own, so a seed gives one run whatever order trio wakes tasks in: the
assertions below hold for these seeds every time, not most of the time.

One run of each is compared, so the tolerance covers what a seed changes: at
N = 200 and 10 % loss over a dozen seeds, the slowest of three changes
reached every host in 0.17-0.35 s with drivers and 0.17-0.51 s in the
simulator, and a dead host was down everywhere in 2.0-3.6 s and 1.9-3.4 s
(measured before the core asked a suspect directly when its suspicion ran
out, which declares a real death about 0.5 s later).  That change and the
piggyback sends after the eager burst removed the core's rare misses (about
one change in 36 not brought to every host before the slow repair, a false
down in 1 of 10 simulated runs of 300 s): none in 600 changes and 40 runs of
300 s at N = 200 in the simulator.  Nothing here reads the wall clock.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random

import msgpack
import pytest
import trio
import trio.testing

from vmmesh.api.gossip import pack_version
from vmmesh.errors import PeerUnavailable
from vmmesh.gossip.core import EventKind, GossipEvent
from vmmesh.gossip.sim import sample_state
from vmmesh.gossip.swim import Baseline, Record, SwimCore
from vmmesh.gossip.swim_driver import MAX_DATAGRAM, Refusal, SwimDriver
from vmmesh.gossip.swim_sim import GENERATION, SwimSimConfig, SwimSimulation
from vmmesh.gossip.swim_wire import ALIVE, Alive, Ping

N = 200


class MemoryNet:
    """Datagrams between drivers in one process: lossy, delayed, in memory;
    one task delivers them all from a heap, in arrival order."""

    def __init__(self, seed: int, loss: float, rtt: float) -> None:
        self.seed = seed
        self.loss = loss
        self.rtt = rtt
        self.drivers: dict[str, SwimDriver] = {}
        self._heap: list[tuple[float, int, str, str, bytes]] = []
        self._tie = 0
        self._wake: trio.CancelScope | None = None

    def link(self, node_id: str) -> Link:
        return Link(self, node_id, Random(f"{self.seed}-{node_id}"))

    def post(self, src: str, dst: str, data: bytes, rng: Random) -> None:
        if self.loss and rng.random() < self.loss:
            return
        at = trio.current_time() + self.rtt / 2 * (0.5 + rng.random())
        self._tie += 1
        heapq.heappush(self._heap, (at, self._tie, src, dst, data))
        if self._wake is not None:
            self._wake.deadline = min(self._wake.deadline, at)

    async def deliver_forever(self) -> None:
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._wake:
                await trio.sleep_forever()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, src, dst, data = heapq.heappop(heap)
                driver = self.drivers.get(dst)
                if driver is not None:
                    driver.deliver(src, data)


@dataclass
class Link:
    net: MemoryNet
    node_id: str
    rng: Random  # its own, so that the order trio runs senders in changes nothing

    async def send(self, node_id: str, data: bytes) -> None:
        self.net.post(self.node_id, node_id, data, self.rng)


@dataclass
class Mesh:
    """N drivers over one MemoryNet, watched as ``SwimSimulation`` watches its cores."""

    cfg: SwimSimConfig
    net: MemoryNet
    drivers: list[SwimDriver] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    scopes: list[trio.CancelScope] = field(default_factory=list)
    live: list[bool] = field(default_factory=list)
    false_downs: int = 0
    watch: tuple[str, int] | None = None
    victim: str | None = None
    seen: set[int] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    suspected: list[tuple[int, str]] = field(default_factory=list)  # (observer, host)

    def bytes_out(self) -> int:
        return sum(d.stats.bytes_out for d in self.drivers)

    def observer(self, i: int) -> Callable[[GossipEvent], None]:
        def on_event(ev: GossipEvent) -> None:
            if ev.kind == EventKind.SUSPECT:
                self.suspected.append((i, ev.node_id))
            elif ev.kind == EventKind.DOWN:
                if ev.node_id == self.victim:
                    self._saw(i)
                elif ev.node_id in self.ids and self.live[self.ids.index(ev.node_id)]:
                    self.false_downs += 1
            elif ev.kind == EventKind.CHANGED and self.watch and ev.node_id == self.watch[0]:
                held = self.drivers[i].core.version_of(ev.node_id)
                if held is not None and held >= self.watch[1]:
                    self._saw(i)

        return on_event

    def _saw(self, i: int) -> None:
        self.seen.add(i)
        if len(self.seen) == sum(self.live):
            self.done.set()

    async def _wait(self, max_wait: float) -> float | None:
        start = trio.current_time()
        with trio.move_on_after(max_wait):
            await self.done.wait()
            return trio.current_time() - start
        return None

    async def change(self, i: int, max_wait: float = 20.0) -> float | None:
        """Host ``i`` publishes a value: seconds until every live host holds it."""
        driver = self.drivers[i]
        self.seen, self.done = {i}, trio.Event()
        driver.set_local("templates", [{"id": f"{i:032x}", "changed_at": trio.current_time()}])
        self.watch = (self.ids[i], driver.core.local_version)
        return await self._wait(max_wait)

    async def kill(self, i: int, max_wait: float = 20.0) -> float | None:
        """Host ``i`` stops: seconds until every live host marks it down."""
        self.seen, self.done = set(), trio.Event()
        self.victim = self.ids[i]
        self.live[i] = False
        self.scopes[i].cancel()
        return await self._wait(max_wait)


async def _run_in(
    scope: trio.CancelScope,
    driver: SwimDriver,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await driver.run(task_status=task_status)


def _cores(cfg: SwimSimConfig) -> tuple[list[str], list[SwimCore]]:
    """A converged mesh as the simulator builds it (the same states and
    baseline), each core with a Random of its own: with per-sender loss too, a
    run does not depend on the order in which trio runs tasks that wake at one
    instant, so a seed gives one run."""
    rng = Random(cfg.seed)
    ids: list[str] = []
    while len(ids) < cfg.nodes:  # no set: its order would change with the hash seed
        nid = f"{rng.getrandbits(64):016x}"
        if nid not in ids:
            ids.append(nid)
    members = {}
    for i, nid in enumerate(ids):
        state = sample_state(i)
        keys = {k: (pack_version(GENERATION, j + 1), v) for j, (k, v) in enumerate(state.items())}
        version = pack_version(GENERATION, len(keys))
        members[nid] = Record(pack_version(GENERATION, 1), ALIVE, version, keys, 0.0)
    ring = ids[:]
    Random(cfg.seed).shuffle(ring)
    base = Baseline(members, ring, cfg.nodes)
    cores = [
        SwimCore(
            nid,
            GENERATION,
            now=0.0,
            rng=Random(f"{cfg.seed}/{nid}"),
            config=cfg.swim,
            baseline=base,
        )
        for nid in ids
    ]
    return ids, cores


async def _start(nursery: trio.Nursery, cfg: SwimSimConfig) -> Mesh:
    """The mesh of ``_cores``, each core run by a real driver."""
    ids, cores = _cores(cfg)
    mesh = Mesh(cfg, MemoryNet(cfg.seed, cfg.loss, cfg.rtt), ids=ids)
    for i, (nid, core) in enumerate(zip(ids, cores, strict=True)):
        driver = SwimDriver(core, mesh.net.link(nid), on_event=mesh.observer(i))
        scope = trio.CancelScope()
        mesh.drivers.append(driver)
        mesh.scopes.append(scope)
        mesh.live.append(True)

        mesh.net.drivers[nid] = driver
        await nursery.start(_run_in, scope, driver)
    nursery.start_soon(mesh.net.deliver_forever)
    return mesh


@dataclass(frozen=True)
class Figures:
    """What ``SwimSimulation.run`` reports, in simulated seconds."""

    spread: list[float | None]
    down: float | None
    false_downs: int
    bytes_per_node_second: float


async def _scenario(cfg: SwimSimConfig) -> Figures:
    """What ``SwimSimulation.run`` does, with real drivers: warm up, three
    changes one after another, then a death."""
    async with trio.open_nursery() as nursery:
        mesh = await _start(nursery, cfg)
        await trio.sleep(5.0)
        start, sent = trio.current_time(), mesh.bytes_out()
        spread = []
        for c in range(3):
            spread.append(await mesh.change(c))
            await trio.sleep(1.0)
        down = await mesh.kill(cfg.nodes - 1)
        await trio.sleep(2.0)
        per_node_second = (mesh.bytes_out() - sent) / cfg.nodes / (trio.current_time() - start)
        nursery.cancel_scope.cancel()
    return Figures(spread, down, mesh.false_downs, per_node_second)


def _worst(spread: list[float | None]) -> float:
    assert None not in spread, spread
    return max(s for s in spread if s is not None)


@pytest.mark.parametrize("loss", [0.0, 0.1])
async def test_200_drivers_converge_as_the_simulator_does(
    loss: float, autojump_clock: trio.testing.MockClock
) -> None:
    """Changes reach every host, and a killed host is down everywhere, about
    as fast as in the simulator; bytes per host per second are alike too."""
    cfg = SwimSimConfig(nodes=N, seed=11, loss=loss)
    sim = SwimSimulation(cfg).run()
    real = await _scenario(cfg)
    print(
        f"N={N} loss={loss}: spread driver {real.spread} sim {sim.spread_seconds}; "
        f"down driver {real.down} sim {sim.down_seconds}; bytes/node/s driver "
        f"{real.bytes_per_node_second:.0f} sim {sim.bytes_per_node_second:.0f}"
    )
    assert _worst(real.spread) <= 2 * _worst(sim.spread_seconds) + 0.3
    assert _worst(real.spread) <= 2.0  # the target at N = 1000
    assert real.down is not None and sim.down_seconds is not None
    assert real.down <= 1.5 * sim.down_seconds + 1.0
    assert real.down <= 5.0  # the target at N = 1000
    assert 0.5 < real.bytes_per_node_second / sim.bytes_per_node_second < 2.0
    assert real.false_downs == sim.false_downs == 0


async def test_no_live_host_is_marked_down_at_ten_percent_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half a simulated minute at 10 % loss (a simulated second of 200 drivers
    costs about a fifth of a second of CPU; ``test_gossip_swim_sim`` runs ten
    minutes of the pure cores).  In this run a host is suspected by every
    other (the failed probe's claim spreads), refutes, and goes down nowhere."""
    cfg = SwimSimConfig(nodes=N, seed=13, loss=0.1)
    async with trio.open_nursery() as nursery:
        mesh = await _start(nursery, cfg)
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert len(mesh.suspected) > N / 2
    assert mesh.false_downs == 0
    assert all(d.core.alive_count == N for d in mesh.drivers)
    assert all(d.core.status(nid) == "up" for d in mesh.drivers for nid in mesh.ids)
    assert sum(d.stats.refused.total() for d in mesh.drivers) == 0


# --- refusals: two hosts are enough ---------------------------------------------


def _ping(sender: str, fact_about: str) -> bytes:
    msg = Ping(sender, 1, (Alive(fact_about, pack_version(GENERATION, 1)),))
    data = msgpack.packb(msg.to_wire())
    assert isinstance(data, bytes)
    return data


async def test_garbage_and_forged_senders_are_refused_counted_and_logged_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh.gossip.swim_driver")
    cfg = SwimSimConfig(nodes=3, seed=5)
    stranger = "00000000000000ff"
    async with trio.open_nursery() as nursery:
        mesh = await _start(nursery, cfg)
        await trio.sleep(1.0)
        a, b, c = mesh.ids
        driver = mesh.drivers[0]
        for junk in (b"\xc1", b"", msgpack.packb([1, "ping"]), msgpack.packb({"a": 1})):
            assert isinstance(junk, bytes)
            driver.deliver(b, junk)
        driver.deliver(c, b"\x92\x01")  # truncated msgpack
        driver.deliver(b, bytes(MAX_DATAGRAM + 1))
        driver.deliver(b, _ping(c, stranger))  # b claims to be c
        assert driver.stats.refused == {Refusal.MALFORMED: 6, Refusal.FORGED: 1}
        assert driver.core.incarnation_of(stranger) is None  # nothing of it was applied
        driver.deliver(b, _ping(b, stranger))  # the same facts, honestly sent
        assert driver.core.incarnation_of(stranger) is not None
        driver.remove(c)
        driver.deliver(c, _ping(c, stranger))
        assert driver.stats.refused[Refusal.REVOKED] == 1
        await trio.sleep(5.0)  # the driver is still running, and so is the mesh
        assert mesh.drivers[1].core.status(a) == "up"
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings  # (b, malformed), (c, malformed), (b, forged), (c, revoked)
    assert len([r for r in caplog.records if "malformed message" in r.getMessage()]) == 6


class _Unreachable:
    async def send(self, node_id: str, data: bytes) -> None:
        raise PeerUnavailable(f"no route to {node_id}")


async def test_a_send_that_fails_is_counted_and_is_loss_to_the_core(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ids, cores = _cores(SwimSimConfig(nodes=2, seed=6))
    events: list[GossipEvent] = []
    driver = SwimDriver(cores[0], _Unreachable(), on_event=events.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert driver.stats.send_failures > 0
    assert driver.stats.messages_out > 0
    assert [(e.kind, e.node_id) for e in events][:2] == [
        (EventKind.SUSPECT, ids[1]),
        (EventKind.DOWN, ids[1]),
    ]


class _Stuck:
    async def send(self, node_id: str, data: bytes) -> None:
        await trio.sleep_forever()


async def test_a_stuck_transport_costs_datagrams_not_timers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The send queue is bounded: what does not fit is dropped and counted,
    and the core's timers keep running (its probes fail, as over a dead link)."""
    ids, cores = _cores(SwimSimConfig(nodes=2, seed=7))
    events: list[GossipEvent] = []
    driver = SwimDriver(cores[0], _Stuck(), on_event=events.append, outbox=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert driver.stats.dropped > 0
    assert (EventKind.DOWN, ids[1]) in [(e.kind, e.node_id) for e in events]
