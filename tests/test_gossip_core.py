"""The pure Scuttlebutt core: reconciliation, wire shape, authority, forgetting."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmesh.api.gossip import Ack, Ack2, Delta, Syn, pack_version
from vmmesh.errors import MalformedMessage, NotFound, Revoked, UsageError
from vmmesh.gossip.core import EventKind, GossipConfig, GossipCore

IDS = [f"{i:02x}" * 8 for i in range(1, 9)]
A, B, C = IDS[0], IDS[1], IDS[2]


def core(nid: str, generation: int = 1000, **cfg: Any) -> GossipCore:
    return GossipCore(nid, generation, config=GossipConfig(**cfg))


def wire(msg: Syn | Ack | Ack2) -> Any:
    return msgpack.unpackb(msgpack.packb(msg.to_wire()))


def exchange(a: GossipCore, b: GossipCore, now: float = 0.0) -> None:
    """A full Syn/Ack/Ack2 exchange from a to b, through the wire encoding."""
    syn = Syn.from_wire(wire(a.make_syn()))
    ack = Ack.from_wire(wire(b.on_syn(syn, a.node_id, now)))
    ack2 = Ack2.from_wire(wire(a.on_ack(ack, b.node_id, now)))
    b.on_ack2(ack2, a.node_id, now)


def converged(cores: list[GossipCore]) -> bool:
    return all(
        other.version_of(c.node_id) == c.version_of(c.node_id)
        and other.state_of(c.node_id) == c.state_of(c.node_id)
        for c in cores
        for other in cores
    )


def test_two_nodes_exchange_state_both_ways() -> None:
    a, b = core(A), core(B)
    a.set_local("name", "alpha")
    b.set_local("capacity", {"cores": 4})
    a.learn(B, 0.0)
    exchange(a, b)
    assert b.state_of(A) == {"name": "alpha"}
    assert a.state_of(B) == {"capacity": {"cores": 4}}
    assert converged([a, b])


def test_change_spreads_through_a_third_node() -> None:
    a, b, c = core(A), core(B), core(C)
    a.set_local("templates", [1])
    a.learn(B, 0.0)
    b.learn(C, 0.0)
    exchange(a, b)
    exchange(b, c)
    assert c.state_of(A) == {"templates": [1]}
    a.set_local("templates", [1, 2])
    exchange(c, b)  # c is behind: b has nothing new yet
    exchange(a, b)
    exchange(c, b)
    assert c.state_of(A) == {"templates": [1, 2]}


def test_unchanged_value_does_not_bump_version() -> None:
    a = core(A)
    a.set_local("name", "x")
    v = a.local_version
    a.set_local("name", "x")
    assert a.local_version == v
    a.set_local("name", "y")
    assert a.local_version > v


@pytest.mark.parametrize("key", ["hb", "", "Name", "a/b", "x" * 40])
def test_bad_local_keys_are_refused(key: str) -> None:
    with pytest.raises(UsageError):
        core(A).set_local(key, 1)


def test_messages_round_trip_the_wire() -> None:
    a = core(A)
    a.set_local("name", "n")
    a.tick(0.0)
    syn = a.make_syn()
    assert Syn.from_wire(wire(syn)) == syn
    mixed = Syn(
        A,
        {A: pack_version(5, 9), B: 0, C: pack_version(3, 1)},
        {A: pack_version(6, 2), B: pack_version(4, 4), C: 0},
    )
    assert Syn.from_wire(wire(mixed)) == mixed
    assert [len(e) for e in mixed.to_wire()["digest"]] == [5, 4, 4]
    ack = Ack(A, (Delta(B, "name", pack_version(7, 3), {"x": [1]}),), {C: 0}, {B: 5})
    assert Ack.from_wire(wire(ack)) == ack
    ack2 = Ack2(A, (Delta(C, "vms", pack_version(1, 1), ["vm1"]),))
    assert Ack2.from_wire(wire(ack2)) == ack2


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"v": 2, "t": "syn", "from": A, "digest": []},
        {"v": 1, "t": "ack", "from": A, "digest": []},
        {"v": 1, "t": "syn", "from": "../etc", "digest": []},
        {"v": 1, "t": "syn", "from": A, "digest": {}},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, 1, 2]]},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, 1, 2, 3, 4, 5]]},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, 1, -2, 0, 0]]},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, 1, 2, "x"]]},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, True, 2, 0, 0]]},
        {"v": 1, "t": "syn", "from": A, "digest": [[A, 1, 2**32, 0, 0]]},
        {"v": 1, "t": "syn", "from": A, "digest": [["XYZ", 1, 2, 0, 0]]},
    ],
)
def test_malformed_syn_is_refused(body: Any) -> None:
    with pytest.raises(MalformedMessage):
        Syn.from_wire(body)


@pytest.mark.parametrize(
    "deltas",
    [
        "x",
        [[A, "name", 1, 1]],
        [[A, "../x", 1, 1, None]],
        [[A, 7, 1, 1, None]],
        [[A, "name", 1, 1, None]] * 10_001,
    ],
)
def test_malformed_deltas_are_refused(deltas: Any) -> None:
    with pytest.raises(MalformedMessage):
        Ack2.from_wire({"v": 1, "t": "ack2", "from": A, "deltas": deltas})
    with pytest.raises(MalformedMessage):
        Ack.from_wire({"v": 1, "t": "ack", "from": A, "deltas": deltas, "request": [], "beats": []})


def test_messages_carry_at_most_max_deltas_and_still_converge() -> None:
    big = core(A, max_deltas=5)
    for i, nid in enumerate(IDS[2:]):
        other = core(nid)
        for k in ("name", "addr", "vms"):
            other.set_local(k, f"{k}{i}")
        big.learn(nid, 0.0)
        exchange(big, other)
    fresh = core(B, max_deltas=5)
    big.learn(B, 0.0)
    rounds = 0
    while fresh.state_of(IDS[-1]) if IDS[-1] in {m.node_id for m in fresh.members(0.0)} else True:
        syn = fresh.make_syn()
        ack = big.on_syn(syn, B, 0.0)
        assert len(ack.deltas) <= 5
        ack2 = fresh.on_ack(ack, A, 0.0)
        big.on_ack2(ack2, B, 0.0)
        rounds += 1
        if all(fresh.version_of(n) == big.version_of(n) for n in IDS[2:]):
            break
        assert rounds < 20
    assert rounds > 1
    for nid in IDS[2:]:
        assert fresh.state_of(nid) == big.state_of(nid)


def test_restart_with_new_generation_supersedes_old_state() -> None:
    a, b = core(A, generation=1000), core(B)
    a.set_local("name", "old")
    a.set_local("vms", ["vm1"])
    for _ in range(50):
        a.set_local("vms", [f"vm{_}"])
    a.learn(B, 0.0)
    exchange(a, b)
    reborn = core(A, generation=2000)
    reborn.set_local("name", "new")
    reborn.learn(B, 1.0)
    b.drain_events()
    exchange(reborn, b, 1.0)
    assert b.state_of(A) == {"name": "new"}
    changed = [e for e in b.drain_events() if e.kind == EventKind.CHANGED]
    assert changed and changed[0].keys == {"name", "vms"}


def test_node_is_the_authority_on_itself() -> None:
    a, b = core(A), core(B)
    a.set_local("name", "real")
    a.learn(B, 0.0)
    exchange(a, b)
    forged = Ack2(C, (Delta(A, "name", pack_version(1000, 500), "forged"),))
    b.on_ack2(forged, C, 0.0)
    assert b.state_of(A) == {"name": "forged"}
    exchange(b, a)  # a sees a newer version of itself in b's digest
    assert a.state_of(A) == {"name": "real"}
    assert a.local_version > (1000, 500)
    exchange(b, a)
    assert b.state_of(A) == {"name": "real"}
    # a forged delta about a node, sent to that very node, is not applied
    a.on_ack2(Ack2(B, (Delta(A, "name", pack_version(9999, 1), "forged"),)), B, 0.0)
    assert a.state_of(A) == {"name": "real"}


def test_silent_host_goes_suspect_then_down_then_is_forgotten() -> None:
    a, b = core(A, forget_after=60.0), core(B)
    b.set_local("name", "b")
    a.learn(B, 0.0)
    exchange(a, b, 0.0)
    a.drain_events()
    t = 0.0
    kinds = []
    while t < 80.0:
        t += 0.5
        a.tick(t)
        kinds += [(e.kind, round(t, 1)) for e in a.drain_events()]
    assert [k for k, _ in kinds] == [EventKind.SUSPECT, EventKind.DOWN, EventKind.FORGOTTEN]
    down_at = kinds[1][1]
    assert down_at <= 6.5
    assert kinds[2][1] == pytest.approx(down_at + 60.0, abs=0.51)
    with pytest.raises(NotFound):
        a.state_of(B)


def test_forgotten_host_is_not_brought_back_by_stale_copies() -> None:
    a, b, c = core(A, forget_after=1.0), core(B), core(C)
    b.set_local("name", "b")
    b.tick(0.0)
    a.learn(B, 0.0)
    exchange(a, b, 0.0)
    exchange(c, a, 0.0)  # c holds a copy of b's state
    assert c.state_of(B) == {"name": "b"}
    t = 0.0
    while B in {m.node_id for m in a.members(t)}:
        t += 0.5
        a.tick(t)
    exchange(c, a, t)
    exchange(a, c, t)
    assert B not in {m.node_id for m in a.members(t)}
    b.tick(t)  # b is alive after all: a newer heartbeat brings it back
    exchange(b, c, t)
    exchange(a, c, t)
    assert a.state_of(B) == {"name": "b"}
    assert a.status(B, t) == "up"


def test_down_host_heard_again_comes_back_up() -> None:
    a, b = core(A), core(B)
    a.learn(B, 0.0)
    b.tick(0.0)
    exchange(a, b, 0.0)
    a.tick(10.0)
    assert a.status(B, 10.0) == "down"
    assert a.pick_targets(random.Random(1), 3) in ([], [B])  # only as a probe
    a.drain_events()
    b.tick(10.0)
    exchange(b, a, 10.5)
    assert [e.kind for e in a.drain_events()] == [EventKind.UP]
    assert a.status(B, 10.5) == "up"


def test_removed_host_is_refused() -> None:
    a, b, c = core(A), core(B), core(C)
    b.set_local("name", "b")
    a.learn(B, 0.0)
    exchange(a, b)
    exchange(c, b)
    a.remove(B)
    with pytest.raises(Revoked):
        a.on_syn(b.make_syn(), B, 0.0)
    exchange(c, a)
    exchange(a, c)
    with pytest.raises(NotFound):
        a.state_of(B)
    a.learn(B, 0.0)
    assert B not in a.pick_targets(random.Random(0), 5)


def test_pick_targets_skips_down_hosts_except_the_occasional_probe() -> None:
    rng = random.Random(3)
    for many in (False, True):
        a = core(A, down_probe=0.0)
        ids = IDS[1:] if not many else [f"{i:016x}" for i in range(1, 200)]
        for nid in ids:
            a.learn(nid, 0.0)
        a.learn(ids[0], 0.0)
        for nid in ids[1:]:
            a.on_syn(Syn(nid, {nid: 0}, {nid: pack_version(1, 1)}), nid, 10.0)
        a.tick(10.0)  # ids[0] was never heard: down; the others were heard at 10.0
        assert a.status(ids[0], 10.0) == "down"
        for _ in range(50):
            picks = a.pick_targets(rng, 3)
            assert len(picks) == len(set(picks)) == 3
            assert ids[0] not in picks
    probing = core(A, down_probe=1.0)
    probing.learn(B, 0.0)
    probing.tick(10.0)
    assert probing.pick_targets(rng, 3) == [B]


def test_events_report_joins_and_changed_keys_not_heartbeats() -> None:
    a, b = core(A), core(B)
    b.set_local("name", "b")
    b.set_local("capacity", {"cores": 2})
    a.learn(B, 0.0)
    exchange(a, b)
    assert [e.kind for e in a.drain_events()] == [EventKind.JOINED, EventKind.CHANGED]
    b.tick(0.1)
    exchange(a, b, 0.1)
    assert a.drain_events() == []
    b.set_local("vms", ["x"])
    exchange(a, b, 0.2)
    (ev,) = a.drain_events()
    assert ev.kind == EventKind.CHANGED and ev.keys == {"vms"}


def test_members_lists_everyone_with_status_and_state() -> None:
    a, b = core(A), core(B)
    b.set_local("name", "b")
    a.set_local("name", "a")
    a.learn(B, 0.0)
    exchange(a, b)
    members = a.members(0.5)
    assert [(m.node_id, m.status, m.state) for m in members] == [
        (A, "up", {"name": "a"}),
        (B, "up", {"name": "b"}),
    ]


def test_api_misuse_is_a_usage_error() -> None:
    with pytest.raises(MalformedMessage):
        GossipCore("not-hex", 1)
    with pytest.raises(UsageError):
        GossipCore(A, -1)
    a = core(A)
    with pytest.raises(UsageError):
        a.forget(A, 0.0)
    with pytest.raises(UsageError):
        a.remove(A)


# --- any delivery order, duplication or loss-then-retry converges --------------

_action = st.one_of(
    st.tuples(
        st.just("set"), st.integers(0, 3), st.sampled_from(["name", "vms"]), st.integers(0, 9)
    ),
    st.tuples(st.just("tick"), st.integers(0, 3)),
    st.tuples(st.just("syn"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("deliver"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
)


@settings(max_examples=150, deadline=None)
@given(actions=st.lists(_action, max_size=60), max_deltas=st.integers(1, 4))
def test_any_delivery_order_converges(actions: list[tuple[Any, ...]], max_deltas: int) -> None:
    cores = [core(nid, max_deltas=max_deltas) for nid in IDS[:4]]
    for c in cores:
        c.set_local("name", c.node_id)
    for c in cores[1:]:
        cores[0].learn(c.node_id, 0.0)
    pending: list[tuple[int, int, Syn | Ack | Ack2]] = []  # (from, to, message)
    now = 0.0

    def deliver(src: int, dst: int, msg: Syn | Ack | Ack2) -> None:
        target = cores[dst]
        sender = cores[src].node_id
        if isinstance(msg, Syn):
            pending.append((dst, src, target.on_syn(msg, sender, now)))
        elif isinstance(msg, Ack):
            pending.append((dst, src, target.on_ack(msg, sender, now)))
        else:
            target.on_ack2(msg, sender, now)

    for action in actions:
        now += 0.01
        match action:
            case ("set", i, key, value):
                cores[i].set_local(key, value)
            case ("tick", i):
                cores[i].tick(now)
            case ("syn", i, j) if i != j:
                pending.append((i, j, cores[i].make_syn()))
            case ("deliver", k) if pending:
                deliver(*pending.pop(k % len(pending)))
            case ("duplicate", k) if pending:
                src, dst, msg = pending[k % len(pending)]
                deliver(src, dst, msg)
            case ("drop", k) if pending:
                pending.pop(k % len(pending))
    # then the network heals: full exchanges between everyone, in order
    for _ in range(40):
        if converged(cores):
            break
        for a in cores:
            for b in cores:
                if a is not b:
                    exchange(a, b, now)
    assert converged(cores)


def test_host_back_from_down_is_watched_again_at_once() -> None:
    a, b = core(A), core(B)
    a.learn(B, 0.0)
    b.tick(0.0)
    exchange(a, b, 0.0)
    a.tick(10.0)
    assert a.status(B, 10.0) == "down"
    b.tick(10.0)
    exchange(b, a, 10.0)  # heard again; then silent again
    a.drain_events()
    t = 10.0
    while t < 17.0:
        t += 0.5
        a.tick(t)
    assert [e.kind for e in a.drain_events()] == [EventKind.SUSPECT, EventKind.DOWN]


def test_learning_a_forgotten_host_does_not_revive_it() -> None:
    a, b = core(A, forget_after=1.0), core(B)
    b.set_local("name", "b")
    a.learn(B, 0.0)
    exchange(a, b, 0.0)
    t = 0.0
    while B in {m.node_id for m in a.members(t)}:
        t += 0.5
        a.tick(t)
    a.learn(B, t)  # discovery still advertises it
    assert B not in {m.node_id for m in a.members(t)}
    b.tick(t)  # it really is back: its own Syn revives it
    exchange(b, a, t)
    assert a.state_of(B) == {"name": "b"}


def test_a_refused_value_is_not_stored_and_not_relayed() -> None:
    """A value that fails its check is dropped where it arrives: the relay never
    passes it on, the key counts as absent, and the version still moves on."""
    from vmmesh.gossip.hoststate import check_value

    x = core(IDS[0])
    relay = GossipCore(IDS[1], 1000, check=check_value)
    far = GossipCore(IDS[2], 1000, check=check_value)
    x.set_local("name", "x")
    x.set_local("templates", 5)  # a host with a valid certificate and bad manners
    exchange(x, relay)
    assert relay.state_of(IDS[0]) == {"name": "x"}
    assert relay.version_of(IDS[0]) == x.local_version, "not asked for again"
    [refused] = [e for e in relay.drain_events() if e.kind is EventKind.REFUSED]
    assert (refused.node_id, refused.keys, refused.via) == (
        IDS[0],
        frozenset({"templates"}),
        IDS[0],
    )
    assert "is not a list" in refused.reason
    exchange(relay, far)  # far hears of x only through the relay
    assert far.state_of(IDS[0]) == {"name": "x"}
    assert not any(e.kind is EventKind.REFUSED for e in far.drain_events())
    # the author replaces the bad value with a good one: it travels as usual
    x.set_local("templates", [])
    exchange(x, relay)
    exchange(relay, far)
    assert far.state_of(IDS[0]) == {"name": "x", "templates": []}


def test_a_valid_value_replaced_by_garbage_is_dropped_not_kept() -> None:
    from vmmesh.gossip.hoststate import check_value

    x = core(IDS[0])
    b = GossipCore(IDS[1], 1000, check=check_value)
    x.set_local("vms", ["web-1"])
    exchange(x, b)
    assert b.state_of(IDS[0]) == {"vms": ["web-1"]}
    x.set_local("vms", "web-1")
    exchange(x, b)
    assert b.state_of(IDS[0]) == {}, "the author meant to replace it"


def test_the_host_state_is_one_typed_record_published_and_parsed_with_the_same_specs() -> None:
    """Every ``HostState`` field is a gossip key: a state with every field set goes out
    as the changed keys, each passes the arriving check, and parses back equal."""
    from dataclasses import fields, replace

    from vmmesh.api.host import NO_CAPACITY, Building, KeptVm, TemplateInfo, WorkItem, WorkKind
    from vmmesh.gossip.hoststate import SCHEMA, HostState, changed_keys, check_value, parse

    full = HostState(
        name="h1",
        addresses=("10.0.0.1:7400",),
        capacity=replace(NO_CAPACITY, cores=4),
        templates=(TemplateInfo("ab" * 16, "ff" * 32, frozenset({"x"}), ("cd" * 32,), (10,)),),
        vms=("web-1",),
        draining=True,
        crl=b"-----BEGIN X509 CRL-----",
        images=("ee" * 32,),
        building=(Building(template_id="ab" * 16, done_at=5.0),),
        keepalive=(KeptVm(name="web-1"),),
        vmshape={"qemu": "7.2"},
        web_port=7402,
        work=(WorkItem(kind=WorkKind.FETCH, name="template ab"),),
    )
    keys = changed_keys(HostState(), full)
    assert set(keys) == set(SCHEMA) and len(keys) == len(fields(HostState))
    for key, value in keys.items():
        check_value(key, value)  # what a peer's check would do on arrival
    assert parse(keys) == full
    # only what changed goes out again
    assert changed_keys(full, replace(full, draining=False, vms=())) == {
        "draining": False,
        "vms": [],
    }
    assert changed_keys(full, full) == {}
