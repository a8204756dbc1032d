"""VMs on this host: linked clones of templates, booted, watched, shut down.

Theory of operation (SPEC items 4-8 and 11, thesis §3.1.1-3.1.2):

* ``request_local`` admits up to COUNT VMs against real free capacity
  (``reserve``), makes sure a template holds the packages
  (``TemplateManager.ensure_template``), then for each VM (side by side, at
  most one boot per host core, as boots are CPU-bound): commits a
  ``creating`` row, writes ``vms/<vm_id>.qcow2`` as an overlay of the template
  (a linked clone: no copy), boots it, waits for the guest agent, gives it its
  own identity (``persona``), unpacks the optional custom zip into ``/opt``,
  and marks the row ``running``.  A VM that fails half-way is killed and its
  overlay and row removed.
* Every running guest has a watcher task in the manager's nursery (started
  by ``run``).  When QEMU exits, the watcher looks at the row: ``stopping``
  means we ordered it (nothing to do, the shutdown path cleans up); anything
  else is an *unexpected stop*: the row becomes ``lost``, its stop reason
  says how QEMU ended, and ``on_unexpected_stop`` is called (keep-alive's
  hook).  The overlay of a lost VM is kept so it can be restarted elsewhere.
* ``shutdown(name)`` is an order, and it removes every VM of that name
  whatever its state: a running guest's QEMU is ended at once (no power-off
  inside the guest: its disk is thrown away, so there is nothing to flush);
  then overlay, run directory and row go; the template stays.
* Admission is atomic: ``reserve`` and the creation path compute capacity
  and update ``_reserved`` without an ``await`` in between, so two requests
  racing on one host can never both take the last slot.
* ``reconcile`` at node start makes rows agree with QEMU and the disk (see its
  docstring for which side wins).

VM naming: VMs of one request share its NAME; each has its own hex ``vm_id``
(the QEMU name and file name, never a user string) and a display name
``NAME-<n>`` (``api.names``).  The display name is what the ``name`` column
holds; the request name is recovered by cutting the ``-<n>`` suffix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from vmmesh.api.host import Capacity
from vmmesh.api.names import check_vm_name, next_index, request_name_of
from vmmesh.api.vm import FETCH_AUTO, TemplateSource
from vmmesh.errors import (
    CapacityError,
    HypervisorError,
    NotFound,
    StateError,
    UsageError,
    VmmeshError,
)
from vmmesh.host import customzip, persona
from vmmesh.host.build import Progress
from vmmesh.host.capacity import CapacityPolicy, HostProbe, Usage, compute_capacity, disk_used_mb
from vmmesh.host.customzip import ZipEntry, check_zip
from vmmesh.host.reconcile import kill_leftovers
from vmmesh.host.sshkeys import check_public_keys, pick_port
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager, TemplateRecord
from vmmesh.host.warm import WarmStore, warm_error
from vmmesh.hypervisor.base import BootSpec, ExecResult, Guest, Hypervisor
from vmmesh.nurseries import open_nursery

log = logging.getLogger("vmmesh.vms")

# States whose VMs hold cores and memory.
ACTIVE = ("creating", "running", "stopping")
WARM_TIMEOUT = 60.0  # a resumed guest answers in about a second; a stuck one is abandoned
WARM_RETRY = 10.0  # a warm boot that found no free slot is tried again this often


def _can_bind(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address or "0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class SshAccess:
    """What ``vmmesh ssh`` needs from the VM's host."""

    vm: str
    port: int
    bind: str
    host_key: str


