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

``HostState`` is the one definition: each of its fields names its gossip key
and the spec its value meets (``gossiped``), and ``SCHEMA`` is read from those
fields.  ``parse`` turns a host's stored keys into a ``HostState`` for
placement and the CLI; it cannot fail, because every stored value was
checked.  A host publishes a whole ``HostState`` (``NodeContext.publish``,
usually ``replace(node.published, field=value)``: the field names and types
are checked by mypy), and ``changed_keys`` gives the keys whose values
changed, dumped with the same specs.

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
from dataclasses import MISSING, dataclass, field, fields
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


def gossiped(
    key: str, spec: Spec[Any], *, default: Any = MISSING, default_factory: Any = MISSING
) -> Any:
    """A ``HostState`` field, gossiped under ``key`` and checked with ``spec`` at both
    ends: ``publish`` dumps it with the spec, ``check_value`` loads it on arrival."""
    return field(
        default=default, default_factory=default_factory, metadata={"key": key, "spec": spec}
    )


@dataclass(frozen=True)
class HostState:
    """The keys of one host, typed; a missing key has its neutral value (the default).

    One field per key: a new key is one line here, and the schema, the parser and
    the publisher follow from it.
    """

    name: str = gossiped("name", HostName, default="")
    addresses: tuple[str, ...] = gossiped("addr", ListOf(ADDRESS, 8), default=())
    capacity: Capacity = gossiped("capacity", Nested(Capacity), default=NO_CAPACITY)
    templates: tuple[TemplateInfo, ...] = gossiped(
        "templates", ListOf(Nested(TemplateInfo), MAX_TEMPLATES), default=()
    )
    vms: tuple[str, ...] = gossiped("vms", ListOf(VmName, MAX_VMS), default=())
    draining: bool = gossiped("draining", Bool(), default=False)
    crl: bytes = gossiped("crl", Bytes(256 << 10), default=b"")
    images: tuple[str, ...] = gossiped("images", ListOf(Sha256, 16), default=())
    building: tuple[Building, ...] = gossiped("building", ListOf(Nested(Building), 64), default=())
    keepalive: tuple[KeptVm, ...] = gossiped(
        "keepalive", ListOf(Nested(KeptVm), MAX_VMS), default=()
    )
    vmshape: Mapping[str, str] = gossiped(
        "vmshape", MapOf(Text(32), Text(300), 16), default_factory=dict
    )
    # None: not gossiped (an older host); 0: no page
    web_port: int | None = gossiped("web", Int(0, 65535), default=None)
    work: tuple[WorkItem, ...] = gossiped("work", ListOf(Nested(WorkItem), MAX_WORK), default=())


#: field name -> (gossip key, spec), in declaration order
_KEYS: dict[str, tuple[str, Spec[Any]]] = {
    f.name: (f.metadata["key"], f.metadata["spec"]) for f in fields(HostState)
}
SCHEMA: dict[str, Spec[Any]] = dict(_KEYS.values())
"""Gossip key -> the spec its value must meet (from ``HostState``'s fields)."""


def parse(keys: Mapping[str, Any]) -> HostState:
    """Typed state from stored keys (checked on arrival, so this cannot fail).

    A value that fails anyway (state written before a schema change) counts
    as absent, like a refused one.
    """
    out: dict[str, Any] = {}
    for attr, (key, spec) in _KEYS.items():
        if key in keys:
            try:
                out[attr] = spec.load(keys[key], key)
            except MalformedMessage:
                continue
    return HostState(**out)


def changed_keys(old: HostState, new: HostState) -> dict[str, object]:
    """The gossip keys (and their wire values) of the fields ``new`` changes."""
    out: dict[str, object] = {}
    for attr, (key, spec) in _KEYS.items():
        value = getattr(new, attr)
        if value != getattr(old, attr):
            out[key] = spec.dump(value)
    return out


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
