"""The placement planner: ranking, fill-then-spill, replanning, wire form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.plancodec import plan_from_wire, plan_to_wire, request_from_wire
from vmmesh.api.host import Capacity, TemplateInfo
from vmmesh.errors import InternalError, MalformedMessage, UnknownMessage
from vmmesh.gossip.hoststate import HostView
from vmmesh.placement.planner import (
    HostIndex,
    MatchClass,
    PlacementRequest,
    Plan,
    affinity,
    plan,
    replan,
)

BASE = "b" * 64


def tmpl(n: int, *pkgs: str) -> TemplateInfo:
    return TemplateInfo(template_id=f"{n:064x}", base_image_id=BASE, packages=frozenset(pkgs))


def host(
    n: int,
    free: int,
    *templates: TemplateInfo,
    status: str = "up",
    draining: bool = False,
    running: int = 0,
    disk: int | None = None,
) -> HostView:
    return HostView(
        node_id=f"{n:08x}",
        name=f"h{n}",
        status=status,
        capacity=Capacity(
            cores=4,
            memory_mb=8192,
            storage_quota_mb=10_000,
            storage_free_mb=10_000,
            free_vm_slots=free,
            free_disk_slots=free if disk is None else disk,
            running_vms=running,
        ),
        templates=templates,
        draining=draining,
    )


def req(count: int, *pkgs: str, rid: str = "r1") -> PlacementRequest:
    return PlacementRequest(request_id=rid, name="job", count=count, packages=frozenset(pkgs))


def placed(p: Plan) -> list[tuple[str, int]]:
    return [(s.host, s.count) for s in p.shares]


# --- affinity ------------------------------------------------------------------


def test_affinity_orders_exact_superset_partial_none() -> None:
    want = frozenset({"perl", "povray"})
    exact = affinity(frozenset({"perl", "povray"}), want)
    small_super = affinity(frozenset({"perl", "povray", "gcc"}), want)
    big_super = affinity(frozenset({"perl", "povray", "gcc", "make"}), want)
    partial = affinity(frozenset({"perl"}), want)
    partial_fat = affinity(frozenset({"perl", "gcc"}), want)
    none = affinity(frozenset({"gcc"}), want)
    base = affinity(frozenset(), want)
    assert exact[0] == MatchClass.EXACT
    assert small_super[0] == MatchClass.SUPERSET
    assert partial[0] == MatchClass.PARTIAL
    assert none[0] == base[0] == MatchClass.NONE
    assert exact < small_super < big_super < partial < partial_fat < base < none


def test_affinity_empty_request_base_is_exact() -> None:
    assert affinity(frozenset(), frozenset()) == (MatchClass.EXACT, 0, 0)
    assert affinity(frozenset({"perl"}), frozenset())[0] == MatchClass.SUPERSET


# --- ranking and filling ---------------------------------------------------------


def test_thesis_example_two_on_first_host_one_on_next() -> None:
    """§3.1.1: three VMs with povray and perl; the best host has room for two."""
    hosts = [
        host(1, 5, tmpl(1, "gcc")),
        host(2, 2, tmpl(2, "perl", "povray")),
        host(3, 5, tmpl(3, "perl")),
    ]
    p = plan(req(3, "povray", "perl"), hosts)
    assert placed(p) == [("h2", 2), ("h3", 1)]
    assert p.shares[0].match is MatchClass.EXACT and not p.shares[0].builds
    assert p.shares[0].template_id == f"{2:064x}"
    assert p.shares[1].match is MatchClass.PARTIAL
    assert p.shares[1].missing == ("povray",)
    assert "povray" in p.shares[1].reason
    assert p.unplaced == 0 and p.unplaced_reason == ""


def test_exact_before_superset_before_partial_before_none() -> None:
    hosts = [
        host(1, 1),  # no templates at all
        host(2, 1, tmpl(2, "perl")),
        host(3, 1, tmpl(3, "perl", "povray", "gcc")),
        host(4, 1, tmpl(4, "perl", "povray")),
        host(5, 1, tmpl(5, "gcc")),
    ]
    p = plan(req(5, "perl", "povray"), hosts)
    assert [s.host for s in p.shares[:3]] == ["h4", "h3", "h2"]
    assert [s.match for s in p.shares] == [
        MatchClass.EXACT,
        MatchClass.SUPERSET,
        MatchClass.PARTIAL,
        MatchClass.NONE,
        MatchClass.NONE,
    ]
    for s in p.shares[3:]:
        assert s.template_id is None
        assert s.missing == ("perl", "povray")
        assert "build from base image" in s.reason


def test_smallest_superset_and_most_in_common_first() -> None:
    hosts = [
        host(1, 1, tmpl(1, "a", "b", "x", "y")),
        host(2, 1, tmpl(2, "a", "b", "x")),
        host(3, 1, tmpl(3, "a")),
        host(4, 1, tmpl(4, "a", "c")),  # 2 in common beats 1
    ]
    p = plan(req(4, "a", "b"), hosts)
    assert [s.host for s in p.shares[:2]] == ["h2", "h1"]
    p = plan(req(3, "a", "c", "d"), hosts)
    # h4 has two in common; the others one each, the leanest template first.
    assert [s.host for s in p.shares] == ["h4", "h3", "h2"]


def test_host_uses_its_best_template() -> None:
    h = host(1, 3, tmpl(1, "gcc"), tmpl(2, "perl", "povray", "gcc"), tmpl(3, "perl"))
    [share] = plan(req(1, "perl", "povray"), [h]).shares
    assert share.template_id == f"{2:064x}"
    assert share.match is MatchClass.SUPERSET


def test_down_draining_unknown_and_full_hosts_skipped() -> None:
    good = tmpl(1, "perl")
    hosts = [
        host(1, 5, good, status="down"),
        host(2, 5, good, draining=True),
        host(3, 5, good, status="weird"),
        host(4, 5, good, disk=0),  # no disk room: free_slots is the minimum
        host(5, 1),
    ]
    p = plan(req(3, "perl"), hosts)
    assert placed(p) == [("h5", 1)]
    assert p.unplaced == 2
    assert p.unplaced_reason.startswith("no capacity left in the mesh: 1 of 3 placed")
    assert "2 down" in p.unplaced_reason
    assert "1 draining" in p.unplaced_reason
    assert "1 full" in p.unplaced_reason


def test_suspect_after_up_of_same_class_but_before_worse_class() -> None:
    hosts = [
        host(1, 1, tmpl(1, "perl"), status="suspect"),
        host(2, 1, tmpl(2, "perl")),
        host(3, 5),
    ]
    p = plan(req(3, "perl"), hosts)
    assert [s.host for s in p.shares] == ["h2", "h1", "h3"]
    assert p.shares[1].suspect and "suspect" in p.shares[1].reason


def test_fill_then_spill_and_unplaced() -> None:
    hosts = [host(1, 1, tmpl(1, "perl")), host(2, 1, tmpl(2, "perl", "gcc"))]
    p = plan(req(5, "perl"), hosts)
    assert placed(p) == [("h1", 1), ("h2", 1)]
    assert p.unplaced == 3
    assert p.unplaced_reason == "no capacity left in the mesh: 2 of 5 placed"


def test_empty_request_all_hosts_tie_spread_by_free_then_running() -> None:
    hosts = [
        host(1, 2, tmpl(1, "perl"), running=0),
        host(2, 4, running=3),
        host(3, 4, running=1),
    ]
    p = plan(req(10), hosts)
    assert placed(p) == [("h3", 4), ("h2", 4), ("h1", 2)]
    assert all(s.match is MatchClass.EXACT and s.template_id is None for s in p.shares)


def test_equal_hosts_spread_by_request_id_deterministically() -> None:
    hosts = [host(n, 1, tmpl(1, "perl")) for n in range(1, 11)]
    firsts = {plan(req(1, "perl", rid=f"r{i}"), hosts).shares[0].host for i in range(30)}
    assert len(firsts) > 3
    assert plan(req(3, "perl"), hosts) == plan(req(3, "perl"), list(reversed(hosts)))


def test_zero_count_places_nothing() -> None:
    p = plan(req(0, "perl"), [host(1, 3)])
    assert p.shares == () and p.unplaced == 0


def test_input_the_callers_checked_is_a_bug_when_bad() -> None:
    """Count and name are checked where they enter (CLI, ``from_wire``) and the
    view has distinct hosts: bad ones here are a bug, not the user's input."""
    with pytest.raises(InternalError):
        req(-1)
    with pytest.raises(InternalError):
        PlacementRequest(request_id="", name="job", count=1)
    with pytest.raises(InternalError, match="twice"):
        plan(req(1), [host(1, 1), host(1, 2)])


