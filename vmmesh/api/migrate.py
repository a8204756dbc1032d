"""Moving a running VM to another host: ``vmmesh migrate`` and the calls between the hosts.

The CLI asks its own node (``migrate``); the node finds the host that runs
the VM and asks it (``migrate.run``), which is the *source*.  The source
asks the *target* to get ready (``migrate.prepare``: the template chain,
an empty overlay, a QEMU waiting for the stream), then the bytes flow as
byte *pipes* over the hosts' mutual-TLS link (``migrate.pipe``: the RAM
stream, the disk mirror's NBD traffic, or whole files for ``--offline``),
and the source ends it with ``migrate.commit`` (the target runs the VM) or
``migrate.abort`` (nothing is left on the target).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from vmmesh.api.codec import (
    Bool,
    Bytes,
    Choice,
    Empty,
    Float,
    Int,
    ListOf,
    MapOf,
    Message,
    Method,
    Nested,
    Optional,
    Record,
    StreamMethod,
    Text,
    wire,
)
from vmmesh.api.common import Progress
from vmmesh.api.names import HexId, HostName, VmName
from vmmesh.api.vm import PLAIN, Lineage

CHUNK = 256 << 10
"""Bytes per pipe item: small enough that the NBD traffic is not held back."""

Session = Text(32, "[0-9a-f]{32}", "migration session")
ShapeFields = MapOf(Text(32), Text(300), 32)


class Mode(enum.StrEnum):
    LIVE = "live"
    OFFLINE = "offline"


class Channel(enum.StrEnum):
    """What a pipe carries."""

    RAM = "ram"  # the live RAM stream, source -> target
    NBD = "nbd"  # the disk mirror's NBD connection, both ways
    LAYER = "layer"  # the layer between the template and the overlay (a warm disk)
    OVERLAY = "overlay"  # the VM's overlay, offline
    STATE = "state"  # the saved RAM and devices, offline


# --- the CLI and the source --------------------------------------------------


@dataclass(frozen=True)
class MigrateRequest(Message):
    """Move VM ``vm`` (a full name, ``NAME-<n>``) to host ``to`` (name or node id;
    empty: the planner picks)."""

    vm: str = wire(VmName)
    to: str = wire(Text(64, "[A-Za-z0-9._-]*", "host"), default="")
    mode: Mode = wire(Choice(Mode), default=Mode.LIVE)


@dataclass(frozen=True)
class Phase(Record):
    name: str = wire(Text(32))
    seconds: float = wire(Float(0.0))


@dataclass(frozen=True)
class MigrateReport(Message):
    """What a migration did, with QEMU's own figures (live)."""

    vm: str = wire(VmName)
    source: str = wire(HostName)
    target: str = wire(HostName)
    mode: Mode = wire(Choice(Mode))
    seconds: float = wire(Float(0.0))
    phases: tuple[Phase, ...] = wire(ListOf(Nested(Phase), 32), default=())
    downtime_ms: int | None = wire(Optional(Int()), default=None)  # QEMU's, live
    total_time_ms: int = wire(Int(), default=0)  # QEMU's, live
    ram_bytes: int = wire(Int(), default=0)
    disk_bytes: int = wire(Int(), default=0)
    wire_bytes: int = wire(Int(), default=0)  # every pipe's bytes
    fetched_template: bool = wire(Bool(), default=False)
    why_target: str = wire(Text(300), default="")
    restarted: bool = wire(Bool(), default=False)  # drain: made afresh there, not moved
    decision: str = wire(Text(1000), default="")  # drain: migrate or restart, and why


# --- source and target -------------------------------------------------------


