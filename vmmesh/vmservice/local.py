"""The local VM methods: what a host does for the node that coordinates a request.

Served to every peer over the mesh's mutual TLS, and to this host's own
coordinator through the same ``Handlers`` (``PeerPool.call`` to itself does
not touch the network): ``vm.share`` admits up to N VMs against the host's
real free capacity and makes them, streaming progress; the others list,
stop, run commands in, and open ssh to this host's VMs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmmesh.api.codec import Empty
from vmmesh.api.customzip import checked_zip
from vmmesh.api.vm import (
    EXEC_LOCAL,
    LIST_LOCAL,
    SHARE,
    SHUTDOWN_LOCAL,
    SSH_LOCAL,
    TEMPLATES_LOCAL,
    ExecReply,
    ExecRequest,
    Removed,
    ShareReply,
    ShareRequest,
    ShutdownLocalReply,
    ShutdownRequest,
    SshLocalReply,
    SshRequest,
    TemplateList,
    TemplateRow,
    VmList,
    VmRow,
)
from vmmesh.host.sshkeys import check_public_keys
from vmmesh.net.rpc import Context, Handlers
from vmmesh.progress import progress_pump
from vmmesh.vm.admission import NoFreeSlot
from vmmesh.vm.manager import VmManager

if TYPE_CHECKING:
    from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.vms")


class LocalVms:
    """The ``vm.*_local`` and ``vm.share`` handlers of one host."""

    def __init__(self, service: VmService) -> None:
        self.svc = service

    def register(self, peer: Handlers) -> None:
        peer.add(SHARE, self.share)
        peer.add(SHUTDOWN_LOCAL, self.shutdown)
        peer.add(LIST_LOCAL, self.list_vms)
        peer.add(TEMPLATES_LOCAL, self.templates)
        peer.add(EXEC_LOCAL, self.exec)
        peer.add(SSH_LOCAL, self.ssh)

    @property
    def _host(self) -> str:
        return self.svc.node.identity.name

    async def share(self, ctx: Context, req: ShareRequest) -> ShareReply:
        """Admit and make up to ``count`` VMs here; the host's answer goes back as it is."""
        mgr = self.svc.manager()
        custom_zip = None if req.custom_zip is None else checked_zip(req.custom_zip)
        try:
            async with progress_pump(ctx.send_item) as emit:
                reply = await mgr.request_local(
                    req.name,
                    req.count,
                    req.packages,
                    custom_zip,
                    emit,
                    first_index=req.first_index,
                    vcpus=req.vcpus,
                    memory_mb=req.memory_mb,
                    request_id=req.request_id,
                    fetch=req.fetch,
                    lineage=req.lineage,
                )
        except NoFreeSlot:
            log.info("share of request %s: %d VM(s) asked, none admitted", req.name, req.count)
            return ShareReply(host=self._host, granted=0, unplaced=req.count)
        log.info(
            "share of request %s: %d VM(s) asked, %d admitted", req.name, req.count, reply.granted
        )
        self.svc.publish_now()
        return reply

    async def shutdown(self, ctx: Context, req: ShutdownRequest) -> ShutdownLocalReply:
        if self.svc.mgr is None:
            return ShutdownLocalReply()
        removed = await self.svc.mgr.shutdown(req.name)
        self.svc.publish_now()
        return ShutdownLocalReply(
            removed=tuple(Removed(name=v.name, host=self._host, state=v.state) for v in removed)
        )

    async def list_vms(self, ctx: Context, req: Empty) -> VmList:
        mgr = self.svc.mgr
        if mgr is None:
            return VmList()
        packages = {t.template_id: t.packages for t in mgr.list_templates()}
        node_id = self.svc.node.node_id
        rows = tuple(
            VmRow(
                name=v.name,
                vm_id=v.vm_id,
                request=v.request_name,
                host=self._host,
                node_id=node_id,
                state=v.state,
                template=v.template_id or "",
                packages=packages.get(v.template_id or "", frozenset()),
                vcpus=v.vcpus,
                memory_mb=v.memory_mb,
                created=v.created,
                stop_reason=v.stop_reason,
                ssh_port=v.ssh_port,
                start=v.start_kind,
                start_seconds=round(v.start_seconds, 2),
                lineage=v.lineage,
            )
            for v in mgr.list_vms()
        )
        return VmList(vms=rows)

    async def templates(self, ctx: Context, req: Empty) -> TemplateList:
        mgr = self.svc.mgr
        if mgr is None:
            return TemplateList()
        node_id = self.svc.node.node_id
        rows = tuple(
            TemplateRow(
                host=self._host,
                node_id=node_id,
                template_id=t.template_id,
                parent=t.parent_id or "",
                packages=t.packages,
                size=t.size,
                depth=t.depth,
                sha256=t.sha256,
                base_image=t.base_image_id,
                last_used=t.last_used,
                origin=t.origin,
                warm_size=_warm_size(mgr, t.template_id),
            )
            for t in mgr.list_templates()
        )
        return TemplateList(templates=rows)

    async def exec(self, ctx: Context, req: ExecRequest) -> ExecReply:
        result = await self.svc.manager().exec(req.name, list(req.argv))
        return ExecReply(
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            truncated=result.truncated,
        )

    async def ssh(self, ctx: Context, req: SshRequest) -> SshLocalReply:
        keys = check_public_keys(list(req.keys))
        access = await self.svc.manager().ssh_access(req.name, keys)
        return SshLocalReply(
            vm=access.vm, port=access.port, bind=access.bind, host_key=access.host_key
        )


def _warm_size(mgr: VmManager, template_id: str) -> int:
    state = mgr.warm.get(template_id) if mgr.warm is not None else None
    return state.size() if state is not None else 0
