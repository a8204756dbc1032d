"""A VM's states, the events that move it, and the one table of legal transitions.

Pure: no database, no clock, no QEMU.  A state is stored as its value in the
``vms`` table's ``state`` column and travels as that string in ``api`` records,
so the values are today's words and the schema and the wire do not change.
A transition either gives the row its next state or says the row is gone
(``GONE``: overlay, run directory and row deleted).  ``transition`` is the only
place that decides; ``rows.VmRows.apply`` is the only place that writes a
state, and it asks ``transition`` first.  An event a state does not accept is a
bug in the caller (``errors.InternalError``), never the user's or a peer's
fault: code that meets a race it expects (a stop ordered while the VM starts)
checks the state before it applies the event.

Migration (``vmmesh.migrate``) is rows of this table, not a path beside it:
on the source a running VM becomes ``migrating`` (``MIGRATE_BEGUN``) and
either goes back to ``running`` (``MIGRATE_FAILED``: anything that failed
before the target ran it) or is gone (``MIGRATED_AWAY``: the target runs
it).  On the target the VM's row is born ``incoming`` (``VmRows.insert``)
and becomes ``running`` (``STARTED``) once its QEMU runs the guest, or is
gone (``FAILED``).  Keep-alive (``vmmesh.keepalive``) adds two paths: a
``lost`` keep-alive VM is started again from its own disk (``RESTART_BEGUN``
to ``restarting``, then ``STARTED`` or ``RESTART_FAILED`` back to ``lost``),
and a lost VM whose next generation runs on another host is deleted here
(``SUPERSEDED``), so an old copy never runs again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from vmmesh.errors import InternalError


class VmState(enum.StrEnum):
    """Where a VM's row stands (the ``state`` column's words)."""

    CREATING = "creating"  # row committed, clone and boot under way; holds its slot
    RUNNING = "running"  # QEMU runs and is watched
    STOPPING = "stopping"  # a stop was ordered; the row goes once QEMU and files are gone
    LOST = "lost"  # QEMU ended without an order; overlay kept, no slot held
    STOPPED = "stopped"  # in the schema's list, written by no path today
    MIGRATING = "migrating"  # running here while it is copied to another host
    INCOMING = "incoming"  # arriving from another host; QEMU waits for the stream
    RESTARTING = "restarting"  # keep-alive: started again from its own disk


class VmEvent(enum.StrEnum):
    """What happens to a VM."""

    STARTED = "started"  # resumed or booted, became itself, custom zip unpacked
    FAILED = "failed"  # creation failed half-way, or was found half made at start-up
    STOP_ORDERED = "stop-ordered"  # ``vmmesh shutdown`` or a job's end
    STOPPED = "stopped"  # the ordered stop is done: QEMU killed, overlay and run dir gone
    EXITED = "exited"  # QEMU exited without an order while the VM ran
    FOUND_GONE = "found-gone"  # at start-up: the QEMU of a running VM, or its disk, is gone
    DISK_MISSING = "disk-missing"  # at start-up: a VM that does not run has no disk left
    MIGRATE_BEGUN = "migrate-begun"  # the target is ready; copying starts
    MIGRATE_FAILED = "migrate-failed"  # it failed before the target ran the VM: it runs on here
    MIGRATED_AWAY = "migrated-away"  # the target runs the VM: this copy goes
    RESTART_BEGUN = "restart-begun"  # keep-alive: a lost VM is started again here
    RESTART_FAILED = "restart-failed"  # it did not come up: lost again
    SUPERSEDED = "superseded"  # a newer generation runs on another host: this copy goes


#: A transition's outcome when the VM's row, overlay and run directory are deleted.
GONE: Final = None

Outcome = VmState | None

#: Every legal (state, event); anything else is a bug.
TRANSITIONS: Final[Mapping[tuple[VmState, VmEvent], Outcome]] = {
    (VmState.CREATING, VmEvent.STARTED): VmState.RUNNING,
    (VmState.CREATING, VmEvent.FAILED): GONE,
    (VmState.CREATING, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.RUNNING, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.RUNNING, VmEvent.EXITED): VmState.LOST,
    (VmState.RUNNING, VmEvent.FOUND_GONE): VmState.LOST,
    (VmState.STOPPING, VmEvent.STOP_ORDERED): VmState.STOPPING,  # ordered twice
    (VmState.STOPPING, VmEvent.STOPPED): GONE,
    (VmState.STOPPING, VmEvent.FAILED): GONE,  # a stop ordered while it started
    (VmState.LOST, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.LOST, VmEvent.DISK_MISSING): GONE,
    (VmState.STOPPED, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.STOPPED, VmEvent.DISK_MISSING): GONE,
    (VmState.RUNNING, VmEvent.MIGRATE_BEGUN): VmState.MIGRATING,
    (VmState.MIGRATING, VmEvent.MIGRATE_FAILED): VmState.RUNNING,
    (VmState.MIGRATING, VmEvent.MIGRATED_AWAY): GONE,
    (VmState.MIGRATING, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.MIGRATING, VmEvent.EXITED): VmState.LOST,
    (VmState.MIGRATING, VmEvent.FOUND_GONE): VmState.LOST,
    (VmState.INCOMING, VmEvent.STARTED): VmState.RUNNING,
    (VmState.INCOMING, VmEvent.FAILED): GONE,
    (VmState.INCOMING, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.LOST, VmEvent.RESTART_BEGUN): VmState.RESTARTING,
    (VmState.RESTARTING, VmEvent.STARTED): VmState.RUNNING,
    (VmState.RESTARTING, VmEvent.RESTART_FAILED): VmState.LOST,
    (VmState.RESTARTING, VmEvent.STOP_ORDERED): VmState.STOPPING,
    (VmState.LOST, VmEvent.SUPERSEDED): GONE,
}

#: States whose VMs hold cores, memory and a disk allowance.
ACTIVE: Final = (
    VmState.CREATING,
    VmState.RUNNING,
    VmState.STOPPING,
    VmState.MIGRATING,
    VmState.INCOMING,
    VmState.RESTARTING,
)


def transition(state: VmState, event: VmEvent) -> Outcome:
    """The state ``event`` moves a VM in ``state`` to (``GONE``: deleted).

    Raises ``InternalError`` for a pair the table does not hold.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InternalError(f"a VM that is {state} cannot take the event {event}") from None


def ends(event: VmEvent) -> bool:
    """True if ``event`` deletes the VM from every state that takes it."""
    return all(out is GONE for (_, e), out in TRANSITIONS.items() if e == event)
