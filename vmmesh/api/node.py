"""The node's own methods on the control socket: status, peers, invite, remove."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmmesh.api.codec import (
    Bool,
    Empty,
    Float,
    Int,
    ListOf,
    MapOf,
    Message,
    Method,
    Nested,
    Record,
    Text,
    wire,
)
from vmmesh.api.figures import MAX_FIGURES, Figure
from vmmesh.api.host import MAX_WORK, Capacity, TemplateInfo, WorkItem
from vmmesh.api.names import HexId, HostName, VmName

MAX_HOSTS = 10_000
MAX_VMS = 4096
Address = Text(80)
Fact = Text(300)


@dataclass(frozen=True)
class StatusReply(Message):
    """``vmmesh status``: this node, its capacity, and what it refused (by cause)."""

    node_id: str = wire(HexId)
    name: str = wire(HostName)
    mesh_id: str = wire(HexId)
    admin: bool = wire(Bool())
    address: str = wire(Address)
    addresses: tuple[str, ...] = wire(ListOf(Address, 64))
    port: int = wire(Int(1, 65535))
    uptime: float = wire(Float(0.0))
    generation: int = wire(Int())
    peers_total: int = wire(Int())
    peers_up: int = wire(Int())
    capacity: Capacity = wire(Nested(Capacity))
    templates: int = wire(Int())
    vms: tuple[str, ...] = wire(ListOf(VmName, MAX_VMS))
    crl_number: int = wire(Int())
    data_dir: str = wire(Text(4096))
    facts: Mapping[str, str] = wire(MapOf(Text(32), Fact, 32), default_factory=dict)
    refusals: Mapping[str, int] = wire(MapOf(Text(32), Int(), 32), default_factory=dict)
    figures: tuple[Figure, ...] = wire(ListOf(Nested(Figure), MAX_FIGURES), default=())


@dataclass(frozen=True)
class PeerRow(Record):
    """One host of ``vmmesh peers``; ``work``: its work under way, as it gossips it."""

    node_id: str = wire(HexId)
    name: str = wire(Text(63))
    this_host: bool = wire(Bool())
    status: str = wire(Text(16))
    address: str = wire(Address)
    last_heard: float = wire(Float(0.0))
    capacity: Capacity = wire(Nested(Capacity))
    templates: tuple[TemplateInfo, ...] = wire(ListOf(Nested(TemplateInfo), 1000))
    vms: tuple[str, ...] = wire(ListOf(VmName, MAX_VMS))
    draining: bool = wire(Bool())
    work: tuple[WorkItem, ...] = wire(ListOf(Nested(WorkItem), MAX_WORK), default=())


@dataclass(frozen=True)
class PeersReply(Message):
    mesh_id: str = wire(HexId)
    node_id: str = wire(HexId)
    hosts: tuple[PeerRow, ...] = wire(ListOf(Nested(PeerRow), MAX_HOSTS))


@dataclass(frozen=True)
class InviteRequest(Message):
    ttl: float = wire(Float(1.0, 30 * 86400.0), default=3600.0)


@dataclass(frozen=True)
class InviteReply(Message):
    token: str = wire(Text(4096))
    expires: float = wire(Float(0.0))
    addresses: tuple[str, ...] = wire(ListOf(Address, 64))


@dataclass(frozen=True)
class RemoveRequest(Message):
    host: str = wire(Text(64, r"[A-Za-z0-9._-]+", "host name or node id"))


@dataclass(frozen=True)
class RemoveReply(Message):
    node_id: str = wire(HexId)
    name: str = wire(Text(64))
    crl_number: int = wire(Int())


STATUS = Method("node.status", Empty, StatusReply)
PEERS = Method("node.peers", Empty, PeersReply)
INVITE = Method("mesh.invite", InviteRequest, InviteReply)
REMOVE = Method("mesh.remove", RemoveRequest, RemoveReply)
