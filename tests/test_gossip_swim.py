"""The pure SWIM core: dissemination and repair under any delivery, refutation,
Lifeguard's suspicion timeout, checked values, revocation and restarts."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmesh.api.gossip import Delta, pack_version
from vmmesh.errors import MalformedMessage, NotFound, Revoked
from vmmesh.gossip.core import EventKind
from vmmesh.gossip.swim import Baseline, Record, SwimConfig, SwimCore
from vmmesh.gossip.swim_wire import (
    ALIVE,
    Ack,
    Alive,
    Dead,
    Gossip,
    Message,
    News,
    Ping,
    Suspect,
    Sync,
    decode,
)

IDS = [f"{i:02x}" * 8 for i in range(1, 9)]
A, B, C = IDS[0], IDS[1], IDS[2]
# slow probes (nothing is suspected in these tests), fast gossip
QUIET: dict[str, Any] = {"probe_interval": 1000.0, "probe_timeout": 500.0, "gossip_interval": 0.001}


def mesh(n: int, seed: int = 0, **cfg: Any) -> list[SwimCore]:
    rng = random.Random(seed)
    config = SwimConfig(**{**QUIET, **cfg})
    cores = [SwimCore(IDS[i], 1000, now=0.0, rng=rng, config=config) for i in range(n)]
    for c in cores:
        for other in cores:
            c.join(other.node_id, 0.0)
    return cores


def converged(cores: list[SwimCore]) -> bool:
    return all(
        other.version_of(c.node_id) in (c.local_version, 0 if c.state_of(c.node_id) == {} else -1)
        and other.state_of(c.node_id) == c.state_of(c.node_id)
        for c in cores
        for other in cores
    )


def wire(msg: Message) -> Message:
    """What the peer gets: encoded, sent as msgpack, decoded and checked."""
    return decode(msgpack.unpackb(msgpack.packb(msg.to_wire())))


def deliver_all(cores: list[SwimCore], pending: list[tuple[str, Message]], now: float) -> None:
    by_id = {c.node_id: c for c in cores}
    while pending:
        dst, msg = pending.pop(0)
        pending += by_id[dst].receive(wire(msg), now)


# (op, core, argument): write a key, tick a core, deliver / duplicate / drop a message
OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "tick", "deliver", "dup", "drop"]),
        st.integers(0, 2),
        st.integers(0, 50),
    ),
    max_size=60,
)


def _play(cores: list[SwimCore], ops: list[tuple[str, int, int]], losses: bool) -> float:
    """Run the ops with messages held in a pool; returns the time reached."""
    pool: list[tuple[str, Message]] = []
    by_id = {c.node_id: c for c in cores}
    now = 0.0
    for op, i, arg in ops:
        now += 0.01
        if op == "write":
            cores[i].set_local(f"k{arg % 4}", arg)
        elif op == "tick":
            pool += cores[i].tick(now)
        elif pool and op in ("deliver", "dup"):
            dst, msg = pool[arg % len(pool)] if op == "dup" else pool.pop(arg % len(pool))
            pool += by_id[dst].receive(wire(msg), now)
        elif pool and op == "drop" and losses:
            pool.pop(arg % len(pool))
    for dst, msg in reversed(pool):  # what is left arrives, last sent first
        pool2 = by_id[dst].receive(wire(msg), now)
        deliver_all(cores, pool2, now)
    return now


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_dissemination_converges_in_any_order_with_duplicates(ops: list[Any]) -> None:
    """No repair at all: news alone (and the pulls its gaps cause) converge."""
    cores = mesh(3, sync_interval=1e6, forget_after=1e6, tombstone_ttl=1e6)
    now = _play(cores, ops, losses=False)
    for _ in range(10):  # the queued news goes out until its retransmits are spent
        now += 0.01
        for c in cores:
            deliver_all(cores, c.tick(now), now)
    assert converged(cores)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_repair_converges_after_any_loss(ops: list[Any]) -> None:
    """Lost news, lost pulls, lost repair messages: the next repairs fix it."""
    cores = mesh(3, sync_interval=0.2)
    now = _play(cores, ops, losses=True)
    for _ in range(20):  # quiet time, nothing lost: every core syncs every 0.2 s
        now += 0.1
        for c in cores:
            deliver_all(cores, c.tick(now), now)
    assert converged(cores)


def test_news_with_a_gap_is_pulled_from_the_relay() -> None:
    a, b = mesh(2, sync_interval=1e6)
    a.set_local("name", "alpha")
    first = a.tick(0.01)
    a.set_local("name", "alpha2")
    a.set_local("vms", ["x"])
    second = a.tick(0.02)
    assert first and second
    out = b.receive(second[0][1], 0.02)  # the later news first: b has a gap
    assert any(type(m).__name__ == "Want" for _, m in out)
    deliver_all([a, b], out, 0.02)
    assert b.state_of(A) == {"name": "alpha2", "vms": ["x"]}
    b.receive(first[0][1], 0.03)  # the old news, late: stale, ignored
    assert b.state_of(A) == {"name": "alpha2", "vms": ["x"]}


def test_suspected_host_refutes_with_a_higher_incarnation() -> None:
    a, b = mesh(2)
    inc = b.incarnation
    a.receive(Gossip(C, (Alive(B, inc), Suspect(B, inc, A))), 0.0)
    assert a.status(B) == "suspect"
    out = b.receive(Gossip(A, (Suspect(B, inc, A),)), 0.0)
    assert b.incarnation > inc
    out += b.tick(0.01)
    deliver_all([a, b], [(d, m) for d, m in out if d == A], 0.01)
    assert a.status(B) == "up"
    assert a.incarnation_of(B) == b.incarnation
    # an old dead claim does not beat the refutation
    a.receive(Gossip(C, (Dead(B, inc, C),)), 0.02)
    assert a.status(B) == "up"


def _big_core(n: int) -> tuple[SwimCore, list[str]]:
    ids = [f"{i:016x}" for i in range(1, n + 1)]
    members = {nid: Record(pack_version(5, 1), ALIVE, 0, {}, 0.0) for nid in ids}
    base = Baseline(members, ids, n)
    return SwimCore(ids[0], 5, now=0.0, rng=random.Random(1), baseline=base), ids


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    cfg = SwimConfig()
    low = cfg.suspicion_mult * 2 * cfg.gossip_interval  # log10(100) = 2
    high = low * cfg.suspicion_max_mult
    lone, ids = _big_core(100)
    inc = pack_version(5, 1)
    lone.receive(Gossip(ids[2], (Suspect(ids[1], inc, ids[2]),)), 0.0)
    lone.tick(low + 0.01)
    assert lone.status(ids[1]) == "suspect"  # one accuser: the long timeout
    _run_out(lone, high + 0.01)
    assert lone.status(ids[1]) == "down"

    confirmed, ids = _big_core(100)
    for by in ids[2:6]:  # the first suspicion and three independent confirmations
        confirmed.receive(Gossip(by, (Suspect(ids[1], inc, by),)), 0.0)
    _run_out(confirmed, low + 0.01)
    assert confirmed.status(ids[1]) == "down"
    kinds = [e.kind for e in confirmed.drain_events() if e.node_id == ids[1]]
    assert kinds == [EventKind.SUSPECT, EventKind.DOWN]


def _run_out(core: SwimCore, at: float) -> None:
    """Tick at ``at`` and through the direct asks that follow a timeout; none is answered."""
    cfg = core.config
    for k in range(cfg.suspicion_asks + 1):
        core.tick(at + k * cfg.probe_timeout)


def test_a_refused_value_is_not_stored_nor_relayed() -> None:
    def check(key: str, value: object, held: int) -> None:
        if key == "name" and not isinstance(value, str):
            raise MalformedMessage("name is not a string")

    rng = random.Random(0)
    b = SwimCore(B, 1000, now=0.0, rng=rng, config=SwimConfig(**QUIET), check=check)
    b.join(A, 0.0)
    b.drain_events()
    bad = News(A, 0, (_delta(A, "name", pack_version(7, 1), 42),))
    b.receive(Gossip(A, (bad,)), 0.0)
    assert b.state_of(A) == {}
    refused = [e for e in b.drain_events() if e.kind == EventKind.REFUSED]
    assert refused and refused[0].via == A and "string" in refused[0].reason
    assert b.pending_facts == 1  # only its own Alive: the bad news is not relayed


def _delta(nid: str, key: str, version: int, value: Any) -> Delta:
    return Delta(nid, key, version, value)


def test_revoked_host_is_refused_and_not_brought_back() -> None:
    a, b, c = mesh(3, sync_interval=0.2)
    a.remove(C)
    with pytest.raises(Revoked):
        a.receive(Ping(C, 1, ()), 0.0)
    a.receive(Gossip(B, (Alive(C, c.incarnation + 5),)), 0.0)
    a.receive(Sync(B, b._entries()), 0.0)
    with pytest.raises(NotFound):
        a.status(C)
    assert C not in a.members()


def test_a_claim_about_us_above_our_own_is_outnumbered() -> None:
    a, b = mesh(2)
    a.set_local("name", "alpha")
    forged = News(A, 0, (_delta(A, "name", pack_version(2000, 5), "forged"),))
    b.receive(Gossip(A, (forged,)), 0.0)
    a.receive(Gossip(B, (forged, Alive(A, pack_version(2000, 9)))), 0.0)
    assert a.local_version > pack_version(2000, 5)
    assert a.incarnation > pack_version(2000, 9)
    deliver_all([a, b], a.tick(0.01), 0.01)
    assert b.state_of(A) == {"name": "alpha"}
    assert b.status(A) == "up"


def test_every_message_encodes_with_msgpack() -> None:
    a, _ = mesh(2, sync_interval=0.0001)
    a.set_local("capacity", {"cores": 4})
    out = a.tick(1.0) + a.tick(1.001)
    assert out
    for _, msg in out:
        assert isinstance(msgpack.unpackb(msgpack.packb(msg.to_wire())), list)


def test_a_shared_ring_walk_probes_every_member_once_per_walk() -> None:
    """Cores share one ring but start at random places in it; each still
    probes every member once before any twice (a walk that wrapped at the
    ring's end instead of its own start left members unprobed for long)."""
    core, ids = _big_core(50)
    cfg = core.config
    targets: list[str] = []
    now = 0.0
    while len(targets) < 2 * 49:
        now += cfg.probe_interval
        for dst, msg in core.tick(now):
            if isinstance(msg, Ping):
                targets.append(dst)
                core.receive(Ack(dst, msg.seq, ()), now)
    assert sorted(targets[:49]) == sorted(ids[1:])
    assert sorted(targets[49:]) == sorted(ids[1:])


def _advance(cores: list[SwimCore], start: float, end: float, linked: bool) -> float:
    """Tick every core every 50 ms from ``start`` to ``end``; deliver what they send
    while ``linked``, lose all of it while not.  The time reached."""
    now = start
    while now < end:
        out: list[tuple[str, Message]] = []
        for c in cores:
            out += c.tick(now)
        if linked:
            deliver_all(cores, out, now)
        now += 0.05
    return now


def test_both_sides_of_a_healed_partition_come_back_to_each_other() -> None:
    """Nobody probes a dead host: after a partition long enough for each side to mark
    the other down and forget it, the reconnect Sync brings both back (it used to
    leave them dead to each other for good)."""
    rng = random.Random(7)
    a, b = (SwimCore(n, 1000, now=0.0, rng=rng) for n in (A, B))
    a.join(B, 0.0)
    b.join(A, 0.0)
    now = _advance([a, b], 0.0, 5.0, linked=True)
    assert a.status(B) == b.status(A) == "up"
    now = _advance([a, b], now, now + 90.0, linked=False)  # forgotten after 60 s
    assert B not in a.members() and A not in b.members()
    healed = now
    while a.status(B) != "up" or b.status(A) != "up":
        assert now - healed < 4 * SwimConfig().reconnect_interval, "still apart"
        now = _advance([a, b], now, now + 0.5, linked=True)
    # and one seen again (discovery, an inbound link) is asked at once
    now = _advance([a, b], now, now + 30.0, linked=False)
    assert a.status(B) == "down"
    a.join(B, now)
    _advance([a, b], now, now + 0.2, linked=True)
    assert a.status(B) == b.status(A) == "up"