def test_index_gives_the_same_plan() -> None:
    hosts = [host(n, n % 3, tmpl(n % 4, "perl", f"p{n % 4}")) for n in range(1, 30)]
    index = HostIndex(hosts)
    for count in (1, 5, 40):
        r = req(count, "perl", "p2")
        assert plan(r, index) == plan(r, hosts)


# --- replanning ----------------------------------------------------------------


def test_replan_after_a_failure_uses_the_next_host() -> None:
    hosts = [
        host(1, 2, tmpl(1, "perl", "povray")),
        host(2, 1, tmpl(2, "perl")),
        host(3, 5),
    ]
    first = plan(req(3, "perl", "povray"), hosts)
    assert placed(first) == [("h1", 2), ("h2", 1)]
    second = replan(first, ["00000001"], {}, hosts)
    assert placed(second) == [("h2", 1), ("h3", 2)]
    assert second.failed == {"00000001"}
    # h3 fails too; h1 is back "up" in the view but is never asked again.
    third = replan(second, ["00000003"], {}, hosts)
    assert placed(third) == [("h2", 1)]
    assert third.failed == {"00000001", "00000003"}
    assert third.unplaced == 2
    assert "2 failed" in third.unplaced_reason


def test_replan_refused_keeps_grant_and_spills() -> None:
    hosts = [host(1, 3, tmpl(1, "perl")), host(2, 3), host(3, 2, running=1)]
    first = plan(req(4, "perl"), hosts)
    assert placed(first) == [("h1", 3), ("h2", 1)]
    refused_h1 = replan(first, [], {"00000001": 1}, hosts)
    # h2 accepted 1 of its 3 slots: with 2 left it ties h3 on room, and has
    # fewer running VMs, so it takes the spill.
    assert placed(refused_h1) == [("h1", 1), ("h2", 3)]
    # A host that granted nothing is dropped and not asked again.
    refused_all = replan(first, [], {"00000001": 0}, hosts)
    assert placed(refused_all) == [("h2", 3), ("h3", 1)]


