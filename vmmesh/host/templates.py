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
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from vmmesh.api.host import TemplateInfo, check_package
from vmmesh.errors import HypervisorError, NotFound, PackageInstallError, UsageError
from vmmesh.host.store import Store
from vmmesh.hypervisor.base import BootSpec, Guest, Hypervisor, ImageManifest

Progress = Callable[[str, float | None], None]

MAX_DEPTH = 4
BUILDING_PREFIX = ".building-"
_APT_MISSING = (
    re.compile(r"E: Unable to locate package (\S+)"),
    re.compile(r"E: Package '([^']+)' has no installation candidate"),
    re.compile(r"E: Couldn't find any package by (?:glob|regex) '([^']+)'"),
    re.compile(r"E: Version '[^']*' for '([^']+)' was not found"),
)


log = logging.getLogger("vmmesh.host.templates")

_WAIT_ONLINE = "/usr/lib/systemd/systemd-networkd-wait-online"
_APT_RETRIES_FILE = "/etc/apt/apt.conf.d/80vmmesh-retries"
UPDATE_ATTEMPTS = 3


def _no_progress(phase: str, fraction: float | None) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class BaseImage:
    """The base image as the template layer needs it: its id and its files."""

    directory: Path
    manifest: ImageManifest

    @property
    def image_id(self) -> str:
        return self.manifest.image_id

    @property
    def disk(self) -> Path:
        return self.directory / self.manifest.disk

    @property
    def kernel(self) -> Path:
        return self.directory / self.manifest.kernel

    @property
    def initrd(self) -> Path:
        return self.directory / self.manifest.initrd


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


def missing_packages(apt_output: str) -> list[str]:
    """Package names apt says it cannot find, in the order it says so."""
    out: list[str] = []
    for line in apt_output.splitlines():
        for pattern in _APT_MISSING:
            m = pattern.search(line)
            if m and m.group(1) not in out:
                out.append(m.group(1))
    return out


async def power_off(guest: Guest, timeout: float) -> int:
    """Power the guest off and return QEMU's exit status (0: clean power-off).

    Why not just ``Guest.shutdown``: qemu-ga's guest-shutdown runs
    ``shutdown -P +0``, which goes through logind; the development image masks
    logind, so that request hangs until the QMP ``quit`` fallback, a minute
    later.  ``systemctl poweroff --no-block`` asks systemd directly (1.5 s
    under TCG).  ``Guest.shutdown`` stays the fallback.
    """
    # the agent dies with the guest: its answer may never come
    with trio.move_on_after(15.0), contextlib.suppress(HypervisorError):
        await guest.exec(["systemctl", "poweroff", "--no-block"], timeout=10.0)
    with trio.move_on_after(timeout):
        return await guest.wait_exit()
    await guest.shutdown(timeout)
    return await guest.wait_exit()


def _tail(data: bytes, lines: int = 3) -> str:
    text = data.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-lines:])


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
        self.apt_sources = tuple(apt_sources)
        self.build_vcpus = build_vcpus
        self.build_memory_mb = build_memory_mb
        self.max_depth = max_depth
        self.agent_timeout = agent_timeout
        self.install_timeout = install_timeout
        self.poweroff_timeout = poweroff_timeout
        self.now = now
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
        parent_disk = self.disk_path(parent) if parent else self.base.disk
        started = time.monotonic()
        timings: dict[str, float] = {}

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
                    tmp.name,
                    depth,
                    self.now(),
                ),
            )
        guest: Guest | None = None
        done = False
        try:
            t = time.monotonic()
            progress("clone", None)
            tmp.unlink(missing_ok=True)
            await self.hv.create_overlay(parent_disk, tmp)
            timings["clone"] = time.monotonic() - t

            t = time.monotonic()
            progress("boot", None)
            spec = BootSpec(
                name=run_dir.name,
                disk=tmp,
                kernel=self.base.kernel,
                initrd=self.base.initrd,
                run_dir=run_dir,
                cmdline=self.base.manifest.cmdline,
                vcpus=self.build_vcpus,
                memory_mb=self.build_memory_mb,
            )
            guest = await self.hv.start(spec)
            await guest.wait_agent(self.agent_timeout)
            timings["boot"] = time.monotonic() - t

            t = time.monotonic()
            await self._install(guest, sorted(choice.missing), progress)
            timings["install"] = time.monotonic() - t

            t = time.monotonic()
            progress("shutdown", None)
            status = await power_off(guest, self.poweroff_timeout)
            guest = None
            if status != 0:
                # killed after the power-off timeout: QEMU may not have written
                # out its qcow2 metadata, so the delta is not trusted
                raise HypervisorError(f"build guest did not power off cleanly (exit {status})")
            timings["shutdown"] = time.monotonic() - t

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
                    await self._abandon(tid, guest, tmp, final)
            shutil.rmtree(run_dir, ignore_errors=True)

    async def _install(self, guest: Guest, missing: list[str], progress: Progress) -> None:
        if self.apt_sources:
            progress("sources", None)
            text = "\n".join(self.apt_sources) + "\n"
            await guest.write_file("/etc/apt/sources.list", text.encode())
            await guest.exec(
                [
                    "sh",
                    "-c",
                    "rm -f /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources",
                ]
            )
        progress("update", None)
        # A package source that drops a connection now and then (a busy mirror,
        # a loaded host) should cost a retry, not the template.
        await guest.write_file(_APT_RETRIES_FILE, b'Acquire::Retries "3";\n')
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            # the agent may answer before DHCP is done; apt needs the network
            await guest.exec(["sh", "-c", f"{_WAIT_ONLINE} --timeout=60 || true"], timeout=90.0)
            res = await guest.exec(["apt-get", "update"], timeout=self.install_timeout)
            if res.exit_code == 0:
                break
            if attempt == UPDATE_ATTEMPTS:
                raise PackageInstallError(
                    f"apt-get update failed in the guest ({attempt} attempts): {_tail(res.stderr)}"
                )
            log.info(
                "apt-get update failed in the build guest (attempt %d): %s",
                attempt,
                _tail(res.stderr),
            )
            await trio.sleep(5.0)
        progress("install", 0.0)
        res = await guest.exec(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            timeout=self.install_timeout,
        )
        if res.exit_code != 0:
            output = (res.stdout + b"\n" + res.stderr).decode("utf-8", "replace")
            unknown = missing_packages(output)
            if unknown:
                names = ", ".join(unknown)
                raise PackageInstallError(f"package not found: {names}")
            raise PackageInstallError(
                f"installing {' '.join(missing)} failed (apt exit {res.exit_code}): "
                f"{_tail(res.stderr or res.stdout)}"
            )
        progress("install", 1.0)
        progress("clean", None)
        await guest.exec(["apt-get", "clean"])
        await guest.exec(
            ["sh", "-c", "rm -rf /var/lib/apt/lists/*; fstrim -a >/dev/null 2>&1; sync"]
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
