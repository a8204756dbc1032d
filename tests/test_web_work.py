"""This host's work under way as the gossip key ``work`` (``web.work``): rounded, published
only when the rounded list changes and at most every 2 s, an empty list when idle, and
checked like every gossiped key.  No sockets, no clock: the tests pass the times."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import msgpack
import pytest

from vmmesh.api.common import Progress
from vmmesh.api.host import MAX_WORK, WorkItem, WorkKind
from vmmesh.errors import MalformedMessage
from vmmesh.gossip.hoststate import check_value, parse
from vmmesh.web.work import MIN_GAP, WorkGossip, from_progress, items, rounded, significant


def _fetch(done: int, rate: float, total: int = 100 << 20) -> WorkItem:
    p = Progress(task="template abc", phase="fetching", fraction=done / total, done=done,
                 total=total, rate=rate, note="from h2")  # fmt: skip
    return from_progress(WorkKind.FETCH, p)


def test_rounding_keeps_fractions_to_5_percent_and_figures_to_2_digits() -> None:
    r = rounded(_fetch(done=37_654_321, rate=123_456.0))
    assert r.fraction == 0.35  # 35.9 % down to 35 %: never 100 % before the end
    assert r.done == 38_000_000 and r.rate == 120_000.0
    assert rounded(_fetch(done=100 << 20, rate=0.0)).fraction == 1.0
    assert significant(0.0) == 0.0 and significant(987.0) == 990.0 and significant(1.04) == 1.0


def test_a_long_name_or_phase_is_cut_to_what_the_spec_allows() -> None:
    p = Progress(task="t" * 128, phase="p" * 200, note="n" * 200)
    item = from_progress(WorkKind.MIGRATION, p, peer="h" * 300)
    assert WorkItem.from_wire(item.to_wire()) == item


def test_published_only_on_a_material_change_and_at_most_every_2_s() -> None:
    """Progress of the same work waits for the gap; work that starts or ends does not
    (a finished migration must not linger on every page)."""
    g = WorkGossip()
    assert g.update({}, wall=1000.0, now=0.0) == ()  # idle: an empty list, once
    assert g.update({}, wall=1001.0, now=1.0) is None
    first = g.update({"f": _fetch(10 << 20, 1e6)}, wall=1002.0, now=2.0)
    assert first is not None and first[0].started == 1002.0  # at once after idle
    assert g.update({"f": _fetch(10 << 20, 1.01e6)}, wall=1005.0, now=5.0) is None  # same, rounded
    assert g.update({"f": _fetch(30 << 20, 1e6)}, wall=1003.0, now=3.0) is None  # too soon
    later = g.update({"f": _fetch(30 << 20, 1e6)}, wall=1004.0, now=2.0 + MIN_GAP)
    assert later is not None and later[0].fraction == 0.3
    assert later[0].started == 1002.0  # first seen, kept while it runs
    both: dict[Hashable, WorkItem] = {"f": _fetch(30 << 20, 1e6), "g": _fetch(1 << 20, 1e6)}
    started = g.update(both, wall=1005.0, now=2.5 + MIN_GAP)  # new work: at once
    assert started is not None and len(started) == 2
    assert g.update({"f": both["f"]}, wall=1005.0, now=2.6 + MIN_GAP) is not None  # g ended
    assert g.update({}, wall=1005.0, now=2.7 + MIN_GAP) == ()  # all done: at once too
    assert g.update({}, wall=1006.0, now=2.0 + 2 * MIN_GAP) is None


def test_a_busy_host_publishes_at_most_once_per_gap_while_a_fetch_moves() -> None:
    g = WorkGossip()
    sent = [
        g.update({"f": _fetch(t * (1 << 20), 5e6 + t)}, wall=1000.0 + t / 10, now=t / 10)
        for t in range(100)  # 10 s of progress, one look every 0.1 s
    ]
    published = [v for v in sent if v is not None]
    assert 1 < len(published) <= 10 / MIN_GAP + 1


def test_at_most_32_items_the_oldest_first() -> None:
    now: dict[Hashable, WorkItem] = {}
    g = WorkGossip()
    for i in range(40):
        now[i] = _fetch(i, 0.0)
        g.update(now, wall=1000.0 + i, now=0.0)  # seen one by one (the gap holds them back)
    g.published, g.min_gap = None, 0.0
    out = g.update(now, wall=2000.0, now=100.0)
    assert out is not None and len(out) == MAX_WORK
    assert out[0].started == 1000.0 and out[-1].started == 1000.0 + MAX_WORK - 1


def test_items_name_each_kind_and_a_migrations_target() -> None:
    fetch = Progress(task="template abc", phase="fetching")
    move = Progress(task="web-1", phase="copying memory", fraction=0.5, note="to h2")
    got = items({7: fetch}, {"web-1": move}, {"web-1": "h2"}, [])
    assert {(w.kind, w.name, w.peer) for w in got.values()} == {
        (WorkKind.FETCH, "template abc", ""),
        (WorkKind.MIGRATION, "web-1", "h2"),
    }


def _gossiped(work: tuple[WorkItem, ...]) -> list[dict[str, Any]]:
    return [w.to_wire() for w in work]


def test_the_key_is_checked_and_parsed_like_every_gossiped_key() -> None:
    g = WorkGossip()
    value = g.update({"f": _fetch(1 << 20, 1e6)}, wall=1000.0, now=0.0)
    assert value is not None
    check_value("work", _gossiped(value))
    assert parse({"work": _gossiped(value)}).work == value
    for bad in (
        [{"kind": "fetch", "name": "x", "started": -1.0}],
        [{"kind": "job", "name": "x", "failed": 1 << 40}],
        [{"kind": "fetch", "name": "x", "rate": 1e15}],
        [{"kind": "fetch", "name": "x", "note": "n" * 129}],
        [_gossiped(value)[0]] * (MAX_WORK + 1),
    ):
        with pytest.raises(MalformedMessage):
            check_value("work", bad)
    assert parse({"work": [{"kind": "x"}]}).work == ()  # a refused value reads as idle


def test_what_the_key_costs_in_gossip_bytes() -> None:
    """One migration and one fetch: a value of a few hundred bytes, sent at most every 2 s
    while they run; an idle host's value is one byte."""
    move = Progress(task="web-1", phase="copying memory", fraction=0.5, done=300 << 20,
                    total=600 << 20, rate=1.2e8, note="to h2")  # fmt: skip
    g = WorkGossip()
    busy = g.update(
        {"f": _fetch(30 << 20, 5e6), "m": from_progress(WorkKind.MIGRATION, move, "h2")},
        wall=1_765_000_000.0,
        now=0.0,
    )
    assert busy is not None
    size = len(msgpack.packb(_gossiped(busy), use_bin_type=True))
    idle = len(msgpack.packb([], use_bin_type=True))
    print(f"work key: {size} bytes busy (a fetch and a migration), {idle} idle")
    assert size < 500 and idle == 1