@dataclass(frozen=True)
class PrepareRequest(Message):
    """Get ready to receive VM ``vm_id``: the source's account of it."""

    session: str = wire(Session)
    mode: Mode = wire(Choice(Mode))
    vm_id: str = wire(HexId)
    name: str = wire(VmName)
    template_id: str | None = wire(Optional(HexId))
    image_id: str = wire(HexId)
    vcpus: int = wire(Int(1, 1024))
    memory_mb: int = wire(Int(64, 1 << 22))
    shape: Mapping[str, str] = wire(ShapeFields)
    request_id: str = wire(Text(64, r"[0-9a-f]{0,64}", "request id"), default="")
    lineage: Lineage = wire(Nested(Lineage), default=PLAIN)
    layer_bytes: int = wire(Int(0), default=0)  # 0: the overlay sits on the template
    disk_limit: int = wire(Int(0), default=64 << 30)  # offline: the overlay's bytes at most


@dataclass(frozen=True)
class PrepareReply(Message):
    fetched_template: bool = wire(Bool(), default=False)
    seconds: float = wire(Float(0.0), default=0.0)


@dataclass(frozen=True)
class PipeRequest(Message):
    session: str = wire(Session)
    channel: Channel = wire(Choice(Channel))


@dataclass(frozen=True)
class Chunk(Message):
    data: bytes = wire(Bytes(CHUNK))


@dataclass(frozen=True)
class PipeEnd(Message):
    bytes: int = wire(Int(0))


@dataclass(frozen=True)
class SessionRequest(Message):
    session: str = wire(Session)
    reason: str = wire(Text(300), default="")


@dataclass(frozen=True)
class CommitReply(Message):
    """The target runs the VM (its QEMU said so)."""

    resume_seconds: float = wire(Float(0.0), default=0.0)


# --- drain and undrain ----------------------------------------------------------


@dataclass(frozen=True)
class DrainRequest(Message):
    """Drain (or undrain) host ``host`` (name or node id; empty: the host asked)."""

    host: str = wire(Text(64, "[A-Za-z0-9._-]*", "host"), default="")
    bring_back: bool = wire(Bool(), default=False)  # undrain: move back the VMs that left


@dataclass(frozen=True)
class Moved(Record):
    vm: str = wire(VmName)
    source: str = wire(HostName)
    target: str = wire(HostName)
    seconds: float = wire(Float(0.0), default=0.0)
    downtime_ms: int | None = wire(Optional(Int()), default=None)
    how: str = wire(Text(16), default="migrated")  # migrated | restarted
    why: str = wire(Text(1000), default="")  # the migrate-or-restart rule's figures


@dataclass(frozen=True)
class DrainReport(Message):
    """What a drain or undrain did: the VMs moved, those left and why, the errors."""

    host: str = wire(HostName)
    draining: bool = wire(Bool())
    moved: tuple[Moved, ...] = wire(ListOf(Nested(Moved), 4096), default=())
    left: tuple[str, ...] = wire(ListOf(Text(400), 4096), default=())
    errors: tuple[str, ...] = wire(ListOf(Text(400), 4096), default=())
    seconds: float = wire(Float(0.0), default=0.0)


MIGRATE = StreamMethod("migrate", MigrateRequest, MigrateReport, item=Progress)
RUN = StreamMethod("migrate.run", MigrateRequest, MigrateReport, item=Progress)
PREPARE = Method("migrate.prepare", PrepareRequest, PrepareReply)
LISTEN = Method("migrate.listen", SessionRequest, Empty)
PIPE = StreamMethod("migrate.pipe", PipeRequest, PipeEnd, item=Chunk)
COMMIT = Method("migrate.commit", SessionRequest, CommitReply)
ABORT = Method("migrate.abort", SessionRequest, Empty)
DRAIN = StreamMethod("drain", DrainRequest, DrainReport, item=Progress)
UNDRAIN = StreamMethod("undrain", DrainRequest, DrainReport, item=Progress)
DRAIN_RUN = StreamMethod("drain.run", DrainRequest, DrainReport, item=Progress)
UNDRAIN_RUN = StreamMethod("undrain.run", DrainRequest, DrainReport, item=Progress)
