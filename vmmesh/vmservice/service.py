"""The VM service: the node extension that makes this host run VMs for the mesh.

It chooses what VMs run on (QEMU with the probed accelerator, the default
base image of the data directory, verified), builds the host's
``VmManager``, publishes the host's templates and VMs into gossip, and
registers the local methods (``local.LocalVms``) and the mesh methods
(``mesh.MeshVms``, ``requests.RequestCoordinator``).

A host without a usable base image still runs a node: it offers no VM slots
and says why in its gossiped capacity (``blocked``), so a request the mesh
cannot place says "h1: no base image" instead of "full".  It keeps looking:
a base image built, imported or fetched while the node runs is taken up at
the next publish tick, with no restart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from vmmesh.api.host import Building, Capacity
from vmmesh.errors import ImageError, IntegrityError, NotFound, VmmeshError
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, Usage, compute_capacity, probe_host
from vmmesh.host.images import ImageStore
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.accel import probe_accel
from vmmesh.hypervisor.base import Guest, Hypervisor
from vmmesh.hypervisor.qemu import QemuHypervisor
from vmmesh.net.rpc import Handlers
from vmmesh.vm.lifecycle import VmStopped
from vmmesh.vm.manager import VmManager
from vmmesh.vm.state import VmState
from vmmesh.vmservice.local import LocalVms
from vmmesh.vmservice.mesh import MeshVms
from vmmesh.vmservice.requests import RequestCoordinator

log = logging.getLogger("vmmesh.vms")

ACCEL_CACHE = "accel.json"
PER_VM_SHAPE = ("memory_mb", "vcpus")  # a shape's fields each VM sets for itself


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
        self.no_vms_reason = "starting"
        self._node: NodeContext | None = None
        self._nursery: trio.Nursery | None = None
        self._image_stamp: object = None
        self.local = LocalVms(self)
        self.manager_hooks: list[Callable[[VmManager], None]] = []
        self.stop_hooks: list[Callable[[VmStopped], None]] = []  # keep-alive's
        # keys published with (and before) this host's VMs, so a peer that sees a
        # VM in gossip also sees them (keep-alive's list of its VMs)
        self.publish_hooks: list[Callable[[NodeContext], None]] = []
        # what a saved state needs of any host that resumes it (QEMU, machine,
        # accelerator, CPU, devices, kernel), gossiped so migrations pick hosts
        # that can run this host's guests
        self.vm_shape: dict[str, str] = {}

    # --- start ------------------------------------------------------------------

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node = node
        self._nursery = nursery
        self.local.register(peer_handlers)
        MeshVms(self, node).register(control_handlers)
        RequestCoordinator(self, node).register(control_handlers)
        for what in ImageStore(node.data_dir).sweep_unfinished():
            log.info("reconcile: %s", what)
        await self._take_up_image()

    async def _take_up_image(self) -> bool:
        """Start the VM manager on the base image, if there is one; False if not (yet)."""
        assert self._node is not None and self._nursery is not None
        base = self._base or self._default_image(self._node.data_dir)
        if base is None:
            return False
        hv = self._hv
        if hv is None:
            cfg = self._node.cfg
            cache = self._node.data_dir / ACCEL_CACHE
            accel = cfg.accel if cfg.accel != "auto" else await probe_accel(cache_file=cache)
            hv = QemuHypervisor(accel)
        self.accel, self.image_id = hv.accel, base.image_id
        log.info("base image %s, accelerator %s", base.image_id[:16], self.accel)
        mgr = self._make_manager(hv, base)
        mgr.templates.on_change = self.publish_now
        for hook in self.manager_hooks:
            hook(mgr)
        await self._nursery.start(mgr.run)
        probe = base.boot_spec("shape", base.disk, self._node.data_dir / "run", 1, 512)
        shape = (await hv.shape(probe)).to_json()
        self.vm_shape = {k: v for k, v in shape.items() if k not in PER_VM_SHAPE}
        for what in await mgr.reconcile():
            log.info("reconcile: %s", what)
        mgr.warm_sched.refit()  # the VM size changed while the node was down
        mgr.schedule_warm(None)  # the base image's: builds and package-less VMs resume it
        for rec in mgr.templates.records():
            mgr.schedule_warm(rec)
        self.mgr, self.no_vms_reason = mgr, ""
        return True

    def _default_image(self, data_dir: Path) -> BaseImage | None:
        """The verified default base image; None (and why, in ``no_vms_reason``) if none."""
        images = ImageStore(data_dir)
        try:
            rec = images.verify(images.default_image().image_id)
        except (NotFound, ImageError, IntegrityError) as exc:
            reason = str(exc)
            if isinstance(exc, NotFound):
                reason = "no base image (run `vmmesh image build`, `import` or `fetch`)"
            elif isinstance(exc, IntegrityError):
                reason = f"the base image failed verification: {exc}"
            if reason != self.no_vms_reason:
                log.warning("this host runs no VMs: %s", reason)
            self.no_vms_reason = reason
            return None
        return BaseImage(rec.path, rec.manifest)

    def _make_manager(self, hv: Hypervisor, base: BaseImage) -> VmManager:
        assert self._node is not None
        node, cfg = self._node, self._node.cfg
        data_dir = node.data_dir
        templates = TemplateManager(
            store=node.store,
            hypervisor=hv,
            data_dir=data_dir,
            base=base,
            apt_sources=cfg.apt_sources,
        )
        warm = WarmStore(data_dir, hv, base) if cfg.warm_start else None
        mgr = VmManager(
            warm=warm,
            store=node.store,
            hypervisor=hv,
            templates=templates,
            data_dir=data_dir,
            policy=CapacityPolicy.from_config(cfg),
            probe=lambda: probe_host(data_dir),
            host=node.identity.name,
            node_id=node.node_id,
            on_unexpected_stop=self._on_unexpected_stop,
            ssh_ports=range(cfg.ssh_port_first, cfg.ssh_port_first + max(cfg.ssh_port_count, 0)),
            ssh_bind=cfg.ssh_bind,
        )
        mgr.spares.enabled = cfg.warm_spare
        return mgr

    # --- the node's hooks -------------------------------------------------------

    def capacity(self) -> Capacity:
        if self.mgr is not None:
            return self.mgr.offered()
        assert self._node is not None
        probe = probe_host(self._node.data_dir)
        policy = CapacityPolicy.from_config(self._node.cfg)
        return compute_capacity(probe, Usage(), policy, blocked=self.no_vms_reason or "starting")

    def publish(self, node: NodeContext) -> None:
        if self._base is None:
            images = ImageStore(node.data_dir)
            held = [r.image_id for r in images.list_images()]
            default = next((i for i in held if i == self.image_id), None)
            ordered = ([default] if default else []) + [i for i in held if i != default]
            node.publish(dataclasses.replace(node.published, images=tuple(ordered)))
        if self.vm_shape:
            node.publish(dataclasses.replace(node.published, vmshape=self.vm_shape))
        if self.mgr is None:
            if self._base is None and self._image_changed(node.data_dir):
                assert self._nursery is not None
                self._nursery.start_soon(self._retry_image)
            return
        for hook in self.publish_hooks:
            hook(node)
        templates = self.mgr.templates
        warm = self.mgr.warm_held()
        inventory = [
            dataclasses.replace(t, warm=True) if t.template_id in warm else t
            for t in templates.templates_info()
        ]
        live = sorted(
            v.name for v in self.mgr.list_vms() if v.state in (VmState.CREATING, VmState.RUNNING)
        )
        building = tuple(
            Building(template_id=t, done_at=d) for t, d in sorted(templates.building.items())
        )
        node.publish(
            dataclasses.replace(
                node.published, templates=tuple(inventory), vms=tuple(live), building=building
            )
        )

    def _image_changed(self, data_dir: Path) -> bool:
        """Did the image store change since we last looked (a cheap stat per tick)?"""
        marker = data_dir / "images" / "default"
        try:
            st = marker.stat()
            stamp: object = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        changed = stamp != self._image_stamp
        self._image_stamp = stamp
        return changed and stamp is not None

    async def _retry_image(self) -> None:
        try:
            if await self._take_up_image():
                log.info("took up the new base image %s", self.image_id[:16])
                self.publish_now()
        except VmmeshError as exc:
            log.warning("cannot take up the base image: %s", exc)

    def facts(self) -> Mapping[str, str]:
        return {
            "accelerator": self.accel or "none",
            "base image": self.image_id or "none",
            "VMs": "on" if self.mgr is not None else f"off: {self.no_vms_reason}",
            "warm starts": "on" if self.mgr is not None and self.mgr.warm_enabled else "off",
            "warm spare": self._spare_fact(),
        }

    def _spare_fact(self) -> str:
        """``vmmesh status``: the warm spare waiting here, if any (``vm.spare``)."""
        if self.mgr is None or not (self.mgr.warm_enabled and self.mgr.spares.enabled):
            return "off"
        spare = self.mgr.spares.spare
        if spare is None:
            return "none"
        return f"ready: {spare.key[:12]} ({spare.vcpus} vCPU, {spare.memory_mb} MB)"

    def publish_now(self) -> None:
        """Gossip this host's capacity, templates and VMs at once after a change,
        instead of at the next publish tick, so planners elsewhere see it sooner."""
        assert self._node is not None
        self._node.publish_capacity()
        self.publish(self._node)

    def reconfigure(self, node: NodeContext) -> None:
        if self.mgr is not None:
            self.mgr.policy = CapacityPolicy.from_config(node.cfg)
            self.mgr.warm_enabled = node.cfg.warm_start and self.mgr.warm is not None
            self.mgr.spares.enabled = node.cfg.warm_spare
            self.mgr.warm_sched.refit()  # states of another VM size are made again
            self.mgr.templates.builder.apt_sources = tuple(node.cfg.apt_sources)

    def _on_unexpected_stop(self, ev: VmStopped) -> None:
        log.warning("VM %s stopped without an order (exit %s)", ev.name, ev.exit_status)
        if self._node is not None:
            self.publish_now()
        for hook in self.stop_hooks:
            hook(ev)

    def being_made(self) -> set[str]:
        """The names of this host's VMs still being made (``VmState.CREATING``: cloned,
        resuming or booting, not yet running)."""
        if self.mgr is None:
            return set()
        return {v.name for v in self.mgr.list_vms() if v.state == VmState.CREATING}

    def guests(self) -> dict[str, Guest]:
        """This host's running guests by VM name (none while it runs no VMs)."""
        if self.mgr is None:
            return {}
        running = self.mgr.guests
        return {v.name: running[v.vm_id] for v in self.mgr.list_vms() if v.vm_id in running}

    def manager(self) -> VmManager:
        if self.mgr is None:
            raise NotFound(f"this host runs no VMs: {self.no_vms_reason}")
        return self.mgr

    @property
    def fixed_image(self) -> bool:
        """The base image was given (tests): do not look for one on disk or fetch one."""
        return self._base is not None

    @property
    def node(self) -> NodeContext:
        assert self._node is not None
        return self._node