def _no_progress(phase: str, fraction: float | None) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class VmRecord:
    """One row of the ``vms`` table."""

    vm_id: str
    name: str
    template_id: str | None
    state: str
    disk: str
    vcpus: int
    memory_mb: int
    pid: int
    created: float
    started: float
    stopped: float
    stop_reason: str
    request_id: str
    ssh_port: int = 0  # host port forwarded to the guest's port 22; 0: none
    start_kind: str = "cold"  # cold: booted; warm: resumed from a saved boot
    start_seconds: float = 0.0

    @property
    def request_name(self) -> str:
        return request_name_of(self.name)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VmRecord:
        return cls(
            vm_id=row["vm_id"],
            name=row["name"],
            template_id=row["template_id"],
            state=row["state"],
            disk=row["disk"],
            vcpus=int(row["vcpus"]),
            memory_mb=int(row["memory_mb"]),
            pid=int(row["pid"]),
            created=float(row["created"]),
            started=float(row["started"]),
            stopped=float(row["stopped"]),
            stop_reason=row["stop_reason"],
            request_id=row["request_id"],
            ssh_port=int(row["ssh_port"]),
            start_kind=row["start_kind"],
            start_seconds=float(row["start_seconds"]),
        )


@dataclass(frozen=True)
class VmStopped:
    """A VM whose QEMU exited without an order (for keep-alive)."""

    vm_id: str
    name: str
    template_id: str | None
    at: float
    exit_status: int | None


@dataclass(frozen=True)
class VmReport:
    """How one VM of a request came to be."""

    name: str
    vm_id: str
    template_id: str | None
    built: bool
    seconds: dict[str, float]
    start_kind: str = "cold"
    start_note: str = ""  # why cold although the template has a warm state

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class RequestReport:
    """The answer to ``request_local``: made VMs, and what could not be."""

    name: str
    requested: int
    vms: tuple[VmReport, ...]
    template_id: str | None
    built: bool
    template_seconds: dict[str, float]
    unplaced: int = 0
    errors: tuple[str, ...] = ()
    source: TemplateSource = field(default_factory=TemplateSource)


@dataclass(frozen=True)
class _VmPlan:
    """What one VM of a request is to be."""

    display: str
    template: TemplateRecord | None
    custom_zip: bytes | None
    entries: list[ZipEntry] | None
    vcpus: int
    memory_mb: int
    request_id: str


