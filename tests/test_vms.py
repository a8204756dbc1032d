"""VmManager against the fake hypervisor: create, reuse, zip, stop, lose, reconcile."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakehv import FakeHypervisor, chain_of, files_on, make_base_image
from vmmesh.api.common import Progress
from vmmesh.api.customzip import check_zip
from vmmesh.api.names import request_name_of
from vmmesh.errors import CapacityError, NotFound, PackageInstallError, UsageError
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, HostProbe
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager
from vmmesh.hypervisor.base import BootSpec
from vmmesh.vm.lifecycle import VmStopped
from vmmesh.vm.manager import VmManager

POLICY = CapacityPolicy(
    storage_quota_mb=10_000,
    cpu_overcommit=2.0,
    memory_reserve_mb=0,
    vm_vcpus=1,
    vm_memory_mb=512,
    vm_disk_allowance_mb=1000,
)


def make_zip(members: dict[str, bytes], mode: int = 0o644) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, data)
    return buf.getvalue()


class Node:
    """One host's managers over a shared data dir and a fake machine."""

    def __init__(
        self,
        data: Path,
        hv: FakeHypervisor,
        store: Store,
        cores: int = 2,
        ssh_ports: range = range(0),
    ) -> None:
        image_dir = data / "images" / "base"
        image_dir.mkdir(parents=True, exist_ok=True)
        self.hv = hv
        self.stopped: list[VmStopped] = []
        self.templates = TemplateManager(
            store=store,
            hypervisor=hv,
            data_dir=data,
            base=BaseImage(image_dir, make_base_image(image_dir)),
        )
        self.vms = VmManager(
            store=store,
            hypervisor=hv,
            templates=self.templates,
            data_dir=data,
            policy=POLICY,
            probe=lambda: HostProbe(cores=cores, memory_mb=8192, fs_free_mb=50_000),
            host="h1",
            node_id="0123456789abcdef",
            on_unexpected_stop=self.stopped.append,
            ssh_ports=ssh_ports,
        )


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor(repo_packages=frozenset({"a", "b", "c"}))


