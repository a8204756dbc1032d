"""Domain records shared by gossip, placement, the node and the CLI.

They are frozen dataclasses so that they can be hashed, compared and put on
the wire as they are; ``to_wire``/``from_wire`` convert to and from plain
msgpack-able dicts and validate what a peer sent (a peer's string never
becomes a path: ids are checked as lowercase hex).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vmmesh.errors import MalformedMessage

HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")


def check_hex_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a lowercase hex id, else raise MalformedMessage."""
    if not isinstance(value, str) or not HEX_ID.match(value):
        raise MalformedMessage(f"bad {what}: {value!r:.80}")
    return value


def check_vm_name(value: object) -> str:
    if not isinstance(value, str) or not VM_NAME.match(value):
        raise MalformedMessage(f"bad VM name: {value!r:.80}")
    return value


def check_package(value: object) -> str:
    if not isinstance(value, str) or not PACKAGE_NAME.match(value):
        raise MalformedMessage(f"bad package name: {value!r:.80}")
    return value


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MalformedMessage(f"bad {key}: {v!r:.80}")
    return v


@dataclass(frozen=True)
class Capacity:
    """What a host has and what is still free.

    ``free_vm_slots`` is how many more VMs may *run* (cores and memory, with
    overcommit); ``free_disk_slots`` how many more VM disks fit in the storage
    quota.  Placement uses ``min`` of the two.
    """

    cores: int
    memory_mb: int
    storage_quota_mb: int
    storage_free_mb: int
    free_vm_slots: int
    free_disk_slots: int
    running_vms: int = 0

    @property
    def free_slots(self) -> int:
        return max(0, min(self.free_vm_slots, self.free_disk_slots))

    def to_wire(self) -> dict[str, Any]:
        return {
            "cores": self.cores,
            "memory_mb": self.memory_mb,
            "storage_quota_mb": self.storage_quota_mb,
            "storage_free_mb": self.storage_free_mb,
            "free_vm_slots": self.free_vm_slots,
            "free_disk_slots": self.free_disk_slots,
            "running_vms": self.running_vms,
        }

    @classmethod
    def from_wire(cls, d: object) -> Capacity:
        if not isinstance(d, dict):
            raise MalformedMessage("capacity is not a map")
        return cls(
            cores=_int(d, "cores"),
            memory_mb=_int(d, "memory_mb"),
            storage_quota_mb=_int(d, "storage_quota_mb"),
            storage_free_mb=_int(d, "storage_free_mb"),
            free_vm_slots=_int(d, "free_vm_slots"),
            free_disk_slots=_int(d, "free_disk_slots"),
            running_vms=_int(d, "running_vms"),
        )


@dataclass(frozen=True)
class TemplateInfo:
    """A template as other hosts see it: enough to rank, fetch and verify.

    ``packages`` is the full set (inherited plus installed).  ``chain`` lists
    the delta hashes from the base image outward; ``delta_sizes`` the bytes of
    each, in the same order.
    """

    template_id: str
    base_image_id: str
    packages: frozenset[str]
    chain: tuple[str, ...] = ()
    delta_sizes: tuple[int, ...] = ()
    parent_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.template_id,
            "base": self.base_image_id,
            "pkgs": sorted(self.packages),
            "chain": list(self.chain),
            "sizes": list(self.delta_sizes),
            "parent": self.parent_id,
        }

    @classmethod
    def from_wire(cls, d: object) -> TemplateInfo:
        if not isinstance(d, dict):
            raise MalformedMessage("template is not a map")
        pkgs = d.get("pkgs")
        chain = d.get("chain", [])
        sizes = d.get("sizes", [])
        parent = d.get("parent")
        if not isinstance(pkgs, list) or not isinstance(chain, list) or not isinstance(sizes, list):
            raise MalformedMessage("template fields have the wrong type")
        if any(not isinstance(s, int) or s < 0 for s in sizes):
            raise MalformedMessage("bad delta size")
        return cls(
            template_id=check_hex_id(d.get("id"), "template id"),
            base_image_id=check_hex_id(d.get("base"), "base image id"),
            packages=frozenset(check_package(p) for p in pkgs),
            chain=tuple(check_hex_id(h, "delta hash") for h in chain),
            delta_sizes=tuple(sizes),
            parent_id=None if parent is None else check_hex_id(parent, "parent id"),
        )


@dataclass(frozen=True)
class HostView:
    """One host as the local node's gossip view holds it (placement input)."""

    node_id: str
    name: str
    status: str  # "up" | "suspect" | "down"
    capacity: Capacity
    templates: tuple[TemplateInfo, ...] = ()
    vms: tuple[str, ...] = ()
    draining: bool = False
    address: str = ""
    last_heard: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
