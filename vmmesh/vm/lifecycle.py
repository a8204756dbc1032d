"""Lifecycle of a made VM: watched while it runs, stopped by order, lost without one.

Every running guest has a watcher task in the manager's nursery.  When QEMU
exits, the watcher looks at the row: ``stopping`` means we ordered it (nothing
to do, the stop path cleans up); ``running`` means an *unexpected stop*: the row
becomes ``lost`` (``EXITED``), its stop reason says how QEMU ended, and
``on_unexpected_stop`` is called (keep-alive's hook).  The overlay of a lost VM
is kept so it can be restarted elsewhere.  ``shutdown(name)`` is an order and
removes every VM of that name whatever its state (``STOP_ORDERED``, then
``STOPPED``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from vmmesh.errors import HypervisorError, NotFound, StateError, UsageError
from vmmesh.host import persona
from vmmesh.host.sshkeys import check_public_keys
from vmmesh.hypervisor.base import ExecResult, Guest
from vmmesh.vm.rows import VmRecord, VmRows
from vmmesh.vm.state import VmEvent, VmState

log = logging.getLogger("vmmesh.vms")


@dataclass(frozen=True)
class SshAccess:
    """What ``vmmesh ssh`` needs from the VM's host."""

    vm: str
    port: int
    bind: str
    host_key: str


@dataclass(frozen=True)
class VmStopped:
    """A VM whose QEMU exited without an order (for keep-alive)."""

    vm_id: str
    name: str
    template_id: str | None
    at: float
    exit_status: int | None


def lost_reason(status: int | None) -> str:
    """Why a VM is ``lost``, from how its QEMU ended, for ``vmmesh vms``."""
    if status is None:
        return "QEMU was gone when the node looked (node restarted or QEMU unreachable)"
    if status < 0:
        return f"QEMU was killed by signal {-status} without an order"
    return f"QEMU exited with status {status} without an order (guest powered off?)"


class Lifecycle:
    """The guests that run here, their watchers, and stopping them."""

    def __init__(
        self,
        rows: VmRows,
        *,
        now: Callable[[], float],
        on_unexpected_stop: Callable[[VmStopped], None] | None,
    ) -> None:
        self.rows = rows
        self.now = now
        self.on_unexpected_stop = on_unexpected_stop
        self.guests: dict[str, Guest] = {}
        self.nursery: trio.Nursery | None = None  # set by ``VmManager.run``

    # --- watching -----------------------------------------------------

    def watch(self, vm_id: str, guest: Guest) -> None:
        if self.nursery is None:
            raise StateError("VmManager.run is not started")
        self.guests[vm_id] = guest
        self.nursery.start_soon(self._watcher, vm_id, guest)

    async def _watcher(self, vm_id: str, guest: Guest) -> None:
        status: int | None
        try:
            status = await guest.wait_exit()
        except HypervisorError:
            status = None
        self.guests.pop(vm_id, None)
        if self.rows.state_of(vm_id) != VmState.RUNNING:
            return  # ordered stop or already cleaned up
        self.mark_lost(vm_id, status, VmEvent.EXITED)

    def mark_lost(self, vm_id: str, status: int | None, event: VmEvent) -> None:
        at = self.now()
        reason = lost_reason(status)
        self.rows.apply(vm_id, event, stop_reason=reason, stopped=at, pid=0)
        rec = self.rows.get(vm_id)
        log.warning("VM %s lost: %s", rec.name, reason)
        if self.on_unexpected_stop is not None:
            self.on_unexpected_stop(VmStopped(vm_id, rec.name, rec.template_id, at, status))

    # --- using ----------------------------------------------------------

    def running(self, name_or_id: str) -> tuple[VmRecord, Guest]:
        """A VM running here and its guest; NotFound otherwise."""
        rec = self.rows.get(name_or_id)
        guest = self.guests.get(rec.vm_id)
        if guest is None or rec.state != VmState.RUNNING:
            raise NotFound(f"VM {rec.name} is not running here (it is {rec.state})")
        return rec, guest

    async def exec(
        self, name_or_id: str, argv: list[str], *, input_data: bytes | None = None
    ) -> ExecResult:
        """Run ``argv`` in a running VM through its guest agent (wrap in fail_after)."""
        _rec, guest = self.running(name_or_id)
        return await guest.exec(argv, input_data=input_data)

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
        return SshAccess(vm=rec.name, port=rec.ssh_port, bind=self.rows.ssh_bind, host_key=host_key)

    # --- stopping -------------------------------------------------------

    async def shutdown(self, name: str) -> list[VmRecord]:
        """Remove, by order, every VM of request ``name`` here, whatever its state.

        A running guest's QEMU is killed, not powered off: the overlay goes
        with it, so a clean guest shutdown would only cost seconds (5-6 s
        under TCG).  A lost or stopped one only has its overlay, run
        directory and row removed.  Templates stay.  Returns
        the records as they were, so the caller can say exactly what went.
        """
        targets = [v for v in self.rows.list() if name in (v.request_name, v.name)]
        async with trio.open_nursery() as nursery:
            for v in targets:
                nursery.start_soon(self.shutdown_vm, v.vm_id)
        return targets

    async def shutdown_vm(self, vm_id: str) -> None:
        self.rows.apply(vm_id, VmEvent.STOP_ORDERED)
        guest = self.guests.pop(vm_id, None)
        if guest is not None:
            await guest.kill()
        self.rows.apply(vm_id, VmEvent.STOPPED)
