"""The migration extension: ``vmmesh migrate`` from any host, and both hosts' handlers.

The CLI's ``migrate`` reaches the local node; it finds the host whose gossip
lists the VM (the source) and the target (``--to``, or the planner's pick:
an up host that is not draining, runs the same base image, has a free
slot, preferring one that holds the VM's template) and hands the move to
the source (``migrate.run``), streaming its progress back.  The source runs
``source.Source``; the target answers ``prepare``/``listen``/``commit``/
``abort`` through ``target.Target``, and both ends serve ``migrate.pipe``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import replace

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.figures import Figure, counter, gauge
from vmmesh.api.migrate import (
    ABORT,
    COMMIT,
    DRAIN,
    DRAIN_RUN,
    LISTEN,
    MIGRATE,
    PIPE,
    PREPARE,
    RUN,
    UNDRAIN,
    UNDRAIN_RUN,
    CommitReply,
    DrainReport,
    DrainRequest,
    MigrateReport,
    MigrateRequest,
    Mode,
    Moved,
    PipeEnd,
    PipeRequest,
    PrepareReply,
    PrepareRequest,
    SessionRequest,
)
from vmmesh.api.vm import SHARE, ShareRequest
from vmmesh.errors import CapacityError, NotFound, StateError, UsageError, VmmeshError
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.gossip.hoststate import HostView
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.migrate import drain, pipes
from vmmesh.migrate.rule import Decision, decide
from vmmesh.migrate.source import Source, settle_forever
from vmmesh.migrate.target import Incoming, Target
from vmmesh.net.rpc import Context, Handlers
from vmmesh.vm.manager import VmManager
from vmmesh.vm.rows import VmRecord
from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.migrate")

IDLE = 900.0  # seconds a prepared target waits for the source's commit
DONE_KEPT = 256  # committed sessions remembered, to answer a late abort


class MigrateService(NodeExtension):
    def __init__(self, vms: VmService) -> None:
        self.vms = vms
        self._node: NodeContext | None = None
        self._nursery: trio.Nursery | None = None
        self._source: Source | None = None
        self._target: Target | None = None
        self._committed: dict[str, str] = {}
        self.migrated = 0
        self.failed = 0
        self.active: dict[str, Progress] = {}  # VM name -> its migration's last progress
        self.targets: dict[str, str] = {}  # VM name -> the host it moves to (while active)

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node, self._nursery = node, nursery
        control_handlers.add(MIGRATE, self._ctl_migrate)
        peer_handlers.add(RUN, self._run)
        peer_handlers.add(PREPARE, self._prepare)
        peer_handlers.add(LISTEN, self._listen)
        peer_handlers.add(PIPE, self._pipe)
        peer_handlers.add(COMMIT, self._commit)
        peer_handlers.add(ABORT, self._abort)
        control_handlers.add(DRAIN, self._ctl_drain)
        control_handlers.add(UNDRAIN, self._ctl_undrain)
        peer_handlers.add(DRAIN_RUN, self._drain)
        peer_handlers.add(UNDRAIN_RUN, self._undrain)
        self.vms.manager_hooks.append(self._hold_back_spares)
        if self.vms.mgr is not None:  # made before this extension started
            self._hold_back_spares(self.vms.mgr)
        nursery.start_soon(settle_forever, self.source)  # what a restart left
        if node.cfg.drain_on_stop:
            nursery.start_soon(self._drain_on_stop)

    def publish(self, node: NodeContext) -> None:
        node.publish(dataclasses.replace(node.published, draining=drain.is_draining(node.store)))

    def _hold_back_spares(self, mgr: VmManager) -> None:
        """A draining host keeps no warm spare (it takes no new VM), also after a restart."""
        mgr.spares.held_back = self._spares_held_back

    def _spares_held_back(self) -> str:
        node = self._node
        return "the host drains" if node is not None and drain.is_draining(node.store) else ""

    def figures(self) -> list[Figure]:
        done = "Migrations this host ran as the source, by result."
        return [
            counter("migrations", done, self.migrated, result="done"),
            counter("migrations", done, self.failed, result="failed"),
            gauge("migrations_active", "Migrations this host is the source of, under way.",
                  len(self.active)),
        ]  # fmt: skip

    def facts(self) -> Mapping[str, str]:
        facts = {"migrations": f"{self.migrated} done, {self.failed} failed"}
        if self._node is not None and drain.is_draining(self._node.store):
            facts["draining"] = "yes: no new VMs here (`vmmesh undrain` ends it)"
        return facts

    @property
    def node(self) -> NodeContext:
        if self._node is None:
            raise StateError("the node is not running")
        return self._node

    def source(self) -> Source:
        mgr = self.vms.manager()
        if self._source is None or self._source.mgr is not mgr:
            self._source = Source(mgr, self.node.pool, self._name(self.node.node_id))
        self._source.host_name = self._name(self.node.node_id)  # made before gossip named us
        return self._source

    def target(self) -> Target:
        mgr = self.vms.manager()
        if self._target is None or self._target.mgr is not mgr:
            self._target = Target(mgr)
        return self._target

    def _name(self, node_id: str) -> str:
        for h in self.node.hosts():
            if h.node_id == node_id:
                return h.name
        return node_id[:12]

    # --- the CLI's node ----------------------------------------------------------

    async def _ctl_migrate(self, ctx: Context, req: MigrateRequest) -> MigrateReport:
        hosts = self.node.hosts()
        holders = [h for h in hosts if req.vm in h.vms and h.status == "up"]
        if not holders:
            raise NotFound(f"no host of the mesh runs a VM {req.vm} (`vmmesh vms` lists them)")
        source = holders[0]
        return await self.node.pool.stream(source.node_id, RUN, req, ctx.send_item)

    # --- the source --------------------------------------------------------------

    async def _run(self, ctx: Context, req: MigrateRequest) -> MigrateReport:
        mgr = self.vms.manager()
        rec = mgr.get(req.vm)
        target, why = self._pick_target(req, rec.template_id)

        async def emit(item: Progress) -> None:
            await ctx.send_item(item)

        try:
            report = await self._migrate(rec, target, req.mode, emit)
        except BaseException:
            self.failed += 1
            raise
        finally:
            self.vms.publish_now()
        self.migrated += 1
        log.info(
            "migrated %s to %s (%s) in %.2f s, downtime %s ms",
            rec.name, target.name, req.mode, report.seconds, report.downtime_ms,
        )  # fmt: skip
        return _with_why(report, why)

    def _pick_target(
        self, req: MigrateRequest, template_id: str | None, avoid: frozenset[str] = frozenset()
    ) -> tuple[HostView, str]:
        me = self.node.node_id
        hosts = [h for h in self.node.hosts() if h.node_id != me and h.node_id not in avoid]
        if req.to:
            for h in hosts:
                if req.to in (h.name, h.node_id):
                    if h.status != "up":
                        raise StateError(f"{h.name} is {h.status}: it cannot take a VM")
                    if why := self._shape_differs(h):
                        raise StateError(f"{h.name} cannot run this host's guests: {why}")
                    return h, "asked for"  # a draining target refuses in prepare
            if req.to in (self._name(me), me):
                raise UsageError(f"{req.vm} runs on {req.to} already")
            raise NotFound(f"no host {req.to} in the mesh (`vmmesh peers` lists them)")
        image = self.vms.image_id
        fit = [
            h
            for h in hosts
            if h.status == "up"
            and not h.draining
            and h.capacity.free_slots > 0
            and (not h.images or image in h.images)
            and not self._shape_differs(h)
        ]
        if not fit:
            raise CapacityError(f"no other host can take {req.vm}: none is up with a free slot")

        def score(h: HostView) -> tuple[bool, int, str]:
            holds = template_id is None or any(t.template_id == template_id for t in h.templates)
            return (holds, h.capacity.free_slots, h.name)

        best = max(fit, key=score)
        holds = score(best)[0]
        why = f"{'holds the template, ' if holds else ''}{best.capacity.free_slots} free slots"
        return best, why

    def _shape_differs(self, h: HostView) -> str:
        """Why ``h`` cannot resume this host's guests ("" when it can, or has not said)."""
        mine = self.vms.vm_shape
        if not mine or not h.vmshape:
            return ""
        return Shape.of(h.vmshape).differs(Shape.of(mine))

    # --- drain and undrain -------------------------------------------------------

    def _host(self, name: str) -> HostView:
        """A host by name or node id (empty: this one)."""
        me = self.node.node_id
        for h in self.node.hosts():
            if (not name and h.node_id == me) or name in (h.name, h.node_id):
                return h
        raise NotFound(f"no host {name} in the mesh (`vmmesh peers` lists them)")

    async def _ctl_drain(self, ctx: Context, req: DrainRequest) -> DrainReport:
        host = self._host(req.host)
        return await self.node.pool.stream(host.node_id, DRAIN_RUN, req, ctx.send_item)

    async def _ctl_undrain(self, ctx: Context, req: DrainRequest) -> DrainReport:
        host = self._host(req.host)
        return await self.node.pool.stream(host.node_id, UNDRAIN_RUN, req, ctx.send_item)

    async def _drain(self, ctx: Context, req: DrainRequest) -> DrainReport:
        return await self.drain_here(ctx.send_item)

    async def drain_here(self, emit: drain.Emit) -> DrainReport:
        node = self.node
        drain.set_draining(node.store, True)
        self.publish(node)
        mgr = self.vms.manager()
        mgr.spares.check(mgr.warm_sched.enabled)  # held back now: the spare goes

        async def move(rec: VmRecord) -> MigrateReport:
            return await self._move_away(rec.vm_id, emit)

        return await drain.drain(self._name(node.node_id), mgr.list_vms(), move, node.store, emit)

    def _decide(self, rec: VmRecord) -> Decision:
        """Migrate or restart (thesis §5.4), from this host's measured figures."""
        mgr = self.vms.manager()
        disk = mgr.rows.vm_dir / rec.disk
        overlay = disk.stat().st_size if disk.is_file() else 0
        starts = [
            v.start_seconds
            for v in mgr.list_vms()
            if v.template_id == rec.template_id
            and v.start_kind in ("warm", "cold")
            and v.start_seconds > 0
        ]
        fig = drain.figures(self.node.store, rec, overlay, starts, time.time())
        decision = decide(fig)
        log.info("%s: %s (inputs: %s)", rec.name, decision.why, fig)
        return decision

    async def _migrate(
        self, rec: VmRecord, target: HostView, mode: Mode, emit: drain.Emit
    ) -> MigrateReport:
        """``Source.migrate``, shown in ``active`` while it runs (the web page's bars)."""
        note = f"to {target.name}"

        async def track(item: Progress) -> None:
            self.active[rec.name] = replace(item, note=note)
            await emit(item)

        self.active[rec.name] = Progress(task=rec.name, phase="starting", note=note)
        self.targets[rec.name] = target.name
        try:
            return await self.source().migrate(rec, target.node_id, target.name, mode, track)
        finally:
            del self.active[rec.name]
            self.targets.pop(rec.name, None)

    async def _move_away(self, vm_id: str, emit: drain.Emit) -> MigrateReport:
        """Move one VM to the best other host, or make it afresh there when the rule says
        a restart costs less; a target found full is replaced once."""
        avoid: frozenset[str] = frozenset()
        while True:
            rec = self.vms.manager().get(vm_id)
            target, why = self._pick_target(MigrateRequest(vm=rec.name), rec.template_id, avoid)
            decision = self._decide(rec)
            try:
                if decision.migrate:
                    report = await self._migrate(rec, target, Mode.LIVE, emit)
                    drain.record_migration(self.node.store, report)
                else:
                    report = await self._restart_on(rec, target, decision.why)
            except CapacityError:
                if avoid:
                    raise
                avoid = frozenset({target.node_id})
                continue
            finally:
                self.vms.publish_now()
            self.migrated += 1
            return replace(_with_why(report, why), decision=decision.why[:1000])

    async def _restart_on(self, rec: VmRecord, target: HostView, why: str) -> MigrateReport:
        """Make ``rec`` afresh on ``target`` from its template (same name, next generation),
        then delete it here."""
        t0 = time.monotonic()
        mgr = self.vms.manager()
        packages = mgr.templates.get(rec.template_id).packages if rec.template_id else frozenset()
        me = self._name(self.node.node_id)
        index = rec.name.rpartition("-")[2]
        origin = f"restarted on {target.name} instead of moved from {me}: {why}"
        share = ShareRequest(
            request_id=secrets.token_hex(8),
            name=rec.request_name,
            count=1,
            packages=packages,
            first_index=int(index) if index.isdigit() and int(index) > 0 else None,
            vcpus=rec.vcpus,
            memory_mb=rec.memory_mb,
            lineage=replace(
                rec.lineage, generation=rec.lineage.generation + 1, origin=origin[:1000]
            ),
        )

        async def quiet(item: Progress) -> None:
            return None

        reply = await self.node.pool.stream(target.node_id, SHARE, share, quiet)
        if reply.granted < 1:
            raise CapacityError(f"{target.name} did not make {rec.name}: {reply.errors}")
        await mgr.shutdown_vm(rec.vm_id)
        return MigrateReport(
            vm=rec.name,
            source=me,
            target=target.name,
            mode=Mode.OFFLINE,
            seconds=round(time.monotonic() - t0, 3),
            restarted=True,
        )

    async def _undrain(self, ctx: Context, req: DrainRequest) -> DrainReport:
        t0 = time.monotonic()
        node = self.node
        drain.set_draining(node.store, False)
        self.publish(node)
        me = self._name(node.node_id)
        moved: list[Moved] = []
        left: list[str] = []
        errors: list[str] = []
        if req.bring_back:
            where = drain.departed(node.store)
            for name in sorted(where):
                holders = [h for h in node.hosts() if name in h.vms and h.status == "up"]
                if not holders:
                    left.append(f"{name}: no host runs it now")
                    del where[name]
                    continue
                if holders[0].node_id == node.node_id:
                    del where[name]
                    continue
                back = MigrateRequest(vm=name, to=node.node_id)
                try:
                    r = await node.pool.stream(holders[0].node_id, RUN, back, ctx.send_item)
                except VmmeshError as exc:
                    errors.append(f"{name}: {exc}")
                    continue
                moved.append(Moved(vm=r.vm, source=r.source, target=r.target,
                                   seconds=r.seconds, downtime_ms=r.downtime_ms))  # fmt: skip
                del where[name]
            drain.set_departed(node.store, where)
        return DrainReport(
            host=me,
            draining=False,
            moved=tuple(moved),
            left=tuple(left),
            errors=tuple(errors),
            seconds=round(time.monotonic() - t0, 3),
        )

    async def _drain_on_stop(self) -> None:
        """``drain_on_stop``: SIGTERM drains this host, then the node ends."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                log.info("SIGTERM: draining before the node stops")

                async def quiet(item: Progress) -> None:
                    return None

                try:
                    report = await self.drain_here(quiet)
                    log.info("drained: %d moved, %d errors", len(report.moved), len(report.errors))
                except VmmeshError as exc:
                    log.warning("drain before stop failed: %s", exc)
                raise SystemExit(0)

    # --- the target --------------------------------------------------------------

    async def _prepare(self, ctx: Context, req: PrepareRequest) -> PrepareReply:
        if drain.is_draining(self.node.store):
            me = self._name(self.node.node_id)
            raise StateError(f"{me} is draining: it takes no VM (`vmmesh undrain {me}`)")
        target = self.target()
        reply = await target.prepare(ctx.peer_id, req, lambda phase, frac: None)
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, target, target.sessions[req.session])
        return reply

    async def _watch(self, target: Target, inc: Incoming) -> None:
        """A source that stops talking: abort (unless the guest already runs here)."""
        with trio.move_on_after(IDLE):
            await inc.finished.wait()
            return
        if inc.guest is not None:
            try:
                if await inc.guest.query_status() == "running":
                    await target.commit(inc)
                    self._committed[inc.req.session] = inc.req.name
                    log.warning("%s: source silent after the switchover; kept", inc.req.name)
                    return
            except Exception as exc:  # any failure means: abort
                log.warning("%s: %s", inc.req.name, exc)
        await target.abort(inc, "the source went silent")

    def _incoming(self, ctx: Context, session: str) -> Incoming:
        return self.target().get(session, ctx.peer_id)

    async def _listen(self, ctx: Context, req: SessionRequest) -> Empty:
        inc = self._incoming(ctx, req.session)
        try:
            await self.target().listen(inc)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.target().abort(inc, "could not listen")
            raise
        return Empty()

    async def _commit(self, ctx: Context, req: SessionRequest) -> CommitReply:
        inc = self._incoming(ctx, req.session)
        try:
            reply = await self.target().commit(inc)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.target().abort(inc, "could not start the guest")
            raise
        self._committed[req.session] = inc.req.name
        while len(self._committed) > DONE_KEPT:
            del self._committed[next(iter(self._committed))]
        self.vms.publish_now()
        return reply

    async def _abort(self, ctx: Context, req: SessionRequest) -> Empty:
        if req.session in self._committed:
            raise StateError(f"{self._committed[req.session]} runs here already")
        inc = self._incoming(ctx, req.session)
        await self.target().abort(inc, req.reason or "the source gave up")
        return Empty()

    async def _pipe(self, ctx: Context, req: PipeRequest) -> PipeEnd:
        return await pipes.serve(ctx, req, self._pipes_of)

    def _pipes_of(self, session: str) -> pipes.PipeSession | None:
        if self._source is not None and session in self._source.sessions:
            return self._source.sessions[session]
        if self._target is not None and session in self._target.sessions:
            return self._target.sessions[session].pipes
        return None


def _with_why(report: MigrateReport, why: str) -> MigrateReport:
    from dataclasses import replace

    return replace(report, why_target=why[:300])
