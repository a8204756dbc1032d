"""Three (or more) real nodes in one trio run, on loopback addresses 127.0.0.1-3: static
seeds, real mutual TLS and gossip, the control socket, and a fake hypervisor.
Shared by the tests of the VM service and of hardening."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

import vmmesh.node
from tests.fakehv import FakeGuest, FakeHypervisor, make_base_image
from vmmesh.api.codec import Method, WireType
from vmmesh.api.common import Progress
from vmmesh.api.vm import REQUEST, RequestReport, RequestVms
from vmmesh.config import Config
from vmmesh.errors import HypervisorError
from vmmesh.gossip.hoststate import HostView
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import count_cores
from vmmesh.hypervisor.base import BootSpec
from vmmesh.jobs.service import JobService
from vmmesh.mesh import pki
from vmmesh.net.control import connect_control
from vmmesh.node import Node
from vmmesh.transfer.service import TransferService
from vmmesh.vm.manager import VmManager
from vmmesh.vmservice.service import VmService

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)

ALLOWANCE = 1024
REPO = frozenset({"povray", "perl", "vmm-test-a", "vmm-test-b"})
PATIENCE = 30.0


def overcommit(n: int) -> float:
    """The ``cpu_overcommit`` that gives exactly ``n`` one-vCPU slots here."""
    return (n + 0.5) / count_cores()


def fake(**kw: Any) -> FakeHypervisor:
    opts: dict[str, Any] = dict(
        repo_packages=REPO, agent_seconds=0.01, install_seconds=0.01, shutdown_seconds=0.01
    )
    opts.update(kw)
    return FakeHypervisor(**opts)


class BuildFailsHypervisor(FakeHypervisor):
    """A host whose template builds cannot boot (its whole share fails)."""

    async def start(self, spec: BootSpec) -> FakeGuest:
        if spec.name.startswith("tpl-"):
            raise HypervisorError("no /dev/kvm today")
        return await super().start(spec)


@dataclass
class Host:
    name: str
    cfg: Config
    node: Node
    svc: VmService
    hv: FakeHypervisor
    scope: trio.CancelScope

    @property
    def mgr(self) -> VmManager:
        assert self.svc.mgr is not None
        return self.svc.mgr

    def view(self) -> dict[str, HostView]:
        return {h.name: h for h in self.node.hosts()}


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmmesh.node, "PUBLISH_EVERY", 0.2)


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory: control socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="vms"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _port_free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


@pytest.fixture
def port() -> int:
    return free_port_pair()


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` (the join port) free on 127.0.0.1-3 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p < 65000 and all(_port_free(f"127.0.0.{i}", q) for i in (1, 2, 3) for q in (p, p + 1)):
            return p
    raise AssertionError("no free port on 127.0.0.1-3")


def identities(root: Path) -> None:
    """h1 inits the mesh; h2 and h3 get certificates as if they had joined."""
    admin = pki.init_mesh(root / "h1" / "pki", "h1")
    ca = pki.load_ca(admin.pki_dir)
    for name in ("h2", "h3"):
        key_pem, csr_pem = pki.make_key_and_csr(name)
        pki.install_joined(
            root / name / "pki",
            key_pem,
            pki.sign_csr(ca, csr_pem),
            admin.ca_cert_path.read_bytes(),
            pki.current_crl(admin.pki_dir),
        )


async def run_node(node: Node, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    scope = trio.CancelScope()
    with scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            task_status.started(scope)


async def eventually(check: Callable[[], object], what: str, patience: float = PATIENCE) -> None:
    with trio.move_on_after(patience):
        while not check():  # noqa: ASYNC110 - polls gossip state, which has no event
            await trio.sleep(0.05)
        return
    raise AssertionError(f"never happened: {what}")


def all_see(hosts: Sequence[Host], free: dict[str, int]) -> bool:
    """Every host sees every host up, with its free slots, and can dial it."""
    for h in hosts:
        view = h.view()
        if len(view) != len(free) or any(v.status != "up" for v in view.values()):
            return False
        assert h.node.pool is not None
        if any(
            h.node.pool.endpoint(v.node_id) is None
            for v in view.values()
            if v.node_id != h.node.node_id
        ):
            return False
        for n, f in free.items():
            v = view.get(n)
            if v is None or v.capacity.free_slots != f:
                return False
    return True


@contextlib.asynccontextmanager
async def mesh(
    root: Path,
    port: int,
    capacity: Sequence[int] = (2, 2, 2),
    *,
    storage_quota_mb: int = 20_000,
    hypervisors: Sequence[FakeHypervisor] | None = None,
    pack_level: int = 0,
    gossip: str = Config.gossip,
) -> AsyncIterator[list[Host]]:
    """Three running nodes that all see each other up with their free slots (templates
    served as compressed on the fly unless ``pack_level`` is given)."""
    identities(root)
    hvs = list(hypervisors) if hypervisors is not None else [fake(), fake(), fake()]
    async with trio.open_nursery() as nursery:
        hosts: list[Host] = []
        for i in range(3):
            name = f"h{i + 1}"
            image_dir = root / name / "base"
            image_dir.mkdir(parents=True)
            cfg = Config(
                data_dir=root / name,
                name=name,
                listen=f"127.0.0.{i + 1}",
                advertise=(f"127.0.0.{i + 1}",),
                port=port,
                peers=(f"127.0.0.1:{port}",),
                mdns=False,
                gossip_interval=0.1,
                storage_quota_mb=storage_quota_mb,
                cpu_overcommit=overcommit(capacity[i]),
                vm_memory_mb=64,
                vm_disk_allowance_mb=ALLOWANCE,
                pack_level=pack_level,
                gossip=gossip,
            )
            base = BaseImage(image_dir, make_base_image(image_dir))
            svc = VmService(hypervisor=hvs[i], base=base)
            node = Node(cfg, extensions=[svc, TransferService(svc), JobService(svc)])
            scope = await nursery.start(run_node, node)
            hosts.append(Host(name, cfg, node, svc, hvs[i], scope))
        # (what each offers: a warm boot of the base image may hold a slot it gives up)
        await eventually(
            lambda: all_see(hosts, {h.name: h.mgr.offered().free_slots for h in hosts}),
            "three hosts up with their slots",
        )
        yield hosts
        nursery.cancel_scope.cancel()


async def call(host: Host, method: Method[Req, Rep], body: Req) -> Rep:
    async with connect_control(host.cfg.socket_path) as conn:
        return await conn.request(method, body)


async def request(
    host: Host,
    name: str,
    count: int,
    *packages: str,
    items: list[Progress] | None = None,
    dry_run: bool = False,
) -> RequestReport:
    """``vmmesh request`` through the control socket; its report."""
    body = RequestVms(name=name, count=count, packages=frozenset(packages), dry_run=dry_run)
    async with connect_control(host.cfg.socket_path) as conn, conn.stream(REQUEST, body) as answer:
        async for item in answer:
            if items is not None:
                items.append(item)
    return answer.result()


def per_host(hosts: Sequence[Host]) -> dict[str, int]:
    return {h.name: len(h.mgr.list_vms()) for h in hosts}


def overlays(hosts: Sequence[Host]) -> list[Path]:
    return [p for h in hosts for p in (h.cfg.data_dir / "vms").glob("*.qcow2")]


def building(hosts: Sequence[Host]) -> list[Path]:
    return [p for h in hosts for p in (h.cfg.data_dir / "templates").glob(".building*")]
