"""Warm starts with real QEMU guests (TCG): three clones of one saved boot are three
machines, a state of another shape is not used, a corrupt one is deleted."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.aptrepo import AptRepo, apt_repo
from tests.warmseed import link_seed
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, probe_host
from vmmesh.host.images import read_manifest
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.base import BootSpec
from vmmesh.hypervisor.qemu import QemuGuest, QemuHypervisor
from vmmesh.vm.manager import VmManager

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))
__all__ = ["apt_repo"]  # fixture

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (BASE_DIR / "manifest.json").is_file() or shutil.which("qemu-system-x86_64") is None,
        reason=f"needs qemu-system-x86_64 and a base image in {BASE_DIR}",
    ),
]


class RecordingQemu(QemuHypervisor):
    def __init__(self) -> None:
        super().__init__(accel="tcg")
        self.guests: list[QemuGuest] = []

    async def start(self, spec: BootSpec) -> QemuGuest:
        guest = await super().start(spec)
        self.guests.append(guest)
        return guest


@pytest.fixture
async def mgr(tmp_path: Path, store: Store, apt_repo: AptRepo) -> AsyncIterator[VmManager]:
    hv = RecordingQemu()
    data = tmp_path / "data"
    base = BaseImage(BASE_DIR.resolve(), read_manifest(BASE_DIR).manifest)
    link_seed(data, BASE_DIR, base.image_id)
    templates = TemplateManager(
        store=store,
        hypervisor=hv,
        data_dir=data,
        base=base,
        apt_sources=[apt_repo.source_line()],
        agent_timeout=240.0,
    )
    vms = VmManager(
        store=store,
        hypervisor=hv,
        templates=templates,
        data_dir=data,
        policy=CapacityPolicy(cpu_overcommit=4.0, vm_vcpus=1, vm_memory_mb=512),
        probe=lambda: probe_host(data),
        host="h1",
        node_id="0123456789abcdef",
        agent_timeout=240.0,
        warm=WarmStore(data, hv, base, agent_timeout=240.0),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vms.run)
            yield vms
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for guest in hv.guests:
                await guest.kill()


async def _warmed(mgr: VmManager, tid: str) -> None:
    assert mgr.warm is not None
    with trio.fail_after(900):
        while mgr.warm.get(tid) is None:  # noqa: ASYNC110 - made in the background
            await trio.sleep(0.5)


async def _spare_of(mgr: VmManager, tid: str) -> str:
    with trio.fail_after(600):
        while (spare := mgr.spares.spare) is None or spare.key != tid:  # noqa: ASYNC110
            await trio.sleep(0.2)
    return spare.vm_id


async def _out(mgr: VmManager, vm: str, script: str) -> bytes:
    res = await mgr.exec(vm, ["sh", "-c", script])
    assert res.exit_code == 0, res
    return res.stdout.strip()


async def test_three_warm_clones_are_three_machines(mgr: VmManager) -> None:
    # The base image's warm state (the suite's seed, or one boot): VMs with no
    # packages resume it, and so does the build of a template, whose guest is then
    # saved as that template's own warm state instead of being powered off.
    base = mgr.templates.base.image_id
    mgr.schedule_warm(None)
    await _warmed(mgr, base)
    plain = await mgr.request_local("plain", 1)
    assert [v.start for v in plain.vms] == ["warm"], plain
    assert await _out(mgr, plain.vms[0].name, "hostname") == plain.vms[0].name.encode()
    first = await mgr.request_local("w", 1, ["vmm-test-a"])
    tid = first.template
    print("from a new template:", {k: round(v, 1) for k, v in first.vms[0].phases.items()})
    assert first.built and "resume" in first.template_seconds, first.template_seconds
    assert "boot" not in first.template_seconds, "the build resumed the base image's state"
    assert [v.start for v in first.vms] == ["warm"], "its first VM resumed the build"
    name = first.vms[0].name
    assert await _out(mgr, name, "cat /usr/share/vmm-test-a/marker") == b"vmm-test-a"
    clock = float(await _out(mgr, name, "date +%s"))
    assert abs(clock - time.time()) < 120, "the clock was set after the resume"
    await mgr.shutdown("plain")
    started = trio.current_time()
    await _warmed(mgr, tid)
    assert mgr.warm is not None
    state = mgr.warm.get(tid)
    assert state is not None
    print(
        f"warm state made in {state.made_seconds:.1f} s, {state.size() / 1e6:.0f} MB "
        f"(waited {trio.current_time() - started:.1f} s)"
    )
    clones = await mgr.request_local("w", 3, ["vmm-test-a"])
    assert [v.start for v in clones.vms] == ["warm"] * 3, clones
    for v in clones.vms:
        print(f"{v.name}: resumed and ready in {v.phases['vm_resume']:.2f} s")
    names = [v.name for v in clones.vms]
    hostnames = {await _out(mgr, n, "hostname") for n in names}
    machine_ids = {await _out(mgr, n, "cat /etc/machine-id") for n in names}
    randoms = {await _out(mgr, n, "head -c 16 /dev/urandom | od -An -tx1") for n in names}
    assert len(hostnames) == len(machine_ids) == len(randoms) == 3
    assert hostnames == {n.encode() for n in names}
    await _out(mgr, names[0], "echo mine > /root/only-here && sync")
    for other in names[1:]:
        res = await mgr.exec(other, ["cat", "/root/only-here"])
        assert res.exit_code != 0, "a file written in one clone is not in the others"
    marker = await _out(mgr, names[1], "cat /usr/share/vmm-test-a/marker")
    assert marker == b"vmm-test-a"

    # The next VM of the template waits resumed (a warm spare, made once
    # the host is idle): taking it is a wake-up, and it is a machine of its own.
    spare_id = await _spare_of(mgr, tid)
    t = time.monotonic()
    nxt = await mgr.request_local("w", 1, ["vmm-test-a"])
    took = time.monotonic() - t
    [vm] = nxt.vms
    assert vm.vm_id == spare_id and vm.start == "warm" and "spare" in vm.start_note, vm
    print(f"{vm.name}: from the warm spare in {took:.2f} s: {vm.phases}")
    assert await _out(mgr, vm.name, "hostname") == vm.name.encode()
    assert await _out(mgr, vm.name, "cat /etc/machine-id") not in machine_ids
    clock = float(await _out(mgr, vm.name, "date +%s"))
    assert abs(clock - time.time()) < 120, "the clock was set when it woke"
    await mgr.shutdown("w")
    mgr.spares.enabled = False  # what follows is about the warm state, not a spare
    mgr.spares.hold_off()
    mgr.spares.check(True)

    # another shape (memory) is not resumed: a cold boot, and why
    big = await mgr.request_local("big", 1, ["vmm-test-a"], memory_mb=768)
    [vm] = big.vms
    assert vm.start == "cold" and "memory_mb 512 != 768" in vm.start_note, vm

    # a corrupt state: the VM still comes up (cold), the state is gone
    state.state.write_bytes(os.urandom(4096))
    again = await mgr.request_local("again", 1, ["vmm-test-a"])
    [vm] = again.vms
    assert vm.start == "cold" and "did not resume" in vm.start_note, vm
    assert await _out(mgr, vm.name, "hostname") == vm.name.encode()
    assert mgr.warm.get(tid) is None or mgr.warm.making(tid)
