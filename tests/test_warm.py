"""Warm states over the fake hypervisor: made in the background, used when the shape
fits, deleted when they fail, never in a request's way (real guests: test_warm_real)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.fakehv import FakeHypervisor, make_base_image
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, HostProbe
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import SAVING, WarmStore
from vmmesh.vm.manager import VmManager

POLICY = CapacityPolicy(
    storage_quota_mb=10_000,
    cpu_overcommit=2.0,
    memory_reserve_mb=0,
    vm_vcpus=1,
    vm_memory_mb=512,
    vm_disk_allowance_mb=1000,
)


class Host:
    def __init__(
        self,
        data: Path,
        hv: FakeHypervisor,
        store: Store,
        cores: int = 2,
        policy: CapacityPolicy = POLICY,
    ) -> None:
        image_dir = data / "images" / "base"
        image_dir.mkdir(parents=True, exist_ok=True)
        base = BaseImage(image_dir, make_base_image(image_dir))
        self.hv = hv
        self.templates = TemplateManager(store=store, hypervisor=hv, data_dir=data, base=base)
        self.warm = WarmStore(data, hv, base)
        self.vms = VmManager(
            store=store,
            hypervisor=hv,
            templates=self.templates,
            data_dir=data,
            policy=policy,
            probe=lambda: HostProbe(cores=cores, memory_mb=8192, fs_free_mb=50_000),
            host="h1",
            node_id="0123456789abcdef",
            warm=self.warm,
        )

    async def warmed(self, tid: str) -> None:
        while self.warm.get(tid) is None:  # noqa: ASYNC110 - made by a background task
            await trio.sleep(0.1)


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor(
        repo_packages=frozenset({"a", "b"}), agent_seconds=5.0, install_seconds=5.0
    )


@pytest.fixture
async def host(tmp_path: Path, hv: FakeHypervisor, store: Store) -> AsyncIterator[Host]:
    h = Host(tmp_path / "data", hv, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        yield h
        nursery.cancel_scope.cancel()


async def test_the_second_request_gets_warm_vms(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    assert [v.start for v in first.vms] == ["cold"]
    tid = first.template
    await host.warmed(tid)  # made after the request, in the background
    second = await host.vms.request_local("web", 2, ["a"])
    assert [v.start for v in second.vms] == ["warm", "warm"]
    assert "vm_resume" in second.vms[0].phases and "vm_boot" not in second.vms[0].phases
    assert sorted(host.hv.resumed) == sorted(v.vm_id for v in second.vms)
    rows = {v.name: v for v in host.vms.list_vms()}
    assert rows["web-2"].start_kind == "warm" and rows["web-1"].start_kind == "cold"
    # the warm overlay sits between the template and each VM's own overlay
    state = host.warm.get(tid)
    assert state is not None and state.size() > 0


async def test_another_shape_boots_cold_and_says_why(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    await host.warmed(first.template)
    big = await host.vms.request_local("big", 1, ["a"], memory_mb=1024)
    [vm] = big.vms
    assert vm.start == "cold"
    assert vm.start_note == "warm state has another shape: memory_mb 512 != 1024"
    assert host.warm.get(first.template) is not None, "kept for VMs it fits"


async def test_a_corrupt_state_is_deleted_and_the_vm_boots_cold(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    tid = first.template
    await host.warmed(tid)
    state = host.warm.get(tid)
    assert state is not None
    state.state.write_bytes(b"\x00garbage")
    again = await host.vms.request_local("web", 1, ["a"])
    [vm] = again.vms
    assert vm.start == "cold" and "did not resume" in vm.start_note, vm
    assert host.vms.get(vm.name).state == "running"
    assert not (host.warm.dir / tid).exists() or host.warm.making(tid), "the bad state is gone"


async def test_a_half_saved_state_is_removed_at_start(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    tid = first.template
    await host.warmed(tid)
    (host.warm.dir / f"{SAVING}{tid}").mkdir()  # the node was killed while saving
    (host.warm.dir / f"{SAVING}{tid}" / "state.tmp").write_bytes(b"half")
    (host.warm.dir / ("ab" * 16)).mkdir()  # a state whose template is gone
    removed = await host.vms.reconcile()
    assert f"warm state {SAVING}{tid}" in removed
    assert f"warm state {'ab' * 16}" in removed
    assert sorted(p.name for p in host.warm.dir.iterdir()) == [tid]


async def test_warm_starts_can_be_turned_off(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    await host.warmed(first.template)
    host.vms.warm_enabled = False
    again = await host.vms.request_local("web", 1, ["a"])
    assert [v.start for v in again.vms] == ["cold"]


async def test_the_warm_state_goes_with_its_template(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    first = await host.vms.request_local("web", 1, ["a"])
    tid = first.template
    await host.warmed(tid)
    await host.vms.shutdown("web")
    host.templates.remove(tid)
    assert not (host.warm.dir / tid).exists()


async def test_a_warm_boot_gives_way_to_a_request(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """One free slot, taken by a warm boot: a request for a VM gets it at once."""
    h = Host(tmp_path / "d", hv, store, cores=1)  # two slots (overcommit 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        first = await h.vms.request_local("web", 1, ["a"])
        tid = first.template
        while not h.warm.making(tid):  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert h.vms.capacity().free_slots == 0, "the warm boot holds the last slot"
        second = await h.vms.request_local("other", 1)
        assert len(second.vms) == 1 and second.unplaced == 0
        await trio.testing.wait_all_tasks_blocked()
        assert h.warm.get(tid) is None and not h.warm.making(tid)
        assert not any(p.name.startswith(SAVING) for p in h.warm.dir.iterdir())
        nursery.cancel_scope.cancel()


def test_shape_json_round_trip(tmp_path: Path) -> None:
    from vmmesh.hypervisor.savedstate import Shape

    shape = Shape.of({"memory_mb": 512, "qemu": "QEMU emulator version 7.2.19"})
    assert Shape.from_json(json.loads(json.dumps(shape.to_json()))) == shape
    assert Shape.from_json({"memory_mb": 5}) is None
    assert shape.differs(Shape.of({"memory_mb": 1024, "qemu": "QEMU emulator version 7.2.19"}))


async def test_a_warm_boot_put_off_for_want_of_a_slot_is_made_once_one_frees(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """The host was full when its template was made: the warm state comes later, when a
    slot is free, without another request for the template."""
    h = Host(tmp_path / "d", hv, store, cores=1)  # two slots (overcommit 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        first = await h.vms.request_local("web", 2, ["a"])  # both slots taken
        tid = first.template
        await trio.sleep(30.0)
        assert h.warm.get(tid) is None and not h.warm.making(tid), "no slot: put off"
        await h.vms.shutdown("web")
        with trio.fail_after(120.0):  # the autojump clock: virtual seconds
            await h.warmed(tid)
        nursery.cancel_scope.cancel()


async def test_a_warm_boot_that_gave_way_to_a_request_is_made_again(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """A request took the warm boot's slot midway: once a slot frees, the warm boot is
    made again with no other request for its template (a CI run saw one never made)."""
    h = Host(tmp_path / "d", hv, store, cores=1)  # two slots (overcommit 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        first = await h.vms.request_local("web", 1, ["a"])
        tid = first.template
        while not h.warm.making(tid):  # noqa: ASYNC110 - started in the background
            await trio.sleep(0.1)
        await h.vms.request_local("big", 1, ["b"])  # another template: the warm boot's slot
        assert h.warm.get(tid) is None and not h.warm.making(tid), "it gave way"
        await h.vms.shutdown("big")
        with trio.fail_after(120.0):  # the autojump clock: virtual seconds
            await h.warmed(tid)
        nursery.cancel_scope.cancel()


def _inflate(directory: Path, mb: int) -> None:
    """Give a fake saved state the size of a real one (allocated, not sparse)."""
    fd = os.open(directory / "ram.pad", os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, mb << 20)
    finally:
        os.close(fd)


async def test_warm_states_live_in_the_quota_but_never_take_a_vms_room(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    # Room for three VM disks of 100 MB and a little more.
    policy = dataclasses.replace(POLICY, storage_quota_mb=350, vm_disk_allowance_mb=100)
    h = Host(tmp_path / "d", hv, store, policy=policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        first = await h.vms.request_local("web", 1, ["a"])
        a = first.template
        await h.warmed(a)
        state = h.warm.get(a)
        assert state is not None
        _inflate(state.directory, 200)
        # Over the quota now (two VMs' room and 200 MB of state), but a warm state a
        # VM's disk is made from never goes.
        second = await h.vms.request_local("web", 1, ["a"])
        assert [v.start for v in second.vms] == ["warm"]
        await trio.sleep(30)
        assert h.warm.get(a) is not None
        # No VM of it left, and room enough: a cache is kept while it fits.
        await h.vms.shutdown("web")
        await trio.sleep(30)
        assert h.warm.get(a) is not None
        # Three VMs need all but 50 MB of the quota: the unused state goes, the VMs
        # get their slots, and no new state is made where it does not fit.
        big = await h.vms.request_local("big", 3, ["b"])
        assert len(big.vms) == 3 and big.unplaced == 0
        assert h.warm.get(a) is None
        await trio.sleep(60)
        assert h.warm.sizes() == {}, "no room for a warm state of b"
        nursery.cancel_scope.cancel()


async def _base_warmed(host: Host) -> str:
    """Have the base image's warm state made (the node schedules it when it starts)."""
    key = host.templates.base.image_id
    host.vms.schedule_warm(None)
    await host.warmed(key)
    return key


