"""The request coordinator without I/O: plain synchronous waves and answers."""

from __future__ import annotations

import pytest

from vmmesh.api.host import Capacity, TemplateInfo
from vmmesh.api.vm import VmMade
from vmmesh.errors import InternalError, PackageInstallError
from vmmesh.gossip.hoststate import HostView
from vmmesh.placement.coordinator import Ask, Coordinator, dry_run, placement_seed
from vmmesh.placement.planner import PlacementRequest

BASE = "b" * 64
IDS = {name: f"{i:02x}" * 16 for i, name in enumerate(["a", "b", "c", "d"], start=1)}


def host(name: str, free: int, *templates: frozenset[str], status: str = "up") -> HostView:
    infos = tuple(
        TemplateInfo(template_id=f"{abs(hash(t)) % (1 << 60):016x}", base_image_id=BASE, packages=t)
        for t in templates
    )
    return HostView(
        node_id=IDS[name],
        name=name,
        status=status,
        capacity=Capacity(4, 8192, 20000, 20000, free, free),
        templates=infos,
    )


def made(ask: Ask, n: int | None = None) -> list[VmMade]:
    count = ask.count if n is None else n
    return [
        VmMade(
            name=f"web-{ask.first_index + i}", vm_id="ab" * 8, host=ask.host, node_id=ask.node_id
        )
        for i in range(count)
    ]


def request(count: int, *packages: str) -> PlacementRequest:
    return PlacementRequest(
        placement_seed("web", count, packages), "web", count, frozenset(packages)
    )


def test_the_thesis_example() -> None:
    """Three VMs with povray and perl (thesis §3.1.1): B holds the template but has
    room for two, so B gets two and the next host the third."""
    view = [host("a", 4), host("b", 2, frozenset({"povray", "perl"})), host("c", 4)]
    coord = Coordinator(request(3, "povray", "perl"))
    wave = coord.start(view)
    assert next((a.host, a.count) for a in wave) == ("b", 2)
    assert sum(a.count for a in wave) == 3
    assert sorted(a.first_index for a in wave) == [1, 3]  # names never collide
    for ask in wave:
        coord.made(ask, ask.count, made(ask))
    assert coord.next_wave(view) == []
    report = coord.report()
    assert sorted(v.name for v in report.vms) == ["web-1", "web-2", "web-3"]
    assert report.unplaced == () and report.notes == ()
    assert report.plan[0].host == "b" and report.plan[0].match == "exact"


def test_a_host_failing_mid_share_is_replaced_and_never_asked_again() -> None:
    view = [host("a", 3), host("b", 3)]
    coord = Coordinator(request(3))
    [first] = coord.start(view)
    coord.failed(first, "connection lost")
    [second] = coord.next_wave(view)
    assert second.node_id != first.node_id and second.count == 3
    assert second.first_index == first.first_index + first.count
    coord.made(second, 3, made(second))
    assert coord.next_wave(view) == []
    report = coord.report()
    assert len(report.vms) == 3 and report.unplaced == ()
    assert any(first.host in n and "re-placed" in n for n in report.notes)


def test_a_refusal_at_the_owner_moves_the_rest_on() -> None:
    """Gossip said 3 free, the owner admitted 1: it keeps that one, the rest goes on."""
    view = [host("a", 3), host("b", 2)]
    coord = Coordinator(request(3))
    [ask] = coord.start(view)
    assert ask.host == "a"
    coord.made(ask, 1, made(ask, 1))
    [rest] = coord.next_wave(view)
    assert (rest.host, rest.count) == ("b", 2)
    coord.made(rest, 2, made(rest))
    assert coord.next_wave(view) == []
    report = coord.report()
    assert len(report.vms) == 3
    assert any("admitted 1 of 3" in n for n in report.notes)


def test_capacity_exhausted_reports_what_was_not_placed() -> None:
    view = [host("a", 1), host("b", 1), host("c", 0), host("d", 2, status="down")]
    coord = Coordinator(request(5))
    wave = coord.start(view)
    assert sum(a.count for a in wave) == 2
    for ask in wave:
        coord.made(ask, ask.count, made(ask))
    assert coord.next_wave(view) == []
    report = coord.report()
    [missing] = report.unplaced
    assert missing.count == 3
    assert "no capacity" in missing.reason and "full" in missing.reason
    assert "1 down" in missing.reason


def test_a_host_that_cannot_run_vms_says_why() -> None:
    blocked = HostView(
        node_id=IDS["a"],
        name="a",
        status="up",
        capacity=Capacity(4, 8192, 20000, 20000, 0, 0, blocked="no base image"),
    )
    report = dry_run(request(1), [blocked])
    assert report.unplaced[0].reason.endswith("a: no base image")


def test_an_unknown_package_ends_the_request() -> None:
    view = [host("a", 2), host("b", 2)]
    coord = Coordinator(request(4, "no-such-package"))
    wave = coord.start(view)
    for ask in wave:
        coord.cannot_install(ask, "package not found: no-such-package")
    with pytest.raises(PackageInstallError, match="no-such-package"):
        coord.next_wave(view)


def test_driving_it_out_of_order_is_a_bug_not_a_usage_error() -> None:
    view = [host("a", 2), host("b", 2)]
    coord = Coordinator(request(4))
    wave = coord.start(view)
    with pytest.raises(InternalError, match="already started"):
        coord.start(view)
    with pytest.raises(InternalError, match="not answered"):
        coord.next_wave(view)
    coord.made(wave[0], wave[0].count, made(wave[0]))
    with pytest.raises(InternalError, match="no open ask"):
        coord.failed(wave[0], "answered twice")


def test_a_package_one_host_lacks_moves_its_share_when_others_made_vms() -> None:
    view = [host("a", 2), host("b", 2), host("c", 2)]
    coord = Coordinator(request(4, "povray"))
    wave = coord.start(view)
    assert len(wave) == 2
    good, bad = wave
    coord.made(good, good.count, made(good))
    coord.cannot_install(bad, "package not found: povray")
    [again] = coord.next_wave(view)
    assert again.node_id not in (good.node_id, bad.node_id)
    coord.made(again, again.count, made(again))
    assert coord.next_wave(view) == []
    assert any("cannot install" in n for n in coord.report().notes)


def test_a_dry_run_is_the_plan_the_request_follows() -> None:
    view = [host(n, 2) for n in "abcd"]
    for count in (1, 3, 5):
        dry = dry_run(request(count, "x"), view)
        coord = Coordinator(request(count, "x"))
        wave = coord.start(view)
        assert [(s.host, s.count) for s in dry.plan] == [(a.host, a.count) for a in wave]


def test_rounds_are_bounded() -> None:
    view = [host("a", 1)]
    coord = Coordinator(request(2), max_rounds=3)
    asks = coord.start(view)
    rounds = 1
    while asks:
        for ask in asks:
            coord.made(ask, ask.count, [])  # admitted but nothing made: a boot failed
        asks = coord.next_wave(view)
        rounds += bool(asks)
    assert rounds == 1  # a host that made fewer than asked gets no more
    assert coord.report().unplaced[0].count == 2
