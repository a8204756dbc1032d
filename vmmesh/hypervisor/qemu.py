"""The QEMU backend: qemu-img for disks, qemu-system-x86_64 processes for guests.

Theory of operation
-------------------
Disks are qcow2 files; a linked clone is an overlay that names its backing
file relative to its own directory (``backing_name``), so a chain does not
depend on the node's working directory or on where the data directory sits.
Every qemu-img call is one short process whose stderr becomes the
HypervisorError message.

A guest is one QEMU child process started in its *own session*: killing or
restarting the node (its process group, its terminal) leaves the VMs running.
Everything a later node process needs to find the guest again lives in the
guest's ``run_dir``: ``qemu.pid`` (written by QEMU itself), ``spec.json`` (the
BootSpec), ``qmp.sock`` (monitor) and ``qga.sock`` (guest agent), plus
``qemu.log`` (QEMU's own stderr).  ``adopt`` re-attaches from those files after
checking that the pid still is *this* QEMU (its command line names our
monitor socket), so a recycled pid is never mistaken for a guest.

The serial console goes to a 1 MiB ring buffer inside QEMU, not to a file: a
chatty or hostile guest cannot fill the host disk, and ``console()`` reads the
last megabyte over QMP when someone needs to see why a guest did not boot.

Nothing is held open between operations: each monitor or agent operation
opens its socket, does its work and closes it (both protocols are cheap to
start).  So a ``QemuGuest`` needs no closing, and one made by ``adopt`` is as
good as one made by ``start``.  A per-guest lock serialises operations on
each socket, because QEMU serves one client per socket at a time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from vmmesh.errors import (
    GuestAgentError,
    GuestAgentSilent,
    HypervisorError,
    QemuImgFailed,
    QMPError,
)
from vmmesh.hypervisor.base import BootSpec, DiskInfo, ExecResult
from vmmesh.hypervisor.qcow2 import qcow2_backing
from vmmesh.hypervisor.qga import AgentLink
from vmmesh.hypervisor.qmp import (
    QMPClient,
    incoming_from_file_uri,
    migrate_to_file_uri,
    migration_finished,
    open_qmp,
)
from vmmesh.hypervisor.savedstate import DEVICES, Shape

log = logging.getLogger(__name__)

QMP_SOCKET = "qmp.sock"
QGA_SOCKET = "qga.sock"
PID_FILE = "qemu.pid"
SPEC_FILE = "spec.json"
QEMU_LOG = "qemu.log"
CONSOLE_RING = 1 << 20  # bytes of serial console kept (QEMU wants a power of two)
_ERROR_TAIL = 2000
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL


def _opt(value: object) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (a comma is doubled)."""
    return str(value).replace(",", ",,")


def qemu_argv(
    spec: BootSpec,
    *,
    accel: str,
    qemu_binary: str = "qemu-system-x86_64",
    machine: str = "q35",
    cache: str = "unsafe",
) -> list[str]:
    """The full QEMU command line for ``spec``; pure, so it is tested without QEMU."""
    run = spec.run_dir.absolute()
    if len(str(run / QMP_SOCKET).encode()) > _SUN_PATH_MAX:
        raise HypervisorError(f"run_dir {run} is too long for a Unix socket path")
    argv = [
        qemu_binary,
        "-name", _opt(spec.name),
        "-machine", f"{machine},accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mb),
        "-nodefaults",
        "-display", "none",
        "-chardev", f"ringbuf,id=console,size={CONSOLE_RING}",
        "-serial", "chardev:console",
        "-kernel", str(spec.kernel.absolute()),
        "-initrd", str(spec.initrd.absolute()),
        "-append", spec.cmdline,
        # discard=unmap: what the guest frees (fstrim) leaves the qcow2, so a
        # template's delta holds what was installed, not what apt left behind
        "-drive", (
            f"file={_opt(spec.disk.absolute())},if=virtio,format=qcow2,cache={cache},"
            "discard=unmap,detect-zeroes=unmap"
        ),
        "-qmp", f"unix:{_opt(run / QMP_SOCKET)},server=on,wait=off",
        "-chardev", f"socket,path={_opt(run / QGA_SOCKET)},server=on,wait=off,id=qga0",
        "-device", "virtio-serial",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        # a new generation id at every start: a guest resumed from a saved state
        # is told it is a copy, and Linux reseeds its random number generator
        "-device", "vmgenid,guid=auto",
        "-pidfile", str(run / PID_FILE),
    ]  # fmt: skip
    argv += _net_argv(spec)
    if spec.incoming is not None:
        argv += ["-incoming", incoming_from_file_uri(spec.incoming.absolute())]
    elif spec.defer_incoming:
        argv += ["-incoming", "defer"]
    return argv


