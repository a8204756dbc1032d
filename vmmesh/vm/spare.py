"""Warm spares: the next VM of a template, resumed before anyone asks for it.

A warm VM costs its request the clone (0.02 s), QEMU loading the saved state
(0.3-0.9 s under TCG) and the guest becoming itself just after a resume, when
TCG translates its code again (0.3-0.5 s).  A spare does all of that before
the request: after a warm request of a template, once this host has been
idle for ``SPARE_DELAY``, one more VM of it is cloned, resumed and made a
machine of its own (``persona.become_itself``: machine id, randomness, clock,
lease) under a placeholder name, and left running: an idle guest costs
0.3-1.5 % of a core under TCG, and its clock stays right, which a paused one's
would not.  The next VM of that template and shape takes it (``take``): its
ssh forward is added, it takes the VM's host name (``persona.set_hostname``,
shell builtins only): about 0.1 s.

* At most one spare per host, of the template of the latest warm request;
  one of another template is dropped for it.  That template and shape are
  kept (store meta ``warm_spare``): a node that starts, whose spare went for a
  request's slot, or whose spares were turned on again makes it once a slot
  is free (``check``, every 10 s).  One that failed to resume is not tried
  again until the next warm request of its template.
* It holds one slot (``Admission.hold_for_spare``) which it gives up to any
  request that needs it (the spare is killed); the mesh counts that slot as
  free, as it does the warm boot's.  The storage quota drops it before any
  warm state.  A request that starts here stops a spare still being made, so
  it never competes with one for the CPU.
* It is made only from a whole warm state and taken only while that state is
  still the same file (``_stamp``); otherwise it is dropped and the VM resumes
  as before.  A spare that does not answer when taken is killed and the VM
  resumes the warm state: a request never fails because of a spare.
* It is no VM: no row, and its disk is ``spares/<id>.qcow2``, outside ``vms/``
  (the same depth: the relative backing name resolves alike), its QEMU
  already named and run as the next VM (``run/<id>``).  Taking it links the
  disk into ``vms/`` as ``<id>.qcow2`` and writes the row.  The first name
  stays while the VM lives (QEMU reopens its disk by the name it opened it
  with, when a migration hands the disk over: a renamed disk failed there)
  and goes with the VM (``VmRows.delete_files``).  A node killed with a spare
  leaves a disk in ``spares/`` with no row and a QEMU with no row: the next
  start removes both (``reconcile`` here and in ``vm.reconcile``); a node
  that stops kills it.
* Off with warm starts, or with ``warm_spare = false``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from vmmesh.errors import VmmeshError
from vmmesh.host import persona
from vmmesh.host.build import BaseImage
from vmmesh.host.warm import WarmState
from vmmesh.hypervisor.base import Guest, Hypervisor
from vmmesh.vm.admission import Admission
from vmmesh.vm.rows import SPARES_DIR, VmRows

log = logging.getLogger("vmmesh.vms")

SPARE_DELAY = 2.0  # seconds of no request on this host before a spare is made
SPARE_TIMEOUT = 60.0  # a resume that takes longer is abandoned (as a warm VM's is)
PLACEHOLDER = "spare"  # the host name a spare has until it is taken
WANTED_KEY = "warm_spare"  # store meta: [warm state key, vCPUs, MB] of the latest warm request


def _stamp(state: WarmState) -> tuple[int, int]:
    """Which file the warm state's disk is: a state made again is another file, and a
    spare's overlay must sit on the one it was cloned from."""
    st = os.stat(state.disk)
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True)
class Spare:
    """A resumed clone of a warm state, waiting for the next VM of its template."""

    vm_id: str
    key: str  # the warm state's key (template id, or the base image's id)
    guest: Guest
    disk: Path
    vcpus: int
    memory_mb: int
    stamp: tuple[int, int]
    slot: object  # the token of the slot it holds (``Spares._slot``)