@dataclass
class _Batch:
    """The VMs of one ``request_local`` as they are made."""

    held: int  # reserved slots not yet handed to a VM row
    unplaced: int
    made: dict[int, tuple[str, dict[str, float], str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def lost_reason(status: int | None) -> str:
    """Why a VM is ``lost``, from how its QEMU ended, for ``vmmesh vms``."""
    if status is None:
        return "QEMU was gone when the node looked (node restarted or QEMU unreachable)"
    if status < 0:
        return f"QEMU was killed by signal {-status} without an order"
    return f"QEMU exited with status {status} without an order (guest powered off?)"


class VmManager:
    """VMs, templates and capacity of this host: the library the node calls.

    Start ``run`` in the node's nursery (``await nursery.start(mgr.run)``)
    before anything else: it hosts the watchers.  Then call ``reconcile``.
    """

    def __init__(
        self,
        *,
        store: Store,
        hypervisor: Hypervisor,
        templates: TemplateManager,
        data_dir: Path,
        policy: CapacityPolicy,
        probe: Callable[[], HostProbe],
        on_unexpected_stop: Callable[[VmStopped], None] | None = None,
        agent_timeout: float = 300.0,
        now: Callable[[], float] = time.time,
        ssh_ports: range = range(0),
        ssh_bind: str = "127.0.0.1",
        warm: WarmStore | None = None,
    ) -> None:
        self.store = store
        self.hv = hypervisor
        self.templates = templates
        self.data_dir = data_dir
        self.vm_dir = data_dir / "vms"
        self.run_root = data_dir / "run"
        self.policy = policy
        self.probe = probe
        self.on_unexpected_stop = on_unexpected_stop
        self.agent_timeout = agent_timeout
        self.now = now
        self.ssh_ports = ssh_ports
        self.ssh_bind = ssh_bind
        self.warm = warm
        self.warm_enabled = warm is not None
        self._warm_limiter = trio.CapacityLimiter(1)
        # no free slot when it was asked (None: the base image's state)
        self._warm_later: dict[str, TemplateRecord | None] = {}
        self._warm_noted: set[str] = set()  # ... and that was logged once
        self._warm_held = False
        self._warm_scope: trio.CancelScope | None = None
        if warm is not None:
            templates.on_remove.append(lambda tid: warm.discard(tid, "its template went"))
        templates.warm_source = self._warm_for_builds
        self.guests: dict[str, Guest] = {}
        self._reserved = 0
        self._nursery: trio.Nursery | None = None
        self.vm_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the watcher tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(WARM_RETRY)
                self.trim_warm()  # templates fetched or built since take their room
                self._retry_warm()

    def _retry_warm(self) -> None:
        """Warm boots put off for want of a slot, tried again (while their template stays)."""
        later, self._warm_later = self._warm_later, {}
        held = {t.template_id for t in self.templates.records()} | {self.templates.base.image_id}
        for tid, rec in later.items():
            if tid in held:
                self.schedule_warm(rec)

    # --- reading ------------------------------------------------------

    def list_vms(self) -> list[VmRecord]:
        rows = self.store.conn.execute("SELECT * FROM vms ORDER BY created, name").fetchall()
        return [VmRecord.from_row(r) for r in rows]

    def list_templates(self) -> list[TemplateRecord]:
        return self.templates.records()

    def get(self, name_or_id: str) -> VmRecord:
        row = self.store.conn.execute(
            "SELECT * FROM vms WHERE vm_id = ? OR name = ? ORDER BY created DESC",
            (name_or_id, name_or_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no VM {name_or_id!r:.80} on this host")
        return VmRecord.from_row(row)

    # --- capacity and admission ---------------------------------------

    def capacity(self) -> Capacity:
        """Free slots now, counting running VMs and outstanding reservations."""
        vcpus, memory, running = self.store.conn.execute(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mb), 0), COUNT(*)"
            f" FROM vms WHERE state IN ({','.join('?' * len(ACTIVE))})",
            ACTIVE,
        ).fetchone()
        usage = Usage(
            running_vms=int(running),
            vcpus=int(vcpus),
            memory_mb=int(memory),
            disk_used_mb=self._disk_used_mb(int(running)),
            reserved_vms=self._reserved,
        )
        return compute_capacity(self.probe(), usage, self.policy)

    def _disk_used_mb(self, active: int) -> int:
        """Templates, packs and VM disks (each at least its allowance) against the quota."""
        allowance = self.policy.vm_disk_allowance_mb
        # A VM whose row exists but whose overlay is not written yet still
        # holds a disk allowance (the reservation was handed over to the row).
        overlays = sum(1 for _ in self.vm_dir.glob("*.qcow2"))
        return disk_used_mb(self.data_dir, allowance) + max(0, active - overlays) * allowance

    def trim_warm(self, need_mb: int = 0, keep: str | None = None) -> bool:
        """Drop warm states until they, with everything else and ``need_mb`` more, fit in
        the storage quota; True if they do.

        Warm states are a cache: they count against the quota but never cost a VM
        its slot (capacity leaves them out, since they can always go).  Least
        recently used templates' states go first, ``keep``'s last; a state a VM's
        disk is made from (any VM of its template on this host) never goes.
        """
        if self.warm is None:
            return True
        active = self.store.conn.execute(
            f"SELECT COUNT(*) FROM vms WHERE state IN ({','.join('?' * len(ACTIVE))})", ACTIVE
        ).fetchone()[0]
        committed = self._disk_used_mb(int(active)) + self._reserved * (
            self.policy.vm_disk_allowance_mb
        )
        sizes = self.warm.sizes()
        over = committed + need_mb + -(-sum(sizes.values()) // (1 << 20))
        over -= self.policy.storage_quota_mb
        if over <= 0:
            return True
        in_use = {self._warm_key(v.template_id) for v in self.list_vms()}
        used = {t.template_id: t.last_used for t in self.templates.records()}
        # the base image's state is used by every build and package-less VM: it goes last
        base = self.templates.base.image_id
        used[base] = float("inf")
        order = sorted(
            (tid for tid in sizes if tid in used and tid not in in_use),
            key=lambda tid: (tid == base, tid == keep, used[tid]),
        )
        for tid in order:
            if over <= 0:
                break
            self.warm.discard(tid, "the storage quota needs its room")
            over -= sizes[tid] >> 20
        if order:
            self.templates.on_change()
        return over <= 0

    def offered(self) -> Capacity:
        """What the mesh is told is free: a slot held by a warm boot counts as free, since
        the warm boot gives it up to the first request that needs it."""
        cap = self.capacity()
        if not self._warm_held:
            return cap
        return dataclasses.replace(
            cap, free_vm_slots=cap.free_vm_slots + 1, free_disk_slots=cap.free_disk_slots + 1
        )

    def reserve(self, count: int) -> int:
        """Hold up to ``count`` default-size slots; returns how many were granted.

        No ``await`` between reading capacity and taking it: atomic under trio.
        """
        if count < 0:
            raise UsageError("cannot reserve a negative count")
        granted = min(count, self.capacity().free_slots)
        if granted < count and self._warm_held:
            self._yield_warm()  # a warm boot gives way to a VM someone asked for
            granted = min(count, self.capacity().free_slots)
        self._reserved += granted
        return granted

    def _yield_warm(self) -> None:
        """Stop the warm boot under way and hand its slot back (no await: atomic)."""
        self._warm_held = False
        self.release(1)
        if self._warm_scope is not None:
            self._warm_scope.cancel()
        log.info("a warm boot gave way to a requested VM (it is made again later)")

    def release(self, count: int) -> None:
        """Give back reserved slots that will not become VMs."""
        self._reserved = max(0, self._reserved - count)

    # --- creating -----------------------------------------------------

    async def request_local(
        self,
        name: str,
        count: int,
        packages: Iterable[str] = (),
        custom_zip: bytes | None = None,
        progress: Progress = _no_progress,
        *,
        reserved: int = 0,
        first_index: int | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        request_id: str = "",
        fetch: str = FETCH_AUTO,
    ) -> RequestReport:
        """Make up to ``count`` VMs named ``name-<n>`` here.

        ``reserved`` slots already taken with ``reserve`` are used first; the
        rest are reserved now.  VMs that do not fit are reported as
        ``unplaced`` (the node spills them to peers).  ``first_index`` numbers
        the VMs (default: after the highest local one), so a node spreading a
        request over hosts can keep names unique.
        """
        check_vm_name(name)
        if count < 1:
            raise UsageError("COUNT must be at least 1")
        entries = check_zip(custom_zip) if custom_zip is not None else None
        held = min(reserved, count) + self.reserve(max(0, count - reserved))
        if held == 0:
            raise CapacityError(f"no free VM slot on this host for {name}")
        batch = _Batch(held=held, unplaced=count - held)
        try:
            got = await self.templates.ensure_template(packages, progress, policy=fetch)
            rec, built, tpl_seconds = got.record, got.built, got.timings
            self.trim_warm(keep=rec.template_id if rec else None)  # the new disks' room
            start = first_index or next_index(name, (v.name for v in self.list_vms()))
            plans = [
                _VmPlan(
                    display=f"{name}-{start + i}",
                    template=rec,
                    custom_zip=custom_zip,
                    entries=entries,
                    vcpus=vcpus or self.policy.vm_vcpus,
                    memory_mb=memory_mb or self.policy.vm_memory_mb,
                    request_id=request_id,
                )
                for i in range(held)
            ]
            await self._create_many(plans, batch, progress)
        finally:
            self.release(batch.held)
        progress("done", 1.0)
        self.schedule_warm(rec)  # after this request's VMs: never in its way
        # The first VM carries the template's phases; the others reused it.
        made = tuple(
            VmReport(
                name=plans[i].display,
                vm_id=vm_id,
                template_id=rec.template_id if rec else None,
                built=built and n == 0,
                seconds={**(tpl_seconds if n == 0 else {"install": 0.0}), **seconds},
                start_kind=kind,
                start_note=note,
            )
            for n, (i, (vm_id, seconds, kind, note)) in enumerate(sorted(batch.made.items()))
        )
        return RequestReport(
            name=name,
            requested=count,
            vms=made,
            template_id=rec.template_id if rec else None,
            built=built,
            template_seconds=tpl_seconds,
            unplaced=batch.unplaced,
            errors=tuple(batch.errors),
            source=got.source,
        )

    async def _create_many(self, plans: list[_VmPlan], batch: _Batch, progress: Progress) -> None:
        """Boot ``plans`` side by side, at most one per host core (boots are CPU-bound)."""
        limiter = trio.CapacityLimiter(max(1, min(len(plans), self.probe().cores)))

        async def one(i: int, plan: _VmPlan) -> None:
            async with limiter:
                progress(f"vm {plan.display}", len(batch.made) / len(plans))
                # The row written first thing in _create_one (before any
                # checkpoint) takes over the slot from the reservation.
                self.release(1)
                batch.held -= 1
                try:
                    batch.made[i] = await self._create_one(plan)
                except VmmeshError as exc:
                    batch.errors.append(f"{plan.display}: {exc}")
                    log.warning("%s: not made: %s", plan.display, exc)
                    batch.unplaced += 1

        async with open_nursery() as nursery:
            for i, plan in enumerate(plans):
                nursery.start_soon(one, i, plan)

    # --- warm states ---------------------------------------------------

    def warm_held(self) -> set[str]:
        """Templates whose VMs would resume from a warm state here (none when off)."""
        if self.warm is None or not self.warm_enabled:
            return set()
        return self.warm.held()

    def _warm_key(self, template_id: str | None) -> str:
        """Whose warm state a VM of ``template_id`` resumes: the template's, or the base
        image's for a VM with no packages (ids are hex hashes: they never collide)."""
        return template_id or self.templates.base.image_id

    def _warm_for_builds(self) -> tuple[WarmStore, int, int] | None:
        """The warm states builds resume and leave, and the VMs' shape; None when off."""
        if self.warm is None or not self.warm_enabled:
            return None
        return self.warm, self.policy.vm_vcpus, self.policy.vm_memory_mb

    def schedule_warm(self, rec: TemplateRecord | None) -> None:
        """Make the warm state of ``rec`` (None: of the base image) in the background, if
        it has none yet.  The base image's state serves VMs with no packages, and
        builds: they resume it instead of booting (``TemplateManager``)."""
        warm = self.warm
        if warm is None or not self.warm_enabled or self._nursery is None:
            return
        key = self._warm_key(rec.template_id if rec else None)
        if warm.get(key) is None and not warm.making(key):
            self._nursery.start_soon(self._make_warm, rec)

    async def _make_warm(self, rec: TemplateRecord | None) -> None:
        """One warm boot at a time, in a slot of its own that it gives up to any request."""
        assert self.warm is not None
        key = self._warm_key(rec.template_id if rec else None)
        async with self._warm_limiter:
            if self.warm.get(key) is not None:  # a warm build left one meanwhile
                return
            if not self.trim_warm(self._warm_estimate_mb(), keep=key):
                if key not in self._warm_noted:
                    log.info(
                        "no room in the storage quota for a warm state of %s: its VMs boot",
                        key[:12],
                    )
                    self._warm_noted.add(key)
                return
            if self.reserve(1) == 0:
                if key not in self._warm_noted:
                    log.info("no free slot for the warm boot of %s: later", key[:12])
                    self._warm_noted.add(key)
                self._warm_later[key] = rec
                return
            self._warm_held = True
            try:
                with trio.CancelScope() as self._warm_scope:
                    await self.warm.make(
                        key, self._disk_of(rec), self.policy.vm_vcpus, self.policy.vm_memory_mb
                    )
                if self._warm_scope.cancelled_caught:  # gave way to a request: again later
                    self._warm_later[key] = rec
                self.trim_warm()  # the estimate was short: the quota still holds
            except (VmmeshError, OSError) as exc:
                log.warning("no warm state for %s: %s", key[:12], exc)
            finally:
                self._warm_scope = None
                if self._warm_held:
                    self._warm_held = False
                    self.release(1)
            self.templates.on_change()

    def _warm_estimate_mb(self) -> int:
        """Room a new warm state will take: as much as the largest one here, or a quarter
        of the guest's memory (a settled Debian guest saves 140-175 MB of 512)."""
        assert self.warm is not None
        largest = max(self.warm.sizes().values(), default=0) >> 20
        return max(largest, self.policy.vm_memory_mb // 4)

    def _disk_of(self, template: TemplateRecord | None) -> Path:
        return self.templates.base.disk if template is None else self.templates.disk_path(template)

    def _insert_row(self, vm_id: str, plan: _VmPlan, disk: Path) -> int:
        """The ``creating`` row, with its ssh port; returns the port (0: none)."""
        template = plan.template
        with self.store.transaction() as conn:
            # chosen and recorded with no await between: two VMs never share a port
            ssh_port = self._free_ssh_port(conn)
            conn.execute(
                "INSERT INTO vms (vm_id, name, template_id, state, disk, vcpus, memory_mb,"
                " created, request_id, ssh_port) VALUES (?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?)",
                (
                    vm_id,
                    plan.display,
                    template.template_id if template else None,
                    disk.name,
                    plan.vcpus,
                    plan.memory_mb,
                    self.now(),
                    plan.request_id,
                    ssh_port,
                ),
            )
        return ssh_port

    async def _create_one(self, plan: _VmPlan) -> tuple[str, dict[str, float], str, str]:
        """Clone, resume (warm) or boot (cold), become itself, unpack: one VM.

        Returns (vm_id, seconds per phase, "warm" or "cold", why cold if a
        warm state was there but not used).
        """
        vm_id = secrets.token_hex(8)
        disk = self.vm_dir / f"{vm_id}.qcow2"
        ssh_port = self._insert_row(vm_id, plan, disk)
        seconds: dict[str, float] = {}
        guest: Guest | None = None
        done = False
        try:
            spec = self.templates.base.boot_spec(
                vm_id, disk, self.run_root / vm_id, plan.vcpus, plan.memory_mb
            ).with_ssh(ssh_port or None, self.ssh_bind)
            guest, kind, why = await self._start_warm(plan, spec, seconds)
            if guest is None:
                guest = await self._start_cold(plan, spec, seconds)
            if plan.custom_zip is not None and plan.entries is not None:
                t = time.monotonic()
                await customzip.unpack(guest, plan.custom_zip, plan.entries)
                seconds["custom"] = time.monotonic() - t
            ready = seconds.get("vm_resume", 0.0) + seconds.get("vm_boot", 0.0)
            self._mark_running(vm_id, plan.display, guest, kind, ready)
            done = True
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    if guest is not None:
                        with contextlib.suppress(HypervisorError, OSError):
                            await guest.kill()
                    self._forget(vm_id)
        if plan.template is not None:
            self.templates.touch(plan.template.template_id)
        return vm_id, seconds, kind, why

    async def _start_cold(self, plan: _VmPlan, spec: BootSpec, seconds: dict[str, float]) -> Guest:
        t = time.monotonic()
        spec.disk.unlink(missing_ok=True)
        await self.hv.create_overlay(self._disk_of(plan.template), spec.disk)
        seconds["vm_clone"] = time.monotonic() - t
        t = time.monotonic()
        guest = await self.hv.start(spec)
        try:
            await guest.wait_agent(self.agent_timeout)
            seconds["vm_boot"] = time.monotonic() - t
            t = time.monotonic()
            await persona.set_hostname(guest, plan.display)
            seconds["identity"] = time.monotonic() - t
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(HypervisorError, OSError):
                await guest.kill()
            raise
        return guest

    async def _start_warm(
        self, plan: _VmPlan, spec: BootSpec, seconds: dict[str, float]
    ) -> tuple[Guest | None, str, str]:
        """Resume the template's warm state as this VM; (None, "cold", why) when it cannot."""
        tid = self._warm_key(plan.template.template_id if plan.template else None)
        if self.warm is None or not self.warm_enabled:
            return None, "cold", ""
        state = self.warm.get(tid)
        if state is None:
            return None, "cold", ""
        why = state.shape.differs(await self.hv.shape(spec))
        if why:
            return None, "cold", f"warm state has another shape: {why}"
        guest: Guest | None = None
        try:
            t = time.monotonic()
            await self.hv.create_overlay(state.disk, spec.disk)
            seconds["vm_clone"] = time.monotonic() - t
            t = time.monotonic()
            with trio.fail_after(WARM_TIMEOUT):
                guest = await self.hv.start(replace(spec, incoming=state.state))
                await guest.wait_agent(WARM_TIMEOUT)
                seconds["vm_resume"] = time.monotonic() - t
                t = time.monotonic()
                await persona.become_itself(guest, plan.display)
                seconds["identity"] = time.monotonic() - t
            return guest, "warm", ""
        except (VmmeshError, OSError, trio.TooSlowError) as exc:
            reason = warm_error(exc)
            if guest is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(HypervisorError, OSError):
                    await guest.kill()
            self.warm.discard(tid, f"it did not resume: {reason}")
            self.templates.on_change()  # the mesh stops counting on it
            return None, "cold", f"warm state did not resume ({reason}): deleted"

    def _mark_running(
        self, vm_id: str, display: str, guest: Guest, kind: str, start_seconds: float
    ) -> None:
        with self.store.transaction() as conn:
            updated = conn.execute(
                "UPDATE vms SET state = 'running', pid = ?, started = ?, start_kind = ?,"
                " start_seconds = ? WHERE vm_id = ? AND state = 'creating'",
                (guest.pid, self.now(), kind, start_seconds, vm_id),
            ).rowcount
        if not updated:
            raise NotFound(f"{display} was shut down while it started")
        self._watch(vm_id, guest)

    # --- watching -----------------------------------------------------

    def _watch(self, vm_id: str, guest: Guest) -> None:
        if self._nursery is None:
            raise StateError("VmManager.run is not started")
        self.guests[vm_id] = guest
        self._nursery.start_soon(self._watcher, vm_id, guest)

    async def _watcher(self, vm_id: str, guest: Guest) -> None:
        status: int | None
        try:
            status = await guest.wait_exit()
        except HypervisorError:
            status = None
        self.guests.pop(vm_id, None)
        row = self.store.conn.execute("SELECT state FROM vms WHERE vm_id = ?", (vm_id,)).fetchone()
        if row is None or row["state"] != "running":
            return  # ordered stop or already cleaned up
        self._mark_lost(vm_id, status)

    def _mark_lost(self, vm_id: str, status: int | None) -> None:
        at = self.now()
        reason = lost_reason(status)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE vms SET state = 'lost', stop_reason = ?, stopped = ?, pid = 0"
                " WHERE vm_id = ?",
                (reason, at, vm_id),
            )
        rec = self.get(vm_id)
        log.warning("VM %s lost: %s", rec.name, reason)
        if self.on_unexpected_stop is not None:
            self.on_unexpected_stop(VmStopped(vm_id, rec.name, rec.template_id, at, status))

    # --- using and stopping -------------------------------------------

    async def exec(
        self, name_or_id: str, argv: list[str], *, input_data: bytes | None = None
    ) -> ExecResult:
        """Run ``argv`` in a running VM through its guest agent (wrap in fail_after)."""
        _rec, guest = self.running(name_or_id)
        return await guest.exec(argv, input_data=input_data)

    def running(self, name_or_id: str) -> tuple[VmRecord, Guest]:
        """A VM running here and its guest; NotFound otherwise."""
        rec = self.get(name_or_id)
        guest = self.guests.get(rec.vm_id)
        if guest is None or rec.state != "running":
            raise NotFound(f"VM {rec.name} is not running here (it is {rec.state})")
        return rec, guest

    def _free_ssh_port(self, conn: sqlite3.Connection) -> int:
        """A forward port no VM of this host holds and nothing else listens on; 0: none."""
        if not self.ssh_ports:
            return 0
        used = [int(r[0]) for r in conn.execute("SELECT ssh_port FROM vms WHERE ssh_port != 0")]
        return pick_port(self.ssh_ports, used, lambda port: _can_bind(self.ssh_bind, port))

    async def ssh_access(self, name_or_id: str, public_keys: Sequence[str]) -> SshAccess:
        """Let ``public_keys`` log in as root; returns the forward and the guest's host key."""
        keys = check_public_keys(list(public_keys))
        rec, guest = self.running(name_or_id)
        if not rec.ssh_port:
            raise UsageError(
                f"{rec.name} has no ssh port (ssh forwarding is off on its host, or every "
                f"port was taken); use `vmmesh exec {rec.request_name} -- COMMAND`"
            )
        host_key = await persona.authorize_ssh(guest, rec.name, rec.request_name, keys)
        return SshAccess(vm=rec.name, port=rec.ssh_port, bind=self.ssh_bind, host_key=host_key)

    async def shutdown(self, name: str) -> list[VmRecord]:
        """Remove, by order, every VM of request ``name`` here, whatever its state.

        A running guest's QEMU is killed, not powered off: the overlay goes
        with it, so a clean guest shutdown would only cost seconds (5-6 s
        under TCG).  A lost or stopped one only has its overlay, run
        directory and row removed.  Templates stay.  Returns
        the records as they were, so the caller can say exactly what went.
        """
        targets = [v for v in self.list_vms() if name in (v.request_name, v.name)]
        async with trio.open_nursery() as nursery:
            for v in targets:
                nursery.start_soon(self.shutdown_vm, v.vm_id)
        return targets

    async def shutdown_vm(self, vm_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE vms SET state = 'stopping' WHERE vm_id = ?", (vm_id,))
        guest = self.guests.pop(vm_id, None)
        if guest is not None:
            await guest.kill()
        self._forget(vm_id)

    def _forget(self, vm_id: str) -> None:
        """Delete a VM's overlay, run dir and row."""
        (self.vm_dir / f"{vm_id}.qcow2").unlink(missing_ok=True)
        shutil.rmtree(self.run_root / vm_id, ignore_errors=True)
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,))

    # --- start-up -------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Make rows, QEMU processes and disks agree; returns what changed.

        * ``running`` rows: re-adopt the QEMU that still runs (watch it again);
          if it is gone, the VM is ``lost`` / ``unexpected`` (event emitted).
        * ``creating`` rows were half made: kill any QEMU, delete disk and row.
        * ``stopping`` rows were ordered down: finish the order.
        * A row whose disk is missing cannot run again: ``running`` becomes
          lost, ``lost``/``stopped`` rows are deleted.  A disk in ``vms/``
          with no row is deleted (nothing refers to it), and so is a run
          directory with no running VM, after killing any QEMU still in it.
        * Templates: see ``TemplateManager.reconcile``.
        """
        changes = await self.templates.reconcile()
        if self.warm is not None:
            ids = {r.template_id for r in self.templates.records()}
            ids.add(self.templates.base.image_id)
            changes += await self.warm.reconcile(ids)
        for rec in self.list_vms():
            disk_ok = (self.vm_dir / rec.disk).is_file()
            if rec.state in ("running", "creating", "stopping"):
                guest = await self.hv.adopt(rec.vm_id, self.run_root / rec.vm_id)
                if rec.state == "running" and guest is not None and disk_ok:
                    self._watch(rec.vm_id, guest)
                    changes.append(f"re-adopted {rec.name}")
                    continue
                if rec.state == "running":
                    if guest is not None:
                        await guest.kill()
                    self._mark_lost(rec.vm_id, None)
                    changes.append(f"{rec.name} lost while the node was down")
                    continue
                if guest is not None:
                    await guest.kill()
                self._forget(rec.vm_id)
                changes.append(f"removed {rec.state} VM {rec.name}")
            elif not disk_ok:
                self._forget(rec.vm_id)
                changes.append(f"removed {rec.state} VM {rec.name} (disk missing)")
        rows = self.list_vms()
        known = {v.disk for v in rows}
        for entry in sorted(self.vm_dir.iterdir()):
            if entry.is_file() and entry.name not in known:
                entry.unlink()
                changes.append(f"orphan file vms/{entry.name}")
        live = {v.vm_id for v in rows if v.state == "running"}
        strays = [
            d
            for d in self.run_root.glob("*")
            if d.name not in live and not d.name.startswith(("tpl-", "warm-"))
        ]
        return changes + await kill_leftovers(self.hv, strays, "QEMU with no VM row:")
