"""Templates: package sets installed once, kept as qcow2 deltas, reused by VMs.

Theory of operation (SPEC items 5 and 11, thesis §3.1.2-3.1.3):

* A template is a qcow2 delta over a parent — the base image disk or another
  template — so it inherits the parent's packages.  Its id is
  ``sha256(base image id + "\\n" + sorted packages joined by "\\n")[:32]``:
  the same package set over the same base has the same id on every host, which
  is what gossip and placement compare.
* ``choose_parent`` (pure) picks what to start from: a template holding every
  wanted package is a *full match* (the smallest such wins, so an exact match
  beats a superset) and is used as is; otherwise the one holding the most
  wanted packages (fewest extras, then shallowest, on ties) becomes the parent
  and only the missing packages are installed.
* Building is crash-safe by construction.  A ``building`` row is committed
  first; the delta is written under ``templates/.building-<id>.qcow2``; the
  guest boots, apt installs, the guest powers off, ``qemu-img check`` passes,
  the delta is hashed, then the file is renamed to ``templates/<id>.qcow2`` and
  the row turns ``ready`` in the same transaction.  Any failure or
  cancellation kills the guest, removes the temp file and deletes the row;
  a node killed outright leaves a ``building`` row and/or a ``.building-``
  file that ``reconcile`` removes at the next start.
* Chains stay shallow: when the new delta would sit deeper than
  ``max_depth`` deltas over the base, it is flattened after the build
  (``Hypervisor.flatten`` of the whole chain) and rebased, unsafe, onto the
  base disk.  The result is a complete image whose reads never reach the base,
  so it is correct but as big as the base plus everything installed: we trade
  disk for depth, which only happens after ``max_depth`` successive partial
  builds.  Lineage is dropped (``parent_id`` None, chain of one hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from vmmesh.api.host import TemplateInfo
from vmmesh.api.names import check_package
from vmmesh.errors import HypervisorError, NotFound, UsageError
from vmmesh.host.build import BaseImage, Builder, Progress
from vmmesh.host.store import Store
from vmmesh.hypervisor.base import Guest, Hypervisor

MAX_DEPTH = 4
BUILDING_PREFIX = ".building-"


log = logging.getLogger("vmmesh.host.templates")


def _no_progress(phase: str, fraction: float | None) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class TemplateRecord:
    """One row of the ``templates`` table."""

    template_id: str
    parent_id: str | None
    base_image_id: str
    packages: frozenset[str]
    disk: str
    size: int
    sha256: str
    chain: tuple[str, ...]
    depth: int
    state: str
    created: float
    last_used: float = 0.0
    build_seconds: float = 0.0
    origin: str = "built"  # built here, or fetched from a peer

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TemplateRecord:
        return cls(
            template_id=row["template_id"],
            parent_id=row["parent_id"],
            base_image_id=row["base_image_id"],
            packages=frozenset(json.loads(row["packages"])),
            disk=row["disk"],
            size=int(row["size"]),
            sha256=row["sha256"],
            chain=tuple(json.loads(row["chain"])),
            depth=int(row["depth"]),
            state=row["state"],
            created=float(row["created"]),
            last_used=float(row["last_used"]),
            build_seconds=float(row["build_seconds"]),
            origin=row["origin"],
        )


@dataclass(frozen=True)
class Choice:
    """What ``choose_parent`` decided.

    ``parent`` None means the base image.  ``full`` means the parent already
    holds every wanted package (nothing to build); ``missing`` is what a build
    must install.
    """

    parent: TemplateRecord | None
    missing: frozenset[str]
    full: bool


def template_id(base_image_id: str, packages: Iterable[str]) -> str:
    """Content-derived id: same base + same package set = same id everywhere."""
    text = "\n".join([base_image_id, *sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def choose_parent(templates: Iterable[TemplateRecord], wanted: Iterable[str]) -> Choice:
    """Pick the template to reuse or to build on (SPEC item 5).

    Only ``ready`` templates count.  Full matches first, smallest package set
    first; otherwise most wanted packages in common, then fewest extra
    packages, then shallowest chain; ties broken by id so every host agrees.
    A template with nothing in common is never a parent: the base is smaller.
    """
    want = frozenset(wanted)
    ready = [t for t in templates if t.state == "ready"]
    full = [t for t in ready if want <= t.packages]
    if full:
        best = min(full, key=lambda t: (len(t.packages), t.depth, t.template_id))
        return Choice(best, frozenset(), True)
    partial = [t for t in ready if t.packages & want]
    if not partial:
        return Choice(None, want, False)
    best = min(
        partial,
        key=lambda t: (
            -len(t.packages & want),
            len(t.packages - want),
            t.depth,
            t.template_id,
        ),
    )
    return Choice(best, want - best.packages, False)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class TemplateManager:
    """Templates on this host: list, choose, build, reconcile.

    One instance per node.  Builds of the same package set are serialized by
    a per-id lock, so two requests arriving together build once.
    """

    def __init__(
        self,
        *,
        store: Store,
        hypervisor: Hypervisor,
        data_dir: Path,
        base: BaseImage,
        apt_sources: Iterable[str] = (),
        build_vcpus: int = 2,
        build_memory_mb: int = 1024,
        max_depth: int = MAX_DEPTH,
        agent_timeout: float = 300.0,
        install_timeout: float = 1800.0,
        poweroff_timeout: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.hv = hypervisor
        self.data_dir = data_dir
        self.dir = data_dir / "templates"
        self.run_root = data_dir / "run"
        self.base = base
        self.max_depth = max_depth
        self.now = now
        self.builder = Builder(
            hypervisor,
            base,
            apt_sources=tuple(apt_sources),
            vcpus=build_vcpus,
            memory_mb=build_memory_mb,
            agent_timeout=agent_timeout,
            install_timeout=install_timeout,
            poweroff_timeout=poweroff_timeout,
        )
        self._locks: dict[str, trio.Lock] = {}
        self.dir.mkdir(parents=True, exist_ok=True)

    # --- reading ------------------------------------------------------

    def records(self, *, include_building: bool = False) -> list[TemplateRecord]:
        rows = self.store.conn.execute("SELECT * FROM templates ORDER BY created").fetchall()
        recs = [TemplateRecord.from_row(r) for r in rows]
        return [r for r in recs if include_building or r.state == "ready"]

    def get(self, tid: str) -> TemplateRecord:
        row = self.store.conn.execute(
            "SELECT * FROM templates WHERE template_id = ? AND state = 'ready'", (tid,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no template {tid}")
        return TemplateRecord.from_row(row)

    def disk_path(self, rec: TemplateRecord) -> Path:
        return self.dir / rec.disk

    def templates_info(self) -> list[TemplateInfo]:
        """The inventory for gossip: full package set, hashes and sizes base outward."""
        recs = {r.template_id: r for r in self.records()}
        out: list[TemplateInfo] = []
        for rec in recs.values():
            sizes: list[int] = []
            cur: TemplateRecord | None = rec
            while cur is not None:
                sizes.append(cur.size)
                cur = recs.get(cur.parent_id) if cur.parent_id else None
            out.append(
                TemplateInfo(
                    template_id=rec.template_id,
                    base_image_id=rec.base_image_id,
                    packages=rec.packages,
                    chain=rec.chain,
                    delta_sizes=tuple(reversed(sizes)),
                    parent_id=rec.parent_id,
                )
            )
        return out

    def touch(self, tid: str) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE templates SET last_used = ? WHERE template_id = ?", (self.now(), tid)
            )

    # --- building -----------------------------------------------------

    async def ensure_template(
        self, packages: Iterable[str], progress: Progress = _no_progress
    ) -> tuple[TemplateRecord | None, bool, dict[str, float]]:
        """Return a template holding ``packages``, building it if needed.

        The record is None only when no packages are wanted (the base image
        serves).  ``built`` says whether this call installed anything;
        ``timings`` holds seconds per phase (``install`` is 0 on reuse).
        """
        wanted = frozenset(packages)
        for p in wanted:
            try:
                check_package(p)
            except Exception:
                raise UsageError(f"bad package name {p!r:.80}") from None
        if not wanted:
            return None, False, {"install": 0.0}
        tid = template_id(self.base.image_id, wanted)
        lock = self._locks.setdefault(tid, trio.Lock())
        async with lock:
            choice = choose_parent(self._same_base(), wanted)
            if choice.full and choice.parent is not None:
                self.touch(choice.parent.template_id)
                progress("reuse", 1.0)
                return self.get(choice.parent.template_id), False, {"install": 0.0}
            rec, timings = await self._build(choice, progress)
            return rec, True, timings

    def _same_base(self) -> list[TemplateRecord]:
        return [t for t in self.records() if t.base_image_id == self.base.image_id]

    async def _build(
        self, choice: Choice, progress: Progress
    ) -> tuple[TemplateRecord, dict[str, float]]:
        parent = choice.parent
        packages = choice.missing | (parent.packages if parent else frozenset())
        tid = template_id(self.base.image_id, packages)
        depth = parent.depth + 1 if parent else 1
        tmp = self.dir / f"{BUILDING_PREFIX}{tid}.qcow2"
        final = self.dir / f"{tid}.qcow2"
        run_dir = self.run_root / f"tpl-{tid[:16]}"
        started = time.monotonic()
        self._begin(tid, parent, packages, tmp.name, depth)
        guest: list[Guest | None] = [None]
        done = False
        try:
            t = time.monotonic()
            progress("clone", None)
            tmp.unlink(missing_ok=True)
            await self.hv.create_overlay(self.disk_path(parent) if parent else self.base.disk, tmp)
            timings = {"clone": time.monotonic() - t}
            timings |= await self.builder.build(
                tmp, run_dir, sorted(choice.missing), progress, lambda g: guest.__setitem__(0, g)
            )
            t = time.monotonic()
            progress("record", None)
            rec = await self._finish(
                tid=tid, tmp=tmp, final=final, parent=parent, depth=depth, started=started
            )
            timings["record"] = time.monotonic() - t
            done = True
            progress("ready", 1.0)
            return rec, timings
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await self._abandon(tid, guest[0], tmp, final)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _begin(
        self,
        tid: str,
        parent: TemplateRecord | None,
        packages: frozenset[str],
        disk: str,
        depth: int,
    ) -> None:
        """Commit the ``building`` row first: a crash from here on is undone by reconcile."""
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM templates WHERE template_id = ?", (tid,))
            conn.execute(
                "INSERT INTO templates (template_id, parent_id, base_image_id, packages, disk,"
                " depth, state, created) VALUES (?, ?, ?, ?, ?, ?, 'building', ?)",
                (
                    tid,
                    parent.template_id if parent else None,
                    self.base.image_id,
                    json.dumps(sorted(packages)),
                    disk,
                    depth,
                    self.now(),
                ),
            )

    async def _finish(
        self,
        *,
        tid: str,
        tmp: Path,
        final: Path,
        parent: TemplateRecord | None,
        depth: int,
        started: float,
    ) -> TemplateRecord:
        await self.hv.check_disk(tmp)
        parent_id = parent.template_id if parent else None
        inherited = parent.chain if parent else ()
        if depth > self.max_depth:
            flat = tmp.with_name(tmp.name + ".flat")
            try:
                await self.hv.flatten(tmp, flat)
                await self.hv.rebase_unsafe(flat, self.base.disk)
                os.replace(flat, tmp)
            finally:
                flat.unlink(missing_ok=True)
            depth, parent_id, inherited = 1, None, ()
        digest = await trio.to_thread.run_sync(_sha256_file, tmp)
        size = (await trio.Path(tmp).stat()).st_size
        chain = (*inherited, digest)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE templates SET state = 'ready', disk = ?, size = ?, sha256 = ?,"
                " chain = ?, depth = ?, parent_id = ?, last_used = ?, build_seconds = ?"
                " WHERE template_id = ?",
                (
                    final.name,
                    size,
                    digest,
                    json.dumps(chain),
                    depth,
                    parent_id,
                    self.now(),
                    time.monotonic() - started,
                    tid,
                ),
            )
            os.replace(tmp, final)
        return self.get(tid)

    async def _abandon(self, tid: str, guest: Guest | None, tmp: Path, final: Path) -> None:
        """Undo a build: no guest, no file, no row."""
        if guest is not None:
            with contextlib.suppress(HypervisorError, OSError):
                await guest.kill()
        await trio.Path(tmp).unlink(missing_ok=True)
        with self.store.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM templates WHERE template_id = ? AND state = 'building'", (tid,)
            ).rowcount
        if deleted:
            await trio.Path(final).unlink(missing_ok=True)

    # --- start-up -------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Make rows and files agree after a crash; returns what was removed.

        A build guest that outlived a killed node (QEMU runs in its own
        session) is killed first.  Half-made templates (``building`` rows,
        ``.building-*`` files) go.
        A ``ready`` row whose disk is missing goes (the disk is the truth: a
        row cannot be used without it), and so do templates built on it.  A
        disk with no ready row goes (without a row we know neither its
        packages nor that it was finished).
        """
        removed: list[str] = []
        for run_dir in sorted(self.run_root.glob("tpl-*")):
            guest = await self.hv.adopt(run_dir.name, run_dir)
            if guest is not None:
                await guest.kill()
                removed.append(f"build guest {run_dir.name}")
            shutil.rmtree(run_dir, ignore_errors=True)
        with self.store.transaction() as conn:
            n = conn.execute("DELETE FROM templates WHERE state != 'ready'").rowcount
            if n:
                removed.append(f"{n} half-built template row(s)")
            ready = {
                r["template_id"]: (r["disk"], r["parent_id"])
                for r in conn.execute("SELECT template_id, disk, parent_id FROM templates")
            }
            gone = {tid for tid, (disk, _) in ready.items() if not (self.dir / disk).is_file()}
            changed = True
            while changed:
                changed = False
                for tid, (_, parent_id) in ready.items():
                    if tid not in gone and parent_id is not None and parent_id in gone:
                        gone.add(tid)
                        changed = True
            for tid in sorted(gone):
                conn.execute("DELETE FROM templates WHERE template_id = ?", (tid,))
                removed.append(f"template row {tid} (disk missing)")
            keep = {disk for tid, (disk, _) in ready.items() if tid not in gone}
        for entry in sorted(self.dir.iterdir()):
            if entry.is_file() and entry.name not in keep:
                entry.unlink()
                removed.append(f"orphan file templates/{entry.name}")
        return removed
