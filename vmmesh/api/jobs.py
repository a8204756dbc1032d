"""Jobs: VMs held for a job, files in and out, a command with its output streamed.

A job session is one long call, ``job.open``: the node places the VMs
(the same request machinery as ``vmmesh request``), answers with a ``Ready``
item, and holds them for as long as the call is open; when the call ends
for any reason (done, Ctrl-C, the CLI killed, its connection lost) the node
shuts them down, unless the session asked to keep them.  A caller that is
done says so with ``job.end``, which answers once the VMs are gone (so a
finished ``vmmesh run`` leaves nothing listed), and ``job.open`` answers.  Files go in with
``job.put`` (chunks appended in order), the command runs with ``job.exec``
(stdout and stderr streamed as they grow, then the exit), results come back
with ``job.get``.  Each has a ``_local`` twin that the session's node calls
on the VM's host, which also holds a lease per job: a host whose job owner
stops renewing it (the owner crashed, restarted or lost its link) shuts
the job's VMs down on its own.
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
from vmmesh.api.common import Progress
from vmmesh.api.customzip import CustomZip
from vmmesh.api.names import MAX_PACKAGES, HexId, Package, VmName
from vmmesh.api.vm import FETCH_AUTO, MAX_ARG, MAX_ARGV, MAX_CUSTOM_ZIP, FetchPolicy, Phases

CHUNK = 1 << 20
MAX_JOB_VMS = 64
JOB_ID = Text(32, "[0-9a-f]{8,32}", "job id")
# A path inside the job's working directory: relative, no "..", no control characters.
RelPath = Text(
    1024, r"(?!/)(?!.*(^|/)\.\.?(/|$))[^\x00-\x1f]+", "relative path inside the job directory"
)
Stream = Text(6, "stdout|stderr", "stream name")
WorkDir = Text(200, "[A-Za-z0-9._-]+", "work directory")  # one name, under the job's directory


@dataclass(frozen=True)
class JobOpen(Message):
    """Place ``count`` VMs with ``packages`` for a job and hold them."""

    count: int = wire(Int(1, MAX_JOB_VMS), default=1)
    packages: frozenset[str] = wire(SetOf(Package, MAX_PACKAGES), default=frozenset())
    custom_zip: bytes | None = wire(Optional(CustomZip(MAX_CUSTOM_ZIP)), default=None)
    vcpus: int | None = wire(Optional(Int(1, 64)), default=None)
    memory_mb: int | None = wire(Optional(Int(64, 1 << 20)), default=None)
    fetch: str = wire(FetchPolicy, default=FETCH_AUTO)
    keep: bool = wire(Bool(), default=False)
    # a bag's number of tasks (0: not a bag, or not known): the page shows "done of N"
    tasks: int = wire(Int(0, 1 << 24), default=0)


@dataclass(frozen=True)
class JobVm(Record):
    name: str = wire(VmName)
    host: str = wire(Text(63))
    node_id: str = wire(HexId)
    start: str = wire(Text(8), default="cold")
    seconds: float = wire(Float(0.0), default=0.0)
    phases: Mapping[str, float] = wire(Phases, default_factory=dict)  # build, fetch, boot...


@dataclass(frozen=True)
class JobEvent(Message):
    """An item of ``job.open``: progress while placing, then ``ready`` with the VMs."""

    progress: Progress | None = wire(Optional(Nested(Progress)), default=None)
    job_id: str = wire(Text(32), default="")
    ready: tuple[JobVm, ...] = wire(ListOf(Nested(JobVm), MAX_JOB_VMS), default=())
    unplaced: str = wire(Text(1000), default="")


@dataclass(frozen=True)
class JobPut(Message):
    """``data`` appended to ``path`` in the VM's job directory (``offset`` 0 starts it)."""

    job_id: str = wire(JOB_ID)
    vm: str = wire(VmName)
    path: str = wire(RelPath)
    offset: int = wire(Int(0, 1 << 50))
    data: bytes = wire(Bytes(CHUNK))
    mode: int = wire(Int(0, 0o7777), default=0o644)
    last: bool = wire(Bool(), default=True)
    workdir: str = wire(WorkDir, default="work")


@dataclass(frozen=True)
class JobExec(Message):
    """Run ``argv`` in ``workdir`` (relative to the job directory) of VM ``vm``."""

    job_id: str = wire(JOB_ID)
    vm: str = wire(VmName)
    argv: tuple[str, ...] = wire(ListOf(Text(MAX_ARG), MAX_ARGV))
    workdir: str = wire(WorkDir, default="work")
    timeout: float = wire(Float(0.0, 30 * 86400.0), default=0.0)  # 0: none

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("a job needs a command")


@dataclass(frozen=True)
class Output(Message):
    """Bytes the command wrote to ``stream``, as they came."""

    stream: str = wire(Stream)
    data: bytes = wire(Bytes(CHUNK))


@dataclass(frozen=True)
class Changed(Record):
    path: str = wire(RelPath)
    kind: str = wire(Text(4, "file|dir", "kind"))


@dataclass(frozen=True)
class JobExit(Message):
    """How the command ended: its status (128 + N for signal N), and what it changed
    at the top of its working directory."""

    exit_code: int = wire(Int(-1, 1 << 16))
    timed_out: bool = wire(Bool(), default=False)
    seconds: float = wire(Float(0.0), default=0.0)
    changed: tuple[Changed, ...] = wire(ListOf(Nested(Changed), 100_000), default=())


@dataclass(frozen=True)
class JobGet(Message):
    job_id: str = wire(JOB_ID)
    vm: str = wire(VmName)
    path: str = wire(RelPath)
    workdir: str = wire(WorkDir, default="work")


@dataclass(frozen=True)
class FileChunk(Message):
    data: bytes = wire(Bytes(CHUNK))


@dataclass(frozen=True)
class FileDone(Message):
    """The end of ``job.get``: a file (``mode``), or a directory sent as a tar."""

    kind: str = wire(Text(4, "file|tar", "kind"))
    size: int = wire(Int(0, 1 << 50))
    mode: int = wire(Int(0, 0o7777), default=0o644)


@dataclass(frozen=True)
class JobLease(Message):
    """The job's owner still wants ``vms``: keep them ``seconds`` more (``keep``: the
    job ended with ``--keep``, they stay until someone shuts them down)."""

    job_id: str = wire(JOB_ID)
    vms: tuple[str, ...] = wire(ListOf(VmName, MAX_JOB_VMS))
    seconds: float = wire(Float(1.0, 3600.0))
    owner: str = wire(HexId)
    keep: bool = wire(Bool(), default=False)


@dataclass(frozen=True)
class JobEnd(Message):
    """The caller is done with job ``job_id``: shut its VMs down (or keep them, as it
    was opened) and answer when that is done."""

    job_id: str = wire(JOB_ID)


OPEN = StreamMethod("job.open", JobOpen, Empty, item=JobEvent)
END = Method("job.end", JobEnd, Empty)
PUT = Method("job.put", JobPut, Empty)
EXEC = StreamMethod("job.exec", JobExec, JobExit, item=Output)
GET = StreamMethod("job.get", JobGet, FileDone, item=FileChunk)

PUT_LOCAL = Method("job.put_local", JobPut, Empty)
EXEC_LOCAL = StreamMethod("job.exec_local", JobExec, JobExit, item=Output)
GET_LOCAL = StreamMethod("job.get_local", JobGet, FileDone, item=FileChunk)
LEASE_LOCAL = Method("job.lease_local", JobLease, Empty)