@pytest.fixture
async def node(tmp_path: Path, hv: FakeHypervisor, store: Store) -> AsyncIterator[Node]:
    n = Node(tmp_path / "data", hv, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(n.vms.run)
        yield n
        nursery.cancel_scope.cancel()


async def test_request_builds_then_reuses(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    report = await node.vms.request_local("web", 2, ["a", "b"])
    assert report.built and report.unplaced == 0 and not report.errors
    assert [v.name for v in report.vms] == ["web-1", "web-2"]
    first, second = report.vms
    assert first.built and not second.built
    assert first.phases["install"] >= 0 and "vm_boot" in first.phases
    assert second.phases["install"] == 0.0
    vms = node.vms.list_vms()
    assert {v.state for v in vms} == {"running"}
    for v in vms:
        disk = node.vms.vm_dir / v.disk
        assert chain_of(disk)[1] == node.templates.disk_path(
            node.templates.get(v.template_id or "")
        )
    again = await node.vms.request_local("web", 1, ["b", "a"])
    assert not again.built and again.vms[0].name == "web-3"
    assert again.vms[0].phases["install"] == 0.0
    assert len(node.vms.list_templates()) == 1
    res = await node.vms.exec("web-3", ["cat", "/usr/share/vmm-test/a"])
    assert res.exit_code == 0 and res.stdout == b"a"


async def test_the_host_makes_the_progress_items_the_cli_shows(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    """One record from the host to the CLI: the build's steps and the VMs' are
    ``Progress`` items of this host's name, made here and streamed as they are."""
    items: list[Progress] = []
    await node.vms.request_local("web", 1, ["a"], progress=items.append)
    assert {i.task for i in items} == {"h1"}
    phases = [i.phase for i in items]
    assert "vm web-1" in phases and phases[-1] == "done", phases
    assert items[-1].fraction == 1.0
    assert any(p not in ("vm web-1", "done") for p in phases), "the build's steps too"


async def test_vms_of_one_request_boot_side_by_side_up_to_the_cores(
    tmp_path: Path, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    hv = FakeHypervisor(repo_packages=frozenset({"a"}), agent_seconds=10.0)
    n = Node(tmp_path / "data", hv, store, cores=2, ssh_ports=range(42000, 42100))
    async with trio.open_nursery() as nursery:
        await nursery.start(n.vms.run)
        await n.vms.request_local("warm", 1, ["a"])  # the template exists from here
        t0 = trio.current_time()
        report = await n.vms.request_local("web", 3, ["a"])
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert [v.name for v in report.vms] == ["web-1", "web-2", "web-3"]
    assert not report.built and all(v.phases["install"] == 0.0 for v in report.vms)
    # three boots of 10 s, two at a time (two cores): 20 s, not 30 s
    assert 20.0 <= elapsed < 30.0, elapsed
    ports = [v.ssh_port for v in n.vms.list_vms()]
    assert len(set(ports)) == len(ports) and 0 not in ports, "each VM its own forward"


async def test_shutdown_by_name_deletes_overlay_keeps_template(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    await node.vms.request_local("job", 2, ["a"])
    await node.vms.request_local("other", 1, ["a"])
    stopped = await node.vms.shutdown("job")
    assert len(stopped) == 2
    assert [v.name for v in node.vms.list_vms()] == ["other-1"]
    assert sorted(p.name for p in node.vms.vm_dir.iterdir()) == [
        f"{node.vms.list_vms()[0].vm_id}.qcow2"
    ]
    assert len(node.vms.list_templates()) == 1
    await trio.testing.wait_all_tasks_blocked()
    assert node.stopped == []
    with pytest.raises(NotFound):
        await node.vms.exec("job-1", ["true"])


async def test_shutdown_by_order_ends_qemu_without_a_power_off(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    # The VM's disk is thrown away: a power-off inside the guest (5-6 s under TCG)
    # would only make the caller wait.
    report = await node.vms.request_local("web", 1)
    guest = node.hv.running[report.vms[0].vm_id]
    started = trio.current_time()
    await node.vms.shutdown("web")
    assert trio.current_time() - started < node.hv.shutdown_seconds
    assert guest.exited.is_set() and guest.exit_status == -9
    assert not any(c[:2] == ["systemctl", "poweroff"] for c in guest.exec_log)
    assert node.vms.list_vms() == []
    await trio.testing.wait_all_tasks_blocked()
    assert node.stopped == [], "an ordered stop is not an unexpected one"


async def test_unexpected_exit_is_recorded_and_reported(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    report = await node.vms.request_local("svc", 1)
    vm_id = report.vms[0].vm_id
    assert report.template == ""  # no packages: the base image serves
    node.hv.running[vm_id].exit(1)
    await trio.testing.wait_all_tasks_blocked()
    rec = node.vms.get(vm_id)
    assert rec.state == "lost"
    assert rec.stop_reason == "QEMU exited with status 1 without an order (guest powered off?)"
    assert [(e.vm_id, e.name, e.exit_status) for e in node.stopped] == [(vm_id, "svc-1", 1)]
    assert (node.vms.vm_dir / rec.disk).is_file()  # kept for a restart elsewhere


async def test_failed_template_leaves_no_vm(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(PackageInstallError, match="zzz"):
        await node.vms.request_local("x", 2, ["a", "zzz"])
    assert node.vms.list_vms() == []
    assert list(node.vms.vm_dir.iterdir()) == []
    assert node.vms.capacity().free_slots == 4


async def test_custom_zip_with_python(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    z = make_zip({"app/run.sh": b"#!/bin/sh\necho hi\n", "data.txt": b"x"}, 0o755)
    report = await node.vms.request_local("c", 1, custom_zip=check_zip(z))
    disk = node.vms.vm_dir / f"{report.vms[0].vm_id}.qcow2"
    files = files_on(disk)
    assert files["/opt/app/run.sh"].startswith(b"#!/bin/sh")
    assert files["/opt/data.txt"] == b"x"
    assert "custom" in report.vms[0].phases


async def test_custom_zip_without_python_goes_file_by_file(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    node.hv.guest_has_python = False
    z = make_zip({"app/bin/tool": b"T"}, 0o755)
    report = await node.vms.request_local("c", 1, custom_zip=check_zip(z))
    vm_id = report.vms[0].vm_id
    assert files_on(node.vms.vm_dir / f"{vm_id}.qcow2")["/opt/app/bin/tool"] == b"T"
    log = node.hv.running[vm_id].exec_log
    assert ["mkdir", "-p", "/opt/app/bin"] in log
    assert ["chmod", "755", "/opt/app/bin/tool"] in log


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "a\\b", "C:/x"])
def test_zip_with_unsafe_names_is_refused(name: str) -> None:
    with pytest.raises(UsageError):
        check_zip(make_zip({name: b"x"}))


def test_zip_symlinks_and_garbage_are_refused() -> None:
    with pytest.raises(UsageError, match="symbolic link"):
        check_zip(make_zip({"link": b"/etc/passwd"}, 0o777 | 0o020000))
    with pytest.raises(UsageError, match="not a zip"):
        check_zip(b"PK nonsense")


def test_request_name_of() -> None:
    assert request_name_of("web-3") == "web"
    assert request_name_of("web-1-12") == "web-1"
    assert request_name_of("web") == "web"
    assert request_name_of("web-x") == "web-x"


async def test_reserve_is_atomic_and_request_spills(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    assert node.vms.capacity().free_slots == 4  # 2 cores x 2.0
    assert node.vms.reserve(3) == 3
    assert node.vms.reserve(3) == 1
    assert node.vms.reserve(1) == 0
    node.vms.release(4)
    report = await node.vms.request_local("big", 6)
    assert len(report.vms) == 4 and report.unplaced == 2
    assert node.vms.capacity().free_slots == 0
    with pytest.raises(CapacityError):
        await node.vms.request_local("more", 1)
    await node.vms.shutdown("big")
    assert node.vms.capacity().free_slots == 4


async def test_a_new_policy_reaches_admission_and_creation(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    """The node sets ``policy`` when it re-reads its config (SIGHUP): a smaller quota
    leaves no room, a new VM size is what the next VM gets."""
    node.vms.policy = dataclasses.replace(POLICY, storage_quota_mb=100)
    assert node.vms.capacity().free_slots == 0
    node.vms.policy = dataclasses.replace(POLICY, vm_memory_mb=256)
    report = await node.vms.request_local("small", 1)
    assert node.vms.get(report.vms[0].name).memory_mb == 256


async def test_two_concurrent_requests_never_overbook(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    reports = []

    async def ask(name: str) -> None:
        reports.append(await node.vms.request_local(name, 3, ["a"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "p")
        nursery.start_soon(ask, "q")
    assert sum(len(r.vms) for r in reports) == 4
    assert sum(r.unplaced for r in reports) == 2
    assert len(node.vms.list_vms()) == 4


async def test_reconcile_after_restart(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    data = tmp_path / "data"
    async with trio.open_nursery() as nursery:
        old = Node(data, hv, store)
        await nursery.start(old.vms.run)
        survivor = (await old.vms.request_local("keep", 1, ["a"])).vms[0].vm_id
        dying = (await old.vms.request_local("die", 1, ["a"])).vms[0].vm_id
        # the node is "killed" while building a template
        with trio.move_on_after(hv.agent_seconds + hv.install_seconds / 2):
            await old.vms.request_local("half", 1, ["b"])
        nursery.cancel_scope.cancel()
    # simulate a kill -9 mid-build: the row and the temp file stay behind
    tm = old.templates
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO templates (template_id, base_image_id, packages, disk, state, created)"
            " VALUES ('abcdef0123456789', ?, '[\"b\"]', '.building-abcdef0123456789.qcow2',"
            " 'building', 0)",
            (tm.base.image_id,),
        )
        conn.execute(
            "INSERT INTO vms (vm_id, name, state, disk, created)"
            " VALUES ('0123456789abcdef', 'half-1', 'creating', '0123456789abcdef.qcow2', 0)"
        )
    (tm.dir / ".building-abcdef0123456789.qcow2").write_text("{}")
    (old.vms.vm_dir / "0123456789abcdef.qcow2").write_text("{}")
    (old.vms.vm_dir / "feedfeedfeedfeed.qcow2").write_text("{}")  # no row
    hv.running[dying].exit(137)  # QEMU died while no node watched it
    stray_dir = data / "run" / "abababababababab"  # a QEMU whose row never got written
    stray = await hv.start(
        BootSpec(
            name=stray_dir.name,
            disk=tm.base.disk,
            kernel=tm.base.kernel,
            initrd=tm.base.initrd,
            run_dir=stray_dir,
        )
    )

    async with trio.open_nursery() as nursery:
        new = Node(data, hv, store)
        await nursery.start(new.vms.run)
        changes = await new.vms.reconcile()
        assert changes
        states = {v.vm_id: v.state for v in new.vms.list_vms()}
        assert states == {survivor: "running", dying: "lost"}
        assert [e.vm_id for e in new.stopped] == [dying]
        assert stray.exited.is_set() and not stray_dir.exists()
        assert sorted(p.name for p in (data / "run").iterdir()) == [survivor]
        assert sorted(p.name for p in new.vms.vm_dir.iterdir()) == sorted(
            [f"{survivor}.qcow2", f"{dying}.qcow2"]
        )
        assert [t.packages for t in new.templates.records(include_building=True)] == [{"a"}]
        assert len(list(new.templates.dir.iterdir())) == 1
        # the re-adopted VM is watched again
        hv.running[survivor].exit(1)
        await trio.testing.wait_all_tasks_blocked()
        assert new.vms.get(survivor).state == "lost"
        nursery.cancel_scope.cancel()
