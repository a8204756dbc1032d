"""A fake ``Hypervisor`` for unit tests of its callers (templates, VMs).

Why: the manager layer's logic (parent choice, atomic building, cleanup,
reconcile, unexpected stops) must be testable in milliseconds with trio's
autojump clock, without QEMU.  It lives under ``tests/`` because nothing in
the product runs it (lab nodes run QEMU) and because it imports
``vmmesh.host.sshkeys``, which the hypervisor layer may not.

A "disk" is a small JSON file: ``{"backing": path | null, "packages": [...],
"files": {guest_path: base64}}``.  What a guest sees is the union along the
backing chain, so a template really inherits its parent's packages and a
linked clone really sees its template's.  Guests understand just the commands
the managers send: ``apt-get update|install|clean``, ``sh -c`` (accepted and
logged), ``python3 -c SCRIPT ZIP`` (extracts the zip to /opt when the fake
image "has" python3), ``mkdir``/``chmod`` (accepted), ``cat PATH``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vmmesh.errors import GuestAgentError, HypervisorError, ImageError
from vmmesh.host.sshkeys import PREPARE_SCRIPT
from vmmesh.hypervisor.base import BootSpec, DiskInfo, ExecResult, ImageManifest
from vmmesh.hypervisor.savedstate import Shape

# A well-formed ed25519 public key (not anyone's): the fake guests' ssh host key.
FAKE_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HypervisorError(f"fake disk {path} unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise HypervisorError(f"fake disk {path} is not a map")
    return data


def _save(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, sort_keys=True))


def make_base_disk(path: Path, packages: tuple[str, ...] = ()) -> None:
    """Write a fake base image disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, {"backing": None, "packages": sorted(packages), "files": {}})


def make_base_image(directory: Path, packages: tuple[str, ...] = ()) -> ImageManifest:
    """A fake base image directory (disk, kernel, initrd) and its manifest."""
    make_base_disk(directory / "disk.qcow2", packages)
    (directory / "vmlinuz").write_bytes(b"fake kernel")
    (directory / "initrd.img").write_bytes(b"fake initrd")
    return ImageManifest(
        image_id="ba5e" * 16,
        disk="disk.qcow2",
        kernel="vmlinuz",
        initrd="initrd.img",
        cmdline="root=/dev/vda rw console=ttyS0 quiet",
        size=(directory / "disk.qcow2").stat().st_size,
        packages=packages,
    )


def chain_of(path: Path) -> list[Path]:
    """The disk and its backing files, outermost first."""
    out = [path]
    while True:
        backing = _load(out[-1]).get("backing")
        if backing is None:
            return out
        # relative to the image, as QEMU resolves it
        out.append(Path(os.path.normpath(out[-1].parent / backing)))


def packages_on(path: Path) -> frozenset[str]:
    """Every package a guest booted from ``path`` would have."""
    pkgs: set[str] = set()
    for disk in chain_of(path):
        pkgs.update(_load(disk).get("packages", []))
    return frozenset(pkgs)


