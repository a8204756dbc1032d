"""VMs across the mesh: the node extension that serves and coordinates requests.

Theory of operation
-------------------
Each host serves *local* operations to its peers over the authenticated RPC
links: ``vm.share`` (admit up to N VMs against its real free capacity, build
or reuse a template, boot them, stream progress), ``vm.shutdown_local``,
``vm.list_local``, ``template.list_local`` and ``vm.exec_local``.

Any host coordinates a *mesh* request from its CLI: it plans over its gossip
view (``placement.plan``), asks every chosen host for its share at once,
forwards their progress to the CLI, and re-plans (``placement.replan``) what
a failed or refusing host did not take — gossip may be stale, so admission
happens at the owning host, atomically, and a refused share simply moves on.
The coordinator itself is just another host: its own share is a direct call.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from vmmesh.api.host import Capacity, HostView, check_package, check_vm_name
from vmmesh.errors import (
    ImageError,
    IntegrityError,
    NotFound,
    PackageInstallError,
    RemoteError,
    UsageError,
    VmmeshError,
)
from vmmesh.host.capacity import CapacityPolicy, probe_host
from vmmesh.host.images import ImageStore
from vmmesh.host.sshkeys import check_public_key, check_public_keys, connect_address
from vmmesh.host.store import Store
from vmmesh.host.templates import BaseImage, TemplateManager
from vmmesh.host.vms import RequestReport, VmManager, VmStopped, check_zip, request_name_of
from vmmesh.hypervisor.accel import probe_accel
from vmmesh.hypervisor.base import Hypervisor
from vmmesh.hypervisor.qemu import QemuHypervisor
from vmmesh.net.rpc import CallContext, Handler
from vmmesh.nurseries import open_nursery
from vmmesh.placement import planner as placement

if TYPE_CHECKING:
    from vmmesh.node import Node

from vmmesh.node import NodeExtension

log = logging.getLogger("vmmesh.host.vms")

Body = dict[str, Any]
MAX_REPLANS = 8
MAX_CUSTOM_ZIP = 3 << 20  # one peer frame carries it (frames are 4 MiB)


class VmService(NodeExtension):
    """``hypervisor`` and ``base`` are for tests of the code above the hypervisor
    (a fake); a node leaves them None: QEMU with the probed accelerator and
    the default base image of its data directory."""

    def __init__(self, hypervisor: Hypervisor | None = None, base: BaseImage | None = None) -> None:
        self._hv = hypervisor
        self._base = base
        self.mgr: VmManager | None = None
        self.accel = ""
        self.image_id = ""
        self.no_vms_reason = ""
        self._node: Node | None = None
        self._index: placement.HostIndex | None = None
        self._index_key: object = None

    # --- start ------------------------------------------------------------------

    async def start(
        self,
        node: Node,
        nursery: trio.Nursery,
        peer_handlers: dict[str, Handler],
        control_handlers: dict[str, Handler],
    ) -> None:
        self._node = node
        peer_handlers.update(
            {
                "vm.share": self._share,
                "vm.shutdown_local": self._shutdown_local,
                "vm.list_local": self._list_local,
                "template.list_local": self._templates_local,
                "vm.exec_local": self._exec_local,
                "vm.ssh_local": self._ssh_local,
            }
        )
        control_handlers.update(
            {
                "vm.request": self._ctl_request,
                "vm.shutdown": self._ctl_shutdown,
                "vm.list": self._ctl_list,
                "template.list": self._ctl_templates,
                "vm.exec": self._ctl_exec,
                "vm.ssh": self._ctl_ssh,
            }
        )
        cfg = node.cfg
        base = self._base
        if base is None:
            images = ImageStore(cfg.data_dir)
            try:
                rec = images.verify(images.default_image().image_id)
            except (NotFound, ImageError, IntegrityError) as exc:
                self.no_vms_reason = f"{exc}"
                log.warning("this host runs no VMs: %s", exc)
                node.capacity = self._no_capacity
                return
            base = BaseImage(rec.path, rec.manifest)
        self.image_id = base.image_id
        hv = self._hv
        if hv is None:
            self.accel = cfg.accel if cfg.accel != "auto" else await probe_accel()
            hv = QemuHypervisor(self.accel)
        self.accel = hv.accel
        log.info("base image %s, accelerator %s", base.image_id[:16], self.accel)
        templates = TemplateManager(
            store=_store(node),
            hypervisor=hv,
            data_dir=cfg.data_dir,
            base=base,
            apt_sources=cfg.apt_sources,
        )
        data_dir = cfg.data_dir
        self.mgr = VmManager(
            store=_store(node),
            hypervisor=hv,
            templates=templates,
            data_dir=data_dir,
            policy=CapacityPolicy.from_config(cfg),
            probe=lambda: probe_host(data_dir),
            on_unexpected_stop=self._on_unexpected_stop,
            ssh_ports=range(cfg.ssh_port_first, cfg.ssh_port_first + max(cfg.ssh_port_count, 0)),
            ssh_bind=cfg.ssh_bind,
        )
        await nursery.start(self.mgr.run)
        for what in await templates.reconcile():
            log.info("reconcile: %s", what)
        for what in await self.mgr.reconcile():
            log.info("reconcile: %s", what)
        node.capacity = self.mgr.capacity

    def _no_capacity(self) -> Capacity:
        assert self._node is not None
        probe = probe_host(self._node.cfg.data_dir)
        quota = self._node.cfg.storage_quota_mb
        return Capacity(probe.cores, probe.memory_mb, quota, min(quota, probe.fs_free_mb), 0, 0)

    def publish(self, node: Node) -> None:
        if self.mgr is None:
            return
        node.publish("templates", [t.to_wire() for t in self.mgr.templates.templates_info()])
        node.publish(
            "vms", sorted(v.name for v in self.mgr.list_vms() if v.state in ("creating", "running"))
        )

    def status(self, node: Node) -> Body:
        return {
            "accel": self.accel or "none",
            "base_image": self.image_id,
            "vms_disabled": self.no_vms_reason,
        }

    def _publish_now(self) -> None:
        """Gossip this host's capacity, templates and VMs at once after a change,
        instead of at the next publish tick, so planners elsewhere see it sooner."""
        assert self._node is not None
        self._node.publish("capacity", self._node.capacity().to_wire())
        self.publish(self._node)

    def reconfigure(self, node: Node) -> None:
        if self.mgr is not None:
            self.mgr.policy = CapacityPolicy.from_config(node.cfg)
            self.mgr.templates.apt_sources = tuple(node.cfg.apt_sources)

    def _on_unexpected_stop(self, ev: VmStopped) -> None:
        log.warning("VM %s stopped without an order (exit %s)", ev.name, ev.exit_status)

    def _manager(self) -> VmManager:
        if self.mgr is None:
            raise NotFound(f"this host runs no VMs: {self.no_vms_reason}")
        return self.mgr

    # --- local operations (served to peers and to this host's coordinator) ----

    async def _share(self, ctx: CallContext, body: Body) -> Body:
        return await self.run_share(body, ctx.send_item)

    async def run_share(self, body: Body, send_item: Callable[[Body], Awaitable[None]]) -> Body:
        """Admit and make up to ``count`` VMs here; the answer says how many."""
        mgr = self._manager()
        req = _parse_request(body, remote=True)
        assert self._node is not None
        if req["custom_zip"] is not None:
            check_zip(req["custom_zip"])  # before reserving: request_local releases what it holds
        granted = mgr.reserve(req["count"])
        host = self._node.identity.name
        log.info(
            "share of request %s: %d VM(s) asked, %d admitted", req["name"], req["count"], granted
        )
        if granted == 0:
            return {"final": True, "granted": 0, "vms": [], "errors": [], "host": host}
        progress_items: list[Body] = []

        def progress(phase: str, fraction: float | None) -> None:
            progress_items.append({"task": host, "phase": phase, "fraction": fraction})

        async def pump(done: trio.Event) -> None:
            while not done.is_set() or progress_items:
                while progress_items:
                    with contextlib.suppress(VmmeshError):
                        await send_item(progress_items.pop(0))
                with trio.move_on_after(0.2):
                    await done.wait()

        done = trio.Event()
        report: RequestReport | None = None
        async with open_nursery() as nursery:
            nursery.start_soon(pump, done)
            try:
                report = await mgr.request_local(
                    req["name"],
                    granted,
                    req["packages"],
                    req["custom_zip"],
                    progress,
                    reserved=granted,
                    first_index=req["first_index"],
                    vcpus=req["vcpus"],
                    memory_mb=req["memory_mb"],
                    request_id=req["request_id"],
                )
            finally:
                done.set()
        assert report is not None
        self._publish_now()
        vms = [
            {
                "name": v.name,
                "vm_id": v.vm_id,
                "host": host,
                "node_id": self._node.node_id,
                "template": v.template_id or "",
                "built": v.built,
                "seconds": round(v.total_seconds, 2),
                "phases": {k: round(s, 2) for k, s in v.seconds.items()},
            }
            for v in report.vms
        ]
        return {
            "final": True,
            "granted": granted,
            "vms": vms,
            "errors": list(report.errors),
            "host": host,
            "template": report.template_id or "",
            "built": report.built,
        }

    async def _shutdown_local(self, ctx: CallContext, body: Body) -> Body:
        name = check_vm_name(body.get("name"))
        if self.mgr is None:
            return {"stopped": 0}
        stopped = await self.mgr.shutdown(name)
        self._publish_now()
        return {"stopped": len(stopped)}

    def _vm_rows(self) -> list[Body]:
        if self.mgr is None:
            return []
        templates = {t.template_id: t for t in self.mgr.list_templates()}
        assert self._node is not None
        rows = []
        for v in self.mgr.list_vms():
            t = templates.get(v.template_id or "")
            rows.append(
                {
                    "name": v.name,
                    "vm_id": v.vm_id,
                    "request": v.request_name,
                    "host": self._node.identity.name,
                    "node_id": self._node.node_id,
                    "state": v.state,
                    "template": v.template_id or "",
                    "packages": sorted(t.packages) if t else [],
                    "vcpus": v.vcpus,
                    "memory_mb": v.memory_mb,
                    "created": v.created,
                    "stop_reason": v.stop_reason,
                    "ssh_port": v.ssh_port,
                }
            )
        return rows

    async def _list_local(self, ctx: CallContext, body: Body) -> Body:
        return {"vms": self._vm_rows()}

    def _template_rows(self) -> list[Body]:
        if self.mgr is None:
            return []
        assert self._node is not None
        return [
            {
                "host": self._node.identity.name,
                "node_id": self._node.node_id,
                "template_id": t.template_id,
                "parent": t.parent_id or "",
                "packages": sorted(t.packages),
                "size": t.size,
                "depth": t.depth,
                "sha256": t.sha256,
                "base_image": t.base_image_id,
            }
            for t in self.mgr.list_templates()
        ]

    async def _templates_local(self, ctx: CallContext, body: Body) -> Body:
        return {"templates": self._template_rows()}

    async def _exec_local(self, ctx: CallContext, body: Body) -> Body:
        name = check_vm_name(body.get("name"))
        argv = body.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise UsageError("exec needs a command")
        result = await self._manager().exec(name, argv)
        return {
            "exit_code": result.exit_code,
            "stdout": base64.b64encode(result.stdout).decode(),
            "stderr": base64.b64encode(result.stderr).decode(),
            "truncated": result.truncated,
        }

    async def _ssh_local(self, ctx: CallContext, body: Body) -> Body:
        name = check_vm_name(body.get("name"))
        keys = check_public_keys(body.get("keys"))
        access = await self._manager().ssh_access(name, keys)
        return {
            "vm": access.vm,
            "port": access.port,
            "bind": access.bind,
            "host_key": access.host_key,
        }

    # --- mesh operations (from this host's CLI) ---------------------------------

    def _hosts_index(self) -> placement.HostIndex:
        assert self._node is not None
        hosts = self._node.hosts()
        key = tuple((h.node_id, h.status, h.capacity, h.templates, h.draining) for h in hosts)
        if key != self._index_key or self._index is None:
            self._index = placement.HostIndex(hosts)
            self._index_key = key
        return self._index

    async def _call_host(
        self,
        node_id: str,
        method: str,
        body: Body,
        local: Callable[[CallContext | None, Body], Awaitable[Body]],
    ) -> Body:
        assert self._node is not None and self._node.pool is not None
        if node_id == self._node.node_id:
            return await local(None, body)
        return await self._node.pool.call(node_id, method, body, timeout=120.0)

    async def _ctl_request(self, ctx: CallContext, body: Body) -> Body:
        assert self._node is not None
        node = self._node
        req = _parse_request(body, remote=False)
        request_id = uuid.uuid4().hex
        preq = placement.PlacementRequest(
            request_id, req["name"], req["count"], frozenset(req["packages"])
        )
        index = self._hosts_index()
        plan = placement.plan(preq, index)
        names = {h.node_id: h.name for h in node.hosts()}
        if body.get("dry_run"):
            return {
                "final": True,
                "dry_run": True,
                "name": req["name"],
                "plan": plan.to_wire(),
                "unplaced": _unplaced(plan),
            }
        next_index = _next_index(req["name"], node)
        asked: dict[str, int] = {}
        failed: set[str] = set()
        vms: list[Body] = []
        errors: list[str] = []
        notes: list[str] = []
        # A package no host can install ends the request; one that some host's
        # package source lacks only moves that host's share elsewhere.
        fatal: list[tuple[placement.Share, PackageInstallError]] = []
        started = time.monotonic()
        first_plan = plan.to_wire()

        async def forward(item: Body) -> None:
            with contextlib.suppress(VmmeshError):
                await ctx.send_item(item)

        async def ask(share: placement.Share, count: int, first: int) -> None:
            share_body = {
                "request_id": request_id,
                "name": req["name"],
                "count": count,
                "packages": sorted(req["packages"]),
                "first_index": first,
                "vcpus": req["vcpus"],
                "memory_mb": req["memory_mb"],
            }
            if req["custom_zip"] is not None:
                share_body["custom_zip"] = req["custom_zip"]
            await forward(
                {"task": share.host, "phase": f"asking for {count} VM(s)", "fraction": 0.0}
            )
            try:
                if share.node_id == node.node_id:
                    answer = await self.run_share(share_body, forward)
                else:
                    assert node.pool is not None
                    answer = await node.pool.stream_call(
                        share.node_id,
                        "vm.share",
                        share_body,
                        nursery_forward,
                    )
            except PackageInstallError as exc:
                fatal.append((share, exc))
                return
            except RemoteError as exc:
                if exc.code == "PackageInstallError":
                    fatal.append((share, PackageInstallError(str(exc))))
                    return
                failed.add(share.node_id)
                notes.append(f"host {share.host} failed ({exc}); its share was re-placed")
                log.warning(
                    "request %s: host %s failed its share of %d (%s: %s); re-placing",
                    req["name"],
                    share.host,
                    count,
                    exc.code,
                    exc,
                )
                await forward({"task": share.host, "phase": "failed", "fraction": 1.0})
                return
            except VmmeshError as exc:
                failed.add(share.node_id)
                notes.append(f"host {share.host} failed ({exc}); its share was re-placed")
                log.warning(
                    "request %s: host %s failed its share of %d (%s: %s); re-placing",
                    req["name"],
                    share.host,
                    count,
                    type(exc).__name__,
                    exc,
                )
                await forward({"task": share.host, "phase": "failed", "fraction": 1.0})
                return
            got = int(answer.get("granted", 0))
            log.info(
                "request %s: host %s made %d of %d VM(s)",
                req["name"],
                share.host,
                len(answer.get("vms", [])),
                count,
            )
            if got < count:
                notes.append(f"host {share.host} admitted {got} of {count}; the rest was re-placed")
            for v in answer.get("vms", []):
                v["seconds_end_to_end"] = round(time.monotonic() - started, 2)
                vms.append(v)
            errors.extend(f"{share.host}: {e}" for e in answer.get("errors", []))

        pending_items: list[Body] = []

        def nursery_forward(item: Body) -> None:
            pending_items.append(item)

        async def pump(stop: trio.Event) -> None:
            while not stop.is_set() or pending_items:
                while pending_items:
                    await forward(pending_items.pop(0))
                with trio.move_on_after(0.2):
                    await stop.wait()

        stop = trio.Event()
        async with open_nursery() as outer:
            outer.start_soon(pump, stop)
            try:
                for _round in range(MAX_REPLANS):
                    wave: list[tuple[placement.Share, int, int]] = []
                    for share in plan.shares:
                        extra = share.count - asked.get(share.node_id, 0)
                        if extra > 0 and share.node_id not in failed:
                            wave.append((share, extra, next_index))
                            next_index += extra
                            asked[share.node_id] = asked.get(share.node_id, 0) + extra
                    if not wave:
                        break
                    async with open_nursery() as nursery:
                        for share, count, first in wave:
                            nursery.start_soon(ask, share, count, first)
                    if fatal and not vms:
                        raise fatal[0][1]
                    for share, exc in fatal:
                        failed.add(share.node_id)
                        notes.append(
                            f"host {share.host} cannot install: {exc}; its share was re-placed"
                        )
                    fatal.clear()
                    # A host that made fewer VMs than asked (it admitted fewer,
                    # or a boot failed) keeps what it made and gets no more;
                    # a host that failed loses its share.  The rest is re-placed.
                    made_by = {nid: sum(1 for v in vms if v.get("node_id") == nid) for nid in asked}
                    refused = {
                        nid: made_by[nid]
                        for nid in asked
                        if made_by[nid] < asked[nid] and nid not in failed
                    }
                    plan = placement.replan(plan, failed, refused, self._hosts_index())
                    asked.update(refused)
            finally:
                stop.set()
        placed = len(vms)
        unplaced = []
        if placed < req["count"]:
            reason = plan.unplaced_reason or "no host could take them"
            unplaced.append({"count": req["count"] - placed, "reason": reason})
        for v in vms:
            v.setdefault("host", names.get(str(v.get("node_id")), ""))
        return {
            "final": True,
            "request_id": request_id,
            "name": req["name"],
            "requested": req["count"],
            "placed": placed,
            "vms": vms,
            "unplaced": unplaced,
            "errors": errors,
            "notes": notes,
            "plan": first_plan,
            "seconds": round(time.monotonic() - started, 2),
        }

    async def _fan_out(
        self, method: str, body: Body, local: Callable[[CallContext | None, Body], Awaitable[Body]]
    ) -> tuple[list[tuple[str, Body]], list[str]]:
        """Call ``method`` on every host that is up; (host name, answer) and errors."""
        assert self._node is not None
        answers: list[tuple[str, Body]] = []
        errors: list[str] = []

        async def one(node_id: str, name: str) -> None:
            try:
                answers.append((name, await self._call_host(node_id, method, body, local)))
            except VmmeshError as exc:
                errors.append(f"{name}: {exc}")

        async with trio.open_nursery() as nursery:
            for h in self._node.hosts():
                if h.status == "down":
                    if method == "vm.shutdown_local" and h.vms:
                        errors.append(f"{h.name}: host is down")
                    continue
                nursery.start_soon(one, h.node_id, h.name)
        return answers, errors

    async def _ctl_shutdown(self, ctx: CallContext, body: Body) -> Body:
        name = check_vm_name(body.get("name"))
        answers, errors = await self._fan_out(
            "vm.shutdown_local",
            {"name": name},
            self._shutdown_local,  # type: ignore[arg-type]
        )
        hosts = [
            {"host": n, "stopped": a.get("stopped", 0)} for n, a in answers if a.get("stopped")
        ]
        return {
            "name": name,
            "stopped": sum(h["stopped"] for h in hosts),
            "hosts": hosts,
            "errors": errors,
        }

    async def _ctl_list(self, ctx: CallContext, body: Body) -> Body:
        answers, errors = await self._fan_out(
            "vm.list_local",
            {},
            self._list_local,  # type: ignore[arg-type]
        )
        vms = [v for _n, a in answers for v in a.get("vms", [])]
        vms.sort(key=lambda v: (str(v.get("name")), str(v.get("host"))))
        return {"vms": vms, "errors": errors}

    async def _ctl_templates(self, ctx: CallContext, body: Body) -> Body:
        answers, errors = await self._fan_out(
            "template.list_local",
            {},
            self._templates_local,  # type: ignore[arg-type]
        )
        rows = [t for _n, a in answers for t in a.get("templates", [])]
        rows.sort(key=lambda t: (str(t.get("host")), len(t.get("packages", []))))
        return {"templates": rows, "errors": errors}

    def _where(self, name: str) -> str:
        """The node id of the host running VM ``name`` (or the only VM of request ``name``)."""
        assert self._node is not None
        hosts = [h for h in self._node.hosts() if h.status != "down"]
        exact = [h for h in hosts if name in h.vms]
        if exact:
            return exact[0].node_id
        by_request = sorted(
            (v, h.node_id) for h in hosts for v in h.vms if request_name_of(v) == name
        )
        if not by_request:
            raise NotFound(f"no running VM called {name!r} in the mesh")
        return by_request[0][1]

    def _locate(self, name: str) -> tuple[HostView, str]:
        """The host running VM ``name`` and the VM's own name there.

        ``name`` is a VM (``NAME-2``) or a request; a request means its
        first VM, by name.
        """
        node_id = self._where(name)
        assert self._node is not None
        host = next(h for h in self._node.hosts() if h.node_id == node_id)
        if name in host.vms:
            return host, name
        return host, sorted(v for v in host.vms if request_name_of(v) == name)[0]

    async def _ctl_exec(self, ctx: CallContext, body: Body) -> Body:
        name = check_vm_name(body.get("name"))
        host, target = self._locate(name)
        return await self._call_host(
            host.node_id,
            "vm.exec_local",
            {"name": target, "argv": body.get("argv")},
            self._exec_local,  # type: ignore[arg-type]
        )

    async def _ctl_ssh(self, ctx: CallContext, body: Body) -> Body:
        """Authorise the caller's keys in the VM; answer where to dial and which host key."""
        name = check_vm_name(body.get("name"))
        keys = check_public_keys(body.get("keys"))
        host, target = self._locate(name)
        reply = await self._call_host(
            host.node_id,
            "vm.ssh_local",
            {"name": target, "keys": list(keys)},
            self._ssh_local,  # type: ignore[arg-type]
        )
        assert self._node is not None
        port = reply.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise RemoteError("ProtocolError", f"{host.name} answered ssh access without a port")
        host_key = check_public_key(reply.get("host_key"))
        address = connect_address(
            host.node_id == self._node.node_id, str(reply.get("bind", "")), host.address
        )
        return {
            "vm": str(reply.get("vm", target)),
            "host": host.name,
            "address": address,
            "port": port,
            "host_key": host_key,
            "user": "root",
        }