def test_replan_kept_host_not_counted_twice_when_view_is_fresh() -> None:
    hosts = [host(1, 3, tmpl(1, "perl")), host(2, 3)]
    first = plan(req(4, "perl"), hosts)
    # The view now counts the VMs that went to h1 and h2.
    fresh = [host(1, 0, tmpl(1, "perl")), host(2, 2)]
    again = replan(first, ["00000001"], {}, fresh)
    assert placed(again) == [("h2", 3)]
    assert again.unplaced == 1


def test_replan_tries_what_was_unplaced_before() -> None:
    first = plan(req(3, "perl"), [host(1, 1)])
    assert first.unplaced == 2
    later = replan(first, [], {}, [host(1, 1), host(2, 5)])
    assert placed(later) == [("h1", 1), ("h2", 2)]


# --- wire form -------------------------------------------------------------------


def test_plan_wire_round_trip_through_msgpack() -> None:
    p = plan(req(3, "povray", "perl"), [host(1, 2, tmpl(1, "perl")), host(2, 2)])
    p = replan(p, ["00000002"], {}, [host(1, 2, tmpl(1, "perl")), host(2, 2)])
    wire = msgpack.unpackb(msgpack.packb(plan_to_wire(p)))
    assert plan_from_wire(wire) == p
    share = wire["shares"][0]  # what `vmmesh request --dry-run` shows
    assert {"host", "count", "reason", "node_id", "match", "template"} <= share.keys()
    assert request_from_wire(wire["request"]) == p.request


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda w: w.update(v=2), UnknownMessage),
        (lambda w: w.update(shares="x"), MalformedMessage),
        (lambda w: w["shares"][0].update(node_id="../etc"), MalformedMessage),
        (lambda w: w["shares"][0].update(match="great"), MalformedMessage),
        (lambda w: w["shares"][0].update(count=-1), MalformedMessage),
        (lambda w: w["shares"][0].update(count=True), MalformedMessage),
        (lambda w: w["shares"][0].update(missing=["Bad Pkg"]), MalformedMessage),
        (lambda w: w["request"].update(name="../x"), MalformedMessage),
        (lambda w: w["request"].update(id=7), MalformedMessage),
        (lambda w: w.update(failed=["zz"]), MalformedMessage),
    ],
)
def test_plan_from_wire_rejects_bad_input(
    mutate: Callable[[dict[str, Any]], object], error: type[Exception]
) -> None:
    wire = plan_to_wire(plan(req(2, "perl"), [host(1, 2)]))
    mutate(wire)
    with pytest.raises(error):
        plan_from_wire(wire)


def test_plan_from_wire_rejects_non_map() -> None:
    with pytest.raises(MalformedMessage):
        plan_from_wire([1, 2])


# --- properties ------------------------------------------------------------------

PKGS = ["perl", "povray", "gcc", "make", "python3", "java"]
pkg_sets = st.frozensets(st.sampled_from(PKGS), max_size=4)


@st.composite
def views(draw: st.DrawFn) -> list[HostView]:
    n = draw(st.integers(0, 12))
    templates = [tmpl(i, *draw(pkg_sets)) for i in range(draw(st.integers(0, 6)))]
    out = []
    for i in range(n):
        held = draw(st.lists(st.sampled_from(templates), max_size=3)) if templates else []
        out.append(
            host(
                i + 1,
                draw(st.integers(0, 4)),
                *held,
                status=draw(st.sampled_from(["up", "up", "suspect", "down"])),
                draining=draw(st.booleans()),
                running=draw(st.integers(0, 3)),
                disk=draw(st.integers(0, 4)),
            )
        )
    return out


