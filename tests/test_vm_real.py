"""The manager layer on real QEMU (TCG), the real base image and the test apt repo.

Minutes per test under TCG.  Skipped when the base image or QEMU is missing.
Every QEMU started is killed at teardown, pass or fail; all files live under
pytest's tmp_path; traffic stays on loopback (the guest reaches the apt repo
at 10.0.2.2, QEMU's user-mode alias of the host's 127.0.0.1).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.aptrepo import AptRepo, apt_repo
from tests.warmseed import MEMORY_MB, VCPUS, link_seed
from vmmesh.api.customzip import check_zip
from vmmesh.errors import PackageInstallError
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, probe_host
from vmmesh.host.images import read_manifest
from vmmesh.host.store import Store
from vmmesh.host.templates import BUILDING_PREFIX, TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.base import BootSpec
from vmmesh.hypervisor.qemu import QemuGuest, QemuHypervisor
from vmmesh.vm.lifecycle import VmStopped
from vmmesh.vm.manager import VmManager

__all__ = ["apt_repo"]  # fixture used by name

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (BASE_DIR / "manifest.json").is_file() or shutil.which("qemu-system-x86_64") is None,
        reason=f"needs qemu-system-x86_64 and a base image in {BASE_DIR}",
    ),
]


class RecordingQemu(QemuHypervisor):
    """QemuHypervisor that remembers every guest, so teardown can kill them all."""

    def __init__(self) -> None:
        super().__init__(accel="tcg")
        self.guests: list[QemuGuest] = []

    async def start(self, spec: BootSpec) -> QemuGuest:
        guest = await super().start(spec)
        self.guests.append(guest)
        return guest

    async def adopt(self, name: str, run_dir: Path) -> QemuGuest | None:
        guest = await super().adopt(name, run_dir)
        if guest is not None:
            self.guests.append(guest)
        return guest


class Host:
    """Managers for one data dir, as the node would wire them.

    ``warm``: with warm states, as a node runs by default (the suite's seed of the
    base image linked in, guests of its shape: builds and VMs resume); without, every
    guest boots cold (2 vCPUs, 1 GB: a cold boot's apt is quicker with them).
    """

    def __init__(
        self, data: Path, hv: RecordingQemu, store: Store, sources: list[str], warm: bool = False
    ) -> None:
        record = read_manifest(BASE_DIR)
        base = BaseImage(BASE_DIR.resolve(), record.manifest)
        vcpus, memory_mb = (VCPUS, MEMORY_MB) if warm else (2, 1024)
        if warm:
            link_seed(data, BASE_DIR, base.image_id)
        self.stopped: list[VmStopped] = []
        self.lost = trio.Event()
        self.templates = TemplateManager(
            store=store,
            hypervisor=hv,
            data_dir=data,
            base=base,
            apt_sources=sources,
            build_vcpus=vcpus,
            build_memory_mb=memory_mb,
            agent_timeout=240.0,
        )
        self.vms = VmManager(
            store=store,
            hypervisor=hv,
            templates=self.templates,
            data_dir=data,
            policy=CapacityPolicy(cpu_overcommit=4.0, vm_vcpus=vcpus, vm_memory_mb=memory_mb),
            probe=lambda: probe_host(data),
            host="h1",
            node_id="0123456789abcdef",
            on_unexpected_stop=self._stopped,
            agent_timeout=240.0,
            warm=WarmStore(data, hv, base, agent_timeout=240.0) if warm else None,
        )

    def _stopped(self, event: VmStopped) -> None:
        self.stopped.append(event)
        self.lost.set()


@pytest.fixture
def hv() -> RecordingQemu:
    return RecordingQemu()


@pytest.fixture
async def killer(hv: RecordingQemu) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            for guest in hv.guests:
                await guest.kill()


@pytest.fixture
async def host(
    tmp_path: Path, hv: RecordingQemu, store: Store, apt_repo: AptRepo, killer: None
) -> AsyncIterator[Host]:
    h = Host(tmp_path / "data", hv, store, [apt_repo.source_line()])
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        yield h
        nursery.cancel_scope.cancel()


@pytest.fixture
async def warm_host(
    tmp_path: Path, hv: RecordingQemu, store: Store, apt_repo: AptRepo, killer: None
) -> AsyncIterator[Host]:
    h = Host(tmp_path / "data", hv, store, [apt_repo.source_line()], warm=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        yield h
        nursery.cancel_scope.cancel()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("tool/hello.sh")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, "#!/bin/sh\necho hello from opt\n")
    return buf.getvalue()


async def test_build_reuse_zip_kill_and_shutdown(warm_host: Host) -> None:
    """With warm states, as a node runs: the build resumes the base image's state, its
    VM and the template's next one resume the build's (the cold path: the other tests
    of this module)."""
    host = warm_host
    first = await host.vms.request_local("web", 1, ["vmm-test-a", "vmm-test-c"])
    assert first.built and first.vms and not first.errors, first
    vm1 = first.vms[0]
    print("from scratch:", {k: round(v, 1) for k, v in vm1.phases.items()})
    for pkg in ("vmm-test-a", "vmm-test-c"):
        res = await host.vms.exec("web-1", ["cat", f"/usr/share/{pkg}/marker"])
        assert res.exit_code == 0 and res.stdout.strip() == pkg.encode()
    res = await host.vms.exec("web-1", ["sh", "-c", "hostname; cat /etc/hostname; hostname -f"])
    assert res.stdout.split() == [b"web-1"] * 3, res
    template = host.templates.get(vm1.template)
    template_disk = host.templates.disk_path(template)
    assert template_disk.is_file()
    assert not [p for p in host.templates.dir.iterdir() if p.name.startswith(BUILDING_PREFIX)]

    second = await host.vms.request_local("web", 1, ["vmm-test-c", "vmm-test-a"], check_zip(_zip()))
    assert not second.built and second.vms[0].phases["install"] == 0.0, second
    assert second.vms[0].template == template.template_id
    print("from template:", {k: round(v, 1) for k, v in second.vms[0].phases.items()})
    res = await host.vms.exec("web-2", ["sh", "/opt/tool/hello.sh"])
    assert res.stdout == b"hello from opt\n"
    res = await host.vms.exec("web-2", ["stat", "-c", "%a", "/opt/tool/hello.sh"])
    assert res.stdout.strip() == b"755"

    # QEMU killed without an order: recorded as an unexpected stop
    lost = host.vms.get("web-2")
    os.kill(lost.pid, signal.SIGKILL)
    await host.lost.wait()
    assert host.vms.get(lost.vm_id).state == "lost"
    assert host.vms.get(lost.vm_id).stop_reason == "QEMU was killed by signal 9 without an order"
    assert host.stopped[0].vm_id == lost.vm_id

    # shutdown by name: every VM of it goes, running or lost, with its overlay;
    # the template stays
    overlays = [host.vms.vm_dir / host.vms.get(n).disk for n in ("web-1", "web-2")]
    assert all(o.is_file() for o in overlays)
    removed = await host.vms.shutdown("web")
    assert {(v.vm_id, v.state) for v in removed} == {(vm1.vm_id, "running"), (lost.vm_id, "lost")}
    assert not any(o.exists() for o in overlays)
    assert host.vms.list_vms() == []
    assert template_disk.is_file()
    assert [t.template_id for t in host.vms.list_templates()] == [template.template_id]
    assert len(host.stopped) == 1  # the ordered stop is not "unexpected"


async def test_unknown_package_is_named_and_leaves_nothing(host: Host) -> None:
    with pytest.raises(PackageInstallError, match="vmm-test-nope"):
        await host.vms.request_local("bad", 1, ["vmm-test-a", "vmm-test-nope"])
    assert host.templates.records(include_building=True) == []
    assert list(host.templates.dir.iterdir()) == []
    assert host.vms.list_vms() == []
    assert list(host.vms.vm_dir.iterdir()) == []


async def test_killed_mid_build_then_reconcile(
    tmp_path: Path, hv: RecordingQemu, store: Store, apt_repo: AptRepo, killer: None
) -> None:
    data = tmp_path / "data"
    old = Host(data, hv, store, [apt_repo.source_line()])
    installing = trio.Event()

    def progress(phase: str, fraction: float | None) -> None:
        if phase == "install":
            installing.set()

    async with trio.open_nursery() as nursery:

        async def build() -> None:
            await old.templates.ensure_template(["vmm-test-b"], progress)

        nursery.start_soon(build)
        await installing.wait()
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()

    new = Host(data, hv, store, [apt_repo.source_line()])
    async with trio.open_nursery() as nursery:
        await nursery.start(new.vms.run)
        await new.vms.reconcile()
        nursery.cancel_scope.cancel()
    assert new.templates.records(include_building=True) == []
    assert list(new.templates.dir.iterdir()) == []
    assert list(new.vms.vm_dir.iterdir()) == []
    assert all(g.pid and _gone(g.pid) for g in hv.guests)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
