"""How many more VMs this host can run and store.

Theory of operation: the probe (``probe_host``) reads the machine once —
cores, total memory, free bytes of the data directory's file system — and
``compute_capacity`` turns that, plus what is already used, into a
``vmmesh.api.host.Capacity``.  The computation is pure so that tests (and the
node, for "what if I admitted N more") need no machine.

Rules, with their settings (all in ``vmmesh.config.Config``):

* **running VMs** (thesis §3.1.1, cores and memory): a host offers
  ``floor(cores * cpu_overcommit)`` vCPUs; a VM of the default size takes
  ``vm_vcpus`` of them.  Memory is *not* overcommitted: the host keeps
  ``memory_reserve_mb`` of its total memory for itself and every running VM
  holds its full ``memory_mb``.  ``free_vm_slots`` is the smaller of the two
  counts of default-size VMs that still fit.  Accounting uses what VMs were
  *given*, not what the kernel reports free right now, so the figure does not
  jitter with page cache and is the same before and after a guest touches its
  memory.
* **VM disks** (thesis §3.1.5, the storage quota given at install): VM
  overlays and templates under the data directory count against
  ``storage_quota_mb``; each new VM is assumed to need
  ``vm_disk_allowance_mb`` (an overlay grows as the guest writes).  The room is
  also capped by what the file system really has free.
  ``free_disk_slots = room // vm_disk_allowance_mb``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from vmmesh.api.host import Capacity
from vmmesh.config import Config
from vmmesh.errors import StateError

# Sub-directories of the data dir whose files count against the quota.
QUOTA_DIRS = ("vms", "templates", "warm", "packs")


@dataclass(frozen=True)
class CapacityPolicy:
    """The settings that turn a machine into slots (see the module docstring).

    The settings and their defaults are declared once, in ``Config``; this is
    the part of them capacity needs, by the same names.
    """

    storage_quota_mb: int = Config.storage_quota_mb
    cpu_overcommit: float = Config.cpu_overcommit
    memory_reserve_mb: int = Config.memory_reserve_mb
    vm_vcpus: int = Config.vm_vcpus
    vm_memory_mb: int = Config.vm_memory_mb
    vm_disk_allowance_mb: int = Config.vm_disk_allowance_mb

    @classmethod
    def from_config(cls, cfg: Config) -> CapacityPolicy:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class HostProbe:
    """What the machine has, read once."""

    cores: int
    memory_mb: int
    fs_free_mb: int


@dataclass(frozen=True)
class Usage:
    """What this host already gave away.

    ``reserved_vms`` are admitted but not yet created (``VmManager.reserve``);
    they count as default-size VMs for cores, memory and disk.
    """

    running_vms: int = 0
    vcpus: int = 0
    memory_mb: int = 0
    disk_used_mb: int = 0
    reserved_vms: int = 0


def compute_capacity(
    probe: HostProbe, usage: Usage, policy: CapacityPolicy, blocked: str = ""
) -> Capacity:
    """Pure: slots left for running VMs and for VM disks.

    ``blocked`` says why this host runs no VMs at all (no base image, no
    accelerator); then it offers none.  A quota too small for a single VM
    says so too, so a request that cannot be placed can tell the user why.
    """
    vcpu_budget = int(probe.cores * policy.cpu_overcommit)
    vcpus_left = vcpu_budget - usage.vcpus - usage.reserved_vms * policy.vm_vcpus
    memory_left = (
        probe.memory_mb
        - policy.memory_reserve_mb
        - usage.memory_mb
        - usage.reserved_vms * policy.vm_memory_mb
    )
    by_cpu = vcpus_left // max(1, policy.vm_vcpus)
    by_memory = memory_left // max(1, policy.vm_memory_mb)
    free_vm_slots = max(0, min(by_cpu, by_memory)) if not blocked else 0

    quota_left = policy.storage_quota_mb - usage.disk_used_mb
    storage_free = max(0, min(quota_left, probe.fs_free_mb))
    disk_slots = storage_free // max(1, policy.vm_disk_allowance_mb) - usage.reserved_vms
    if not blocked and policy.storage_quota_mb < policy.vm_disk_allowance_mb:
        blocked = (
            f"storage quota {policy.storage_quota_mb} MB is below one VM's disk allowance "
            f"({policy.vm_disk_allowance_mb} MB)"
        )
    return Capacity(
        cores=probe.cores,
        memory_mb=probe.memory_mb,
        storage_quota_mb=policy.storage_quota_mb,
        storage_free_mb=storage_free,
        free_vm_slots=free_vm_slots,
        free_disk_slots=max(0, disk_slots),
        running_vms=usage.running_vms,
        blocked=blocked,
    )


def parse_meminfo(text: str) -> int:
    """MemTotal from /proc/meminfo, in MiB."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            kib = int(fields[1])
            return kib // 1024
    raise StateError("/proc/meminfo has no MemTotal line")


def count_cores() -> int:
    """Cores this process may use (affinity first: a pinned node must not count all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_host(data_dir: Path, meminfo: Path = Path("/proc/meminfo")) -> HostProbe:
    """Read cores, memory and free file-system space of ``data_dir``."""
    try:
        memory_mb = parse_meminfo(meminfo.read_text())
    except OSError as exc:
        raise StateError(f"cannot read {meminfo}: {exc}") from exc
    target = data_dir if data_dir.exists() else data_dir.parent
    st = os.statvfs(target)
    return HostProbe(
        cores=count_cores(),
        memory_mb=memory_mb,
        fs_free_mb=st.f_bavail * st.f_frsize // (1 << 20),
    )


def disk_used_mb(data_dir: Path, vm_allowance_mb: int = 0) -> int:
    """MB taken from the storage quota by templates, their packs and VM overlays.

    Files count by the blocks really allocated (sparse files count as used);
    a VM overlay counts at least ``vm_allowance_mb``, because a VM's disk may
    grow to its allowance: a new overlay is a few MB, and counting only that
    would let a host admit more VMs than its quota holds.
    """
    total = 0
    floor = vm_allowance_mb << 20
    for sub in QUOTA_DIRS:
        folder = data_dir / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                used = entry.stat(follow_symlinks=False).st_blocks * 512
                if sub == "vms" and entry.name.endswith(".qcow2"):
                    used = max(used, floor)
                total += used
    return -(-total // (1 << 20))
