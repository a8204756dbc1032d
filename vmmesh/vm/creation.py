"""Creation: a request's VMs admitted, cloned, resumed or booted, made themselves.

``request_local`` admits up to COUNT VMs (``Admission.reserve``), makes sure a
template holds the packages (``TemplateManager.ensure_template``), then for each
VM, side by side (at most one boot per host core, as boots are CPU-bound):
commits a ``creating`` row (which takes over the slot from the reservation),
writes ``vms/<vm_id>.qcow2`` as an overlay of the template's warm state or of
the template (a linked clone: no copy), resumes it or boots it, waits for the
guest agent, gives it its own identity (``persona``), unpacks the optional
custom zip into ``/opt`` and moves the row to ``running`` (``STARTED``); the
lifecycle watches it from then on.  A VM that fails half-way is killed and its
overlay and row removed (``FAILED``); the request reports it as not made.

The answer is the wire's own ``api.vm.ShareReply`` with one ``api.vm.VmMade``
per VM, made here and passed unchanged to the coordinator and the CLI; the
progress items (``api.common.Progress``, this host's name as their task) are
made here too and streamed as they are.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import trio

from vmmesh.api.common import Emit, Progress
from vmmesh.api.customzip import CheckedZip
from vmmesh.api.names import next_index
from vmmesh.api.vm import FETCH_AUTO, PLAIN, Lineage, ShareReply, TemplateSource, VmMade
from vmmesh.errors import HypervisorError, NotFound, VmmeshError
from vmmesh.host import customzip, persona
from vmmesh.host.build import ProgressSink
from vmmesh.host.capacity import CapacityPolicy, HostProbe
from vmmesh.host.templates import TemplateManager, TemplateRecord
from vmmesh.host.warm import warm_error
from vmmesh.hypervisor.base import BootSpec, Guest, Hypervisor
from vmmesh.nurseries import open_nursery
from vmmesh.vm.admission import Admission, NoFreeSlot
from vmmesh.vm.lifecycle import Lifecycle
from vmmesh.vm.rows import NewVm, VmRows
from vmmesh.vm.spare import Spare, Spares
from vmmesh.vm.state import VmEvent, VmState
from vmmesh.vm.warmsched import WarmScheduler

log = logging.getLogger("vmmesh.vms")

WARM_TIMEOUT = 60.0  # a resumed guest answers in about a second; a stuck one is abandoned


def no_progress(item: Progress) -> None:
    """Default progress sink."""


def _rounded(seconds: Mapping[str, float]) -> dict[str, float]:
    return {k: round(s, 2) for k, s in seconds.items()}


@dataclass(frozen=True)
class _VmPlan:
    """What one VM of a request is to be."""

    display: str
    template: TemplateRecord | None
    custom_zip: CheckedZip | None
    vcpus: int
    memory_mb: int
    request_id: str
    lineage: Lineage = PLAIN


@dataclass
class _Batch:
    """The VMs of one ``request_local`` as they are made."""

    held: int  # reserved slots not yet handed to a VM row
    unplaced: int
    made: dict[int, tuple[str, dict[str, float], str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Creator:
    """Makes the VMs of a request on this host."""

    def __init__(
        self,
        *,
        rows: VmRows,
        admission: Admission,
        warm: WarmScheduler,
        lifecycle: Lifecycle,
        spares: Spares,
        hypervisor: Hypervisor,
        templates: TemplateManager,
        policy: CapacityPolicy,
        probe: Callable[[], HostProbe],
        agent_timeout: float,
        host: str,
        node_id: str,
    ) -> None:
        self.host = host  # this host's name and node id, for its VmMade records
        self.node_id = node_id
        self.rows = rows
        self.admission = admission
        self.warm = warm
        self.lifecycle = lifecycle
        self.spares = spares
        self.hv = hypervisor
        self.templates = templates
        self.policy = policy
        self.probe = probe
        self.agent_timeout = agent_timeout

    async def request_local(
        self,
        name: str,
        count: int,
        packages: Iterable[str] = (),
        custom_zip: CheckedZip | None = None,
        progress: Emit = no_progress,
        *,
        first_index: int | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        request_id: str = "",
        fetch: str = FETCH_AUTO,
        lineage: Lineage = PLAIN,
    ) -> ShareReply:
        """Make up to ``count`` VMs named ``name-<n>`` here.

        Admits them here (the one place a request reserves its slots): VMs
        that do not fit are reported as ``unplaced`` (the node spills them to
        peers), none fitting is ``NoFreeSlot``.  ``name``, ``count`` and the
        other fields were checked where they entered (the CLI, ``from_wire``).
        ``first_index`` numbers the VMs (default: after the highest local one),
        so a node spreading a request over hosts can keep names unique.  The
        custom zip carries the entries its check listed where it entered.
        """
        step = self._steps(progress)
        self.spares.hold_off()  # a spare being made never competes with a request
        held = self.admission.reserve(count)
        if held == 0:
            raise NoFreeSlot(f"no free VM slot on this host for {name}")
        batch = _Batch(held=held, unplaced=count - held)
        try:
            got = await self.templates.ensure_template(packages, step, policy=fetch)
            rec, built, tpl_seconds = got.record, got.built, got.timings
            self.warm.trim(keep=rec.template_id if rec else None)  # the new disks' room
            start = first_index or next_index(name, (v.name for v in self.rows.list()))
            plans = [
                _VmPlan(
                    display=f"{name}-{start + i}",
                    template=rec,
                    custom_zip=custom_zip,
                    vcpus=vcpus or self.policy.vm_vcpus,
                    memory_mb=memory_mb or self.policy.vm_memory_mb,
                    request_id=request_id,
                    lineage=lineage,
                )
                for i in range(held)
            ]
            await self._create_many(plans, batch, step)
        finally:
            self.admission.release(batch.held)
        step("done", 1.0)
        self.warm.schedule(rec)  # after this request's VMs: never in its way
        if any(kind == "warm" for _, _, kind, _ in batch.made.values()):
            self.spares.want(self.warm.key(rec.template_id if rec else None), *self._shape(plans))
        template = rec.template_id if rec else ""
        made: list[VmMade] = []
        for i, (vm_id, seconds, kind, note) in sorted(batch.made.items()):
            first = not made  # carries the template's phases and source; the others reused it
            phases = {**(tpl_seconds if first else {"install": 0.0}), **seconds}
            made.append(
                VmMade(
                    name=plans[i].display,
                    vm_id=vm_id,
                    host=self.host,
                    node_id=self.node_id,
                    template=template,
                    built=built and first,
                    start=kind,
                    start_note=note,
                    seconds=round(sum(phases.values()), 2),
                    phases=_rounded(phases),
                    source=got.source if first else TemplateSource(),
                )
            )
        return ShareReply(
            host=self.host,
            granted=held,
            vms=tuple(made),
            errors=tuple(batch.errors),
            template=template,
            built=built,
            source=got.source,
            unplaced=batch.unplaced,
            template_seconds=_rounded(tpl_seconds),
        )

    @staticmethod
    def _shape(plans: list[_VmPlan]) -> tuple[int, int]:
        return plans[0].vcpus, plans[0].memory_mb

    def _steps(self, emit: Emit) -> ProgressSink:
        """The host layer's ``progress(phase, fraction)`` as this host's ``Progress`` items."""

        def step(phase: str, fraction: float | None) -> None:
            emit(Progress(task=self.host[:128], phase=phase[:200], fraction=fraction))

        return step

    async def _create_many(
        self, plans: list[_VmPlan], batch: _Batch, progress: ProgressSink
    ) -> None:
        """Boot ``plans`` side by side, at most one per host core (boots are CPU-bound)."""
        limiter = trio.CapacityLimiter(max(1, min(len(plans), self.probe().cores)))

        async def one(i: int, plan: _VmPlan) -> None:
            async with limiter:
                progress(f"vm {plan.display}", len(batch.made) / len(plans))
                # The row written first thing in _create_one (before any
                # checkpoint) takes over the slot from the reservation.
                self.admission.release(1)
                batch.held -= 1
                try:
                    batch.made[i] = await self._create_one(plan)
                except VmmeshError as exc:
                    batch.errors.append(f"{plan.display}: {exc}")
                    log.warning("%s: not made: %s", plan.display, exc)
                    batch.unplaced += 1

        async with open_nursery() as nursery:
            for i, plan in enumerate(plans):
                nursery.start_soon(one, i, plan)

    async def _create_one(self, plan: _VmPlan) -> tuple[str, dict[str, float], str, str]:
        """Clone, resume (warm) or boot (cold), become itself, unpack: one VM.

        Returns (vm_id, seconds per phase, "warm" or "cold", why cold if a
        warm state was there but not used).
        """
        template_id = plan.template.template_id if plan.template else None
        spare = None
        if self.warm.store() is not None:
            spare = self.spares.take(self.warm.key(template_id), plan.vcpus, plan.memory_mb)
        vm_id = spare.vm_id if spare is not None else secrets.token_hex(8)
        disk = self.rows.vm_dir / f"{vm_id}.qcow2"
        ssh_port = self.rows.insert(
            NewVm(
                vm_id,
                plan.display,
                template_id,
                disk,
                plan.vcpus,
                plan.memory_mb,
                plan.request_id,
                plan.lineage,
            )
        )
        seconds: dict[str, float] = {}
        guest: Guest | None = None
        done = False
        try:
            spec = self.templates.base.boot_spec(
                vm_id, disk, self.rows.run_root / vm_id, plan.vcpus, plan.memory_mb
            ).with_ssh(ssh_port or None, self.rows.ssh_bind)
            guest, kind, why = None, "cold", ""
            if spare is not None:
                guest, kind, why = await self._wake_spare(spare, plan, spec, seconds)
            if guest is None:
                guest, kind, why = await self._start_warm(plan, spec, seconds)
            if guest is None:
                guest = await self._start_cold(plan, spec, seconds)
            if plan.custom_zip is not None:
                t = time.monotonic()
                await customzip.unpack(guest, plan.custom_zip)
                seconds["custom"] = time.monotonic() - t
            ready = seconds.get("vm_resume", 0.0) + seconds.get("vm_boot", 0.0)
            self._mark_running(vm_id, plan.display, guest, kind, ready)
            done = True
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    if guest is not None:
                        with contextlib.suppress(HypervisorError, OSError):
                            await guest.kill()
                    self.rows.apply(vm_id, VmEvent.FAILED)
        if plan.template is not None:
            self.templates.touch(plan.template.template_id)
        return vm_id, seconds, kind, why

    async def _start_cold(self, plan: _VmPlan, spec: BootSpec, seconds: dict[str, float]) -> Guest:
        t = time.monotonic()
        spec.disk.unlink(missing_ok=True)
        await self.hv.create_overlay(self.warm.disk_of(plan.template), spec.disk)
        seconds["vm_clone"] = time.monotonic() - t
        t = time.monotonic()
        guest = await self.hv.start(spec)
        try:
            await guest.wait_agent(self.agent_timeout)
            seconds["vm_boot"] = time.monotonic() - t
            t = time.monotonic()
            await persona.set_hostname(guest, plan.display)
            seconds["identity"] = time.monotonic() - t
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(HypervisorError, OSError):
                await guest.kill()
            raise
        return guest

    async def _wake_spare(
        self, spare: Spare, plan: _VmPlan, spec: BootSpec, seconds: dict[str, float]
    ) -> tuple[Guest | None, str, str]:
        """The warm spare taken for this VM, running as it; (None, ...) if it did not wake
        (it is killed and its files go: the VM resumes the warm state instead)."""
        try:
            t = time.monotonic()
            with trio.fail_after(WARM_TIMEOUT):
                await spare.guest.become_vm(spec.ssh_bind, spec.ssh_port)
                seconds["vm_resume"] = time.monotonic() - t
                t = time.monotonic()
                await persona.set_hostname(spare.guest, plan.display)
                seconds["identity"] = time.monotonic() - t
            log.info("%s is the warm spare %s", plan.display, spare.vm_id)
            return spare.guest, "warm", "a warm spare, resumed before the request"
        except (VmmeshError, OSError, trio.TooSlowError) as exc:
            log.warning("%s: the warm spare did not wake (%s); resuming the state", plan.display,
                        warm_error(exc))  # fmt: skip
            with trio.CancelScope(shield=True):
                await self.spares.discard(spare)
            seconds.pop("vm_resume", None)
            return None, "cold", ""

    async def _start_warm(
        self, plan: _VmPlan, spec: BootSpec, seconds: dict[str, float]
    ) -> tuple[Guest | None, str, str]:
        """Resume the template's warm state as this VM; (None, "cold", why) when it cannot."""
        tid = self.warm.key(plan.template.template_id if plan.template else None)
        warm = self.warm.store()
        if warm is None:
            return None, "cold", ""
        state = warm.get(tid)
        if state is None:
            return None, "cold", ""
        why = state.shape.differs(await self.hv.shape(spec))
        if why:
            return None, "cold", f"warm state has another shape: {why}"
        guest: Guest | None = None
        try:
            t = time.monotonic()
            await self.hv.create_overlay(state.disk, spec.disk)
            seconds["vm_clone"] = time.monotonic() - t
            t = time.monotonic()
            with trio.fail_after(WARM_TIMEOUT):
                guest = await self.hv.start(replace(spec, incoming=state.state))
                await guest.wait_agent(WARM_TIMEOUT)
                seconds["vm_resume"] = time.monotonic() - t
                t = time.monotonic()
                await persona.become_itself(guest, plan.display)
                seconds["identity"] = time.monotonic() - t
            return guest, "warm", ""
        except (VmmeshError, OSError, trio.TooSlowError) as exc:
            reason = warm_error(exc)
            if guest is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(HypervisorError, OSError):
                    await guest.kill()
            warm.discard(tid, f"it did not resume: {reason}")
            self.templates.on_change()  # the mesh stops counting on it
            return None, "cold", f"warm state did not resume ({reason}): deleted"

    def _mark_running(
        self, vm_id: str, display: str, guest: Guest, kind: str, start_seconds: float
    ) -> None:
        if self.rows.state_of(vm_id) != VmState.CREATING:
            raise NotFound(f"{display} was shut down while it started")
        self.rows.apply(
            vm_id,
            VmEvent.STARTED,
            pid=guest.pid,
            started=self.rows.now(),
            start_kind=kind,
            start_seconds=start_seconds,
        )
        self.lifecycle.watch(vm_id, guest)
