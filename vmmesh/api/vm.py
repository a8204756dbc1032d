"""VMs and templates: requests, shares, listing, shutdown, exec, ssh.

Two levels, as the service has them: the *mesh* methods the CLI calls on its
own node (``vm.request``, ``vm.list``, ...), which fan out over the mesh, and
the *local* methods a node calls on each host (``vm.share``,
``vm.list_local``, ...), which act on that host only.  Both use the bodies
below, so a field means the same at the CLI, the coordinating node and the
host that makes the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmmesh.api.codec import (
    Bool,
    Bytes,
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
    SetOf,
    StreamMethod,
    Text,
    wire,
)
from vmmesh.api.common import MAX_ERRORS, ErrorText, Progress
from vmmesh.api.customzip import CustomZip
from vmmesh.api.names import MAX_PACKAGES, HexId, Package, VmName

MAX_COUNT = 1000
MAX_CUSTOM_ZIP = 3 << 20
"""A custom zip travels inside one request and one share call, whose frames
are 4 MiB on peer links: 3 MiB leaves room for the rest.  The one limit, for
the CLI and every node."""
MAX_ARGV = 256
MAX_ARG = 64 << 10
MAX_OUTPUT = 1 << 20
MAX_ROWS = 10_000
MAX_KEY_CHARS = 16_384
MAX_KEYS = 16
Packages = SetOf(Package, MAX_PACKAGES)
Phases = MapOf(Text(32), Float(0.0), 32)
Reason = Text(1000)
Request = Text(64, r"[0-9a-f]{1,64}", "request id")


# How a host gets a template it lacks: decide, or force one way (tests, benchmarks).
FETCH_AUTO, FETCH_ALWAYS, FETCH_NEVER = "auto", "fetch", "install"
FetchPolicy = Text(8, "auto|fetch|install", "fetch policy")


# --- requests ---------------------------------------------------------------


@dataclass(frozen=True)
class Lineage(Record):
    """Whether the mesh keeps a VM alive, which generation of it this is, and where
    it came from (``vmmesh vms`` shows it).  A VM recovered on another host is the
    next generation: a host that finds an older one of the same name never runs it."""

    keep_alive: bool = wire(Bool(), default=False)
    generation: int = wire(Int(1, 1 << 30), default=1)
    origin: str = wire(Reason, default="")


PLAIN = Lineage()
"""A VM nobody keeps alive (the default)."""


@dataclass(frozen=True)
class RequestVms(Message):
    """``vmmesh request NAME COUNT PKG...``."""

    name: str = wire(VmName)
    count: int = wire(Int(1, MAX_COUNT))
    packages: frozenset[str] = wire(Packages, default=frozenset())
    custom_zip: bytes | None = wire(Optional(CustomZip(MAX_CUSTOM_ZIP)), default=None)
    dry_run: bool = wire(Bool(), default=False)
    vcpus: int | None = wire(Optional(Int(1, 64)), default=None)
    memory_mb: int | None = wire(Optional(Int(64, 1 << 20)), default=None)
    fetch: str = wire(FetchPolicy, default=FETCH_AUTO)
    keep_alive: bool = wire(Bool(), default=False)


@dataclass(frozen=True)
class PlannedShare(Record):
    """One host's part of a plan, and why that host."""

    node_id: str = wire(HexId)
    host: str = wire(Text(63))
    count: int = wire(Int(0, MAX_COUNT))
    match: str = wire(Text(16))
    template: str | None = wire(Optional(HexId), default=None)
    missing: tuple[str, ...] = wire(ListOf(Package, MAX_PACKAGES), default=())
    reason: str = wire(Reason, default="")


@dataclass(frozen=True)
class Unplaced(Record):
    count: int = wire(Int(1, MAX_COUNT))
    reason: str = wire(Reason)


@dataclass(frozen=True)
class TemplateSource(Record):
    """How a host got the template of its share, with both estimates (seconds).

    ``how`` is ``reused``, ``built``, or ``fetched``; the estimates are 0 when
    there was nothing to decide.
    """

    how: str = wire(Text(16), default="reused")
    install_estimate: float = wire(Float(0.0), default=0.0)
    fetch_estimate: float = wire(Float(0.0), default=0.0)
    why: str = wire(Reason, default="")
    bytes_fetched: int = wire(Int(), default=0)
    # bytes of a peer's warm state fetched with the template (in ``bytes_fetched``
    # too): its VMs here resume it instead of booting
    warm_bytes: int = wire(Int(), default=0)


