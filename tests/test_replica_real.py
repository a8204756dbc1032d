"""Overlay replica increments on a real QEMU (``hypervisor.replica``, issue 17 item 5).

A tiny probe guest (no Debian boot: it never touches its disk) runs over a qcow2
overlay of a small base; the test writes into the running disk through the
monitor's ``qemu-io``, as a guest's writes would land, takes a first increment
and then two more, chains them over the base, and reads the replica back with
``qemu-io``: each increment holds only what was written since the last, and the
chain's head reads as the disk did when the increment was taken.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vmmesh.hypervisor.accel import probe_payload
from vmmesh.hypervisor.base import BootSpec
from vmmesh.hypervisor.qemu import QemuGuest, QemuHypervisor
from vmmesh.hypervisor.replica import chain_onto, drop_bitmap, has_bitmap, take_increment

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-io") is None,
        reason="needs qemu-system-x86_64, qemu-img and qemu-io",
    ),
]

SIZE = 64 << 20
K64 = 64 << 10


def _img(*argv: str) -> str:
    return subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=True).stdout


def _io(image: Path, command: str) -> str:
    """``qemu-io`` on an image file (read-only), its output."""
    res = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", command, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.stdout + res.stderr


def _holds(image: Path, pattern: int, offset: int, length: int = K64) -> bool:
    out = _io(image, f"read -P {pattern} {offset} {length}")
    return "Pattern verification failed" not in out and "read " in out


def _allocated(image: Path) -> int:
    """Bytes of data the image itself holds (not its backing chain)."""
    rows = json.loads(_img("map", "--output=json", "-f", "qcow2", str(image)))
    return sum(r["length"] for r in rows if r["data"] and r["depth"] == 0)


def _disks(tmp_path: Path) -> Path:
    """A base with a pattern in its first cluster, and an empty overlay over it."""
    base = tmp_path / "base.qcow2"
    _img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 17 0 {K64}", str(base)],
        capture_output=True,
        check=True,
    )
    disk = tmp_path / "disk.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk))
    return disk


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[QemuGuest]:
    (tmp_path / "probe.bin").write_bytes(probe_payload())
    disk = _disks(tmp_path)
    spec = BootSpec(
        name="rep",
        disk=disk,
        kernel=tmp_path / "probe.bin",
        initrd=tmp_path / "probe.bin",
        run_dir=tmp_path / "run",
        memory_mb=64,
        network="none",
    )
    g = await QemuHypervisor(machine="pc").start(spec)
    try:
        yield g
    finally:
        with trio.CancelScope(shield=True):
            await g.kill()


async def _write(guest: QemuGuest, pattern: int, offset: int) -> None:
    """A write into the running disk, through the monitor (as the guest's would land;
    qemu-io's report goes to QEMU's own output, not the monitor's answer)."""
    await guest.qmp(
        "human-monitor-command",
        {"command-line": f'qemu-io virtio0 "write -P {pattern} {offset} {K64}"'},
    )


async def test_increments_hold_only_new_writes_and_chain_into_the_disk_as_it_was(
    guest: QemuGuest, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    rep = tmp_path / "replica"
    rep.mkdir()
    await _write(guest, 34, 1 << 20)
    async with guest.monitor() as qmp:
        assert not await has_bitmap(qmp)
        first = await take_increment(qmp, rep / "0.qcow2", SIZE, first=True)
        assert await has_bitmap(qmp)
    await _write(guest, 51, 2 << 20)
    await _write(guest, 68, 1 << 20)  # over the first write: the newer data travels
    async with guest.monitor() as qmp:
        second = await take_increment(qmp, rep / "1.qcow2", SIZE, first=False)
        third = await take_increment(qmp, rep / "2.qcow2", SIZE, first=False)  # nothing new
        await drop_bitmap(qmp)
        assert not await has_bitmap(qmp)

    # the first holds the overlay's own clusters, not the base's; the next only the
    # two clusters written since; the third nothing
    assert _allocated(first.path) == K64
    assert _allocated(second.path) == 2 * K64
    assert _allocated(third.path) == 0
    assert first.first and not second.first

    await chain_onto(first.path, base)
    await chain_onto(second.path, first.path)
    await chain_onto(third.path, second.path)
    assert _holds(first.path, 17, 0) and _holds(first.path, 34, 1 << 20)
    assert _holds(first.path, 0, 2 << 20), "the first is the disk as it was then"
    head = third.path
    assert _holds(head, 17, 0) and _holds(head, 68, 1 << 20) and _holds(head, 51, 2 << 20)

    # a replica begun anew (another host): a first increment again, whole
    async with guest.monitor() as qmp:
        again = await take_increment(qmp, tmp_path / "again.qcow2", SIZE, first=True)
        assert await has_bitmap(qmp)
        await drop_bitmap(qmp)
    assert _allocated(again.path) == 2 * K64  # the clusters at 1 MiB and 2 MiB
    info = json.loads(_img("info", "--output=json", str(second.path)))
    assert info["backing-filename"] == "0.qcow2", "named beside it: the directory can move"