def _net_argv(spec: BootSpec) -> list[str]:
    """User-mode networking by default; ``bridge:NAME`` or ``none`` on request."""
    if spec.network == "none":
        return []
    if spec.network == "user":
        netdev = "user,id=n0"
        if spec.ssh_port is not None:
            netdev += f",hostfwd=tcp:{_ipv4(spec.ssh_bind)}:{int(spec.ssh_port)}-:22"
    elif spec.network.startswith("bridge:") and spec.network[7:]:
        netdev = f"bridge,id=n0,br={_opt(spec.network[7:])}"
    else:
        raise HypervisorError(f"unknown network mode {spec.network!r}")
    # romfile= : no PXE option ROM, we boot the kernel directly
    return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile="]


def _ipv4(text: str) -> str:
    """user-mode hostfwd takes an IPv4 address (empty: all addresses)."""
    try:
        return str(ipaddress.IPv4Address(text or "0.0.0.0"))
    except ValueError as exc:
        raise HypervisorError(f"ssh forward address must be IPv4, got {text!r}") from exc


def parse_disk_info(path: Path, info: Any) -> DiskInfo:
    """Turn ``qemu-img info --output=json`` into a DiskInfo."""
    if not isinstance(info, dict):
        raise HypervisorError(f"qemu-img info {path}: not a JSON object")
    try:
        virtual, actual = int(info["virtual-size"]), int(info.get("actual-size", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise HypervisorError(f"qemu-img info {path}: no sizes") from exc
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return DiskInfo(
        path=path,
        virtual_size=virtual,
        actual_size=actual,
        backing_file=Path(backing) if isinstance(backing, str) else None,
        format=str(info.get("format", "")),
    )


def spec_to_json(spec: BootSpec) -> str:
    return json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()}, indent=1
    )