@dataclass(frozen=True)
class VmMade(Record):
    """One VM a request made: where, from what, and how long each phase took."""

    name: str = wire(VmName)
    vm_id: str = wire(HexId)
    host: str = wire(Text(63))
    node_id: str = wire(HexId)
    template: str = wire(Text(64), default="")
    built: bool = wire(Bool(), default=False)
    start: str = wire(Text(8), default="cold")
    start_note: str = wire(Reason, default="")
    seconds: float = wire(Float(0.0), default=0.0)
    phases: Mapping[str, float] = wire(Phases, default_factory=dict)
    seconds_end_to_end: float = wire(Float(0.0), default=0.0)
    source: TemplateSource = wire(Nested(TemplateSource), default=TemplateSource())


@dataclass(frozen=True)
class RequestReport(Message):
    """The answer to ``vmmesh request``: per VM where and how long, and what was not placed."""

    name: str = wire(VmName)
    requested: int = wire(Int(1, MAX_COUNT))
    request_id: str = wire(Text(64), default="")
    dry_run: bool = wire(Bool(), default=False)
    placed: int = wire(Int(0, MAX_COUNT), default=0)
    vms: tuple[VmMade, ...] = wire(ListOf(Nested(VmMade), MAX_COUNT), default=())
    unplaced: tuple[Unplaced, ...] = wire(ListOf(Nested(Unplaced), 16), default=())
    errors: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())
    notes: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())
    plan: tuple[PlannedShare, ...] = wire(ListOf(Nested(PlannedShare), MAX_ROWS), default=())
    seconds: float = wire(Float(0.0), default=0.0)


@dataclass(frozen=True)
class ShareRequest(Message):
    """A host's share of a request: make up to ``count`` VMs here."""

    request_id: str = wire(Text(64))
    name: str = wire(VmName)
    count: int = wire(Int(1, MAX_COUNT))
    packages: frozenset[str] = wire(Packages, default=frozenset())
    custom_zip: bytes | None = wire(Optional(CustomZip(MAX_CUSTOM_ZIP)), default=None)
    first_index: int | None = wire(Optional(Int(1, 1 << 30)), default=None)
    vcpus: int | None = wire(Optional(Int(1, 64)), default=None)
    memory_mb: int | None = wire(Optional(Int(64, 1 << 20)), default=None)
    fetch: str = wire(FetchPolicy, default=FETCH_AUTO)
    lineage: Lineage = wire(Nested(Lineage), default=Lineage())


@dataclass(frozen=True)
class ShareReply(Message):
    """What a host made of its share (``granted`` may be less than asked).

    The host's own answer (``VmManager.request_local`` makes it), passed on as
    it is: ``unplaced`` counts the VMs asked for and not made here (not
    admitted, or failed half-way); ``template`` is ``""`` when the base image
    served; ``template_seconds`` are the phases of getting the template
    (build or fetch; ``install`` 0 when it was there), which the first VM's
    ``phases`` also carry.
    """

    host: str = wire(Text(63))
    granted: int = wire(Int(0, MAX_COUNT))
    vms: tuple[VmMade, ...] = wire(ListOf(Nested(VmMade), MAX_COUNT), default=())
    errors: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())
    template: str = wire(Text(64), default="")
    built: bool = wire(Bool(), default=False)
    source: TemplateSource = wire(Nested(TemplateSource), default=TemplateSource())
    unplaced: int = wire(Int(0, MAX_COUNT), default=0)
    template_seconds: Mapping[str, float] = wire(Phases, default_factory=dict)


# --- shutdown ----------------------------------------------------------------


@dataclass(frozen=True)
class ShutdownRequest(Message):
    name: str = wire(VmName)


@dataclass(frozen=True)
class Removed(Record):
    """A VM a shutdown removed, and the state it was in."""

    name: str = wire(VmName)
    host: str = wire(Text(63))
    state: str = wire(Text(16))


@dataclass(frozen=True)
class ShutdownLocalReply(Message):
    removed: tuple[Removed, ...] = wire(ListOf(Nested(Removed), MAX_ROWS), default=())


@dataclass(frozen=True)
class ShutdownReply(Message):
    """``vmmesh shutdown NAME``: exactly what was removed, and which hosts did not answer."""

    name: str = wire(VmName)
    removed: tuple[Removed, ...] = wire(ListOf(Nested(Removed), MAX_ROWS), default=())
    errors: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())


# --- listing -------------------------------------------------------------------


