"""QEMU's side of an overlay replica: crash-consistent increments of a running VM's disk.

Theory of operation (issue 17 item 5; Proxmox's storage replication is the
anchor, done here with QEMU's incremental backup instead of ZFS snapshots):

* ``take_increment(first=True)``: one QMP ``transaction`` adds a dirty bitmap
  to the VM's drive and starts a ``blockdev-backup`` of the overlay's own
  clusters (``sync=top``: the backing chain is content-addressed and held
  elsewhere too) into a new qcow2 file with no backing file.  Both take the
  same instant, so no write falls between the copy's point in time and the
  bitmap's first bit.
* ``take_increment(first=False)``: ``blockdev-backup sync=incremental`` with
  that bitmap: only the clusters written since the last increment that
  succeeded, as they were when the job started (the backup job copies a
  cluster's old data before the guest overwrites it, so the increment is one
  point in time while the guest runs on: crash-consistent).  QEMU clears the
  bitmap's bits when the job succeeds and keeps them when it fails
  (``bitmap-mode=on-success``), so a failed increment loses nothing: the
  next one carries its clusters too.
* An increment is a sparse qcow2 of only its clusters.  A replica is the
  chain of them (``chain_onto``: each over the one before, the first over
  the VM's backing chain; ``qemu-img rebase -u`` rewrites only the header),
  and a VM brought back from it gets an overlay over the chain's head.

What can fail: the job (``QMPError``; the caller deletes the half file, the
bitmap keeps its bits), qemu-img (``QemuImgFailed``), and a bitmap that is
gone because QEMU restarted (``has_bitmap`` is False: the next increment
must be a first one).  Only a ``QemuGuest``'s monitor can do this; the fake
hypervisor of the tests cannot.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vmmesh.errors import QemuImgFailed, QMPError
from vmmesh.hypervisor.migration import DRIVE
from vmmesh.hypervisor.qmp import QMPClient

BITMAP = "vmmesh-replica"
JOB = "vmmesh-replica"
NODE = "vmmesh-replica-target"
POLL = 0.05  # seconds between two looks at the job


@dataclass(frozen=True)
class Increment:
    """One increment taken: the file, and how much of it the job copied."""

    path: Path
    first: bool
    copied: int  # bytes the job read and wrote (its progress at the end)


async def has_bitmap(client: QMPClient) -> bool:
    """Whether the VM's drive has our dirty bitmap (False after QEMU restarted)."""
    for dev in _list(await client.execute("query-block"), "query-block"):
        if dev.get("device") != DRIVE:
            continue
        inserted = dev.get("inserted")
        bitmaps = inserted.get("dirty-bitmaps", []) if isinstance(inserted, dict) else []
        return any(isinstance(b, dict) and b.get("name") == BITMAP for b in bitmaps)
    raise QMPError(f"no drive {DRIVE} on this guest")


async def take_increment(
    client: QMPClient, dest: Path, virtual_size: int, first: bool, qemu_img: str = "qemu-img"
) -> Increment:
    """Copy into a new ``dest`` the overlay's clusters (``first``) or those written
    since the last increment; see the module docstring.  A first increment starts
    the count again (a replica begun anew, on another host): an older bitmap goes."""
    if first:
        await drop_bitmap(client)
    await _run([qemu_img, "create", "-q", "-f", "qcow2", str(dest), str(virtual_size)])
    await client.execute(
        "blockdev-add",
        {"driver": "qcow2", "node-name": NODE, "file": {"driver": "file", "filename": str(dest)}},
    )
    try:
        backup: dict[str, Any] = {
            "job-id": JOB,
            "device": DRIVE,
            "target": NODE,
            "auto-dismiss": False,
        }
        if first:
            actions = [
                {"type": "block-dirty-bitmap-add", "data": {"node": DRIVE, "name": BITMAP}},
                {"type": "blockdev-backup", "data": {**backup, "sync": "top"}},
            ]
        else:
            incremental = {"sync": "incremental", "bitmap": BITMAP, "bitmap-mode": "on-success"}
            actions = [{"type": "blockdev-backup", "data": {**backup, **incremental}}]
        await client.execute("transaction", {"actions": actions})
        copied = await _wait_job(client)
    finally:
        with contextlib.suppress(QMPError):
            await client.execute("blockdev-del", {"node-name": NODE})
    return Increment(dest, first, copied)


async def drop_bitmap(client: QMPClient) -> None:
    """No more replica of this VM: stop counting its writes."""
    with contextlib.suppress(QMPError):
        await client.execute("block-dirty-bitmap-remove", {"node": DRIVE, "name": BITMAP})


async def chain_onto(increment: Path, parent: Path, qemu_img: str = "qemu-img") -> None:
    """Make ``increment`` read through to ``parent`` where it has no cluster (header
    only: nothing is copied).  ``parent`` is named relative to the increment's
    directory when it is beside it, so a replica's directory can move whole."""
    backing = parent.name if parent.parent == increment.parent else str(parent)
    await _run(
        [qemu_img, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(increment)]
    )


async def _wait_job(client: QMPClient) -> int:
    """Wait for the backup job to conclude; its bytes copied, or QMPError with its error."""
    try:
        while True:
            job = _job(await client.execute("query-jobs"))
            if job is None:
                raise QMPError("the replica's backup job vanished")
            if job.get("status") == "concluded":
                error = job.get("error")
                if error:
                    raise QMPError(f"replica increment failed: {str(error)[:200]}")
                progress = job.get("current-progress", 0)
                return progress if isinstance(progress, int) else 0
            await trio.sleep(POLL)
    finally:
        with contextlib.suppress(QMPError):
            await client.execute("job-dismiss", {"id": JOB})


def _job(answer: Any) -> dict[str, Any] | None:
    for job in _list(answer, "query-jobs"):
        if job.get("id") == JOB:
            return job
    return None


def _list(answer: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list) or not all(isinstance(x, dict) for x in answer):
        raise QMPError(f"malformed {what} answer")
    return answer


async def _run(argv: list[str]) -> None:
    res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        tail = err[-1] if err else ""
        raise QemuImgFailed(f"{argv[0]} {argv[1]} exited {res.returncode}: {tail}", res.returncode)