async def test_a_vm_with_no_packages_resumes_the_base_images_state(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    await _base_warmed(host)
    plain = await host.vms.request_local("plain", 2)
    assert [v.start for v in plain.vms] == ["warm", "warm"], plain
    assert sorted(host.hv.resumed) == sorted(v.vm_id for v in plain.vms)


async def test_a_build_resumes_its_parents_state_and_leaves_its_own(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    """No boot for a build over a warm parent, and none for the template's first VM:
    the build guest resumes the base image's state and is saved, not powered off."""
    await _base_warmed(host)
    first = await host.vms.request_local("web", 1, ["a"])
    tid = first.template
    assert first.built
    [vm] = first.vms
    assert {"resume", "save"} <= set(first.template_seconds), first.template_seconds
    assert not {"boot", "shutdown"} & set(first.template_seconds), first.template_seconds
    assert host.warm.get(tid) is not None, "the build's own state, kept at once"
    assert vm.start == "warm", vm
    assert any(name.startswith("tpl-") for name in host.hv.resumed), host.hv.resumed
    assert not any(p.name.startswith(SAVING) for p in host.warm.dir.iterdir())
    # the template holds the package and names the base image as its backing file
    rec = host.templates.get(tid)
    assert rec.chain and rec.parent_id is None
    # a template over it resumes the parent template's state in turn
    child = await host.vms.request_local("more", 1, ["a", "b"])
    assert "resume" in child.template_seconds and child.vms[0].start == "warm", child
    assert host.templates.get(child.template).parent_id == tid


async def test_a_parent_state_that_does_not_resume_costs_the_build_only_the_try(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    key = await _base_warmed(host)
    state = host.warm.get(key)
    assert state is not None
    state.state.write_bytes(b"\x00garbage")
    first = await host.vms.request_local("web", 1, ["a"])
    assert first.built and "boot" in first.template_seconds, first.template_seconds
    assert "resume" not in first.template_seconds
    assert [v.start for v in first.vms] == ["cold"]
    assert host.vms.get("web-1").state == "running"
    assert not any(p.name.startswith(SAVING) for p in host.warm.dir.iterdir()) or (
        host.warm.making(first.template)
    ), "no half-kept state of the build"


async def test_a_new_vm_size_makes_the_warm_states_again_but_one_a_vm_sits_on(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    """The host's VM size changed (config reload, or a restart with a new config): the
    warm states of the old size would never resume a default VM again, so they are made
    again at the new size; one a running VM's disk sits on stays until it is free."""
    await _base_warmed(host)
    first = await host.vms.request_local("web", 1, ["a"])
    tid, base = first.template, host.templates.base.image_id
    assert host.warm.get(tid) is not None
    host.vms.policy = dataclasses.replace(POLICY, vm_memory_mb=1024)
    host.vms.warm_sched.refit()
    assert host.warm.get(tid) is not None, "web-1's disk sits on it"
    await host.warmed(base)
    state = host.warm.get(base)
    assert state is not None and dict(state.shape.fields)["memory_mb"] == "1024"
    plain = await host.vms.request_local("plain", 1)
    assert [v.start for v in plain.vms] == ["warm"], plain
    await host.vms.shutdown("web")
    host.vms.warm_sched.refit()
    await host.warmed(tid)
    state = host.warm.get(tid)
    assert state is not None and dict(state.shape.fields)["memory_mb"] == "1024"
