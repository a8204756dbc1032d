"""Templates: package sets installed once, kept as qcow2 deltas, reused by VMs.

Theory of operation (SPEC items 5, 9 and 11, thesis §3.1.2-3.1.3):

* A template is a chain of qcow2 deltas over the base image, so it inherits
  its parent's packages.  Its id is ``sha256(base image id + "\\n" + sorted
  packages joined by "\\n")[:32]``: the same package set over the same base
  has the same id on every host, which is what gossip and placement compare.
* Delta files are named by their content: ``templates/<sha256>.qcow2``, each
  naming its backing file relative to itself (``<parent sha>.qcow2``, or
  ``../images/<id>/disk.qcow2`` for the base).  So a delta's bytes are the
  same on every host, a delta fetched from a peer is used exactly as it was
  sent and verified, and two templates of the same id built on two hosts
  (different bytes) never collide.  A template row names the top delta and
  its ``chain`` of hashes, base outward; a delta file lives as long as some
  template's chain holds it.
* ``choose_parent`` (pure) picks what to start from: a template holding every
  wanted package is a *full match* (the smallest such wins, so an exact match
  beats a superset) and is used as is; otherwise the one holding the most
  wanted packages (fewest extras, then shallowest, on ties) becomes the parent
  and only the missing packages are installed.
* Before building, a ``TemplateFetcher`` (the transfer service) may fetch the
  template from a peer instead, when its estimate says that is faster; the
  answer's ``TemplateSource`` says which way it went and both estimates.
* Building is crash-safe by construction.  A ``building`` row is committed
  first; the delta is written under ``templates/.building-<id>.qcow2``; the
  guest boots, apt installs, the guest powers off, ``qemu-img check`` passes,
  the delta is hashed, then the file is renamed to ``<sha>.qcow2`` and the row
  turns ``ready`` in the same transaction.  Any failure or cancellation kills
  the guest, removes the temp file and deletes the row; a node killed
  outright leaves a ``building`` row and/or a ``.building-`` file that
  ``reconcile`` removes at the next start.
* Chains stay shallow: when the new delta would sit deeper than
  ``max_depth`` deltas over the base, the whole chain is flattened after the
  build and rebased, unsafe, onto the base disk: one bigger delta instead of
  a deep chain (lineage is dropped: ``parent_id`` None, chain of one hash).
* The cache counts against the storage quota; ``evictable`` lists, least
  recently used first, the templates no VM uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from vmmesh.api.host import TemplateInfo
from vmmesh.api.names import check_package
from vmmesh.api.vm import FETCH_AUTO, TemplateSource
from vmmesh.errors import HypervisorError, IntegrityError, NotFound, UsageError, VmmeshError
from vmmesh.host.build import BaseImage, Builder, ProgressSink, WarmBuild
from vmmesh.host.history import BuildSample, History, install_estimate
from vmmesh.host.reconcile import kill_leftovers
from vmmesh.host.store import Store
from vmmesh.host.warm import STATE, WarmStore
from vmmesh.hypervisor.base import Guest, Hypervisor

MAX_DEPTH = 4
BUILDING_PREFIX = ".building-"
SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("vmmesh.host.templates")


def _no_progress(phase: str, fraction: float | None) -> None:
    """Default progress sink."""


def delta_name(sha: str) -> str:
    """The file name of the delta with content hash ``sha`` (checked: never a peer's path)."""
    if not SHA256.fullmatch(sha):
        raise IntegrityError(f"not a sha256: {sha!r:.80}")
    return f"{sha}.qcow2"


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


@dataclass(frozen=True)
class Ensured:
    """What ``ensure_template`` did: the template (None: the base image serves), how
    it came to be (``reused``, ``built``, ``fetched``), seconds per phase, and the
    fetch-or-install decision with its estimates."""

    record: TemplateRecord | None
    how: str
    timings: dict[str, float]
    source: TemplateSource

    @property
    def built(self) -> bool:
        return self.how == "built"


class TemplateFetcher(Protocol):
    """Gets a template from peers instead of building it (``vmmesh.transfer``)."""

    async def obtain(
        self,
        template_id: str,
        wanted: frozenset[str],
        install_estimate: float,
        policy: str,
        progress: ProgressSink,
    ) -> tuple[TemplateRecord | None, TemplateSource]:
        """The fetched and recorded template, or None (build it), and why."""
        ...

    async def make_room(self, need_bytes: int) -> None:
        """Evict cached templates until ``need_bytes`` more fit in the storage quota."""
        ...


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
        key=lambda t: (-len(t.packages & want), len(t.packages - want), t.depth, t.template_id),
    )
    return Choice(best, want - best.packages, False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_packages(packages: Iterable[str]) -> frozenset[str]:
    wanted = frozenset(packages)
    for p in wanted:
        try:
            check_package(p)
        except Exception:
            raise UsageError(f"bad package name {p!r:.80}") from None
    return wanted


class TemplateManager:
    """Templates on this host: list, choose, build, record fetched ones, evict, reconcile.

    One instance per node.  Builds of the same package set are serialized by
    a per-id lock, so two requests arriving together build (or fetch) once.
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
        self.history = History(store.get_meta, store.set_meta)
        self.fetcher: TemplateFetcher | None = None
        self.downloaders: Callable[[], int] = lambda: 1
        self.building: dict[str, float] = {}  # template id -> expected done (unix time)
        self.on_change: Callable[[], None] = lambda: None
        self.on_remove: list[Callable[[str], None]] = []
        # Set by the VM manager: while warm starts are on, the warm states and
        # the VMs' shape (vcpus, memory), so that builds resume their parent's
        # state (the base image's, or a template's) and leave their own.
        self.warm_source: Callable[[], tuple[WarmStore, int, int] | None] = lambda: None
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

    def delta_path(self, sha: str) -> Path:
        return self.dir / delta_name(sha)

    def has_delta(self, sha: str) -> bool:
        return self.delta_path(sha).is_file()

    def delta_sizes(self, rec: TemplateRecord) -> tuple[int, ...]:
        sizes = []
        for sha in rec.chain:
            try:
                sizes.append(self.delta_path(sha).stat().st_size)
            except OSError:
                sizes.append(0)
        return tuple(sizes)

    def templates_info(self) -> list[TemplateInfo]:
        """The inventory for gossip: full package set, hashes and sizes base outward."""
        return [
            TemplateInfo(
                template_id=rec.template_id,
                base_image_id=rec.base_image_id,
                packages=rec.packages,
                chain=rec.chain,
                delta_sizes=self.delta_sizes(rec),
                parent_id=rec.parent_id,
            )
            for rec in self.records()
        ]

    def touch(self, tid: str) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE templates SET last_used = ? WHERE template_id = ?", (self.now(), tid)
            )

    def _delta_guess(self, packages: int) -> int:
        """Bytes a new delta installing ``packages`` packages will likely take."""
        per = [s.delta_bytes / s.packages for s in self.history.builds() if s.packages]
        return int(packages * (sorted(per)[len(per) // 2] if per else 50e6))

    def install_estimate(self, packages: int) -> float:
        return install_estimate(self.history.builds(), packages, self.downloaders()).seconds

    # --- getting one ----------------------------------------------------

    async def ensure_template(
        self,
        packages: Iterable[str],
        progress: ProgressSink = _no_progress,
        *,
        policy: str = FETCH_AUTO,
    ) -> Ensured:
        """A template holding ``packages``: reused, fetched from a peer, or built here."""
        wanted = _check_packages(packages)
        if not wanted:
            return Ensured(None, "reused", {"install": 0.0}, TemplateSource())
        tid = template_id(self.base.image_id, wanted)
        lock = self._locks.setdefault(tid, trio.Lock())
        async with lock:
            choice = choose_parent(self._same_base(), wanted)
            if choice.full and choice.parent is not None:
                self.touch(choice.parent.template_id)
                progress("reuse", 1.0)
                rec = self.get(choice.parent.template_id)
                return Ensured(rec, "reused", {"install": 0.0}, TemplateSource())
            source = TemplateSource(how="built")
            if self.fetcher is not None:
                t = time.monotonic()
                estimate = self.install_estimate(len(choice.missing))
                got, source = await self.fetcher.obtain(tid, wanted, estimate, policy, progress)
                if got is not None:
                    self.touch(got.template_id)
                    return Ensured(got, "fetched", {"fetch": time.monotonic() - t}, source)
            self.building[tid] = self.now() + self.install_estimate(len(choice.missing))
            self.on_change()
            try:
                if self.fetcher is not None:
                    await self.fetcher.make_room(self._delta_guess(len(choice.missing)))
                rec, timings = await self._build(choice, progress)
            finally:
                self.building.pop(tid, None)
                self.on_change()
            return Ensured(rec, "built", timings, source)

    def _same_base(self) -> list[TemplateRecord]:
        return [t for t in self.records() if t.base_image_id == self.base.image_id]

    # --- building -----------------------------------------------------

    async def _build(
        self, choice: Choice, progress: ProgressSink
    ) -> tuple[TemplateRecord, dict[str, float]]:
        parent = choice.parent
        packages = choice.missing | (parent.packages if parent else frozenset())
        tid = template_id(self.base.image_id, packages)
        tmp = self.dir / f"{BUILDING_PREFIX}{tid}.qcow2"
        run_dir = self.run_root / f"tpl-{tid[:16]}"
        started = time.monotonic()
        self._begin(tid, parent, packages, tmp.name)
        guest: list[Guest | None] = [None]
        done = False
        source = self.warm_source()
        warm: WarmBuild | None = None
        try:
            t = time.monotonic()
            progress("clone", None)
            tmp.unlink(missing_ok=True)
            warm = await self._warm_build(source, parent, tid, tmp) if source else None
            if warm is None:
                await self.hv.create_overlay(self._parent_disk(parent), tmp)
            timings = {"clone": time.monotonic() - t}
            timings |= await self.builder.build(
                tmp, run_dir, sorted(choice.missing), progress, lambda g: guest.__setitem__(0, g),
                warm=warm,
            )  # fmt: skip
            t = time.monotonic()
            progress("record", None)
            rec = await self._finish(tid=tid, tmp=tmp, parent=parent, started=started)
            timings["record"] = time.monotonic() - t
            done = True
            if source is not None and warm is not None and "save" in timings:
                await self._keep_warm(source[0], rec, warm, timings)
            self._remember(timings, len(choice.missing), rec.size)
            progress("ready", 1.0)
            return rec, {k: v for k, v in timings.items() if not k.startswith("download")}
        finally:
            if warm is not None and source is not None and source[0].making(tid):
                source[0].abandon(tid)
            if not done:
                with trio.CancelScope(shield=True):
                    await self._abandon(tid, guest[0], tmp)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _parent_disk(self, parent: TemplateRecord | None) -> Path:
        return self.disk_path(parent) if parent else self.base.disk

    async def _warm_build(
        self,
        source: tuple[WarmStore, int, int],
        parent: TemplateRecord | None,
        tid: str,
        tmp: Path,
    ) -> WarmBuild | None:
        """Start a build from its parent's warm state if there is one of the VMs' shape:
        ``tmp`` becomes a copy of that state's overlay (the disk its RAM expects)."""
        warm, vcpus, memory_mb = source
        state = warm.get(parent.template_id if parent else self.base.image_id)
        if state is None:
            return None
        spec = self.base.boot_spec(tid[:16], tmp, self.run_root / tid[:16], vcpus, memory_mb)
        why = state.shape.differs(await self.hv.shape(spec))
        if why:
            log.info("building %s cold: the parent's warm state has another shape: %s", tid, why)
            return None
        try:
            await trio.to_thread.run_sync(shutil.copyfile, state.disk, tmp)
        except OSError as exc:  # the state went meanwhile (trimmed, its template evicted)
            log.info("building %s cold: the parent's warm state went: %s", tid[:12], exc)
            tmp.unlink(missing_ok=True)
            return None
        await self.hv.rebase_unsafe(tmp, self._parent_disk(parent))
        return WarmBuild(state.state, warm.staging(tid) / STATE, vcpus, memory_mb)

    async def _keep_warm(
        self, store: WarmStore, rec: TemplateRecord, warm: WarmBuild, timings: Mapping[str, float]
    ) -> None:
        """The state a warm build saved becomes the new template's warm state."""
        spec = self.base.boot_spec("shape", self.disk_path(rec), self.run_root / "shape",
                                   warm.vcpus, warm.memory_mb)  # fmt: skip
        seconds = timings["resume"] + timings["save"]
        try:
            await store.adopt(rec.template_id, self.disk_path(rec), await self.hv.shape(spec),
                                  seconds)  # fmt: skip
        except (VmmeshError, OSError) as exc:  # the template stands; its VMs boot cold
            log.warning("the warm state of %s was not kept: %s", rec.template_id[:12], exc)

    def _remember(self, timings: Mapping[str, float], packages: int, delta_bytes: int) -> None:
        self.history.add_build(
            BuildSample(
                boot=timings.get("boot", timings.get("resume", 0.0)),
                update=timings.get("update", 0.0),
                install=timings.get("install", 0.0),
                shutdown=timings.get("shutdown", timings.get("save", 0.0)),
                packages=packages,
                download_bytes=int(timings.get("download_bytes", 0)),
                download_seconds=timings.get("download_seconds", 0.0),
                delta_bytes=delta_bytes,
            )
        )

    def _begin(
        self, tid: str, parent: TemplateRecord | None, packages: frozenset[str], disk: str
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
                    (parent.depth + 1) if parent else 1,
                    self.now(),
                ),
            )

    async def _finish(
        self, *, tid: str, tmp: Path, parent: TemplateRecord | None, started: float
    ) -> TemplateRecord:
        await self.hv.check_disk(tmp)
        parent_id = parent.template_id if parent else None
        inherited = parent.chain if parent else ()
        if len(inherited) + 1 > self.max_depth:
            flat = tmp.with_name(tmp.name + ".flat")
            try:
                await self.hv.flatten(tmp, flat)
                await self.hv.rebase_unsafe(flat, self.base.disk)
                os.replace(flat, tmp)
            finally:
                flat.unlink(missing_ok=True)
            parent_id, inherited = None, ()
        digest = await trio.to_thread.run_sync(sha256_file, tmp)
        size = (await trio.Path(tmp).stat()).st_size
        chain = (*inherited, digest)
        final = self.delta_path(digest)
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
                    len(chain),
                    parent_id,
                    self.now(),
                    time.monotonic() - started,
                    tid,
                ),
            )
            os.replace(tmp, final)
        return self.get(tid)

    async def _abandon(self, tid: str, guest: Guest | None, tmp: Path) -> None:
        """Undo a build: no guest, no file, no row."""
        if guest is not None:
            with contextlib.suppress(HypervisorError, OSError):
                await guest.kill()
        await trio.Path(tmp).unlink(missing_ok=True)
        with self.store.transaction() as conn:
            conn.execute(
                "DELETE FROM templates WHERE template_id = ? AND state = 'building'", (tid,)
            )

    # --- fetched templates ------------------------------------------------

    def record_fetched(self, info: TemplateInfo, staged: Mapping[str, Path]) -> TemplateRecord:
        """Make ``info`` a template here from verified delta files.

        ``staged`` maps each delta hash of the chain that was fetched to its
        verified file (moved into place here); the others must be here
        already.  Files move in before the row is written, in one
        transaction: a crash in between leaves delta files no chain holds,
        which ``reconcile`` removes.
        """
        if info.base_image_id != self.base.image_id:
            raise IntegrityError(
                f"template {info.template_id} is made over base image "
                f"{info.base_image_id[:16]}, not this mesh's {self.base.image_id[:16]}"
            )
        for sha in info.chain:
            if sha in staged:
                os.replace(staged[sha], self.delta_path(sha))
            elif not self.has_delta(sha):
                raise IntegrityError(f"delta {sha[:16]} of {info.template_id} is missing")
        local_parent = None
        if info.parent_id is not None:
            with contextlib.suppress(NotFound):
                parent = self.get(info.parent_id)
                if parent.chain == info.chain[:-1]:
                    local_parent = parent.template_id
        top = info.chain[-1]
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM templates WHERE template_id = ?", (info.template_id,))
            conn.execute(
                "INSERT INTO templates (template_id, parent_id, base_image_id, packages, disk,"
                " size, sha256, chain, depth, state, created, last_used, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'ready', ?, ?, 'fetched')",
                (
                    info.template_id,
                    local_parent,
                    info.base_image_id,
                    json.dumps(sorted(info.packages)),
                    delta_name(top),
                    self.delta_path(top).stat().st_size,
                    top,
                    json.dumps(list(info.chain)),
                    len(info.chain),
                    self.now(),
                    self.now(),
                ),
            )
        return self.get(info.template_id)

    # --- the cache --------------------------------------------------------

    def evictable(self, in_use: set[str]) -> list[TemplateRecord]:
        """Templates no VM (and no other template's chain) needs, least recently used first."""
        records = self.records()
        needed = {
            sha for r in records if r.template_id in in_use for sha in r.chain
        }  # a VM's template's chain stays whole
        out = [r for r in records if r.template_id not in in_use and r.sha256 not in needed]
        return sorted(out, key=lambda r: (r.last_used, r.created))

    def remove(self, tid: str) -> int:
        """Forget a template and delete the delta files no other chain holds; bytes freed."""
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM templates WHERE template_id = ?", (tid,))
        for hook in self.on_remove:
            hook(tid)
        return self.collect_garbage()

    def collect_garbage(self) -> int:
        """Delete delta files no ready template's chain holds; returns the bytes freed."""
        keep = {delta_name(sha) for r in self.records() for sha in r.chain}
        freed = 0
        for entry in sorted(self.dir.iterdir()):
            if entry.is_file() and entry.name not in keep and not entry.name.startswith("."):
                freed += entry.stat().st_blocks * 512
                entry.unlink()
        return freed

    # --- start-up -------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Make rows and files agree after a crash; returns what was removed.

        A build guest that outlived a killed node (QEMU runs in its own
        session) is killed first.  Half-made templates (``building`` rows,
        ``.building-*`` files) go.  A ``ready`` row one of whose chain files is
        missing goes (the files are the truth: a row cannot be used without
        them).  A delta file no ready row's chain holds goes (without a row we
        know neither its packages nor that it was finished).
        """
        removed = await kill_leftovers(self.hv, self.run_root.glob("tpl-*"), "build guest")
        with self.store.transaction() as conn:
            n = conn.execute("DELETE FROM templates WHERE state != 'ready'").rowcount
            if n:
                removed.append(f"{n} half-built template row(s)")
        for rec in self.records():
            if not rec.chain or not all(self.has_delta(sha) for sha in rec.chain):
                with self.store.transaction() as conn:
                    conn.execute("DELETE FROM templates WHERE template_id = ?", (rec.template_id,))
                removed.append(f"template row {rec.template_id} (disk missing)")
        keep = {delta_name(sha) for r in self.records() for sha in r.chain}
        for entry in sorted(self.dir.iterdir()):
            if entry.is_file() and entry.name not in keep:
                entry.unlink()
                removed.append(f"orphan file templates/{entry.name}")
        return removed
