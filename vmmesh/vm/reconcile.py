"""Reconcile at node start: rows, QEMU processes and disks made to agree.

* ``running`` rows: re-adopt the QEMU that still runs (watch it again); if it
  is gone, the VM is ``lost`` (``FOUND_GONE``; ``on_unexpected_stop`` told).
* ``creating`` rows were half made: kill any QEMU, delete disk and row (``FAILED``).
* ``stopping`` rows were ordered down: finish the order (``STOPPED``).
* ``incoming`` rows (a migration to here that was not committed): kill the
  QEMU, delete (``FAILED``); the source still holds the VM.
* ``migrating`` rows (a migration from here the node did not see end): a
  guest still running goes back to ``running`` (``MIGRATE_FAILED``); a paused
  one may run on the target already, so it is left paused and ``migrating``,
  never resumed here: the migration service settles it with the target
  (``migrate.source``: this copy goes if the target runs the VM, resumes if
  the target does not and never will; paused while it cannot be asked).
* A row whose disk is missing cannot run again: ``running`` becomes lost,
  ``lost``/``stopped`` rows are deleted (``DISK_MISSING``).  A disk in ``vms/``
  with no row is deleted (nothing refers to it), and so is a run directory
  with no running VM, after killing any QEMU still in it.
* Templates and warm states: see ``TemplateManager.reconcile`` and
  ``WarmStore.reconcile``.
"""

from __future__ import annotations

from vmmesh.errors import VmmeshError
from vmmesh.host.reconcile import kill_leftovers
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.base import Guest, Hypervisor
from vmmesh.vm.lifecycle import Lifecycle
from vmmesh.vm.rows import VmRows
from vmmesh.vm.state import ACTIVE, VmEvent, VmState

#: The event that ends a row found at start-up in a state that is not ``running``.
_LEFT_OVER = {
    VmState.CREATING: VmEvent.FAILED,
    VmState.STOPPING: VmEvent.STOPPED,
    VmState.INCOMING: VmEvent.FAILED,
    VmState.RESTARTING: VmEvent.RESTART_FAILED,  # lost again: keep-alive decides
}


async def reconcile(
    rows: VmRows,
    lifecycle: Lifecycle,
    hv: Hypervisor,
    templates: TemplateManager,
    warm: WarmStore | None,
) -> list[str]:
    """Make rows, QEMU processes and disks agree; returns what changed."""
    changes = await templates.reconcile()
    if warm is not None:
        ids = {r.template_id for r in templates.records()}
        ids.add(templates.base.image_id)
        changes += await warm.reconcile(ids)
    for rec in rows.list():
        disk_ok = (rows.vm_dir / rec.disk).is_file()
        if rec.state in ACTIVE:
            guest = await hv.adopt(rec.vm_id, rows.run_root / rec.vm_id)
            if rec.state == VmState.RUNNING and guest is not None and disk_ok:
                lifecycle.watch(rec.vm_id, guest)
                changes.append(f"re-adopted {rec.name}")
                continue
            if rec.state == VmState.MIGRATING and guest is not None and disk_ok:
                if await _still_running(guest):
                    rows.apply(rec.vm_id, VmEvent.MIGRATE_FAILED)
                    lifecycle.watch(rec.vm_id, guest)
                    changes.append(f"{rec.name}: its migration did not end; it runs on here")
                else:
                    changes.append(f"{rec.name}: paused by a migration that did not end; left")
                continue
            if rec.state in (VmState.RUNNING, VmState.MIGRATING):
                if guest is not None:
                    await guest.kill()
                lifecycle.mark_lost(rec.vm_id, None, VmEvent.FOUND_GONE)
                changes.append(f"{rec.name} lost while the node was down")
                continue
            if guest is not None:
                await guest.kill()
            rows.apply(rec.vm_id, _LEFT_OVER[rec.state])
            changes.append(f"removed {rec.state} VM {rec.name}")
        elif not disk_ok:
            rows.apply(rec.vm_id, VmEvent.DISK_MISSING)
            changes.append(f"removed {rec.state} VM {rec.name} (disk missing)")
    listed = rows.list()
    known = {v.disk for v in listed} | {rows.layer_path(v.vm_id).name for v in listed}
    for entry in sorted(rows.vm_dir.iterdir()):
        if entry.is_file() and entry.name not in known:
            entry.unlink()
            changes.append(f"orphan file vms/{entry.name}")
    live = {v.vm_id for v in listed if v.state in (VmState.RUNNING, VmState.MIGRATING)}
    strays = [
        d
        for d in rows.run_root.glob("*")
        if d.name not in live and not d.name.startswith(("tpl-", "warm-"))
    ]
    return changes + await kill_leftovers(hv, strays, "QEMU with no VM row:")


async def _still_running(guest: Guest) -> bool:
    """Does the guest run (not paused by a migration)?  False when it cannot be asked."""
    query = getattr(guest, "query_status", None)
    if query is None:
        return True  # a hypervisor without a monitor never pauses for a migration
    try:
        return bool(await query() == "running")
    except VmmeshError:
        return False
