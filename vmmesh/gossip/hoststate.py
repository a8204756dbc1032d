"""A host's state as gossip keys, and back: the schema every gossip value meets.

Theory of operation
-------------------
Each host authors a few keys about itself (the table below).  A value
arrives from a peer that may not be its author, and neither is trusted:
``check_value`` runs in the gossip core (``GossipCore(check=...)``) on every
delta before it is stored.  A value that does not meet its key's spec is
refused: it is not stored and so never relayed, and the key counts as absent
for that host (its author meant to replace the old value, so the old one is
not kept either).  Readers therefore only ever see values that passed.

A key this version does not know is kept and relayed as it is, if it is small
(``MAX_UNKNOWN_BYTES`` packed) and the host has few keys: a newer peer may
add a key, and hosts of this version must not cut it off on its way through
the mesh.  Nothing here ever reads such a value.

``parse`` turns a host's stored keys into a ``HostState`` for placement and
the CLI; it cannot fail, because every stored value was checked.

=============  ==========================================================
key            value
=============  ==========================================================
``name``       host name (``HostName``)
``addr``       up to 8 "address:port" strings, best first
``capacity``   ``Capacity`` (free slots, quota, why blocked)
``templates``  up to 1000 ``TemplateInfo``
``vms``        names of up to 4096 VMs the host runs
``draining``   true while the host moves its VMs away (later: drain)
``crl``        the newest mesh CRL the host holds (PEM, at most 256 KiB)
``images``     ids of the base images the host holds, its default first
``building``   up to 64 ``Building``: templates it is making now, and when
               it expects them done
``keepalive``  up to 4096 ``KeptVm``: the VMs it keeps alive, with generation
``vmshape``    what its guests' saved states need of a host (QEMU version,
               machine type, accelerator, CPU model, devices, kernel)
``web``        the TCP port of its HTTPS page, 0 when it has none (absent:
               a host of an older version; its page is guessed as peer
               port + 2)
``work``       up to 32 ``WorkItem``: its fetches, the migrations it is the
               source of and the jobs opened from it, rounded (empty: idle)
=============  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vmmesh.api.codec import Bool, Bytes, Int, ListOf, MapOf, Nested, Spec, Text
from vmmesh.api.host import (
    MAX_WORK,
    NO_CAPACITY,
    Building,
    Capacity,
    KeptVm,
    TemplateInfo,
    WorkItem,
)
from vmmesh.api.names import HostName, Sha256, VmName
from vmmesh.errors import MalformedMessage

MAX_TEMPLATES = 1000
MAX_VMS = 4096
MAX_KEYS = 32
MAX_UNKNOWN_BYTES = 4096
ADDRESS = Text(80, r"[0-9A-Za-z.:\[\]-]{1,72}:[0-9]{1,5}", "address:port")

SCHEMA: dict[str, Spec[Any]] = {
    "name": HostName,
    "addr": ListOf(ADDRESS, 8),
    "capacity": Nested(Capacity),
    "templates": ListOf(Nested(TemplateInfo), MAX_TEMPLATES),
    "vms": ListOf(VmName, MAX_VMS),
    "draining": Bool(),
    "crl": Bytes(256 << 10),
    "images": ListOf(Sha256, 16),
    "building": ListOf(Nested(Building), 64),
    "keepalive": ListOf(Nested(KeptVm), MAX_VMS),
    "vmshape": MapOf(Text(32), Text(300), 16),
    "web": Int(0, 65535),
    "work": ListOf(Nested(WorkItem), MAX_WORK),
}


def check_value(key: str, value: object, keys_held: int = 0) -> None:
    """Raise MalformedMessage unless ``value`` is acceptable for gossip ``key``.

    ``keys_held`` is how many keys the host already has (bounds unknown keys).
    """
    spec = SCHEMA.get(key)
    if spec is not None:
        spec.load(value, f"gossip {key!r}")
        return
    if keys_held >= MAX_KEYS:
        raise MalformedMessage(f"gossip {key!r}: host has over {MAX_KEYS} keys")
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessage(f"gossip {key!r}: not plain data: {exc}") from None
    if size > MAX_UNKNOWN_BYTES:
        raise MalformedMessage(f"gossip {key!r}: {size} bytes is over {MAX_UNKNOWN_BYTES}")


@dataclass(frozen=True)
class HostState:
    """The keys of one host, typed; a missing key has its neutral value."""

    name: str = ""
    addresses: tuple[str, ...] = ()
    capacity: Capacity = NO_CAPACITY
    templates: tuple[TemplateInfo, ...] = ()
    vms: tuple[str, ...] = ()
    draining: bool = False
    crl: bytes = b""
    images: tuple[str, ...] = ()
    building: tuple[Building, ...] = ()
    keepalive: tuple[KeptVm, ...] = ()
    vmshape: Mapping[str, str] = field(default_factory=dict)
    web_port: int | None = None  # None: not gossiped (an older host); 0: no page
    work: tuple[WorkItem, ...] = ()


def parse(keys: Mapping[str, Any]) -> HostState:
    """Typed state from stored keys (checked on arrival, so this cannot fail).

    A value that fails anyway (state written before a schema change) counts
    as absent, like a refused one.
    """
    out: dict[str, Any] = {}
    for key, attr in (
        ("name", "name"),
        ("addr", "addresses"),
        ("capacity", "capacity"),
        ("templates", "templates"),
        ("vms", "vms"),
        ("draining", "draining"),
        ("crl", "crl"),
        ("images", "images"),
        ("building", "building"),
        ("keepalive", "keepalive"),
        ("vmshape", "vmshape"),
        ("web", "web_port"),
        ("work", "work"),
    ):
        if key in keys:
            try:
                out[attr] = SCHEMA[key].load(keys[key], key)
            except MalformedMessage:
                continue
    return HostState(**out)


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
    images: tuple[str, ...] = ()
    building: tuple[Building, ...] = ()
    keepalive: tuple[KeptVm, ...] = ()
    vmshape: Mapping[str, str] = field(default_factory=dict)
    web_port: int | None = None  # its page's port as gossiped (None: not gossiped)
    work: tuple[WorkItem, ...] = ()  # its work under way as gossiped