@dataclass(frozen=True)
class VmRow(Record):
    """One VM of ``vmmesh vms``."""

    name: str = wire(VmName)
    vm_id: str = wire(HexId)
    request: str = wire(VmName)
    host: str = wire(Text(63))
    node_id: str = wire(HexId)
    state: str = wire(Text(16))
    template: str = wire(Text(64), default="")
    packages: frozenset[str] = wire(Packages, default=frozenset())
    vcpus: int = wire(Int(0, 1024), default=1)
    memory_mb: int = wire(Int(0, 1 << 24), default=0)
    created: float = wire(Float(0.0), default=0.0)
    stop_reason: str = wire(Reason, default="")
    ssh_port: int = wire(Int(0, 65535), default=0)
    start: str = wire(Text(8), default="cold")
    start_seconds: float = wire(Float(0.0), default=0.0)
    lineage: Lineage = wire(Nested(Lineage), default=Lineage())


@dataclass(frozen=True)
class VmList(Message):
    vms: tuple[VmRow, ...] = wire(ListOf(Nested(VmRow), MAX_ROWS), default=())
    errors: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())


@dataclass(frozen=True)
class TemplateRow(Record):
    """One template of ``vmmesh templates`` on one host."""

    host: str = wire(Text(63))
    node_id: str = wire(HexId)
    template_id: str = wire(HexId)
    parent: str = wire(Text(64), default="")
    packages: frozenset[str] = wire(Packages, default=frozenset())
    size: int = wire(Int(), default=0)
    depth: int = wire(Int(0, 64), default=1)
    sha256: str = wire(Text(64), default="")
    base_image: str = wire(Text(64), default="")
    last_used: float = wire(Float(0.0), default=0.0)
    origin: str = wire(Text(16), default="built")
    warm_size: int = wire(Int(), default=0)
    holders: tuple[str, ...] = wire(ListOf(Text(63), 1000), default=())


@dataclass(frozen=True)
class TemplateList(Message):
    templates: tuple[TemplateRow, ...] = wire(ListOf(Nested(TemplateRow), MAX_ROWS), default=())
    errors: tuple[str, ...] = wire(ListOf(ErrorText, MAX_ERRORS), default=())


# --- exec and ssh -----------------------------------------------------------------


@dataclass(frozen=True)
class ExecRequest(Message):
    name: str = wire(VmName)
    argv: tuple[str, ...] = wire(ListOf(Text(MAX_ARG), MAX_ARGV))

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("exec needs a command")


@dataclass(frozen=True)
class ExecReply(Message):
    exit_code: int = wire(Int(-1, 1 << 16))
    stdout: bytes = wire(Bytes(MAX_OUTPUT), default=b"")
    stderr: bytes = wire(Bytes(MAX_OUTPUT), default=b"")
    truncated: bool = wire(Bool(), default=False)


PublicKey = Text(MAX_KEY_CHARS)


@dataclass(frozen=True)
class SshRequest(Message):
    name: str = wire(VmName)
    keys: tuple[str, ...] = wire(ListOf(PublicKey, MAX_KEYS))


@dataclass(frozen=True)
class SshLocalReply(Message):
    vm: str = wire(VmName)
    port: int = wire(Int(1, 65535))
    bind: str = wire(Text(64))
    host_key: str = wire(PublicKey)


@dataclass(frozen=True)
class SshReply(Message):
    """Where ``ssh`` should dial and the host key to pin."""

    vm: str = wire(VmName)
    host: str = wire(Text(63))
    address: str = wire(Text(64))
    port: int = wire(Int(1, 65535))
    host_key: str = wire(PublicKey)
    user: str = wire(Text(32), default="root")


# --- methods ------------------------------------------------------------------------

# mesh methods (the CLI calls them on its node)
REQUEST = StreamMethod("vm.request", RequestVms, RequestReport, item=Progress)
SHUTDOWN = Method("vm.shutdown", ShutdownRequest, ShutdownReply)
LIST = Method("vm.list", Empty, VmList)
TEMPLATES = Method("template.list", Empty, TemplateList)
EXEC = Method("vm.exec", ExecRequest, ExecReply)
SSH = Method("vm.ssh", SshRequest, SshReply)

# local methods (a node calls them on each host, itself included)
SHARE = StreamMethod("vm.share", ShareRequest, ShareReply, item=Progress)
SHUTDOWN_LOCAL = Method("vm.shutdown_local", ShutdownRequest, ShutdownLocalReply)
LIST_LOCAL = Method("vm.list_local", Empty, VmList)
TEMPLATES_LOCAL = Method("template.list_local", Empty, TemplateList)
EXEC_LOCAL = Method("vm.exec_local", ExecRequest, ExecReply)
SSH_LOCAL = Method("vm.ssh_local", SshRequest, SshLocalReply)
