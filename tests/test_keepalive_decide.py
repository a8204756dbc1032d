"""Keep-alive's pure decisions: quorum, the one recoverer, what to recover."""

from __future__ import annotations

from vmmesh.api.host import KeptVm
from vmmesh.keepalive.decide import (
    Member,
    Membership,
    has_quorum,
    recoverer,
    runs_elsewhere,
    to_recover,
)

A, B, C, D, E = "a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32
WEB = KeptVm(name="web-1", generation=3)


def _m(node_id: str, status: str = "up", silent: float = 0.0, **kw: object) -> Member:
    return Member(node_id=node_id, name=node_id[:1], status=status, silent_for=silent, **kw)  # type: ignore[arg-type]


def test_a_mesh_of_two_does_not_vote() -> None:
    assert has_quorum([_m(A), _m(B, "down")], A) is None
    assert not recoverer([_m(A), _m(B, "down", 99, keepalive=(WEB,))], A)


def test_the_majority_side_has_the_quorum_and_the_cut_off_host_has_not() -> None:
    seen_by_majority = [_m(A), _m(B), _m(C, "down", 20)]
    seen_by_c = [_m(A, "down", 20), _m(B, "down", 20), _m(C)]
    assert has_quorum(seen_by_majority, A) is True
    assert has_quorum(seen_by_c, C) is False
    # four hosts split two and two: nobody has a majority, nobody recovers
    half = [_m(A), _m(B), _m(C, "down"), _m(D, "down")]
    assert has_quorum(half, A) is False and not recoverer(half, A)


def test_a_suspect_host_still_counts_as_reachable() -> None:
    assert has_quorum([_m(A), _m(B, "suspect"), _m(C, "down")], A) is True


def test_the_lowest_up_id_recovers_and_the_next_takes_over_when_it_goes() -> None:
    mesh = [_m(A), _m(B), _m(C), _m(D, "down", 30), _m(E)]
    assert [recoverer(mesh, x) for x in (A, B, C, E)] == [True, False, False, False]
    mesh[0] = _m(A, "down", 30)
    assert [recoverer(mesh, x) for x in (B, C, E)] == [True, False, False]


def test_only_vms_of_hosts_down_past_the_grace_and_running_nowhere_are_recovered() -> None:
    db = KeptVm(name="db-1")
    mesh = [
        _m(A, vms=("db-1",)),  # db-1 already runs on A (recovered, or moved)
        _m(B),
        _m(C, "down", 20, keepalive=(WEB, db)),
        _m(D, "down", 5, keepalive=(KeptVm(name="new-1"),)),  # not down long enough
    ]
    got = to_recover(mesh, grace=15)
    assert [(r.vm.name, r.from_host.node_id) for r in got] == [("web-1", C)]
    assert got[0].vm.generation == 3


def test_an_old_copy_sees_its_name_run_elsewhere() -> None:
    mesh = [_m(A), _m(B, vms=("web-1",)), _m(C, "down", vms=("x-1",))]
    assert runs_elsewhere(mesh, A, "web-1") == mesh[1]
    assert runs_elsewhere(mesh, B, "web-1") is None  # its own
    assert runs_elsewhere(mesh, A, "x-1") is None  # on a down host: not running


def test_a_cut_off_host_that_forgot_the_others_still_has_no_quorum() -> None:
    """Gossip forgets a host down for a minute: the vote keeps its size."""
    alone = [_m(C)]  # a and b forgotten
    assert has_quorum(alone, C) is None  # what the host would think, counting only gossip
    members = Membership({A: 0.0, B: 0.0, C: 0.0})
    known = members.update(alone, now=120.0)
    assert known == 3 and has_quorum(alone, C, known) is False
    assert not recoverer(alone, C, known)
    assert members.update(alone, now=120.0 + members.keep + 1) == 1  # a day later: gone


def test_the_vote_counts_every_host_seen_lately_even_after_a_restart() -> None:
    members = Membership({A: 50.0, B: 50.0, C: 50.0, D: 50.0})  # as the store kept them
    known = members.update([_m(A), _m(B, "down", 30)], now=100.0)
    assert known == 4 and has_quorum([_m(A), _m(B, "down", 30)], A, known) is False
