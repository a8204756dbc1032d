"""QEMU's side of a live migration: the monitor commands, in the order they must run.

Theory of operation (the Incus recipe on QEMU 7.2):

* The target QEMU is started with ``-incoming defer`` over an empty overlay
  on the same backing chain.  ``target_listen`` exports that overlay as a
  writable NBD export on a Unix socket of the VM's run directory (only the
  node reaches it) and gives QEMU one end of a socket pair for the RAM
  stream (``getfd``, then ``migrate-incoming fd:``).
* On the source, ``start_mirror`` opens an NBD client on a Unix socket the
  node bridges to the target's export, and mirrors the overlay's own
  clusters (``sync=top``: the backing chain is already there); ``mirror``
  reads the job.  ``start_ram`` passes the other socket pair end, turns on
  ``pause-before-switchover`` and starts ``migrate fd:``.  When the status
  is ``pre-switchover`` the guest is paused: ``finish_mirror`` completes the
  mirror without a pivot (the target now holds the disk as the paused guest
  left it), then ``migrate-continue`` sends the devices' state and QEMU says
  ``completed``.  The target then runs the guest by itself.
* ``abort_source`` cancels whatever is under way and resumes the guest:
  anything that fails before ``completed`` leaves the VM running on the
  source.  ``target_done`` stops the target's NBD server.

Everything here needs a ``QemuGuest`` (the monitor); the fake hypervisor of
the tests cannot migrate.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from vmmesh.errors import QMPError
from vmmesh.hypervisor.qmp import (
    MigrationStats,
    MirrorJob,
    QMPClient,
    block_jobs,
    migration_stats,
)

DRIVE = "virtio0"  # the block backend ``-drive if=virtio`` names
EXPORT = "vmdisk"
MIRROR_JOB = "vmmesh-mirror"
MIRROR_NODE = "vmmesh-mirror-target"
RAM_FD_OUT = "vmmesh-migrate-out"
RAM_FD_IN = "vmmesh-migrate-in"
MAX_BANDWIDTH = 10 << 30  # bytes per second: the link decides, not QEMU's 32 MiB/s default
DOWNTIME_LIMIT_MS = 300  # QEMU's default, said out loud


def tracks_guest_writes(accel: str) -> bool:
    """Whether a guest may keep running while its RAM is copied under ``accel``.

    Live RAM copy relies on QEMU noticing every page the guest writes after it
    was sent.  KVM does (the kernel's dirty log).  Under TCG on QEMU 7.2 some
    writes made during the copy never reach the target: measured here, a guest
    kernel panicked (corrupt hrtimer queue, general protection fault) after
    about one live move in four with the host loaded, and after none of 75
    when paused.  (Most likely a vCPU writing through TLB entries made before
    a dirty-bitmap sync cleared the page; not confirmed in QEMU's source.)  A TCG guest
    is therefore paused for the whole RAM copy (``pause_for_copy``); its disk
    is still mirrored while it runs (the block layer's own dirty bitmap).
    """
    return accel == "kvm"


async def pause_for_copy(client: QMPClient) -> None:
    """Stop the guest before its RAM is sent (see ``tracks_guest_writes``)."""
    await client.execute("stop")


async def target_listen(client: QMPClient, nbd_socket: Path, ram_fd: int) -> None:
    """Export the disk for the mirror and wait for the RAM stream on ``ram_fd``."""
    await client.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_socket)}}}
    )
    await client.execute("nbd-server-add", {"device": DRIVE, "name": EXPORT, "writable": True})
    await client.execute_with_fd("getfd", {"fdname": RAM_FD_IN}, ram_fd)
    await client.execute("migrate-incoming", {"uri": f"fd:{RAM_FD_IN}"})


async def target_done(client: QMPClient) -> None:
    """The mirror is over: no more NBD server."""
    with contextlib.suppress(QMPError):
        await client.execute("nbd-server-stop")


async def start_mirror(client: QMPClient, nbd_socket: Path) -> None:
    """Connect to the target's export (through ``nbd_socket``) and mirror the overlay."""
    await client.execute(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": MIRROR_NODE,
            "server": {"type": "unix", "path": str(nbd_socket)},
            "export": EXPORT,
        },
    )
    await client.execute(
        "blockdev-mirror",
        {"job-id": MIRROR_JOB, "device": DRIVE, "target": MIRROR_NODE, "sync": "top"},
    )


async def mirror(client: QMPClient) -> MirrorJob:
    """The mirror job; QMPError when it is gone (failed)."""
    job = block_jobs(await client.execute("query-block-jobs")).get(MIRROR_JOB)
    if job is None:
        raise QMPError("the disk mirror ended without completing (the link to the target?)")
    return job


async def start_ram(client: QMPClient, ram_fd: int) -> None:
    """Start sending RAM on ``ram_fd``; it pauses before the switchover."""
    await client.execute(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "pause-before-switchover", "state": True},
                # a guest that dirties memory faster than the link carries it is
                # slowed down until the copy converges (Proxmox turns it on too)
                {"capability": "auto-converge", "state": True},
            ]
        },
    )
    await client.execute(
        "migrate-set-parameters",
        {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS},
    )
    await client.execute_with_fd("getfd", {"fdname": RAM_FD_OUT}, ram_fd)
    await client.execute("migrate", {"uri": f"fd:{RAM_FD_OUT}"})


async def ram(client: QMPClient) -> MigrationStats:
    return migration_stats(await client.execute("query-migrate"))


async def finish_mirror(client: QMPClient) -> None:
    """Complete the mirror without a pivot (the guest is paused) and close its client."""
    await client.execute("block-job-cancel", {"device": MIRROR_JOB})


async def mirror_gone(client: QMPClient) -> bool:
    return MIRROR_JOB not in block_jobs(await client.execute("query-block-jobs"))


async def drop_mirror_node(client: QMPClient) -> None:
    with contextlib.suppress(QMPError):
        await client.execute("blockdev-del", {"node-name": MIRROR_NODE})


async def switchover(client: QMPClient) -> None:
    await client.execute("migrate-continue", {"state": "pre-switchover"})


async def abort_source(client: QMPClient) -> None:
    """Cancel the RAM stream and the mirror, and let the guest run on here."""
    with contextlib.suppress(QMPError):
        await client.execute("migrate_cancel")
    with contextlib.suppress(QMPError):
        await client.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
    await drop_mirror_node(client)
    with contextlib.suppress(QMPError):
        await client.execute("cont")


async def save_paused(client: QMPClient, uri: str) -> None:
    """Pause the guest and start writing its state to ``uri`` (offline migration)."""
    await client.execute("stop")
    await client.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "pause-before-switchover", "state": False}]},
    )
    await client.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    await client.execute("migrate", {"uri": uri})
