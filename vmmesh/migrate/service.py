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

import logging
from collections.abc import Mapping

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.migrate import (
    ABORT,
    COMMIT,
    LISTEN,
    MIGRATE,
    PIPE,
    PREPARE,
    RUN,
    CommitReply,
    MigrateReport,
    MigrateRequest,
    PipeEnd,
    PipeRequest,
    PrepareReply,
    PrepareRequest,
    SessionRequest,
)
from vmmesh.errors import CapacityError, NotFound, StateError, UsageError
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.gossip.hoststate import HostView
from vmmesh.migrate import pipes
from vmmesh.migrate.source import Source
from vmmesh.migrate.target import Incoming, Target
from vmmesh.net.rpc import Context, Handlers
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

    def facts(self) -> Mapping[str, str]:
        return {"migrations": f"{self.migrated} done, {self.failed} failed"}

    @property
    def node(self) -> NodeContext:
        if self._node is None:
            raise StateError("the node is not running")
        return self._node

    def source(self) -> Source:
        mgr = self.vms.manager()
        if self._source is None or self._source.mgr is not mgr:
            self._source = Source(mgr, self.node.pool, self._name(self.node.node_id))
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
            report = await self.source().migrate(rec, target.node_id, target.name, req.mode, emit)
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

    def _pick_target(self, req: MigrateRequest, template_id: str | None) -> tuple[HostView, str]:
        me = self.node.node_id
        hosts = [h for h in self.node.hosts() if h.node_id != me]
        if req.to:
            for h in hosts:
                if req.to in (h.name, h.node_id):
                    if h.status != "up":
                        raise StateError(f"{h.name} is {h.status}: it cannot take a VM")
                    if h.draining:
                        raise StateError(f"{h.name} is draining: it takes no VM")
                    return h, "asked for"
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

    # --- the target --------------------------------------------------------------

    async def _prepare(self, ctx: Context, req: PrepareRequest) -> PrepareReply:
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
