"""Capacity: the pure rule, the /proc/meminfo parser and the probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmesh.config import Config
from vmmesh.errors import StateError
from vmmesh.host.capacity import (
    CapacityPolicy,
    HostProbe,
    Usage,
    compute_capacity,
    count_cores,
    disk_used_mb,
    parse_meminfo,
    probe_host,
)

POLICY = CapacityPolicy(
    storage_quota_mb=10_000,
    cpu_overcommit=2.0,
    memory_reserve_mb=1024,
    vm_vcpus=1,
    vm_memory_mb=1024,
    vm_disk_allowance_mb=1000,
)


def test_idle_host_cpu_bound() -> None:
    cap = compute_capacity(HostProbe(2, 16_384, 100_000), Usage(), POLICY)
    assert cap.free_vm_slots == 4  # 2 cores x 2.0
    assert cap.free_disk_slots == 10
    assert cap.free_slots == 4
    assert cap.storage_free_mb == 10_000


def test_memory_bound_and_reserve() -> None:
    cap = compute_capacity(HostProbe(16, 4096, 100_000), Usage(), POLICY)
    assert cap.free_vm_slots == 3  # (4096 - 1024) // 1024


def test_running_vms_and_reservations_count() -> None:
    usage = Usage(running_vms=2, vcpus=2, memory_mb=2048, disk_used_mb=2500, reserved_vms=1)
    cap = compute_capacity(HostProbe(2, 16_384, 100_000), usage, POLICY)
    assert cap.free_vm_slots == 1
    assert cap.running_vms == 2
    assert cap.storage_free_mb == 7500
    assert cap.free_disk_slots == 6  # 7500 // 1000 - 1 reserved


def test_file_system_caps_quota_and_never_negative() -> None:
    cap = compute_capacity(HostProbe(1, 512, 1500), Usage(vcpus=8, disk_used_mb=20_000), POLICY)
    assert cap.free_vm_slots == 0
    assert cap.free_disk_slots == 0
    assert cap.storage_free_mb == 0
    cap = compute_capacity(HostProbe(8, 65_536, 1500), Usage(), POLICY)
    assert cap.storage_free_mb == 1500
    assert cap.free_disk_slots == 1


def test_fractional_overcommit_rounds_down() -> None:
    policy = CapacityPolicy(cpu_overcommit=1.5, memory_reserve_mb=0, vm_memory_mb=1)
    assert compute_capacity(HostProbe(3, 10_000, 100_000), Usage(), policy).free_vm_slots == 4


def test_policy_from_config() -> None:
    cfg = Config(storage_quota_mb=123, cpu_overcommit=3.0, vm_disk_allowance_mb=7)
    p = CapacityPolicy.from_config(cfg)
    assert (p.storage_quota_mb, p.cpu_overcommit, p.vm_disk_allowance_mb) == (123, 3.0, 7)


def test_parse_meminfo() -> None:
    text = "MemFree:  100 kB\nMemTotal:       24684448 kB\nSwapTotal: 0 kB\n"
    assert parse_meminfo(text) == 24684448 // 1024
    with pytest.raises(StateError):
        parse_meminfo("MemFree: 1 kB\n")


def test_probe_reads_this_machine(tmp_path: Path) -> None:
    probe = probe_host(tmp_path)
    assert probe.cores == count_cores() >= 1
    assert probe.memory_mb > 0
    assert probe.fs_free_mb >= 0


def test_disk_used_counts_vms_and_templates_only(tmp_path: Path) -> None:
    for sub in ("vms", "templates", "images"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x").write_bytes(b"\1" * (3 << 20))
    assert 6 <= disk_used_mb(tmp_path) <= 7
    assert disk_used_mb(tmp_path / "nothing") == 0
