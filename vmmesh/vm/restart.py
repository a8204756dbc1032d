"""Starting a lost VM again from its own disk (keep-alive's first answer to a crash).

A ``lost`` row keeps its overlay and run directory.  ``restart`` admits the
VM again (a lost VM holds no slot), moves the row to ``restarting``, boots
QEMU from the overlay (cold: the RAM it had is gone) and waits for the guest
agent; then the row is ``running`` and watched again, with its origin saying
why.  If QEMU does not come up the row is ``lost`` again (``RESTART_FAILED``)
with the reason, and the caller may relocate the VM.
"""

from __future__ import annotations

import contextlib
import time

import trio

from vmmesh.errors import CapacityError, HypervisorError, NotFound, StateError, VmmeshError
from vmmesh.host.build import BaseImage
from vmmesh.hypervisor.base import Guest, Hypervisor
from vmmesh.vm.admission import Admission
from vmmesh.vm.lifecycle import Lifecycle
from vmmesh.vm.rows import VmRows
from vmmesh.vm.state import VmEvent, VmState


async def restart(
    *,
    rows: VmRows,
    admission: Admission,
    lifecycle: Lifecycle,
    hv: Hypervisor,
    base: BaseImage,
    vm_id: str,
    why: str,
    agent_timeout: float,
) -> float:
    """Boot lost VM ``vm_id`` again here; returns the seconds it took."""
    rec = rows.get(vm_id)
    if rec.state != VmState.LOST:
        raise StateError(f"{rec.name} is {rec.state}, not lost: nothing to restart")
    disk = rows.vm_dir / rec.disk
    if not disk.is_file():
        raise NotFound(f"{rec.name}'s disk is gone: it cannot restart here")
    if admission.reserve(1) == 0:
        raise CapacityError(f"no free VM slot here to restart {rec.name}")
    try:
        rows.apply(vm_id, VmEvent.RESTART_BEGUN)
    finally:
        admission.release(1)
    t0 = time.monotonic()
    spec = base.boot_spec(vm_id, disk, rows.run_root / vm_id, rec.vcpus, rec.memory_mb).with_ssh(
        rec.ssh_port or None, rows.ssh_bind
    )
    guest: Guest | None = None
    try:
        guest = await hv.start(spec)
        await guest.wait_agent(agent_timeout)
        if rows.state_of(vm_id) != VmState.RESTARTING:
            raise NotFound(f"{rec.name} was shut down while it restarted")
    except (VmmeshError, OSError, trio.TooSlowError) as exc:
        with trio.CancelScope(shield=True):
            if guest is not None:
                with contextlib.suppress(HypervisorError, OSError):
                    await guest.kill()
            if rows.state_of(vm_id) == VmState.RESTARTING:
                rows.apply(vm_id, VmEvent.RESTART_FAILED, stop_reason=f"restart failed: {exc}")
        raise
    seconds = time.monotonic() - t0
    rows.apply(
        vm_id,
        VmEvent.STARTED,
        pid=guest.pid,
        started=rows.now(),
        start_kind="restart",
        start_seconds=seconds,
        stop_reason="",
        origin=why,
    )
    lifecycle.watch(vm_id, guest)
    return seconds
