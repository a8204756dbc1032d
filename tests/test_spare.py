"""Warm spares over the fake hypervisor: made after a warm request when the host is idle,
taken by the next VM of the template, given up to any request that needs the slot,
dropped when their warm state changes, gone with the node (real guests: test_warm_real)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.fakehv import FakeHypervisor
from tests.test_warm import POLICY, Host, host
from vmmesh.host.store import Store
from vmmesh.vm.spare import PLACEHOLDER, SPARE_DELAY

__all__ = ["host"]  # fixture (its Host over this module's `hv`)


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor(
        repo_packages=frozenset({"a", "b"}), agent_seconds=0.5, install_seconds=5.0
    )


async def _spared(host: Host, key: str) -> str:
    """Wait until the spare of ``key`` is ready; its VM id."""
    while (spare := host.vms.spares.spare) is None or spare.key != key:  # noqa: ASYNC110
        await trio.sleep(0.1)
    return spare.vm_id


async def _warm_template(host: Host) -> str:
    first = await host.vms.request_local("web", 1, ["a"])
    await host.warmed(first.template)
    return first.template


async def _with_spare(host: Host) -> tuple[str, str]:
    """A template of `a` with its warm state and, after a warm request, its spare:
    (template id, the spare's VM id)."""
    tid = await _warm_template(host)
    await host.vms.request_local("web", 1, ["a"])
    return tid, await _spared(host, tid)


async def test_the_next_warm_vm_is_the_spare_made_after_a_warm_request(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    tid = await _warm_template(host)
    assert host.vms.spares.spare is None, "a cold request leaves no spare"
    second = await host.vms.request_local("web", 1, ["a"])
    assert [v.start for v in second.vms] == ["warm"]
    spare_id = await _spared(host, tid)
    spare = host.vms.spares.spare
    assert spare is not None
    [guest] = [g for g in host.hv.started if g.name == spare_id]
    # it became a machine of its own, under a placeholder name
    assert any(PLACEHOLDER in argv for argv in guest.exec_log)
    # not a VM: no row, and the mesh is told its slot is free
    assert spare_id not in {v.vm_id for v in host.vms.list_vms()}
    assert not (host.vms.vm_dir / f"{spare_id}.qcow2").exists(), "its disk is no VM's"
    assert (host.vms.spares.dir / f"{spare_id}.qcow2").exists()
    assert host.vms.offered().free_vm_slots == host.vms.capacity().free_vm_slots + 1

    third = await host.vms.request_local("web", 1, ["a"])
    [vm] = third.vms
    assert vm.vm_id == spare_id and vm.start == "warm"
    assert "spare" in vm.start_note
    assert any("web-3" in argv for argv in guest.exec_log), "it became itself"
    assert "vm_clone" not in vm.phases
    assert host.vms.spares.spare is None
    # its disk has the VM's name too; the first one, which QEMU holds, stays with it
    first, disk = host.vms.spares.dir / f"{spare_id}.qcow2", host.vms.vm_dir / f"{spare_id}.qcow2"
    assert first.stat().st_ino == disk.stat().st_ino
    row = host.vms.get("web-3")
    assert row.state == "running" and row.pid == guest.pid
    assert not host.vms.admission.spare_held and host.vms.admission.reserved == 0
    # a node that starts again keeps that name (the VM's QEMU still runs)
    assert "orphan spare" not in " ".join(host.vms.spares.reconcile())
    assert first.exists()
    # and the next spare is made for the request after that
    assert await _spared(host, tid) != spare_id
    await host.vms.shutdown("web")
    assert not first.exists() and not disk.exists(), "both names go with the VM"


async def test_a_request_that_starts_stops_a_spare_being_made(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    tid = await _warm_template(host)
    await host.vms.request_local("web", 1, ["a"])
    await trio.sleep(SPARE_DELAY / 2)
    resumed = len(host.hv.resumed)
    await host.vms.request_local("web", 1, ["a"])  # within the idle delay
    assert len(host.hv.resumed) == resumed + 1, "no spare was resumed beside it"
    await _spared(host, tid)


async def test_a_request_that_needs_the_slot_gets_it_and_the_spare_goes(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    # Three slots of 512 MB; a spare of `a` holds one of them.
    policy = dataclasses.replace(POLICY, memory_reserve_mb=8192 - 3 * 512)
    h = Host(tmp_path / "d", hv, store, policy=policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        _, spare_id = await _with_spare(h)
        assert h.vms.capacity().free_vm_slots == 0
        assert h.vms.offered().free_vm_slots == 1
        # a VM of another template needs the last slot: the spare gives it up
        other = await h.vms.request_local("other", 1, ["b"])
        assert len(other.vms) == 1 and other.unplaced == 0
        await trio.sleep(1)
        assert h.vms.spares.spare is None
        assert not (h.vms.spares.dir / f"{spare_id}.qcow2").exists()
        assert not (h.vms.run_root / spare_id).exists()
        [spare_guest] = [g for g in hv.started if g.name == spare_id]
        assert spare_guest.exited.is_set()
        nursery.cancel_scope.cancel()


async def test_a_vm_of_another_shape_leaves_the_spare_for_the_usual_ones(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    _, spare_id = await _with_spare(host)
    big = await host.vms.request_local("big", 1, ["a"], memory_mb=1024)
    assert big.vms[0].vm_id != spare_id
    spare = host.vms.spares.spare
    assert spare is not None and spare.vm_id == spare_id


async def test_a_spare_whose_warm_state_was_made_again_is_never_used(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    tid, spare_id = await _with_spare(host)
    state = host.warm.get(tid)
    assert state is not None
    # the same path, another file: the spare's overlay would sit on the wrong disk
    fresh = state.disk.with_name("fresh")
    fresh.write_bytes(state.disk.read_bytes())
    os.replace(fresh, state.disk)
    vm = (await host.vms.request_local("web", 1, ["a"])).vms[0]
    assert vm.vm_id != spare_id and vm.start == "warm"
    await trio.sleep(1)
    assert not (host.vms.spares.dir / f"{spare_id}.qcow2").exists()


async def test_the_spare_goes_with_its_template_and_when_spares_are_turned_off(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    tid, spare_id = await _with_spare(host)
    host.vms.spares.enabled = False
    await trio.sleep(15)  # the manager's periodic check
    assert host.vms.spares.spare is None
    assert not (host.vms.spares.dir / f"{spare_id}.qcow2").exists()
    assert not host.vms.admission.spare_held
    await host.vms.request_local("web", 1, ["a"])
    await trio.sleep(10)
    assert host.vms.spares.spare is None, "off: none is made"
    host.vms.spares.enabled = True  # on again: the latest warm request's is made
    await _spared(host, tid)


async def test_a_held_back_host_drops_its_spare_and_makes_none_until_it_is_let_go(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    """A draining host (migration holds spares back) keeps none: the one it has goes at
    once when checked, none is made while held back, the wanted one comes back after."""
    tid, spare_id = await _with_spare(host)
    why = "the host drains"
    host.vms.spares.held_back = lambda: why
    host.vms.spares.check(True)
    assert host.vms.spares.spare is None and not host.vms.admission.spare_held
    await trio.sleep(25)  # two periodic checks, and more than the idle delay
    assert host.vms.spares.spare is None, "held back: none is made"
    assert not (host.vms.spares.dir / f"{spare_id}.qcow2").exists()
    why = ""
    await _spared(host, tid)


async def test_a_stopping_node_kills_its_spare_and_a_killed_one_is_reconciled(
    tmp_path: Path, hv: FakeHypervisor, store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    h = Host(tmp_path / "d", hv, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.vms.run)
        tid, spare_id = await _with_spare(h)
        nursery.cancel_scope.cancel()
    [guest] = [g for g in hv.started if g.name == spare_id]
    assert guest.exited.is_set()
    assert not (h.vms.spares.dir / f"{spare_id}.qcow2").exists()

    # A node that starts again makes the spare of the latest warm request, unasked;
    # killed outright, it leaves the spare's disk and run directory, no row.
    h2 = Host(tmp_path / "d", hv, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h2.vms.run)
        spare_id = await _spared(h2, tid)
        h2.vms.spares.spare = None  # as if the node died: nothing cleans up
        nursery.cancel_scope.cancel()
    assert (h2.vms.spares.dir / f"{spare_id}.qcow2").exists()
    h3 = Host(tmp_path / "d", hv, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h3.vms.run)
        changes = await h3.vms.reconcile()
        nursery.cancel_scope.cancel()
    assert f"orphan spare spares/{spare_id}.qcow2" in changes
    assert not (h3.vms.run_root / spare_id).exists()
