"""What a host says about itself: capacity and template inventory.

These records travel in gossip (``vmmesh.gossip.hoststate`` maps them to
keys) and in the answers of ``vmmesh peers``; placement reads them.  They are
validated on arrival like every other body (``vmmesh.api.codec``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from vmmesh.api.codec import (
    Bool,
    Choice,
    Float,
    Int,
    ListOf,
    Optional,
    Record,
    SetOf,
    Text,
    wire,
)
from vmmesh.api.names import MAX_PACKAGES, HexId, Package, Sha256, VmName

MAX_CHAIN = 16
MAX_BYTES = 1 << 50  # a petabyte: any real size fits, nonsense does not
MAX_REASON = 300
MAX_WORK = 32  # items of ``work`` a host gossips
MAX_RATE = 1e12  # bytes per second: a terabyte, beyond any link
MAX_COUNT = 1 << 30  # a job's commands


@dataclass(frozen=True)
class Capacity(Record):
    """What a host has and what is still free.

    ``free_vm_slots`` is how many more VMs may *run* (cores and memory, with
    overcommit); ``free_disk_slots`` how many more VM disks fit in the storage
    quota.  Placement uses ``min`` of the two.  ``blocked`` says why a host
    offers no VMs at all when that is not plain use (no base image, no
    accelerator, a quota too small for one VM), so a request that cannot be
    placed can say why.
    """

    cores: int = wire(Int(0, 1 << 16))
    memory_mb: int = wire(Int(0, 1 << 40))
    storage_quota_mb: int = wire(Int(0, 1 << 40))
    storage_free_mb: int = wire(Int(0, 1 << 40))
    free_vm_slots: int = wire(Int(0, 1 << 20))
    free_disk_slots: int = wire(Int(0, 1 << 20))
    running_vms: int = wire(Int(0, 1 << 20), default=0)
    blocked: str = wire(Text(MAX_REASON), default="")

    @property
    def free_slots(self) -> int:
        return max(0, min(self.free_vm_slots, self.free_disk_slots))

    def to_wire(self) -> dict[str, Any]:
        # free_slots is derived, and read back from the fields; it is on the wire
        # (and in every ``--json``) so that scripts need not derive it themselves
        return {**super().to_wire(), "free_slots": self.free_slots}


NO_CAPACITY = Capacity(0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class TemplateInfo(Record):
    """A template as other hosts see it: enough to rank, fetch and verify.

    ``packages`` is the full set (inherited plus installed).  ``chain`` lists
    the delta hashes from the base image outward; ``delta_sizes`` the bytes of
    each, in the same order.  ``parent_id`` is the template this one's last
    delta sits on (None: the base image); a host holding a template holds its
    parents too, so a fetcher finds them in the same inventory.  ``warm`` says
    the host holds a saved boot of it, so its VMs resume instead of booting:
    the planner prefers such a host among equals.
    """

    template_id: str = wire(HexId)
    base_image_id: str = wire(HexId)
    packages: frozenset[str] = wire(SetOf(Package, MAX_PACKAGES))
    chain: tuple[str, ...] = wire(ListOf(Sha256, MAX_CHAIN), default=())
    delta_sizes: tuple[int, ...] = wire(ListOf(Int(0, MAX_BYTES), MAX_CHAIN), default=())
    parent_id: str | None = wire(Optional(HexId), default=None)
    warm: bool = wire(Bool(), default=False)

    def __post_init__(self) -> None:
        if len(self.chain) != len(self.delta_sizes):
            raise ValueError("chain and delta_sizes differ in length")


@dataclass(frozen=True)
class Building(Record):
    """A template a host is building now, and when it expects to be done (unix time):
    a host that lacks the template may wait for it and fetch it instead of
    building it too."""

    template_id: str = wire(HexId)
    done_at: float = wire(Float(0.0))


@dataclass(frozen=True)
class KeptVm(Record):
    """A VM its host keeps alive, as gossip carries it: enough for another host to
    make it again from its template (with the next generation) if the host dies."""

    name: str = wire(VmName)
    template: str = wire(Text(64, "[0-9a-f]{0,64}", "template id"), default="")
    packages: frozenset[str] = wire(SetOf(Package, MAX_PACKAGES), default=frozenset())
    generation: int = wire(Int(1, 1 << 30), default=1)
    vcpus: int = wire(Int(1, 1024), default=1)
    memory_mb: int = wire(Int(64, 1 << 22), default=512)


class WorkKind(enum.StrEnum):
    """What kind of long work a host has under way."""

    FETCH = "fetch"  # a template or blob it fetches from holders
    MIGRATION = "migration"  # a VM it moves to another host (it is the source)
    JOB = "job"  # a job or bag of tasks opened from this host


@dataclass(frozen=True)
class WorkItem(Record):
    """One piece of work a host has under way, as gossip carries it (key ``work``) so that
    every host's page shows the whole mesh's transfers, migrations and jobs.

    Figures are rounded by their author (``fraction`` to 5 %, ``rate`` and ``done``
    to 2 significant digits) so that the value changes, and is gossiped, seldom.
    ``done``/``total`` count bytes for a fetch or a migration and commands for a
    job (``failed``: its commands that failed or were lost; ``vms``: its VMs).
    ``peer`` is the other host: a migration's target.
    """

    kind: WorkKind = wire(Choice(WorkKind))
    name: str = wire(Text(128))  # the fetch's task, the VM, the job's request name
    phase: str = wire(Text(64), default="")
    fraction: float | None = wire(Optional(Float(0.0, 1.0)), default=None)
    done: int = wire(Int(0, MAX_BYTES), default=0)
    total: int = wire(Int(0, MAX_BYTES), default=0)
    rate: float = wire(Float(0.0, MAX_RATE), default=0.0)
    peer: str = wire(Text(128), default="")
    note: str = wire(Text(128), default="")  # words for people (a fetch's holders)
    started: float = wire(Float(0.0, 1e11), default=0.0)  # unix time
    failed: int = wire(Int(0, MAX_COUNT), default=0)
    vms: int = wire(Int(0, 1 << 20), default=0)