def files_on(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for disk in reversed(chain_of(path)):
        for name, b64 in _load(disk).get("files", {}).items():
            out[name] = base64.b64decode(b64)
    return out


@dataclass
class FakeGuest:
    hv: FakeHypervisor
    name: str
    pid: int
    run_dir: Path
    disk: Path
    spec: BootSpec
    exec_log: list[list[str]] = field(default_factory=list)
    authorized_keys: list[str] = field(default_factory=list)
    spawned: list[list[str]] = field(default_factory=list)
    _ends: dict[int, float] = field(default_factory=dict)  # spawned pid -> when it exits
    exited: trio.Event = field(default_factory=trio.Event)
    exit_status: int = 0

    def _check_alive(self) -> None:
        if self.exited.is_set():
            raise GuestAgentError(f"guest {self.name} is not running")

    async def wait_agent(self, timeout: float) -> float:
        self._check_alive()
        if self.hv.agent_seconds > timeout:
            await trio.sleep(timeout)
            raise GuestAgentError(f"guest {self.name}: agent did not answer in {timeout} s")
        await trio.sleep(self.hv.agent_seconds)
        return self.hv.agent_seconds

    async def exec(
        self,
        argv: list[str],
        *,
        input_data: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        output_limit: int = 1 << 20,
    ) -> ExecResult:
        self._check_alive()
        self.exec_log.append(list(argv))
        prog = argv[0] if argv else ""
        if prog == "apt-get":
            return await self._apt(argv[1:])
        if prog == "python3":
            if not self.hv.guest_has_python:
                raise GuestAgentError("guest-exec: python3: No such file or directory")
            if len(argv) >= 4:
                self._extract(argv[3], "/opt")
            return ExecResult(0, b"", b"")
        if prog == "cat" and len(argv) == 2:
            files = files_on(self.disk)
            if argv[1] in files:
                return ExecResult(0, files[argv[1]], b"")
            return ExecResult(1, b"", f"cat: {argv[1]}: No such file or directory\n".encode())
        if argv[:2] == ["systemctl", "poweroff"]:
            if self.hv.clean_poweroff:
                self.exit(0)
            return ExecResult(0, b"", b"")
        if argv == ["sh", "-c", PREPARE_SCRIPT]:
            for key in (input_data or b"").decode().splitlines():
                if key and key not in self.authorized_keys:
                    self.authorized_keys.append(key)
            return ExecResult(0, f"{FAKE_HOST_KEY} root@{self.name}\n".encode(), b"")
        if prog in ("sh", "mkdir", "chmod", "sync", "fstrim", "rm", "true"):
            return ExecResult(0, b"", b"")
        return ExecResult(127, b"", f"{prog}: command not found\n".encode())

    async def _apt(self, args: list[str]) -> ExecResult:
        if args[:1] == ["update"]:
            if self.hv.update_output:  # exits 0 but says what it could not fetch
                return ExecResult(0, self.hv.update_output, b"")
            if self.hv.update_failures > 0:
                self.hv.update_failures -= 1
                return ExecResult(100, b"", b"E: Failed to fetch http://repo/ ./InRelease\n")
            return ExecResult(0, b"Reading package lists...\n", b"")
        if args[:1] == ["clean"]:
            return ExecResult(0, b"", b"")
        if "install" not in args:
            return ExecResult(100, b"", b"E: Invalid operation\n")
        wanted = [a for a in args[args.index("install") + 1 :] if not a.startswith("-")]
        await trio.sleep(self.hv.install_seconds)
        missing = [p for p in wanted if p not in self.hv.repo_packages]
        if missing:
            err = "".join(f"E: Unable to locate package {p}\n" for p in missing)
            return ExecResult(100, b"Reading package lists...\n", err.encode())
        broken = [p for p in wanted if p in self.hv.broken_packages]
        if broken:
            out = "".join(
                f"dpkg: error processing package {p} (--configure):\n"
                f" installed {p} package post-installation script subprocess returned"
                " error exit status 1\n"
                for p in broken
            )
            err = "E: Sub-process /usr/bin/dpkg returned an error code (1)\n"
            return ExecResult(100, out.encode(), err.encode())
        data = _load(self.disk)
        data["packages"] = sorted(set(data.get("packages", [])) | set(wanted))
        files = data.setdefault("files", {})
        for p in wanted:
            files[f"/usr/share/vmm-test/{p}"] = base64.b64encode(p.encode()).decode()
        _save(self.disk, data)
        fetched = f"Fetched {len(wanted) * 1500:,} kB in 1s (1,500 kB/s)\nSetting up...\n"
        return ExecResult(0, fetched.encode(), b"")

    def _extract(self, zip_path: str, dest: str) -> None:
        raw = files_on(self.disk).get(zip_path)
        if raw is None:
            raise GuestAgentError(f"no such file in guest: {zip_path}")
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    self._store(f"{dest}/{info.filename}", zf.read(info))

    def _store(self, guest_path: str, data: bytes) -> None:
        disk = _load(self.disk)
        disk.setdefault("files", {})[guest_path] = base64.b64encode(data).decode()
        _save(self.disk, disk)

    async def write_file(self, guest_path: str, data: bytes, append: bool = False) -> None:
        self._check_alive()
        before = files_on(self.disk).get(guest_path, b"") if append else b""
        self._store(guest_path, before + data)

    async def read_file(self, guest_path: str, limit: int = 64 << 20) -> bytes:
        self._check_alive()
        files = files_on(self.disk)
        if guest_path not in files:
            raise GuestAgentError(f"no such file in guest: {guest_path}")
        return files[guest_path][:limit]

    async def read_range(self, guest_path: str, offset: int, count: int) -> bytes:
        return (await self.read_file(guest_path))[offset : offset + count]

    async def spawn(self, argv: list[str]) -> int:
        """A background process that "runs" ``hv.job_seconds`` and exits ``hv.job_exit``.

        For the job runner's wrapper (``sh -c SCRIPT sh WORK OUT TIMEOUT CMD...``)
        it writes ``ran CMD...`` to ``OUT/stdout`` at once.
        """
        self._check_alive()
        self.exec_log.append(list(argv))
        self.spawned.append(list(argv))
        if argv[:2] == ["sh", "-c"] and len(argv) >= 8:
            self._store(f"{argv[5]}/stdout", ("ran " + " ".join(argv[7:]) + "\n").encode())
            for listing in ("before", "after"):  # an empty working directory
                self._store(f"{argv[5]}/{listing}", b"")
        self._ends[len(self.spawned)] = trio.current_time() + self.hv.job_seconds
        return len(self.spawned)

    async def exec_status(self, pid: int) -> ExecResult | None:
        self._check_alive()
        if pid not in self._ends:
            raise GuestAgentError(f"no process {pid} in the guest")
        if trio.current_time() < self._ends[pid]:
            return None
        return ExecResult(self.hv.job_exit, b"", b"")

    async def shutdown(self, timeout: float = 60.0) -> int:
        if not self.exited.is_set():
            await trio.sleep(self.hv.shutdown_seconds if self.hv.clean_poweroff else timeout)
            self.exit(0 if self.hv.clean_poweroff else -9)
        return self.exit_status

    async def kill(self) -> None:
        self.exit(-9)

    async def become_vm(self, ssh_bind: str, ssh_port: int | None) -> None:
        self._check_alive()
        self.spec = self.spec.with_ssh(ssh_port, ssh_bind)

    async def save_state(self, dest: Path) -> None:
        self._check_alive()
        await trio.sleep(self.hv.agent_seconds)
        state = {"disk": str(self.disk), "memory_mb": self.spec.memory_mb}
        dest.write_text(json.dumps(state))
        self.exit(0)

    async def wait_exit(self) -> int:
        await self.exited.wait()
        return self.exit_status

    def exit(self, status: int) -> None:
        """QEMU ends (also used by tests to simulate a crash)."""
        if not self.exited.is_set():
            self.exit_status = status
            self.exited.set()
            self.hv.running.pop(self.name, None)


class FakeHypervisor:
    """In-memory QEMU stand-in; one instance plays the machine across manager restarts."""

    def __init__(
        self,
        *,
        repo_packages: frozenset[str] = frozenset(),
        guest_has_python: bool = True,
        agent_seconds: float = 12.0,
        install_seconds: float = 30.0,
        shutdown_seconds: float = 2.0,
        clean_poweroff: bool = True,
    ) -> None:
        self.accel = "fake"
        self.repo_packages = repo_packages
        self.guest_has_python = guest_has_python
        self.agent_seconds = agent_seconds
        self.install_seconds = install_seconds
        self.shutdown_seconds = shutdown_seconds
        self.clean_poweroff = clean_poweroff  # False: guests ignore power-off and get killed
        self.update_failures = 0  # so many `apt-get update` runs fail first (a flaky source)
        self.update_output = b""  # what `apt-get update` prints when it "succeeds"
        self.broken_packages: frozenset[str] = frozenset()  # their postinst script fails
        self.job_seconds = 0.0  # how long a spawned process runs
        self.job_exit = 0  # and its exit status
        self.running: dict[str, FakeGuest] = {}
        self.resumed: list[str] = []  # guests started from a saved state
        self.started: list[FakeGuest] = []
        self._next_pid = 1000

    async def create_overlay(self, backing: Path, dest: Path) -> DiskInfo:
        if not backing.is_file():
            raise HypervisorError(f"backing file missing: {backing}")
        relative = os.path.relpath(backing.absolute(), dest.absolute().parent)
        _save(dest, {"backing": relative, "packages": [], "files": {}})
        return await self.disk_info(dest)

    async def disk_info(self, path: Path) -> DiskInfo:
        data = _load(path)
        backing = data.get("backing")
        size = path.stat().st_size
        return DiskInfo(
            path=path,
            virtual_size=1 << 30,
            actual_size=size,
            backing_file=None if backing is None else path.parent / backing,
        )

    async def check_disk(self, path: Path) -> None:
        _load(path)

    async def backing_of(self, path: Path) -> str | None:
        try:
            backing = _load(path).get("backing")
        except HypervisorError as exc:
            raise ImageError(f"not a fake disk: {exc}") from None
        return None if backing is None else str(backing)

    async def rebase_unsafe(self, path: Path, new_backing: Path) -> None:
        data = _load(path)
        data["backing"] = os.path.relpath(new_backing.absolute(), path.absolute().parent)
        _save(path, data)

    async def flatten(self, src: Path, dest: Path) -> DiskInfo:
        files = {k: base64.b64encode(v).decode() for k, v in files_on(src).items()}
        _save(dest, {"backing": None, "packages": sorted(packages_on(src)), "files": files})
        return await self.disk_info(dest)

    async def shape(self, spec: BootSpec) -> Shape:
        return Shape.of({"qemu": "fake", "memory_mb": spec.memory_mb, "vcpus": spec.vcpus})

    async def start(self, spec: BootSpec) -> FakeGuest:
        if spec.name in self.running:
            raise HypervisorError(f"a guest named {spec.name} already runs")
        _load(spec.disk)
        if spec.incoming is not None:
            try:
                state = json.loads(spec.incoming.read_text())
                assert isinstance(state, dict) and state["memory_mb"] == spec.memory_mb
            except (OSError, ValueError, KeyError, AssertionError) as exc:
                raise HypervisorError(f"QEMU could not load the saved state: {exc!r}") from exc
            self.resumed.append(spec.name)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        self._next_pid += 1
        guest = FakeGuest(self, spec.name, self._next_pid, spec.run_dir, spec.disk, spec)
        self.running[spec.name] = guest
        self.started.append(guest)
        return guest

    async def adopt(self, name: str, run_dir: Path) -> FakeGuest | None:
        return self.running.get(name)
