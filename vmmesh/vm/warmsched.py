"""Warm scheduling: which warm states to make, when, in whose slot, and which to drop.

Once a template (or the base image) is here, ``schedule`` makes its warm state
in the background (or fetches a peer's, when one fits and comes faster than a
boot: ``fetch_first``, see ``transfer.warmpick``): one warm boot at a time, in a slot of its own
(``Admission.hold_for_warm``) that it gives up at once to any request; a boot
that found no slot or gave way is tried again by ``retry`` (every
``WARM_RETRY`` seconds, from ``VmManager.run``) while its template stays.
Warm states are a cache: ``trim`` drops the least recently used ones when the
storage quota needs their room, the base image's last.  A warm boot that fails
is logged and its VMs boot cold; no caller is told.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from vmmesh.errors import VmmeshError
from vmmesh.host.capacity import CapacityPolicy
from vmmesh.host.templates import TemplateManager, TemplateRecord
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.vm.admission import Admission
from vmmesh.vm.rows import VmRows

log = logging.getLogger("vmmesh.vms")

WARM_RETRY = 10.0  # a warm boot that found no free slot is tried again this often


class WarmScheduler:
    """The warm states of this host's templates: made in the background, trimmed to fit."""

    def __init__(
        self,
        admission: Admission,
        rows: VmRows,
        templates: TemplateManager,
        policy: CapacityPolicy,
        warm: WarmStore | None,
    ) -> None:
        self.admission = admission
        self.rows = rows
        self.templates = templates
        self.policy = policy
        self.warm = warm
        self.enabled = warm is not None
        self.nursery: trio.Nursery | None = None  # set by ``VmManager.run``
        self._limiter = trio.CapacityLimiter(1)
        # no free slot when it was asked (None: the base image's state)
        self._later: dict[str, TemplateRecord | None] = {}
        self._noted: set[str] = set()  # ... and that was logged once
        # drops the warm spare (``vm.spare``) for room; the MB that gave back
        self.spare_room: Callable[[], int] = lambda: 0
        # (the transfer service) fetch a peer's state of (key, disk) instead of a warm
        # boot; True if it did
        self.fetch_first: Callable[[str, Path], Awaitable[bool]] | None = None
        if warm is not None:
            templates.on_remove.append(lambda tid: warm.discard(tid, "its template went"))
        templates.warm_source = self.for_builds

    def store(self) -> WarmStore | None:
        """The warm states VMs resume from; None when off."""
        return self.warm if self.enabled else None

    def held(self) -> set[str]:
        """Templates whose VMs would resume from a warm state here (none when off)."""
        warm = self.store()
        return set() if warm is None else warm.held()

    def key(self, template_id: str | None) -> str:
        """Whose warm state a VM of ``template_id`` resumes: the template's, or the base
        image's for a VM with no packages (ids are hex hashes: they never collide)."""
        return template_id or self.templates.base.image_id

    def for_builds(self) -> tuple[WarmStore, int, int] | None:
        """The warm states builds resume and leave, and the VMs' shape; None when off."""
        warm = self.store()
        if warm is None:
            return None
        return warm, self.policy.vm_vcpus, self.policy.vm_memory_mb

    def disk_of(self, template: TemplateRecord | None) -> Path:
        return self.templates.base.disk if template is None else self.templates.disk_path(template)

    def retry(self) -> None:
        """Warm boots put off for want of a slot, tried again (while their template stays)."""
        later, self._later = self._later, {}
        held = {t.template_id for t in self.templates.records()} | {self.templates.base.image_id}
        for tid, rec in later.items():
            if tid in held:
                self.schedule(rec)

    def trim(self, need_mb: int = 0, keep: str | None = None) -> bool:
        """Drop warm states until they, with everything else and ``need_mb`` more, fit in
        the storage quota; True if they do.

        Warm states are a cache: they count against the quota but never cost a VM
        its slot (capacity leaves them out, since they can always go).  Least
        recently used templates' states go first, ``keep``'s last; a state a VM's
        disk is made from (any VM of its template on this host) never goes.
        """
        if self.warm is None:
            return True
        sizes = self.warm.sizes()
        over = self.admission.committed_mb() + need_mb + -(-sum(sizes.values()) // (1 << 20))
        over -= self.policy.storage_quota_mb
        if over > 0:
            over -= self.spare_room()  # the warm spare goes before any warm state
        if over <= 0:
            return True
        in_use = self._in_use()
        used = {t.template_id: t.last_used for t in self.templates.records()}
        # the base image's state is used by every build and package-less VM: it goes last
        base = self.templates.base.image_id
        used[base] = float("inf")
        order = sorted(
            (tid for tid in sizes if tid in used and tid not in in_use),
            key=lambda tid: (tid == base, tid == keep, used[tid]),
        )
        for tid in order:
            if over <= 0:
                break
            self.warm.discard(tid, "the storage quota needs its room")
            over -= sizes[tid] >> 20
        if order:
            self.templates.on_change()
        return over <= 0

    def refit(self) -> None:
        """Warm states made for another VM size than this host's now (its config
        changed) are dropped and made again at the new size, the base image's first:
        without that, every VM of the default size would boot cold from then on.  One
        that a VM's disk sits on stays (it goes when it is free, at the next refit)."""
        warm = self.store()
        if warm is None:
            return
        base = self.templates.base.image_id
        in_use = self._in_use()
        records = {r.template_id: r for r in self.templates.records()}
        for key in sorted(warm.held(), key=lambda k: k != base):
            state = warm.get(key)
            why = "" if state is None else self._other_size(state.shape)
            if not why or key in in_use:
                continue
            warm.discard(key, why)
            if key == base:
                self.schedule(None)
            elif key in records:
                self.schedule(records[key])

    def _in_use(self) -> set[str]:
        """Warm states a VM's disk sits on (any VM of their template here)."""
        return {self.key(v.template_id) for v in self.rows.list()}

    def _other_size(self, shape: Shape) -> str:
        have = dict(shape.fields)
        want = {"vcpus": str(self.policy.vm_vcpus), "memory_mb": str(self.policy.vm_memory_mb)}
        if all(have.get(k) == v for k, v in want.items()):
            return ""
        return (
            f"made for {have.get('vcpus', '?')} vCPU / {have.get('memory_mb', '?')} MB guests, "
            f"this host's are now {want['vcpus']} vCPU / {want['memory_mb']} MB: made again"
        )

    def schedule(self, rec: TemplateRecord | None) -> None:
        """Make the warm state of ``rec`` (None: of the base image) in the background, if
        it has none yet.  The base image's state serves VMs with no packages, and
        builds: they resume it instead of booting (``TemplateManager``)."""
        warm = self.store()
        if warm is None or self.nursery is None:
            return
        key = self.key(rec.template_id if rec else None)
        if warm.get(key) is None and not warm.making(key):
            self.nursery.start_soon(self._make, rec)

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            log.info(message, key[:12])
            self._noted.add(key)

    async def _make(self, rec: TemplateRecord | None) -> None:
        """One warm boot at a time, in a slot of its own that it gives up to any request."""
        assert self.warm is not None
        key = self.key(rec.template_id if rec else None)
        async with self._limiter:
            if self.warm.get(key) is not None:  # a warm build left one meanwhile
                return
            if self.fetch_first is not None:
                try:
                    fetched = await self.fetch_first(key, self.disk_of(rec))
                except (VmmeshError, OSError) as exc:
                    log.warning("fetching the warm state of %s: %s", key[:12], exc)
                    fetched = False
                if fetched:
                    self.templates.on_change()
                    return
            if not self.trim(self._estimate_mb(), keep=key):
                self._note(key, "no room in the storage quota for a warm state of %s: its VMs boot")
                return
            if not self.admission.hold_for_warm():
                self._note(key, "no free slot for the warm boot of %s: later")
                self._later[key] = rec
                return
            try:
                with trio.CancelScope() as scope:
                    self.admission.warm_scope = scope
                    await self.warm.make(
                        key, self.disk_of(rec), self.policy.vm_vcpus, self.policy.vm_memory_mb
                    )
                if scope.cancelled_caught:  # gave way to a request: again later
                    self._later[key] = rec
                self.trim()  # the estimate was short: the quota still holds
            except (VmmeshError, OSError) as exc:
                log.warning("no warm state for %s: %s", key[:12], exc)
            finally:
                self.admission.end_warm()
            self.templates.on_change()

    def _estimate_mb(self) -> int:
        """Room a new warm state will take: as much as the largest one here, or a quarter
        of the guest's memory (a settled Debian guest saves 140-175 MB of 512)."""
        assert self.warm is not None
        largest = max(self.warm.sizes().values(), default=0) >> 20
        return max(largest, self.policy.vm_memory_mb // 4)
