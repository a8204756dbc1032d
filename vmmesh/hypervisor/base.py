"""The hypervisor interface: what the node needs from QEMU (or another backend).

Backends (QEMU here; VirtualBox or libvirt later) implement ``Hypervisor``.
Disk operations take and return paths inside the node's data directory that
the *caller* built from validated ids; a backend never builds a path from a
peer's string.  A fake implementation (``tests/fakehv.py``) exists only for
unit tests of callers, and does not ship.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from vmmesh.hypervisor.savedstate import Shape


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    virtual_size: int
    actual_size: int
    backing_file: Path | None
    format: str = "qcow2"


@dataclass(frozen=True)
class BootSpec:
    """Everything needed to start one guest.

    ``kernel``/``initrd``/``cmdline`` are for direct kernel boot (the base
    image manifest carries them).  ``run_dir`` holds the QMP and guest-agent
    sockets, the pid file and the console log.  ``incoming`` resumes from a
    saved-state file instead of booting; ``defer_incoming`` starts QEMU waiting
    for a live migration stream (``-incoming defer``).
    """

    name: str
    disk: Path
    kernel: Path
    initrd: Path
    run_dir: Path
    cmdline: str = "root=/dev/vda rw console=ttyS0 quiet"
    vcpus: int = 1
    memory_mb: int = 512
    network: str = "user"  # "user" or "bridge:<name>"
    ssh_port: int | None = None  # host port forwarded to guest port 22 (user mode)
    ssh_bind: str = "127.0.0.1"  # host address that forward listens on
    incoming: Path | None = None
    defer_incoming: bool = False  # wait for a migration stream (``migrate-incoming``)

    def with_ssh(self, port: int | None, bind: str) -> BootSpec:
        """The same guest with its port 22 forwarded from ``bind:port`` (user mode)."""
        return replace(self, ssh_port=port, ssh_bind=bind)


@dataclass(frozen=True)
class ExecResult:
    """A finished guest command.

    ``exit_code`` is 128 + N for a command killed by signal N (the shell's
    convention) and -1 when the agent did not say.  ``truncated`` means
    stdout or stderr was cut at the caller's ``output_limit``.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False


class Guest(Protocol):
    """A running guest: its monitor and its agent."""

    name: str
    pid: int
    run_dir: Path

    async def wait_agent(self, timeout: float) -> float:
        """Wait until the guest agent answers guest-sync; returns seconds waited."""
        ...

    async def exec(
        self,
        argv: list[str],
        *,
        input_data: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        output_limit: int = 1 << 20,
    ) -> ExecResult: ...

    async def write_file(self, guest_path: str, data: bytes, append: bool = False) -> None: ...

    async def read_file(self, guest_path: str, limit: int = 64 << 20) -> bytes: ...

    async def read_range(self, guest_path: str, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes of a guest file from ``offset`` (b"" past its end)."""
        ...

    async def spawn(self, argv: list[str]) -> int:
        """Start ``argv`` in the guest without waiting; its pid there."""
        ...

    async def exec_status(self, pid: int) -> ExecResult | None:
        """How ``spawn``'s process ended (None while it runs); its output is not captured."""
        ...

    async def shutdown(self, timeout: float = 60.0) -> int:
        """Power the guest off and wait for QEMU to exit; kill it after ``timeout``.

        Returns QEMU's exit status: 0 for a clean power-off, negative when it
        had to be killed (its disks may then lack metadata QEMU had not
        written out).  The one power-off of vmmesh: templates and VMs use it.
        """
        ...

    async def kill(self) -> None: ...

    async def become_vm(self, ssh_bind: str, ssh_port: int | None) -> None:
        """A warm spare taken by a VM: its port 22 forwarded from ``ssh_bind:ssh_port``
        from now on (None: none)."""
        ...

    async def save_state(self, dest: Path) -> None:
        """Pause and write RAM + device state to ``dest`` (QMP migrate to exec:)."""
        ...

    async def wait_exit(self) -> int:
        """Wait for the QEMU process to exit; returns its exit status.

        Negative N means killed by signal N; -1 also when the status is not
        ours to know (a guest adopted from an earlier node process).
        """
        ...


class Hypervisor(Protocol):
    accel: str  # "kvm" or "tcg"

    async def create_overlay(self, backing: Path, dest: Path) -> DiskInfo:
        """A new qcow2 whose backing file is ``backing`` (a linked clone)."""
        ...

    async def disk_info(self, path: Path) -> DiskInfo: ...

    async def check_disk(self, path: Path) -> None:
        """Raise HypervisorError when ``qemu-img check`` finds the image broken."""
        ...

    async def rebase_unsafe(self, path: Path, new_backing: Path) -> None: ...

    async def shape(self, spec: BootSpec) -> Shape:
        """The shape a guest started from ``spec`` has: what a saved state must match."""
        ...

    async def backing_of(self, path: Path) -> str | None:
        """The backing name ``path`` holds, as written (None: standalone), read without
        opening the chain; ImageError if it is not a disk this backend would use."""
        ...

    async def flatten(self, src: Path, dest: Path) -> DiskInfo:
        """Write ``src`` with its whole backing chain as one standalone qcow2."""
        ...

    async def start(self, spec: BootSpec) -> Guest: ...

    async def adopt(self, name: str, run_dir: Path) -> Guest | None:
        """Re-attach to a guest still running from a previous node process."""
        ...


@dataclass(frozen=True)
class ImageManifest:
    """The base image's manifest: the disk is named by its sha256."""

    image_id: str  # sha256 of disk file
    disk: str  # file name within the image directory
    kernel: str
    initrd: str
    cmdline: str
    size: int
    packages: tuple[str, ...] = field(default=())
    created: float = 0.0