requests = st.builds(
    PlacementRequest,
    request_id=st.text("0123456789abcdef", min_size=1, max_size=8),
    name=st.just("job"),
    count=st.integers(0, 20),
    packages=pkg_sets,
)


def usable(h: HostView) -> bool:
    return h.status in ("up", "suspect") and not h.draining


@settings(max_examples=300, deadline=None)
@given(requests, views())
def test_plan_properties(r: PlacementRequest, hosts: list[HostView]) -> None:
    p = plan(r, hosts)
    by_id = {h.node_id: h for h in hosts}
    assert len({s.node_id for s in p.shares}) == len(p.shares)
    for s in p.shares:
        h = by_id[s.node_id]
        assert usable(h)
        assert 0 < s.count <= h.capacity.free_slots
    total_free = sum(h.capacity.free_slots for h in hosts if usable(h))
    assert p.placed == min(r.count, total_free)
    assert p.unplaced == r.count - p.placed
    # Classes never get better down the list (up before suspect within a
    # class), and a better-matching usable host with room left means nothing
    # went to a worse class.
    order = [(s.match, s.suspect) for s in p.shares]
    assert order == sorted(order)
    best = {
        h.node_id: min(
            [affinity(frozenset(), r.packages)]
            + [affinity(t.packages, r.packages) for t in h.templates]
        )[0]
        for h in hosts
        if usable(h) and h.capacity.free_slots > 0
    }
    got = {s.node_id: s.count for s in p.shares}
    for s in p.shares:
        assert s.match == best[s.node_id]
        for nid, cls in best.items():
            if cls < s.match:
                assert got.get(nid, 0) == by_id[nid].capacity.free_slots
    assert plan(r, hosts) == p
    assert plan(r, list(reversed(hosts))) == p
    assert plan(r, HostIndex(hosts)) == p
    assert plan_from_wire(msgpack.unpackb(msgpack.packb(plan_to_wire(p)))) == p


@settings(max_examples=200, deadline=None)
@given(requests, views(), st.data())
def test_replan_properties(r: PlacementRequest, hosts: list[HostView], data: st.DataObject) -> None:
    p = plan(r, hosts)
    ids = [s.node_id for s in p.shares]
    failed = data.draw(st.lists(st.sampled_from(ids), unique=True) if ids else st.just([]))
    refused = {
        s.node_id: data.draw(st.integers(0, s.count))
        for s in p.shares
        if s.node_id not in failed and data.draw(st.booleans())
    }
    again = replan(p, failed, refused, hosts)
    by_id = {h.node_id: h for h in hosts}
    assert again.failed == frozenset(failed)
    for s in again.shares:
        assert s.node_id not in failed
        assert usable(by_id[s.node_id])
        assert 0 < s.count <= by_id[s.node_id].capacity.free_slots
        if s.node_id in refused:
            assert s.count == refused[s.node_id]
    assert again.placed + again.unplaced == r.count
    assert again.placed <= r.count


# --- warm states ---------------------------------------------------------------


def warm(t: TemplateInfo) -> TemplateInfo:
    return TemplateInfo(
        template_id=t.template_id, base_image_id=BASE, packages=t.packages, warm=True
    )


def test_a_host_with_a_warm_state_goes_before_an_equal_cold_one() -> None:
    """Among hosts holding the same template, the one whose VMs resume goes first,
    even when the cold one has more free slots (load spreading comes after)."""
    t = tmpl(1, "python3")
    p = plan(req(2, "python3"), [host(1, 4, t), host(2, 2, warm(t))])
    assert placed(p) == [("h2", 2)]
    assert p.shares[0].reason.endswith("; warm start")
    # a warm state does not lift a host over a better match class
    p = plan(req(1, "python3"), [host(1, 1, t), host(2, 1, warm(tmpl(2, "python3", "gcc")))])
    assert placed(p) == [("h1", 1)]


def test_of_one_hosts_equal_templates_the_warm_one_is_offered() -> None:
    a, b = tmpl(1, "povray"), warm(tmpl(2, "povray"))
    p = plan(req(1, "povray"), [host(1, 1, a, b)])
    assert p.shares[0].template_id == b.template_id


def test_warm_in_gossip_must_be_a_bool() -> None:
    raw = warm(tmpl(1, "python3")).to_wire()
    assert TemplateInfo.from_wire(raw).warm is True
    with pytest.raises(MalformedMessage):
        TemplateInfo.from_wire({**raw, "warm": 5})
