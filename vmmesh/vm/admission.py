"""Admission: free slots counted from real capacity, reservations, the warm boot's slot.

A slot is taken with ``reserve`` and handed back with ``release``, or handed over
to a VM's row (an ``ACTIVE`` row counts in capacity, so its reservation is
released at the moment the row is written).  ``reserve`` reads capacity and takes
it with no ``await`` in between: atomic under trio, so two requests racing on
one host never both take the last slot.  A warm boot holds one slot of its own
(``hold_for_warm``) that it gives up to the first request that needs it: the
request's ``reserve`` cancels the warm boot's scope and takes the slot.  A warm
spare (``spare``) holds one the same way (``hold_for_spare``) and is dropped
for such a request.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from vmmesh.api.host import Capacity
from vmmesh.errors import CapacityError, UsageError
from vmmesh.host.capacity import CapacityPolicy, HostProbe, Usage, compute_capacity, disk_used_mb
from vmmesh.vm.rows import VmRows

log = logging.getLogger("vmmesh.vms")


class NoFreeSlot(CapacityError):
    """A request found no free slot here at all (travels as ``CapacityError``; the host's
    own share handler answers "0 granted" instead)."""


class Admission:
    """This host's free slots and who holds them."""

    def __init__(
        self,
        rows: VmRows,
        data_dir: Path,
        policy: CapacityPolicy,
        probe: Callable[[], HostProbe],
    ) -> None:
        self.rows = rows
        self.data_dir = data_dir
        self.policy = policy
        self.probe = probe
        self.reserved = 0
        self.warm_held = False  # a warm boot holds one reserved slot
        self.warm_scope: trio.CancelScope | None = None  # ... and runs in this scope
        self.spare_held = False  # a warm spare (``vm.spare``) holds one reserved slot
        self.on_yield_spare: Callable[[], None] = lambda: None  # ... and is told to go

    def capacity(self) -> Capacity:
        """Free slots now, counting running VMs and outstanding reservations."""
        vcpus, memory, running = self.rows.active()
        usage = Usage(
            running_vms=running,
            vcpus=vcpus,
            memory_mb=memory,
            disk_used_mb=self.disk_used_mb(running),
            reserved_vms=self.reserved,
        )
        return compute_capacity(self.probe(), usage, self.policy)

    def disk_used_mb(self, active: int) -> int:
        """Templates, packs and VM disks (each at least its allowance) against the quota."""
        allowance = self.policy.vm_disk_allowance_mb
        # A VM whose row exists but whose overlay is not written yet still
        # holds a disk allowance (the reservation was handed over to the row).
        overlays = sum(1 for _ in self.rows.vm_dir.glob("*.qcow2"))
        return disk_used_mb(self.data_dir, allowance) + max(0, active - overlays) * allowance

    def committed_mb(self) -> int:
        """Disk used and promised: every active VM's and reservation's allowance."""
        active = self.rows.active()[2]
        return self.disk_used_mb(active) + self.reserved * self.policy.vm_disk_allowance_mb

    def offered(self) -> Capacity:
        """What the mesh is told is free: a slot held by a warm boot counts as free, since
        the warm boot gives it up to the first request that needs it."""
        cap = self.capacity()
        yielding = int(self.warm_held) + int(self.spare_held)
        if not yielding:
            return cap
        return dataclasses.replace(
            cap,
            free_vm_slots=cap.free_vm_slots + yielding,
            free_disk_slots=cap.free_disk_slots + yielding,
        )

    def reserve(self, count: int) -> int:
        """Hold up to ``count`` default-size slots; returns how many were granted.

        No ``await`` between reading capacity and taking it: atomic under trio.
        """
        if count < 0:
            raise UsageError("cannot reserve a negative count")
        granted = min(count, self.capacity().free_slots)
        if granted < count and self.warm_held:
            self._yield_warm()  # a warm boot gives way to a VM someone asked for
            granted = min(count, self.capacity().free_slots)
        if granted < count and self.spare_held:
            self.end_spare()  # and so does a warm spare
            self.on_yield_spare()
            granted = min(count, self.capacity().free_slots)
        self.reserved += granted
        return granted

    def release(self, count: int) -> None:
        """Give back reserved slots that will not become VMs."""
        self.reserved = max(0, self.reserved - count)

    def hold_for_warm(self) -> bool:
        """Take one slot for a warm boot; False when none is free."""
        if self.reserve(1) == 0:
            return False
        self.warm_held = True
        return True

    def hold_for_spare(self) -> bool:
        """Take one slot for a warm spare; False when none is free (never yields one)."""
        if self.spare_held or self.capacity().free_slots < 1:
            return False
        self.reserved += 1
        self.spare_held = True
        return True

    def end_spare(self) -> None:
        """The spare was taken or dropped: its slot back."""
        if self.spare_held:
            self.spare_held = False
            self.release(1)

    def end_warm(self) -> None:
        """The warm boot is over: its slot back, unless it already gave it up."""
        self.warm_scope = None
        if self.warm_held:
            self.warm_held = False
            self.release(1)

    def _yield_warm(self) -> None:
        """Stop the warm boot under way and hand its slot back (no await: atomic)."""
        self.warm_held = False
        self.release(1)
        if self.warm_scope is not None:
            self.warm_scope.cancel()
        log.info("a warm boot gave way to a requested VM (it is made again later)")