class Spares:
    """This host's warm spare: made after a warm request, taken by the next one."""

    def __init__(
        self,
        *,
        admission: Admission,
        rows: VmRows,
        hypervisor: Hypervisor,
        base: BaseImage,
        warm_state: Callable[[str], WarmState | None],
    ) -> None:
        self.admission = admission
        self.rows = rows
        self.hv = hypervisor
        self.base = base
        self.warm_state = warm_state  # the warm state of a key, None when there is none
        self.enabled = True
        # Why no spare may be here now ("" when one may): set by whoever knows, as
        # migration does for a draining host, which takes no new VM to be a spare for.
        self.held_back: Callable[[], str] = lambda: ""
        self.nursery: trio.Nursery | None = None  # set by ``VmManager.run``
        self.spare: Spare | None = None
        self.dir = rows.vm_dir.parent / SPARES_DIR
        self._making: trio.CancelScope | None = None
        self._slot: object | None = None  # who holds the spare's slot: a making or a spare
        self._failed: str | None = None  # a key whose spare did not resume: not tried again
        admission.on_yield_spare = self._yielded
        # The latest warm request's template and shape, kept across node restarts: a
        # node that starts, or whose spare went for a request's slot, makes it again.
        raw = rows.store.get_meta(WANTED_KEY)
        self.wanted: tuple[str, int, int] | None = None
        if isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str):
            with contextlib.suppress(TypeError, ValueError):
                self.wanted = (raw[0], int(raw[1]), int(raw[2]))

    def want(self, key: str, vcpus: int, memory_mb: int) -> None:
        """A warm VM of ``key`` was just made here: have the next one ready."""
        if self.wanted != (key, vcpus, memory_mb):
            self.wanted = (key, vcpus, memory_mb)
            self.rows.store.set_meta(WANTED_KEY, [key, vcpus, memory_mb])
        self._failed = None
        if self.spare is not None and self.spare.key == key:
            return
        self._start(key, vcpus, memory_mb)

    def _start(self, key: str, vcpus: int, memory_mb: int) -> None:
        if not self.enabled or self.nursery is None or self.held_back():
            return
        self.hold_off()
        self.nursery.start_soon(self._make, key, vcpus, memory_mb)

    def hold_off(self) -> None:
        """A request starts here: stop making a spare (a spare already made stays)."""
        if self._making is not None:
            self._making.cancel()
            self._making = None

    def take(self, key: str, vcpus: int, memory_mb: int) -> Spare | None:
        """The spare, if it is of ``key``'s current warm state and this shape; its slot
        is released (the VM's row takes over from the request's own reservation)."""
        spare = self.spare
        if spare is None or spare.key != key:
            return None
        if not self._on_its_state(spare):
            self.drop("its warm state changed")
            return None
        if (spare.vcpus, spare.memory_mb) != (vcpus, memory_mb):
            return None  # another shape: the spare stays for the template's usual VMs
        self.spare = None
        self._release(spare.slot)
        disk = self.rows.vm_dir / f"{spare.vm_id}.qcow2"
        try:
            os.link(spare.disk, disk)  # a second name: QEMU's stays valid
        except OSError as exc:
            log.warning("warm spare %s: its disk cannot be linked: %s", spare.vm_id, exc)
            self._discard_soon(spare)
            return None
        return replace(spare, disk=disk)

    def drop(self, why: str) -> None:
        """Kill the spare (in the background) and give its slot back."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        log.info("warm spare of %s dropped: %s", spare.key[:12], why)
        self._release(spare.slot)
        self._discard_soon(spare)

    def _discard_soon(self, spare: Spare) -> None:
        # its overlay goes now (QEMU keeps its open file until killed, below): the
        # storage it counted against is free for the request that needed the slot
        spare.disk.unlink(missing_ok=True)
        if self.nursery is not None:
            self.nursery.start_soon(self.discard, spare)

    def forget(self, key: str, why: str) -> None:
        """``key``'s template or warm state goes: so does a spare of it."""
        if self.spare is not None and self.spare.key == key:
            self.drop(why)
        if self.wanted is not None and self.wanted[0] == key:
            self.wanted = None
            self.rows.store.set_meta(WANTED_KEY, None)

    def yield_room(self) -> int:
        """The storage quota needs room: the spare goes first (a cache of a cache);
        the MB its reservation held."""
        if self.spare is None:
            return 0
        self.drop("the storage quota needs its room")
        return self.admission.policy.vm_disk_allowance_mb

    def check(self, warm_enabled: bool) -> None:
        """Periodic: a spare goes when spares or warm starts went off, its state did, or
        it is held back (a draining host); the wanted one is made when there is none
        (a node that started, a slot free again, spares turned on, a drain ended)."""
        if why := self.held_back():
            self.hold_off()
            self.drop(why)
            return
        if self.spare is None:
            wanted = self.wanted
            if (
                wanted is not None
                and warm_enabled
                and self._making is None
                and wanted[0] != self._failed
                and self.warm_state(wanted[0]) is not None
                and self.admission.capacity().free_slots > 0
            ):
                self._start(*wanted)
            return
        if not (self.enabled and warm_enabled):
            self.drop("warm spares are off")
        elif not self._on_its_state(self.spare):
            self.drop("its warm state went")

    def _on_its_state(self, spare: Spare) -> bool:
        """Is the spare's warm state still the file its overlay was cloned from?"""
        state = self.warm_state(spare.key)
        try:
            return state is not None and _stamp(state) == spare.stamp
        except OSError:
            return False

    def reconcile(self) -> list[str]:
        """Node start: no spare outlives its node; the disks of those that did go (their
        QEMU, in a run directory with no row, is killed by ``vm.reconcile``)."""
        gone = []
        vms = {f"{v.vm_id}.qcow2" for v in self.rows.list()}  # their disks' first names
        if self.dir.is_dir():
            for entry in sorted(self.dir.iterdir()):
                if entry.is_file() and entry.name not in vms:
                    entry.unlink()
                    gone.append(f"orphan spare {SPARES_DIR}/{entry.name}")
        return gone

    async def close(self) -> None:
        """The node stops: the spare goes with it (it is no VM of anyone's)."""
        self.hold_off()
        spare, self.spare = self.spare, None
        if spare is not None:
            self._release(spare.slot)
            with trio.CancelScope(shield=True):
                await self.discard(spare)

    async def discard(self, spare: Spare) -> None:
        """Kill a spare's QEMU and remove its disk and run directory."""
        with contextlib.suppress(VmmeshError, OSError):
            await spare.guest.kill()
        self._remove_files(spare.vm_id, spare.disk)

    def _remove_files(self, vm_id: str, disk: Path) -> None:
        disk.unlink(missing_ok=True)
        (self.dir / f"{vm_id}.qcow2").unlink(missing_ok=True)
        shutil.rmtree(self.rows.run_root / vm_id, ignore_errors=True)

    def _release(self, token: object) -> None:
        if token is not None and self._slot is token:
            self._slot = None
            self.admission.end_spare()

    def _yielded(self) -> None:
        """``Admission.reserve`` took the spare's slot for a request (no await: atomic)."""
        self._slot = None  # already given back
        self.hold_off()
        self.drop("a request needed its slot")

    async def _make(self, key: str, vcpus: int, memory_mb: int) -> None:
        token = object()
        with trio.CancelScope() as scope:
            self._making = scope
            try:
                await trio.sleep(SPARE_DELAY)  # a burst of requests passes first
                if not self.enabled:
                    return
                if self.spare is not None:
                    self.drop("the spare is now of another template")
                state = self.warm_state(key)
                if state is None or self._slot is not None or not self.admission.hold_for_spare():
                    return
                self._slot = token
                await self._resume(key, state, vcpus, memory_mb, token)
            finally:
                if self._making is scope:
                    self._making = None
                if self.spare is None or self.spare.slot is not token:
                    self._release(token)
        if scope.cancelled_caught:
            log.debug("warm spare of %s put off: a request came", key[:12])

    async def _resume(
        self, key: str, state: WarmState, vcpus: int, memory_mb: int, token: object
    ) -> Spare | None:
        """Clone and resume ``state`` as a machine of its own; the spare or None."""
        vm_id = secrets.token_hex(8)
        self.dir.mkdir(exist_ok=True)
        disk = self.dir / f"{vm_id}.qcow2"
        spec = self.base.boot_spec(vm_id, disk, self.rows.run_root / vm_id, vcpus, memory_mb)
        guest: Guest | None = None
        spare: Spare | None = None
        try:
            if state.shape.differs(await self.hv.shape(spec)):
                return None  # its VMs boot cold; not a spare's business
            stamp = _stamp(state)
            await self.hv.create_overlay(state.disk, disk)
            with trio.fail_after(SPARE_TIMEOUT):
                guest = await self.hv.start(replace(spec, incoming=state.state))
                await guest.wait_agent(SPARE_TIMEOUT)
                await persona.become_itself(guest, PLACEHOLDER)
            spare = Spare(vm_id, key, guest, disk, vcpus, memory_mb, stamp, token)
            self.spare = spare
            log.info("warm spare of %s ready (%s)", key[:12], vm_id)
            return spare
        except (VmmeshError, OSError, trio.TooSlowError) as exc:
            log.warning("no warm spare of %s: %s", key[:12], exc)
            self._failed = key
            return None
        finally:
            if spare is None:
                with trio.CancelScope(shield=True):
                    if guest is not None:
                        with contextlib.suppress(VmmeshError, OSError):
                            await guest.kill()
                    self._remove_files(vm_id, disk)