def spec_from_json(text: str) -> BootSpec:
    try:
        raw = json.loads(text)
        return BootSpec(
            name=str(raw["name"]),
            disk=Path(raw["disk"]),
            kernel=Path(raw["kernel"]),
            initrd=Path(raw["initrd"]),
            run_dir=Path(raw["run_dir"]),
            cmdline=str(raw["cmdline"]),
            vcpus=int(raw["vcpus"]),
            memory_mb=int(raw["memory_mb"]),
            network=str(raw["network"]),
            ssh_port=None if raw["ssh_port"] is None else int(raw["ssh_port"]),
            ssh_bind=str(raw.get("ssh_bind", "127.0.0.1")),
            incoming=None if raw["incoming"] is None else Path(raw["incoming"]),
            defer_incoming=bool(raw.get("defer_incoming", False)),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise HypervisorError(f"unreadable {SPEC_FILE}: {exc}") from exc


def backing_name(backing: Path, image: Path) -> str:
    """How ``image`` names its backing file: relative to its own directory.

    QEMU resolves a relative backing name against the directory of the image
    that holds it (not the working directory).  Relative names make a delta's
    bytes the same on every host whose data directory has the same layout
    (``templates/<sha>.qcow2`` over ``../images/<id>/disk.qcow2``), so a delta
    fetched from a peer is used as it arrived, under the hash it was sent with.
    """
    return os.path.relpath(backing.absolute(), image.absolute().parent)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_tail(run_dir: Path) -> str:
    try:
        data = (run_dir / QEMU_LOG).read_bytes()[-_ERROR_TAIL:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def _is_our_qemu(pid: int, run_dir: Path) -> bool:
    """True when ``pid`` runs and its command line names this run_dir's monitor socket."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir.absolute() / QMP_SOCKET).encode() in cmdline


AGENT_SLICE = 30.0  # a boot's wait is checked against its CPU share this often
CPU_SHARE = 0.5  # a boot given up on has had at least this share of a core on average
WALL_CAP = 3.0  # ... or this many times its timeout, whatever it had


def boot_gave_up(waited: float, cpu_used: float | None, timeout: float) -> bool:
    """Pure: whether a guest whose agent has not answered after ``waited`` seconds, in
    which QEMU used ``cpu_used`` seconds of CPU, is taken for hung.

    A TCG boot of the base image costs 60-75 s of one core, alone or beside
    three others (measured: alone 58 s wall, 60 s CPU; four at once 131-143 s
    wall, 66-75 s CPU each).  So the wall clock alone says little on a busy
    host: seven guests booting on two cores each get under a third of a core
    and need over 250 s.  A guest is given up on after ``timeout`` only if it
    has had at least ``CPU_SHARE`` of a core over it (twice a boot's CPU at
    300 s: a guest that spins without booting); otherwise after ``WALL_CAP``
    times ``timeout`` whatever it had (one that hangs idle).  Without a CPU
    figure, after ``timeout``.
    """
    if waited >= timeout * WALL_CAP:
        return True
    if waited < timeout:
        return False
    return cpu_used is None or cpu_used >= timeout * CPU_SHARE


class QemuGuest:
    """A running QEMU process, started here or adopted from an earlier node."""

    def __init__(
        self, name: str, pid: int, run_dir: Path, process: trio.Process | None = None
    ) -> None:
        self.name = name
        self.pid = pid
        self.run_dir = run_dir
        self._process = process
        self._qmp_lock = trio.Lock()
        self._agent = AgentLink(run_dir / QGA_SOCKET)

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / QMP_SOCKET

    @property
    def qga_path(self) -> Path:
        return self.run_dir / QGA_SOCKET

    async def qmp(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """One monitor command on a fresh connection."""
        async with self._qmp_lock, open_qmp(self.qmp_path) as client:
            return await client.execute(execute, arguments)

    @asynccontextmanager
    async def monitor(self) -> AsyncIterator[QMPClient]:
        """One monitor connection held for several commands (a migration's steps;
        a descriptor passed with ``getfd`` belongs to the connection's monitor)."""
        async with self._qmp_lock, open_qmp(self.qmp_path) as client:
            yield client

    async def query_status(self) -> str:
        status = await self.qmp("query-status")
        return str(status.get("status", "")) if isinstance(status, dict) else ""

    async def console(self) -> bytes:
        """The serial console's last megabyte (the guest's boot messages)."""
        text = await self.qmp("ringbuf-read", {"device": "console", "size": CONSOLE_RING})
        return str(text).encode(errors="replace")

    async def wait_agent(self, timeout: float) -> float:
        """Retry guest-sync until the agent answers; returns the seconds waited.

        ``timeout`` is given up on only once the guest has also had a fair share
        of a core in it (see ``boot_gave_up``): on a host busy with other guests
        a boot gets a fraction of a core and is slow, not hung.
        """
        start = trio.current_time()
        cpu_start = self.cpu_seconds()
        while True:
            waited = trio.current_time() - start
            # until the timeout, then slices up to the wall cap (not past it)
            left = timeout - waited if waited < timeout else timeout * WALL_CAP - waited
            wait = max(1.0, min(AGENT_SLICE, left))
            try:
                async with self._agent.use(sync_timeout=wait) as agent:
                    await agent.ping()
                return trio.current_time() - start
            except GuestAgentSilent:
                waited = trio.current_time() - start
                cpu = self.cpu_seconds()
                used = None if cpu is None or cpu_start is None else cpu - cpu_start
                if not self._running():
                    raise GuestAgentError(
                        f"QEMU exited before the guest agent answered: {_log_tail(self.run_dir)}"
                    ) from None
                if boot_gave_up(waited, used, timeout):
                    had = "" if used is None else f" ({used:.0f} s of CPU)"
                    raise GuestAgentSilent(
                        f"guest agent did not answer guest-sync within {waited:.0f} s{had}"
                    ) from None

    def _running(self) -> bool:
        """QEMU has not exited (a zombie not yet reaped has)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and _is_our_qemu(self.pid, self.run_dir)

    def cpu_seconds(self) -> float | None:
        """CPU time QEMU has used so far (None if it cannot be read)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    async def exec(
        self,
        argv: list[str],
        *,
        input_data: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        output_limit: int = 1 << 20,
    ) -> ExecResult:
        async with self._agent.use() as agent:
            st = await agent.exec(
                argv, input_data=input_data, env=env, timeout=timeout, output_limit=output_limit
            )
        return ExecResult(st.exit_code, st.stdout, st.stderr, st.truncated)

    async def set_time(self) -> None:
        """Set the guest's clock to this host's: ``date -s`` started by the agent.

        Not ``guest-set-time``: after setting the clock the agent runs ``hwclock -w``
        and waits for it (the agent answers nothing meanwhile), and hwclock waits
        for the emulated RTC to tick: 0.8-2.8 s on arrivals of live migrations in a
        TCG guest on a loaded host, against 0.35-0.96 s this way.  ``guest-exec``
        leaves the agent free while ``date`` runs; the clock lands a process start
        behind this host's.
        """
        async with self._agent.use() as agent:
            pid = await agent.spawn(clock_argv(time.time_ns()))
            while not (status := await agent.exec_status(pid)).exited:  # noqa: ASYNC110
                await trio.sleep(0.02)
        if status.exit_code != 0:
            raise GuestAgentError(f"date -s in the guest exited with {status.exit_code}")

    async def write_file(self, guest_path: str, data: bytes, append: bool = False) -> None:
        async with self._agent.use() as agent:
            await agent.write_file(guest_path, data, append)

    async def read_range(self, guest_path: str, offset: int, count: int) -> bytes:
        async with self._agent.use() as agent:
            return await agent.read_range(guest_path, offset, count)

    async def spawn(self, argv: list[str]) -> int:
        async with self._agent.use() as agent:
            return await agent.spawn(argv)

    async def exec_status(self, pid: int) -> ExecResult | None:
        async with self._agent.use() as agent:
            st = await agent.exec_status(pid)
        return ExecResult(st.exit_code, b"", b"") if st.exited else None

    async def read_file(self, guest_path: str, limit: int = 64 << 20) -> bytes:
        async with self._agent.use() as agent:
            return await agent.read_file(guest_path, limit)

    async def shutdown(self, timeout: float = 60.0) -> int:
        """Power the guest off and wait; then QMP quit; then SIGKILL.  Returns QEMU's status.

        The power-off is ``systemctl poweroff --no-block`` through the agent,
        not the agent's guest-shutdown: that one runs ``shutdown -P``, which
        goes through logind, and the base image has no logind (it boots
        faster), so it would hang until the fallback.  ``timeout`` covers the
        guest's own power-off; the fallbacks add at most a few seconds each.
        """
        with trio.move_on_after(timeout):
            try:
                # The agent dies with the guest: its answer may never come.
                with trio.move_on_after(min(15.0, timeout)):
                    await self.exec(["systemctl", "poweroff", "--no-block"], timeout=10.0)
            except HypervisorError as exc:
                # A broken channel is often the guest already going down.
                log.info("%s: power-off through the agent failed (%s)", self.name, exc)
                status = await self._exited_within(5.0)
                if status is not None:
                    return status
            else:
                return await self.wait_exit()
        with trio.move_on_after(5.0):
            try:
                await self.qmp("quit")
            except QMPError as exc:
                # QEMU closes the monitor as it exits on its own, too.
                log.info("%s: QMP quit failed (%s)", self.name, exc)
        status = await self._exited_within(5.0)
        if status is not None:
            return status
        log.info("%s: QEMU still running, killing it", self.name)
        await self.kill()
        return await self.wait_exit()

    async def _exited_within(self, seconds: float) -> int | None:
        with trio.move_on_after(seconds):
            return await self.wait_exit()
        return None

    async def kill(self) -> None:
        """SIGKILL QEMU and wait until it is gone."""
        if self._process is not None and self._process.returncode is not None:
            return  # reaped: the pid may already belong to someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        await self.wait_exit()

    async def become_vm(self, ssh_bind: str, ssh_port: int | None) -> None:
        """A warm spare taken by a VM: its port 22 is forwarded from ``ssh_bind:ssh_port``
        from now on (QEMU's ``hostfwd_add``; None: no forward), and its spec file says so."""
        spec = load_spec(self.run_dir)
        if ssh_port is not None and spec.network == "user":  # a bridged guest has its own address
            rule = f"tcp:{_ipv4(ssh_bind)}:{int(ssh_port)}-:22"
            said = await self.qmp(
                "human-monitor-command", {"command-line": f"hostfwd_add n0 {rule}"}
            )
            if said:  # HMP answers an empty string when the forward is in place
                raise HypervisorError(f"ssh forward {rule} for {self.name}: {str(said).strip()}")
            spec = spec.with_ssh(ssh_port, ssh_bind)
        _write_atomic(self.run_dir / SPEC_FILE, spec_to_json(spec))

    async def save_state(self, dest: Path) -> None:
        """Pause, write RAM and devices to ``dest``, and end QEMU.

        The stream goes to ``dest.tmp`` first and is renamed only when QEMU
        reports the migration completed, so ``dest`` is never a partial state.
        If the migration fails the guest is resumed and keeps running.
        """
        tmp = dest.with_name(dest.name + ".tmp")
        async with self._qmp_lock, open_qmp(self.qmp_path) as client:
            await client.execute("stop")
            try:
                await client.execute("migrate", {"uri": migrate_to_file_uri(tmp.absolute())})
                # no event to wait on without the migration-events capability
                while not migration_finished(await client.execute("query-migrate")):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            except QMPError:
                tmp.unlink(missing_ok=True)
                with trio.CancelScope(shield=True), contextlib.suppress(QMPError):
                    await client.execute("cont")
                raise
            os.replace(tmp, dest)
            await client.execute("quit")
        await self.wait_exit()

    async def wait_exit(self) -> int:
        """Wait for QEMU to exit: its status for a child, -1 for an adopted process.
        The agent's connection is closed then."""
        status = await self._wait_process()
        await self._agent.aclose()
        return status

    async def _wait_process(self) -> int:
        """An adopted QEMU is not our child, so its status is not ours to read;
        a pidfd still tells us the moment it ends, without polling."""
        if self._process is not None:
            return await self._process.wait()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return -1
        try:
            # checked after opening: the pidfd pins the process, so a pid that
            # was recycled by now cannot be mistaken for our QEMU
            if _is_our_qemu(self.pid, self.run_dir):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return -1

    async def _await_running(self, incoming: bool, timeout: float, deferred: bool = False) -> None:
        """Wait until the monitor answers; after an incoming migration, resume the guest.

        A state saved from a paused guest arrives paused, so ``cont`` is
        needed for the resumed VM to run.  A ``deferred`` QEMU waits for its
        migration stream: its monitor answering is all there is to wait for.
        """
        with trio.move_on_after(timeout):
            while True:
                if self._process is not None and self._process.poll() is not None:
                    raise HypervisorError(
                        f"QEMU for {self.name} exited with {self._process.returncode}: "
                        f"{_log_tail(self.run_dir)}"
                    )
                try:
                    status = await self.query_status()
                except QMPError:
                    status = ""
                if status == "paused" and incoming:
                    await self.qmp("cont")
                    return
                if status == "running" or (status == "inmigrate" and deferred):
                    return
                await trio.sleep(0.05)
        raise HypervisorError(f"QEMU for {self.name} did not come up within {timeout:g} s")


CHECK_LEAKS_ONLY = 3  # `qemu-img check`: leaked clusters, no corruption


class QemuHypervisor:
    """``Hypervisor`` on qemu-system-x86_64 and qemu-img."""

    def __init__(
        self,
        accel: str = "tcg",
        qemu_binary: str = "qemu-system-x86_64",
        qemu_img: str = "qemu-img",
        *,
        machine: str = "q35",
        cache: str = "unsafe",
        start_timeout: float = 60.0,
        niceness: int = 10,
    ) -> None:
        if accel not in {"kvm", "tcg"}:
            raise HypervisorError(f"unknown accelerator {accel!r}")
        self.accel = accel
        self.qemu_binary = qemu_binary
        self.qemu_img = qemu_img
        self.machine = machine
        self.cache = cache
        self.start_timeout = start_timeout
        # Guests run below the node's priority: a busy VM (TCG above all)
        # must not starve the node's heartbeats and be taken for a dead host.
        self.niceness = niceness
        self._qemu_version: str | None = None

    async def _img(self, *args: str) -> bytes:
        argv = [self.qemu_img, *args]
        try:
            res = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError as exc:
            raise HypervisorError(f"cannot run {self.qemu_img}: {exc}") from exc
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()[-_ERROR_TAIL:]
            raise QemuImgFailed(
                f"qemu-img {args[0]} failed ({res.returncode}): {err}", res.returncode
            )
        return res.stdout

    async def create_overlay(self, backing: Path, dest: Path) -> DiskInfo:
        await self._img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            backing_name(backing, dest),
            str(dest),
        )
        return await self.disk_info(dest)

    async def disk_info(self, path: Path) -> DiskInfo:
        # --force-share: the image may be open in a running guest
        out = await self._img("info", "--force-share", "--output=json", str(path))
        try:
            return parse_disk_info(path, json.loads(out))
        except ValueError as exc:
            raise HypervisorError(f"qemu-img info {path}: bad JSON") from exc

    async def check_disk(self, path: Path) -> None:
        """Leaked clusters (exit 3) only waste space; corruption (2) or failure (1) raise."""
        try:
            await self._img("check", "-q", str(path))
        except QemuImgFailed as exc:
            if exc.returncode != CHECK_LEAKS_ONLY:
                raise

    async def shape(self, spec: BootSpec) -> Shape:
        """The shape a guest started from ``spec`` has (see ``savedstate``)."""
        return Shape.of(
            {
                "qemu": await self._version(),
                "machine": self.machine,
                "accel": self.accel,
                "cpu": "host" if self.accel == "kvm" else "max",
                "memory_mb": spec.memory_mb,
                "vcpus": spec.vcpus,
                "devices": DEVICES,
                "kernel": spec.kernel.name,
                "kernel_size": spec.kernel.stat().st_size,
                "cmdline": spec.cmdline,
            }
        )

    async def _version(self) -> str:
        if self._qemu_version is None:
            try:
                res = await trio.run_process(
                    [self.qemu_binary, "--version"], capture_stdout=True, check=False
                )
            except OSError as exc:
                raise HypervisorError(f"cannot run {self.qemu_binary}: {exc}") from exc
            self._qemu_version = res.stdout.decode(errors="replace").split("\n")[0].strip()
        return self._qemu_version

    async def backing_of(self, path: Path) -> str | None:
        with path.open("rb") as fh:
            return qcow2_backing(fh.read(65536))

    async def rebase_unsafe(self, path: Path, new_backing: Path) -> None:
        await self._img(
            "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing_name(new_backing, path),
            str(path),
        )  # fmt: skip

    async def flatten(self, src: Path, dest: Path) -> DiskInfo:
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            await self._img("convert", "-O", "qcow2", str(src), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return await self.disk_info(dest)

    async def start(self, spec: BootSpec) -> QemuGuest:
        """Start QEMU in its own session and return once its monitor answers.

        With ``spec.incoming`` the guest resumes from that saved state and is
        running on return.  If QEMU does not come up it is killed.
        """
        run_dir = spec.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (QMP_SOCKET, QGA_SOCKET, PID_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        _write_atomic(run_dir / SPEC_FILE, spec_to_json(spec))
        argv = qemu_argv(
            spec,
            accel=self.accel,
            qemu_binary=self.qemu_binary,
            machine=self.machine,
            cache=self.cache,
        )
        with open(run_dir / QEMU_LOG, "wb") as stderr:  # noqa: ASYNC230 - local, tiny
            try:
                process = await trio.lowlevel.open_process(
                    ["nice", "-n", str(self.niceness), *argv] if self.niceness else argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HypervisorError(f"cannot run {self.qemu_binary}: {exc}") from exc
        guest = QemuGuest(spec.name, process.pid, run_dir, process)
        try:
            await guest._await_running(
                spec.incoming is not None, self.start_timeout, spec.defer_incoming
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await guest.kill()
            raise
        return guest

    async def adopt(self, name: str, run_dir: Path) -> QemuGuest | None:
        """The guest left running by an earlier node process, or None if it is gone."""
        try:
            pid = int((run_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        if not _is_our_qemu(pid, run_dir):
            return None
        return QemuGuest(name, pid, run_dir)


def load_spec(run_dir: Path) -> BootSpec:
    """The BootSpec a guest was started with (for reconciling state after a restart)."""
    try:
        return spec_from_json((run_dir / SPEC_FILE).read_text())
    except OSError as exc:
        raise HypervisorError(f"no {SPEC_FILE} in {run_dir}") from exc


def clock_argv(now_ns: int) -> list[str]:
    """The guest command that sets its clock to ``now_ns`` (nanoseconds since the epoch)."""
    return ["date", "-u", "-s", f"@{now_ns // 1_000_000_000}.{now_ns % 1_000_000_000:09d}"]
