"""Draining a host: no new VMs, and its VMs moved away a few at a time.

A draining host says so in gossip (``draining``), so no planner gives it a
VM and no migration picks it as a target; the flag is kept in the host's
state database, so it survives a restart of the node.  Its running VMs are
migrated live, ``PARALLEL`` at a time, each to the host ``pick`` chooses
then (a target that turns out full is replaced by another once).  Job VMs
(``job-...``) are left to end with their job: their job's owner holds a lease
on this host.  Where each VM went is remembered (``departed``), so
``undrain --bring-back`` can ask their new hosts to move them back here.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from vmmesh.api.common import Progress
from vmmesh.api.migrate import DrainReport, MigrateReport, Moved
from vmmesh.api.names import JOB_PREFIX
from vmmesh.errors import VmmeshError
from vmmesh.host.store import Store
from vmmesh.migrate.rule import Figures
from vmmesh.vm.rows import VmRecord
from vmmesh.vm.state import VmState

log = logging.getLogger("vmmesh.migrate")

PARALLEL = 2
DRAINING_KEY = "draining"
DEPARTED_KEY = "departed"
MIGRATIONS_KEY = "migration_history"
KEEP = 20
DEFAULT_RESUME = 0.5  # seconds, until a migration from here was measured

Emit = Callable[[Progress], Awaitable[None]]
#: Move one VM away (the target picked, a full one replaced) -> report.
Mover = Callable[[VmRecord], Awaitable[MigrateReport]]


def is_draining(store: Store) -> bool:
    return bool(store.get_meta(DRAINING_KEY, False))


def set_draining(store: Store, on: bool) -> None:
    store.set_meta(DRAINING_KEY, on)


def departed(store: Store) -> dict[str, str]:
    """VM name -> the host it went to while this host drained."""
    raw = store.get_meta(DEPARTED_KEY, "{}")
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def set_departed(store: Store, where: dict[str, str]) -> None:
    store.set_meta(DEPARTED_KEY, json.dumps(where, sort_keys=True))


def record_migration(store: Store, report: MigrateReport) -> None:
    """Keep a migration's measured figures for the migrate-or-restart rule."""
    commit = sum(p.seconds for p in report.phases if p.name == "commit")
    sample = {"bytes": report.wire_bytes, "seconds": report.seconds, "resume": commit}
    history = list(store.get_meta(MIGRATIONS_KEY, []) or [])
    store.set_meta(MIGRATIONS_KEY, [*history, sample][-KEEP:])


def figures(
    store: Store, rec: VmRecord, overlay_bytes: int, starts: list[float], now: float
) -> Figures:
    """The rule's inputs for moving ``rec`` away, all measured here.

    The rate and the resume time are the medians of this host's migrations
    (none yet: no rate, so the rule keeps the work); the bytes are the VM's
    memory and overlay; a fresh start is the median start of this host's VMs
    (warm or cold, as they came)."""
    history = [h for h in store.get_meta(MIGRATIONS_KEY, []) or [] if isinstance(h, dict)]
    rates = [h["bytes"] / h["seconds"] for h in history if h.get("seconds", 0) > 0]
    resumes = [h["resume"] for h in history if h.get("resume", 0) > 0]
    return Figures(
        run_seconds=max(0.0, now - rec.started),
        bytes_to_move=rec.memory_mb * (1 << 20) + overlay_bytes,
        rate=statistics.median(rates) if rates else None,
        resume_seconds=statistics.median(resumes) if resumes else DEFAULT_RESUME,
        start_seconds=statistics.median(starts) if starts else rec.start_seconds,
    )


async def drain(
    host: str, vms: list[VmRecord], move: Mover, store: Store, emit: Emit
) -> DrainReport:
    """Move every running VM of ``vms`` away (job VMs stay); report each."""
    t0 = time.monotonic()
    moved: list[Moved] = []
    left: list[str] = []
    errors: list[str] = []
    todo = []
    for v in vms:
        if v.name.startswith(JOB_PREFIX):
            left.append(f"{v.name}: a job's VM, it ends with its job")
        elif v.state != VmState.RUNNING:
            left.append(f"{v.name}: {v.state}, not running")
        else:
            todo.append(v)
    limiter = trio.CapacityLimiter(PARALLEL)
    where = departed(store)

    async def one(i: int, rec: VmRecord) -> None:
        async with limiter:
            await emit(Progress(task=rec.name, phase="moving", fraction=i / max(1, len(todo))))
            try:
                r = await move(rec)
            except VmmeshError as exc:
                errors.append(f"{rec.name}: {exc}")
                return
            moved.append(Moved(vm=r.vm, source=r.source, target=r.target, seconds=r.seconds,
                               downtime_ms=r.downtime_ms, how="restarted" if r.restarted
                               else "migrated", why=r.decision))  # fmt: skip
            where[rec.name] = r.target
            set_departed(store, where)
            await emit(Progress(task=rec.name, phase=f"moved to {r.target}", fraction=1.0))

    async with trio.open_nursery() as nursery:
        for i, rec in enumerate(todo):
            nursery.start_soon(one, i, rec)
    log.info("drained %s: %d moved, %d left, %d errors", host, len(moved), len(left), len(errors))
    return DrainReport(
        host=host,
        draining=True,
        moved=tuple(sorted(moved, key=lambda m: m.vm)),
        left=tuple(left),
        errors=tuple(errors),
        seconds=round(time.monotonic() - t0, 3),
    )
