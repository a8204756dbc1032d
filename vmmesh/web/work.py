"""This host's work under way as the gossip key ``work``: what every host's page shows of it.

Theory of operation.  The transfer, migrate and job extensions keep their
work under way in memory (a ``Progress`` per fetch and per migration, a
session per job); ``items`` turns it into ``WorkItem``s, the record gossip
carries.  A gossiped value is sent to every host each time it changes, and a
fetch's byte count changes with every piece, so ``WorkGossip`` decides what
is worth sending: each item is rounded (fraction down to 5 %, bytes and rate
to 2 significant digits), and the list is published only when the rounded
list differs from the last one published: at once when work started or
ended (a finished migration must not linger on every page), and for progress
of the same work only once ``MIN_GAP`` seconds have passed since the last
publication.  When the work ends, the list becomes empty and is published
once.  An item keeps the time it was first seen as its
start (a job: when it was opened).  Pure: the caller passes the clocks.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from vmmesh.api.common import Progress
from vmmesh.api.host import MAX_WORK, WorkItem, WorkKind

MIN_GAP = 2.0  # seconds between two publications of the key
FRACTION_STEP = 0.05


class CommandCounts(Protocol):
    """A job's commands (``jobs.service.Commands``)."""

    @property
    def running(self) -> int: ...

    @property
    def ok(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def lost(self) -> int: ...


class JobSession(Protocol):
    """An open job (``jobs.service.Session``)."""

    @property
    def job_id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def vms(self) -> Mapping[str, str]: ...

    @property
    def opened(self) -> float: ...

    @property
    def state(self) -> str: ...

    @property
    def commands(self) -> CommandCounts: ...

    @property
    def tasks(self) -> int: ...


def significant(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (0 stays 0)."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    return round(x, digits - 1 - math.floor(math.log10(x)))


def rounded(item: WorkItem) -> WorkItem:
    """``item`` as it is gossiped: coarse enough that it changes seldom."""
    fraction = item.fraction
    if fraction is not None:
        fraction = min(1.0, max(0.0, math.floor(fraction / FRACTION_STEP + 1e-9) * FRACTION_STEP))
        fraction = round(fraction, 2)
    done = item.done
    if item.kind is not WorkKind.JOB:  # bytes; a job's commands are few and exact
        done = min(item.total, int(significant(done))) if item.total else int(significant(done))
    return replace(item, fraction=fraction, done=done, rate=significant(item.rate))


def _text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def from_progress(kind: WorkKind, p: Progress, peer: str = "") -> WorkItem:
    return WorkItem(
        kind=kind,
        name=_text(p.task, 128),
        phase=_text(p.phase, 64),
        fraction=p.fraction,
        done=max(0, p.done),
        total=max(0, p.total),
        rate=max(0.0, p.rate) if math.isfinite(p.rate) else 0.0,
        peer=_text(peer, 128),
        note=_text(p.note, 128),
    )


def from_job(j: JobSession) -> WorkItem:
    c = j.commands
    done = c.ok + c.failed + c.lost
    total = max(done + c.running, j.tasks)  # a bag's tasks not started yet count too
    return WorkItem(
        kind=WorkKind.JOB,
        name=_text(j.name, 128),
        phase=_text(j.state, 64),
        fraction=done / total if total else None,
        done=done,
        total=total,
        failed=c.failed + c.lost,
        vms=len(j.vms),
        started=max(0.0, j.opened),
    )


def items(
    fetches: Mapping[Any, Progress],
    migrations: Mapping[str, Progress],
    targets: Mapping[str, str],
    jobs: Sequence[JobSession],
) -> dict[Hashable, WorkItem]:
    """This host's work under way, by a key that stays the same while it runs."""
    out: dict[Hashable, WorkItem] = {}
    for key, p in fetches.items():
        out[(WorkKind.FETCH, key)] = from_progress(WorkKind.FETCH, p)
    for name, p in migrations.items():
        out[(WorkKind.MIGRATION, name)] = from_progress(
            WorkKind.MIGRATION, p, targets.get(name, "")
        )
    for j in jobs:
        out[(WorkKind.JOB, j.job_id)] = from_job(j)
    return out


class WorkGossip:
    """Decides when this host's ``work`` key is published, and with what."""

    def __init__(self, min_gap: float = MIN_GAP) -> None:
        self.min_gap = min_gap
        self.published: tuple[WorkItem, ...] | None = None  # the last list published
        self._at = -math.inf  # when (monotonic)
        self._first_seen: dict[Hashable, float] = {}
        self._keys: frozenset[Hashable] | None = None  # the work the last list held

    def update(
        self, current: Mapping[Hashable, WorkItem], wall: float, now: float
    ) -> tuple[WorkItem, ...] | None:
        """The list to publish now, or None (unchanged, or too soon after the last)."""
        self._first_seen = {k: self._first_seen.get(k, wall) for k in current}
        out = sorted(
            (
                rounded(replace(item, started=item.started or round(self._first_seen[k], 1)))
                for k, item in current.items()
            ),
            key=lambda i: (i.started, i.kind.value, i.name),
        )[:MAX_WORK]
        value = tuple(out)
        if value == self.published:
            return None
        # work that starts or ends goes out at once (a finished migration must not
        # linger on the pages); only progress of the same work waits for min_gap
        keys = frozenset(current)
        if keys == self._keys and now - self._at < self.min_gap:
            return None
        self.published, self._at, self._keys = value, now, keys
        return value
