"""VMs on this host: linked clones of templates, booted, watched, shut down.

Theory of operation (SPEC items 4-8 and 11, thesis §3.1.1-3.1.2):

* ``request_local`` admits up to COUNT VMs against real free capacity
  (``reserve``), makes sure a template holds the packages
  (``TemplateManager.ensure_template``), then for each VM (side by side, at
  most one boot per host core, as boots are CPU-bound): commits a
  ``creating`` row, writes ``vms/<vm_id>.qcow2`` as an overlay of the template
  (a linked clone: no copy), boots it, waits for the guest agent, unpacks the
  optional custom zip into ``/opt``, and marks the row ``running``.  A VM
  that fails half-way is killed and its overlay and row removed.
* Every running guest has a watcher task in the manager's nursery (started
  by ``run``).  When QEMU exits, the watcher looks at the row: ``stopping``
  means we ordered it (nothing to do, the shutdown path cleans up); anything
  else is an *unexpected stop*: the row becomes ``lost`` with stop_reason
  ``unexpected`` and ``on_unexpected_stop`` is called (the migration layer's
  hook).  The overlay of a lost VM is kept so it can be restarted elsewhere.
* ``shutdown(name)`` is an order: the row goes ``stopping`` first, the guest
  is powered off, then overlay and row are deleted; the template stays.
* Admission is atomic: ``reserve`` and the creation path compute capacity
  and update ``_reserved`` without an ``await`` in between, so two requests
  racing on one host can never both take the last slot.
* ``reconcile`` at node start makes rows agree with QEMU and the disk (see its
  docstring for which side wins).

VM naming: VMs of one request share its NAME; each has its own hex ``vm_id``
(the QEMU name and file name, never a user string) and a display name
``NAME-<n>``.  The display name is what the ``name`` column holds; the
request name is recovered by cutting the ``-<n>`` suffix.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import shutil
import socket
import sqlite3
import stat
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import trio

from vmmesh.api.host import Capacity, check_vm_name
from vmmesh.errors import (
    CapacityError,
    HypervisorError,
    NotFound,
    StateError,
    UsageError,
    VmmeshError,
)
from vmmesh.host.capacity import (
    CapacityPolicy,
    HostProbe,
    Usage,
    compute_capacity,
    disk_used_mb,
)
from vmmesh.host.sshkeys import (
    NO_SSHD_EXIT,
    PREPARE_SCRIPT,
    check_public_key,
    check_public_keys,
    pick_port,
)
from vmmesh.host.store import Store
from vmmesh.host.templates import Progress, TemplateManager, TemplateRecord, power_off
from vmmesh.hypervisor.base import BootSpec, ExecResult, Guest, Hypervisor
from vmmesh.nurseries import open_nursery

log = logging.getLogger("vmmesh.host.vms")

# States whose VMs hold cores and memory.
ACTIVE = ("creating", "running", "stopping")
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_BYTES = 1 << 30
GUEST_ZIP = "/tmp/vmmesh-custom.zip"
# Extract in the guest with its own python3; modes are kept, which extractall does not.
_PY_UNZIP = (
    "import sys, zipfile, os\n"
    "z = zipfile.ZipFile(sys.argv[1])\n"
    "for i in z.infolist():\n"
    "    p = z.extract(i, '/opt')\n"
    "    m = (i.external_attr >> 16) & 0o777\n"
    "    if m and not i.is_dir():\n"
    "        os.chmod(p, m)\n"
    "os.unlink(sys.argv[1])\n"
)


_SET_HOSTNAME = (
    'printf "%s\\n" "$1" > /etc/hostname && hostname "$1" && '
    'sed -i "s/^127\\.0\\.1\\.1[[:space:]].*/127.0.1.1\\t$1/" /etc/hosts'
)


def guest_hostname(display: str) -> str:
    """A valid host name (RFC 1123 label) from a VM name: lower case, ``_``/``.`` -> ``-``."""
    label = "".join(c if c.isalnum() else "-" for c in display.lower()).strip("-")[:63]
    return label.strip("-") or "vm"


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
        )


@dataclass(frozen=True)
class VmStopped:
    """A VM whose QEMU exited without an order (for the migration issue)."""

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

    def to_wire(self) -> dict[str, Any]:
        """The shape ``vmmesh request`` prints (the node adds ``host`` per VM)."""
        return {
            "name": self.name,
            "requested": self.requested,
            "template_id": self.template_id,
            "built": self.built,
            "template_seconds": dict(self.template_seconds),
            "unplaced": self.unplaced,
            "errors": list(self.errors),
            "vms": [
                {
                    "name": v.name,
                    "vm_id": v.vm_id,
                    "template": v.template_id or "",
                    "built": v.built,
                    "seconds": v.total_seconds,
                    "phases": dict(v.seconds),
                }
                for v in self.vms
            ],
        }


@dataclass(frozen=True)
class ZipEntry:
    """A checked member of a custom zip."""

    path: str  # relative, POSIX, no '..'
    is_dir: bool
    mode: int


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


def request_name_of(display_name: str) -> str:
    """``web-3`` -> ``web``: the request a VM belongs to."""
    head, sep, tail = display_name.rpartition("-")
    return head if sep and tail.isdigit() and head else display_name


def check_zip(data: bytes) -> list[ZipEntry]:
    """Validate a custom zip: names, symlinks, size; raise UsageError if bad.

    Why on the host: the guest may have no python3, and even when it has,
    a name like ``../../etc/passwd`` or an absolute path must never be written
    outside ``/opt``; a zip bomb must not fill the VM's disk allowance.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UsageError(f"custom zip is not a zip file: {exc}") from None
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise UsageError(f"custom zip has over {MAX_ZIP_ENTRIES} entries")
    if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
        raise UsageError(f"custom zip unpacks to over {MAX_ZIP_BYTES >> 20} MB")
    out: list[ZipEntry] = []
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        bad = (
            not name
            or "\\" in name
            or "\x00" in name
            or name.startswith("/")
            or ":" in parts[0]
            or any(p in ("..", ".") for p in parts)
        )
        mode = (info.external_attr >> 16) & 0o177777
        if bad:
            raise UsageError(f"custom zip: unsafe member name {name!r:.80}")
        if stat.S_ISLNK(mode):
            raise UsageError(f"custom zip: symbolic link not allowed: {name!r:.80}")
        out.append(ZipEntry("/".join(parts), info.is_dir(), mode & 0o777))
    return out


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
        shutdown_timeout: float = 60.0,
        now: Callable[[], float] = time.time,
        ssh_ports: range = range(0),
        ssh_bind: str = "127.0.0.1",
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
        self.shutdown_timeout = shutdown_timeout
        self.now = now
        self.ssh_ports = ssh_ports
        self.ssh_bind = ssh_bind
        self.guests: dict[str, Guest] = {}
        self._reserved = 0
        self._nursery: trio.Nursery | None = None
        self.vm_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the watcher tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

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
        allowance = self.policy.vm_disk_allowance_mb
        # A VM whose row exists but whose overlay is not written yet still
        # holds a disk allowance (the reservation was handed over to the row).
        overlays = sum(1 for _ in self.vm_dir.glob("*.qcow2"))
        usage = Usage(
            running_vms=int(running),
            vcpus=int(vcpus),
            memory_mb=int(memory),
            disk_used_mb=disk_used_mb(self.data_dir, allowance)
            + max(0, int(running) - overlays) * allowance,
            reserved_vms=self._reserved,
        )
        return compute_capacity(self.probe(), usage, self.policy)

    def reserve(self, count: int) -> int:
        """Hold up to ``count`` default-size slots; returns how many were granted.

        No ``await`` between reading capacity and taking it: atomic under trio.
        """
        if count < 0:
            raise UsageError("cannot reserve a negative count")
        granted = min(count, self.capacity().free_slots)
        self._reserved += granted
        return granted

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
        unplaced = count - held
        made: list[VmReport] = []
        errors: list[str] = []
        try:
            rec, built, tpl_seconds = await self.templates.ensure_template(packages, progress)
            start = self._next_index(name) if first_index is None else first_index
            total = held
            # Boots run side by side, at most one per host core (they are CPU-bound).
            limiter = trio.CapacityLimiter(max(1, min(total, self.probe().cores)))
            results: dict[int, VmReport] = {}

            async def one(i: int) -> None:
                nonlocal held, unplaced
                display = f"{name}-{start + i}"
                async with limiter:
                    progress(f"vm {display}", len(results) / total)
                    # The row written first thing in _create_one (before any
                    # checkpoint) takes over the slot from the reservation.
                    self.release(1)
                    held -= 1
                    plan = _VmPlan(
                        display=display,
                        template=rec,
                        custom_zip=custom_zip,
                        entries=entries,
                        vcpus=vcpus or self.policy.vm_vcpus,
                        memory_mb=memory_mb or self.policy.vm_memory_mb,
                        request_id=request_id,
                    )
                    try:
                        vm_id, seconds = await self._create_one(plan)
                    except VmmeshError as exc:
                        errors.append(f"{display}: {exc}")
                        log.warning("%s: not made: %s", display, exc)
                        unplaced += 1
                        return
                # The first VM carries the template's phases; the others reused it.
                first = i == 0
                results[i] = VmReport(
                    name=display,
                    vm_id=vm_id,
                    template_id=rec.template_id if rec else None,
                    built=built and first,
                    seconds={**(tpl_seconds if first else {"install": 0.0}), **seconds},
                )

            async with open_nursery() as nursery:
                for i in range(total):
                    nursery.start_soon(one, i)
            made = [results[i] for i in sorted(results)]
        finally:
            self.release(held)
        progress("done", 1.0)
        return RequestReport(
            name=name,
            requested=count,
            vms=tuple(made),
            template_id=rec.template_id if rec else None,
            built=built,
            template_seconds=tpl_seconds,
            unplaced=unplaced,
            errors=tuple(errors),
        )

    def _next_index(self, name: str) -> int:
        indices = [
            int(v.name.rpartition("-")[2])
            for v in self.list_vms()
            if v.request_name == name and v.name != name
        ]
        return max(indices, default=0) + 1

    def _disk_of(self, template: TemplateRecord | None) -> Path:
        return self.templates.base.disk if template is None else self.templates.disk_path(template)

    async def _create_one(self, plan: _VmPlan) -> tuple[str, dict[str, float]]:
        """Clone, boot, wait for the agent, unpack: one VM; returns (vm_id, seconds)."""
        template = plan.template
        vm_id = secrets.token_hex(8)
        disk = self.vm_dir / f"{vm_id}.qcow2"
        seconds: dict[str, float] = {}
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
        guest: Guest | None = None
        done = False
        try:
            t = time.monotonic()
            await self.hv.create_overlay(self._disk_of(template), disk)
            seconds["vm_clone"] = time.monotonic() - t
            t = time.monotonic()
            base = self.templates.base
            guest = await self.hv.start(
                BootSpec(
                    name=vm_id,
                    disk=disk,
                    kernel=base.kernel,
                    initrd=base.initrd,
                    run_dir=self.run_root / vm_id,
                    cmdline=base.manifest.cmdline,
                    vcpus=plan.vcpus,
                    memory_mb=plan.memory_mb,
                    ssh_port=ssh_port or None,
                    ssh_bind=self.ssh_bind,
                )
            )
            await guest.wait_agent(self.agent_timeout)
            seconds["vm_boot"] = time.monotonic() - t
            await self._set_hostname(guest, plan.display)
            if plan.custom_zip is not None and plan.entries is not None:
                t = time.monotonic()
                await self._unpack(guest, plan.custom_zip, plan.entries)
                seconds["custom"] = time.monotonic() - t
            with self.store.transaction() as conn:
                updated = conn.execute(
                    "UPDATE vms SET state = 'running', pid = ?, started = ?"
                    " WHERE vm_id = ? AND state = 'creating'",
                    (guest.pid, self.now(), vm_id),
                ).rowcount
            if not updated:
                raise NotFound(f"{plan.display} was shut down while it started")
            self._watch(vm_id, guest)
            done = True
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    if guest is not None:
                        with contextlib.suppress(HypervisorError, OSError):
                            await guest.kill()
                    self._forget(vm_id)
        if template is not None:
            self.templates.touch(template.template_id)
        return vm_id, seconds

    async def _set_hostname(self, guest: Guest, display: str) -> None:
        """The guest calls itself by its VM name (as in ``vmmesh vms`` and ssh prompts)."""
        hostname = guest_hostname(display)
        try:
            res = await guest.exec(["sh", "-c", _SET_HOSTNAME, "sh", hostname])
        except HypervisorError as exc:
            log.warning("%s: hostname not set: %s", display, exc)
            return
        if res.exit_code != 0:
            log.warning("%s: hostname not set: %r", display, res.stderr[-200:])

    async def _unpack(self, guest: Guest, data: bytes, entries: list[ZipEntry]) -> None:
        """Extract to /opt: with the guest's python3 if it has one, else file by file."""
        probe = None
        with contextlib.suppress(HypervisorError):
            probe = await guest.exec(["python3", "-c", "pass"])
        if probe is not None and probe.exit_code == 0:
            await guest.write_file(GUEST_ZIP, data)
            res = await guest.exec(["python3", "-c", _PY_UNZIP, GUEST_ZIP])
            if res.exit_code != 0:
                raise HypervisorError(f"unpacking the custom zip failed: {res.stderr[-300:]!r}")
            return
        dirs = sorted(
            {f"/opt/{e.path}" for e in entries if e.is_dir}
            | {f"/opt/{PurePosixPath(e.path).parent}" for e in entries if not e.is_dir}
        )
        if dirs:
            await guest.exec(["mkdir", "-p", *dirs])
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for e in entries:
                if e.is_dir:
                    continue
                await guest.write_file(f"/opt/{e.path}", zf.read(e.path))
                if e.mode:
                    await guest.exec(["chmod", f"{e.mode:o}", f"/opt/{e.path}"])

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
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE vms SET state = 'lost', stop_reason = 'unexpected', stopped = ?, pid = 0"
                " WHERE vm_id = ?",
                (at, vm_id),
            )
        rec = self.get(vm_id)
        if self.on_unexpected_stop is not None:
            self.on_unexpected_stop(VmStopped(vm_id, rec.name, rec.template_id, at, status))

    # --- using and stopping -------------------------------------------

    async def exec(
        self, name_or_id: str, argv: list[str], *, input_data: bytes | None = None
    ) -> ExecResult:
        """Run ``argv`` in a running VM through its guest agent (wrap in fail_after)."""
        _rec, guest = self._running(name_or_id)
        return await guest.exec(argv, input_data=input_data)

    def _running(self, name_or_id: str) -> tuple[VmRecord, Guest]:
        """A VM running here and its guest; NotFound otherwise."""
        rec = self.get(name_or_id)
        guest = self.guests.get(rec.vm_id)
        if guest is None or rec.state != "running":
            raise NotFound(f"VM {rec.name} is not running here")
        return rec, guest

    def _free_ssh_port(self, conn: sqlite3.Connection) -> int:
        """A forward port no VM of this host holds and nothing else listens on; 0: none."""
        if not self.ssh_ports:
            return 0
        used = [int(r[0]) for r in conn.execute("SELECT ssh_port FROM vms WHERE ssh_port != 0")]
        return pick_port(self.ssh_ports, used, lambda port: _can_bind(self.ssh_bind, port))

    async def ssh_access(self, name_or_id: str, public_keys: Sequence[str]) -> SshAccess:
        """Let ``public_keys`` log in as root; returns the forward and the guest's host key.

        Through the agent: make the guest's own host key if it has none
        (clones of one image must not share one), add the keys to
        ``/root/.ssh/authorized_keys`` once each, read the host key back.
        """
        keys = check_public_keys(list(public_keys))
        rec, guest = self._running(name_or_id)
        if not rec.ssh_port:
            raise UsageError(
                f"{rec.name} has no ssh port (ssh forwarding is off on its host, or every "
                f"port was taken); use `vmmesh exec {rec.request_name} -- COMMAND`"
            )
        res = await guest.exec(
            ["sh", "-c", PREPARE_SCRIPT], input_data="".join(f"{k}\n" for k in keys).encode()
        )
        if res.exit_code == NO_SSHD_EXIT:
            raise UsageError(
                f"{rec.name} has no ssh server (its base image predates it); "
                f"use `vmmesh exec {rec.request_name} -- COMMAND`"
            )
        if res.exit_code != 0:
            raise HypervisorError(f"preparing ssh in {rec.name} failed: {res.stderr[-300:]!r}")
        host_key = check_public_key(res.stdout.decode("utf-8", "replace"))
        return SshAccess(vm=rec.name, port=rec.ssh_port, bind=self.ssh_bind, host_key=host_key)

    async def shutdown(self, name: str) -> list[str]:
        """Stop by order every VM of request ``name`` here; returns their vm ids.

        Their overlays and rows are deleted; their templates stay.
        """
        targets = [
            v
            for v in self.list_vms()
            if v.request_name == name and v.state in ("creating", "running", "stopping")
        ]
        async with trio.open_nursery() as nursery:
            for v in targets:
                nursery.start_soon(self.shutdown_vm, v.vm_id)
        return [v.vm_id for v in targets]

    async def shutdown_vm(self, vm_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE vms SET state = 'stopping' WHERE vm_id = ?", (vm_id,))
        guest = self.guests.pop(vm_id, None)
        if guest is not None:
            try:
                await power_off(guest, self.shutdown_timeout)
            except HypervisorError:
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
        for run_dir in sorted(self.run_root.glob("*")):
            if run_dir.name in live or run_dir.name.startswith("tpl-"):
                continue
            guest = await self.hv.adopt(run_dir.name, run_dir)
            if guest is not None:
                await guest.kill()
                changes.append(f"killed QEMU {run_dir.name} with no VM row")
            shutil.rmtree(run_dir, ignore_errors=True)
        return changes