def _store(node: Node) -> Store:
    assert node.store is not None
    return node.store


def _unplaced(plan: placement.Plan) -> list[Body]:
    if not plan.unplaced:
        return []
    return [{"count": plan.unplaced, "reason": plan.unplaced_reason}]


def _next_index(name: str, node: Node) -> int:
    """The first free NAME-<n> index in the mesh as gossip knows it."""
    highest = 0
    for h in node.hosts():
        for v in h.vms:
            if request_name_of(v) == name:
                with contextlib.suppress(ValueError):
                    highest = max(highest, int(v.rpartition("-")[2]))
    return highest + 1


def _parse_request(body: Body, *, remote: bool) -> Body:
    """Validate a request body; a peer's strings are checked like a user's."""
    name = check_vm_name(body.get("name"))
    count = body.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1000:
        raise UsageError("COUNT must be between 1 and 1000")
    packages = body.get("packages", [])
    if not isinstance(packages, list):
        raise UsageError("packages must be a list")
    pkgs = sorted({check_package(p) for p in packages})
    custom = body.get("custom_zip")
    if custom is not None and (not isinstance(custom, bytes) or len(custom) > MAX_CUSTOM_ZIP):
        raise UsageError(f"--custom zip must be at most {MAX_CUSTOM_ZIP >> 20} MB")
    out: Body = {
        "name": name,
        "count": count,
        "packages": pkgs,
        "custom_zip": custom,
        "vcpus": None,
        "memory_mb": None,
        "first_index": None,
        "request_id": "",
    }
    for key, hi in (("vcpus", 64), ("memory_mb", 1 << 20)):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, int) or not 1 <= v <= hi:
                raise UsageError(f"{key} must be between 1 and {hi}")
            out[key] = v
    if remote:
        fi = body.get("first_index")
        if fi is not None and (not isinstance(fi, int) or fi < 1):
            raise UsageError("bad first_index")
        out["first_index"] = fi
        rid = body.get("request_id", "")
        out["request_id"] = rid if isinstance(rid, str) and len(rid) <= 64 else ""
    return out
