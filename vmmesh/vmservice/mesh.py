"""The mesh VM methods the CLI calls on its node: list, templates, shutdown, exec, ssh.

Each fans out to the hosts that gossip says are not down (or goes to the one
host that runs the VM), through the same typed local methods a peer serves;
this host is called like any other.  What a host that did not answer would
have said is reported as an error line, never silently left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import trio

from vmmesh.api.codec import Empty, Method, WireType
from vmmesh.api.names import request_name_of
from vmmesh.api.vm import (
    EXEC,
    EXEC_LOCAL,
    LIST,
    LIST_LOCAL,
    SHUTDOWN,
    SHUTDOWN_LOCAL,
    SSH,
    SSH_LOCAL,
    TEMPLATES,
    TEMPLATES_LOCAL,
    ExecReply,
    ExecRequest,
    ShutdownReply,
    ShutdownRequest,
    SshReply,
    SshRequest,
    TemplateList,
    VmList,
)
from vmmesh.errors import NotFound, VmmeshError
from vmmesh.extension import NodeContext
from vmmesh.gossip.hoststate import HostView
from vmmesh.host.sshkeys import check_public_keys, connect_address
from vmmesh.net.rpc import Context, Handlers

if TYPE_CHECKING:
    from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.vms")

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)
CALL_TIMEOUT = 120.0


class MeshVms:
    """Handlers of the mesh-wide VM methods on the control socket."""

    def __init__(self, service: VmService, node: NodeContext) -> None:
        self.svc = service
        self.node = node

    def register(self, control: Handlers) -> None:
        control.add(SHUTDOWN, self.shutdown)
        control.add(LIST, self.list_vms)
        control.add(TEMPLATES, self.templates)
        control.add(EXEC, self.exec)
        control.add(SSH, self.ssh)

    async def fan_out(
        self, method: Method[Req, Rep], request: Req, *, down: Callable[[HostView], bool]
    ) -> tuple[list[tuple[HostView, Rep]], list[str]]:
        """Call ``method`` on every host not down; answers by host, and errors.

        ``down(host)`` says whether a down host is worth an error line (it holds
        something the caller asked about).
        """
        answers: list[tuple[HostView, Rep]] = []
        errors: list[str] = []

        async def one(host: HostView) -> None:
            try:
                reply = await self.node.pool.call(host.node_id, method, request, CALL_TIMEOUT)
                answers.append((host, reply))
            except VmmeshError as exc:
                errors.append(f"{host.name}: {exc}")

        async with trio.open_nursery() as nursery:
            for h in self.node.hosts():
                if h.status == "down":
                    if down(h):
                        errors.append(f"{h.name}: host is down")
                    continue
                nursery.start_soon(one, h)
        return answers, sorted(errors)

    async def shutdown(self, ctx: Context, req: ShutdownRequest) -> ShutdownReply:
        """Every VM called NAME (or of request NAME), on every host, whatever its state."""

        def holds(h: HostView) -> bool:
            return any(request_name_of(v) == req.name or v == req.name for v in h.vms)

        answers, errors = await self.fan_out(SHUTDOWN_LOCAL, req, down=holds)
        removed = tuple(r for _, a in answers for r in a.removed)
        if not removed and not errors:
            raise NotFound(f"no VM called {req.name!r} in the mesh")
        return ShutdownReply(name=req.name, removed=removed, errors=tuple(errors))

    async def list_vms(self, ctx: Context, req: Empty) -> VmList:
        answers, errors = await self.fan_out(LIST_LOCAL, req, down=lambda h: bool(h.vms))
        vms = sorted((v for _, a in answers for v in a.vms), key=lambda v: (v.name, v.host))
        return VmList(vms=tuple(vms), errors=tuple(errors))

    async def templates(self, ctx: Context, req: Empty) -> TemplateList:
        answers, errors = await self.fan_out(TEMPLATES_LOCAL, req, down=lambda h: False)
        holders: dict[str, list[str]] = {}
        for h in self.node.hosts():
            if h.status != "down":
                for t in h.templates:
                    holders.setdefault(t.template_id, []).append(h.name)
        rows = sorted(
            (
                replace(t, holders=tuple(sorted(holders.get(t.template_id, []))))
                for _, a in answers
                for t in a.templates
            ),
            key=lambda t: (t.host, len(t.packages)),
        )
        return TemplateList(templates=tuple(rows), errors=tuple(errors))

    def locate(self, name: str) -> tuple[HostView, str]:
        """The host running VM ``name`` and the VM's name there.

        ``name`` is a VM (``NAME-2``) or a request; a request means its first
        VM, by name.
        """
        hosts = [h for h in self.node.hosts() if h.status != "down"]
        for h in hosts:
            if name in h.vms:
                return h, name
        by_request = sorted(
            (v, h.node_id, h) for h in hosts for v in h.vms if request_name_of(v) == name
        )
        if not by_request:
            raise NotFound(f"no running VM called {name!r} in the mesh")
        vm, _, host = by_request[0]
        return host, vm

    async def exec(self, ctx: Context, req: ExecRequest) -> ExecReply:
        host, target = self.locate(req.name)
        local = ExecRequest(name=target, argv=req.argv)
        return await self.node.pool.call(host.node_id, EXEC_LOCAL, local, CALL_TIMEOUT)

    async def ssh(self, ctx: Context, req: SshRequest) -> SshReply:
        """Authorise the caller's keys in the VM; answer where to dial and which host key."""
        keys = check_public_keys(list(req.keys))
        host, target = self.locate(req.name)
        local = SshRequest(name=target, keys=keys)
        reply = await self.node.pool.call(host.node_id, SSH_LOCAL, local, CALL_TIMEOUT)
        address = connect_address(host.node_id == self.node.node_id, reply.bind, host.address)
        return SshReply(
            vm=reply.vm, host=host.name, address=address, port=reply.port, host_key=reply.host_key
        )
