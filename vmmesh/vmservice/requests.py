"""``vmmesh request`` on any host: the trio glue around ``placement.coordinator``.

The coordinator decides; this module calls the hosts it names (their
``vm.share``, in parallel, this host included), forwards their progress to
the CLI and feeds their answers back, wave after wave.  A dry run is the
same plan over the same view, with nothing asked.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from vmmesh.api.common import Progress
from vmmesh.api.names import JOB_PREFIX, next_index
from vmmesh.api.vm import REQUEST, SHARE, Lineage, RequestReport, RequestVms, ShareRequest
from vmmesh.errors import PackageInstallError, UsageError, VmmeshError
from vmmesh.extension import NodeContext
from vmmesh.net.rpc import Context, Handlers, LocalContext
from vmmesh.placement.coordinator import Ask, Coordinator, dry_run, placement_seed
from vmmesh.placement.planner import HostIndex, PlacementRequest

if TYPE_CHECKING:
    from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.vms")


class RequestCoordinator:
    """Serves ``vm.request`` on the control socket."""

    def __init__(self, service: VmService, node: NodeContext) -> None:
        self.svc = service
        self.node = node
        self._index: HostIndex | None = None
        self._index_key: object = None

    def register(self, control: Handlers) -> None:
        control.add(REQUEST, self.request)

    def index(self) -> HostIndex:
        """The planner's digest of the current view, rebuilt only when the view changed."""
        hosts = self.node.hosts()
        key = tuple((h.node_id, h.status, h.capacity, h.templates, h.draining) for h in hosts)
        if key != self._index_key or self._index is None:
            self._index = HostIndex(hosts)
            self._index_key = key
        return self._index

    async def request(self, ctx: Context, req: RequestVms) -> RequestReport:
        if req.name.startswith(JOB_PREFIX) and not isinstance(ctx, LocalContext):
            raise UsageError(
                f"request names starting with {JOB_PREFIX!r} are for `vmmesh run` jobs "
                "(their VMs go when the job ends): choose another name"
            )
        preq = PlacementRequest(
            placement_seed(req.name, req.count, req.packages), req.name, req.count, req.packages
        )
        if req.dry_run:
            return dry_run(preq, self.index())
        existing = (v for h in self.node.hosts() for v in h.vms)
        coord = Coordinator(preq, first_index=next_index(req.name, existing))
        run = _Run(self, ctx, req, coord, request_id=uuid.uuid4().hex, started=time.monotonic())
        asks = coord.start(self.index())
        while asks:
            async with trio.open_nursery() as nursery:
                for ask in asks:
                    nursery.start_soon(run.ask, ask)
            asks = coord.next_wave(self.index())
        return replace(
            coord.report(),
            request_id=run.request_id,
            seconds=round(time.monotonic() - run.started, 2),
        )


@dataclass
class _Run:
    """One request under way: asks hosts and feeds the coordinator."""

    owner: RequestCoordinator
    ctx: Context
    req: RequestVms
    coord: Coordinator
    request_id: str
    started: float

    async def forward(self, item: Progress) -> None:
        with contextlib.suppress(VmmeshError):  # the CLI went away; the request goes on
            await self.ctx.send_item(item)

    async def ask(self, ask: Ask) -> None:
        req = self.req
        share = ShareRequest(
            request_id=self.request_id,
            name=req.name,
            count=ask.count,
            packages=req.packages,
            custom_zip=req.custom_zip,
            first_index=ask.first_index,
            vcpus=req.vcpus,
            memory_mb=req.memory_mb,
            fetch=req.fetch,
            lineage=Lineage(keep_alive=req.keep_alive, origin="requested"),
        )
        await self.forward(Progress(task=ask.host, phase=f"asking for {ask.count} VM(s)"))
        try:
            answer = await self.owner.node.pool.stream(ask.node_id, SHARE, share, self.forward)
        except PackageInstallError as exc:
            self.coord.cannot_install(ask, str(exc))
            return
        except VmmeshError as exc:
            log.warning(
                "request %s: host %s failed its share of %d (%s: %s); re-placing",
                req.name,
                ask.host,
                ask.count,
                type(exc).__name__,
                exc,
            )
            self.coord.failed(ask, str(exc))
            await self.forward(Progress(task=ask.host, phase="failed", fraction=1.0))
            return
        log.info(
            "request %s: host %s made %d of %d VM(s)",
            req.name,
            ask.host,
            len(answer.vms),
            ask.count,
        )
        end_to_end = round(time.monotonic() - self.started, 2)
        vms = [replace(v, seconds_end_to_end=end_to_end) for v in answer.vms]
        self.coord.made(ask, answer.granted, vms, answer.errors)
