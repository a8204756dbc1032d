"""Running jobs from the caller's side: one job (``vmmesh run``, ``vmmesh-condor``) or a
bag of tasks (``vmmesh run --tasks``), over the local node's control socket.

The caller holds a ``job.open`` call for as long as it needs the VMs; when it
leaves the session — finished, interrupted, killed — the call ends and the
node shuts the VMs down.  A session left normally says ``job.end`` first and
waits for its answer, so the VMs are gone when the caller returns.  Files are
read and written here, on the caller's side (the node never opens a user's
path): inputs go in as chunks, outputs come back as files or, for
directories, as tars unpacked with the ``data`` filter (no absolute paths, no
``..``, no links out).

Exit statuses (``EXIT``) tell vmmesh's own failures apart from the job's.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from vmmesh.api.common import Progress
from vmmesh.api.jobs import (
    CHUNK,
    END,
    EXEC,
    GET,
    OPEN,
    PUT,
    JobEnd,
    JobEvent,
    JobExec,
    JobExit,
    JobGet,
    JobOpen,
    JobPut,
    JobVm,
)
from vmmesh.errors import (
    CapacityError,
    ImageError,
    InternalError,
    JobError,
    JobInputError,
    JobLost,
    JobOutputMissing,
    NoJobVm,
    PackageInstallError,
    PeerUnavailable,
    UsageError,
    VmmeshError,
)
from vmmesh.jobs.bag import Bag, Outcome, TaskRun
from vmmesh.net.rpc import RpcConnection
from vmmesh.nurseries import open_nursery

# vmmesh run's own exit statuses (the job's own are 0..255, 128 + N for signal N).
EXIT_TIMEOUT = 124  # --timeout reached: the command was killed (as timeout(1))
EXIT_DATAERR = 65  # a package is not in the package source
EXIT_NOINPUT = 66  # an --input does not exist
EXIT_UNAVAILABLE = 69  # no VM could be had (no capacity, no base image)
EXIT_SOFTWARE = 70  # a bug in vmmesh (InternalError; EX_SOFTWARE as sysexits says)
EXIT_FAILURE = 71  # another vmmesh failure (the node not running, ...: its message says)
EXIT_NOOUTPUT = 73  # a named --output was not made by the command
EXIT_LOST = 75  # the VM or its host was lost during the job

EXIT_HELP = """\
exit status:
  the command's own status (0-255; 128+N when a signal N killed it)
  124  --timeout was reached and the command was killed
    2  bad arguments
   65  a package is not in the package source
   66  an --input file does not exist
   69  no VM could be had (no capacity, no base image)
   70  a bug in vmmesh (the message says where its log is)
   71  another vmmesh failure
   73  a named --output was not made by the command
   75  the VM or its host was lost during the job
with --tasks: 0 when every task exited 0, 1 when some did not.
"""

ProgressSink = Callable[[Progress], None]


def exit_status_of(exc: VmmeshError) -> int:
    """The exit status for a vmmesh failure (not the job's own)."""
    if isinstance(exc, PackageInstallError):
        return EXIT_DATAERR
    if isinstance(exc, JobInputError):
        return EXIT_NOINPUT
    if isinstance(exc, (NoJobVm, CapacityError, ImageError)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, JobOutputMissing):
        return EXIT_NOOUTPUT
    if isinstance(exc, (JobLost, PeerUnavailable)):
        return EXIT_LOST
    if isinstance(exc, InternalError):
        return EXIT_SOFTWARE
    return EXIT_FAILURE


@dataclass(frozen=True)
class JobSpec:
    argv: tuple[str, ...]
    packages: frozenset[str] = frozenset()
    custom_zip: bytes | None = None
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()  # empty: whatever the command created or changed
    vcpus: int | None = None
    memory_mb: int | None = None
    timeout: float = 0.0
    keep: bool = False
    fetch: str = "auto"

    def open_request(self, count: int = 1, tasks: int = 0) -> JobOpen:
        return JobOpen(
            count=count,
            tasks=tasks,
            packages=self.packages,
            custom_zip=self.custom_zip,
            vcpus=self.vcpus,
            memory_mb=self.memory_mb,
            fetch=self.fetch,
            keep=self.keep,
        )


@dataclass
class JobResult:
    exit_code: int
    timed_out: bool
    vm: JobVm
    seconds: float
    run_seconds: float
    outputs: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # vm, inputs, run, outputs, end


def result_json(result: JobResult) -> dict[str, object]:
    """How a job went, for ``--json`` and the wrapper's report."""
    return {
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "vm": result.vm.name,
        "host": result.vm.host,
        "start": result.vm.start,
        "vm_seconds": result.vm.seconds,
        "vm_phases": dict(result.vm.phases),
        "run_seconds": result.run_seconds,
        "seconds": result.seconds,
        "parts": result.parts,
        "outputs": result.outputs,
        "missing": result.missing,
    }


def check_inputs(paths: tuple[Path, ...]) -> None:
    for p in paths:
        if not p.exists():
            raise JobInputError(f"no such input file: {p}")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise UsageError("two inputs have the same name; the job directory holds one of each")


@dataclass
class Session:
    """An open job: its id and VMs."""

    job_id: str
    vms: tuple[JobVm, ...]
    unplaced: str


class JobClient:
    def __init__(self, conn: RpcConnection, progress: ProgressSink | None = None) -> None:
        self.conn = conn
        self.progress = progress

    @contextlib.asynccontextmanager
    async def session(self, request: JobOpen) -> AsyncIterator[Session]:
        """Hold ``request``'s VMs for the block; leaving it ends the job (the node shuts
        the VMs down, unless kept; a block left normally waits until they are
        gone).  Should the node end the job first (its link broke, it stopped),
        the block is cancelled and that error raised."""
        ready: list[Session] = []
        failed: list[VmmeshError] = []
        got = trio.Event()

        async def hold(scope: trio.CancelScope) -> None:
            try:
                async with self.conn.stream(OPEN, request) as answer:
                    async for event in answer:
                        self._event(event, ready, got)
            except VmmeshError as exc:
                failed.append(exc)
                scope.cancel()
            finally:
                got.set()

        async with open_nursery() as nursery:
            nursery.start_soon(hold, nursery.cancel_scope)
            await got.wait()
            if ready:
                try:
                    yield ready[0]
                    await self._end(ready[0].job_id)
                finally:
                    nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if not ready:
            raise JobError("the node ended the job before its VMs were ready")

    async def _end(self, job_id: str) -> None:
        """Ask the node to end the job; back when its VMs are gone."""
        # Failing, the VMs still go: the open call's end (next) makes the node shut them down.
        with contextlib.suppress(VmmeshError):
            await self.conn.request(END, JobEnd(job_id=job_id))

    def _event(self, event: JobEvent, ready: list[Session], got: trio.Event) -> None:
        if event.progress is not None and self.progress is not None:
            self.progress(event.progress)
        if event.ready:
            ready.append(Session(event.job_id, event.ready, event.unplaced))
            got.set()

    async def put(self, job_id: str, vm: str, src: Path, name: str, workdir: str = "work") -> None:
        """``src`` (a file, or a directory and all below it) into the job directory as ``name``."""
        if src.is_dir():
            for child in sorted(src.iterdir()):
                await self.put(job_id, vm, child, f"{name}/{child.name}", workdir)
            return
        mode = src.stat().st_mode & 0o7777
        offset = 0
        with src.open("rb") as fh:
            while True:
                data = fh.read(CHUNK)
                last = len(data) < CHUNK
                put = JobPut(
                    job_id=job_id, vm=vm, path=name, offset=offset, data=data,
                    mode=mode, last=last, workdir=workdir,
                )  # fmt: skip
                await self.conn.request(PUT, put)
                offset += len(data)
                if last:
                    return

    async def exec(self, request: JobExec, out: BinaryIO, err: BinaryIO) -> JobExit:
        """Run the command; its output goes to ``out`` and ``err`` as it comes."""
        async with self.conn.stream(EXEC, request) as answer:
            async for item in answer:
                sink = out if item.stream == "stdout" else err
                sink.write(item.data)
                sink.flush()
        return answer.result()

    async def get(self, job_id: str, vm: str, path: str, dest: Path, workdir: str = "work") -> None:
        """``path`` of the job directory into ``dest`` (same name); directories unpacked."""
        fd, tmp_name = tempfile.mkstemp(prefix=".vmmesh-", dir=dest)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                request = JobGet(job_id=job_id, vm=vm, path=path, workdir=workdir)
                async with self.conn.stream(GET, request) as answer:
                    async for chunk in answer:
                        fh.write(chunk.data)
                done = answer.result()
            if done.kind == "tar":
                with tarfile.open(tmp) as tar:
                    tar.extractall(dest, filter="data")
            else:
                tmp.chmod(done.mode & 0o777)
                os.replace(tmp, dest / path)
        finally:
            tmp.unlink(missing_ok=True)


async def run_job(
    conn: RpcConnection,
    spec: JobSpec,
    *,
    out: BinaryIO,
    err: BinaryIO,
    dest: Path,
    progress: ProgressSink | None = None,
) -> JobResult:
    """One job in a fresh VM: inputs in, command run, outputs back into ``dest``."""
    check_inputs(spec.inputs)
    clock = _Clock()
    client = JobClient(conn, progress)
    async with client.session(spec.open_request()) as session:
        parts = {"vm": clock.lap()}
        vm = session.vms[0]
        for src in spec.inputs:
            await client.put(session.job_id, vm.name, src, src.name)
        parts["inputs"] = clock.lap()
        request = JobExec(job_id=session.job_id, vm=vm.name, argv=spec.argv, timeout=spec.timeout)
        finished = await client.exec(request, out, err)
        parts["run"] = clock.lap()
        names = list(spec.outputs) or [c.path for c in finished.changed]
        result = JobResult(finished.exit_code, finished.timed_out, vm, 0.0, finished.seconds)
        for name in names:
            try:
                await client.get(session.job_id, vm.name, name, dest)
                result.outputs.append(name)
            except JobOutputMissing:
                if spec.outputs:
                    result.missing.append(name)
        parts["outputs"] = clock.lap()
    parts["end"] = clock.lap()  # the session's end: the node told to shut the VM down
    result.parts = parts
    result.seconds = round(clock.total(), 3)
    return result


class _Clock:
    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        lap, self.last = now - self.last, now
        return round(lap, 3)

    def total(self) -> float:
        return time.monotonic() - self.started


@dataclass
class BagResult:
    outcomes: list[Outcome]
    vms: tuple[JobVm, ...]
    seconds: float
    unplaced: str = ""


async def run_bag(
    conn: RpcConnection,
    spec: JobSpec,
    tasks: list[Path],
    vms: int,
    results: Path,
    *,
    progress: ProgressSink | None = None,
    on_outcome: Callable[[Outcome, int], None] | None = None,
) -> BagResult:
    """Run ``spec.argv`` once per task file (``{}`` is the file) over ``vms`` VMs."""
    started = time.monotonic()
    bag = Bag([t.name for t in tasks])
    by_name = {t.name: t for t in tasks}
    client = JobClient(conn, progress)
    changed = trio.Event()
    async with client.session(spec.open_request(vms, tasks=len(tasks))) as session:
        wake = [changed]

        async def worker(vm: JobVm) -> None:
            while not bag.done:
                run = bag.next(vm.name)
                if run is None:
                    if bag.stuck({v.name for v in session.vms}) or bag.is_lost(vm.name):
                        break
                    await wake[0].wait()
                    continue
                task = _Task(client, session.job_id, vm, run, by_name[run.task])
                await _run_task(task, bag, spec, results)
                if on_outcome is not None and run.index in bag.outcomes:
                    on_outcome(bag.outcomes[run.index], len(tasks))
                wake[0].set()
                wake[0] = trio.Event()

        async with open_nursery() as nursery:
            for vm in session.vms:
                nursery.start_soon(worker, vm)
    outcomes = [bag.outcomes[i] for i in sorted(bag.outcomes)]
    return BagResult(outcomes, session.vms, round(time.monotonic() - started, 2), session.unplaced)


@dataclass(frozen=True)
class _Task:
    """One attempt at one task file, on one VM."""

    client: JobClient
    job_id: str
    vm: JobVm
    run: TaskRun
    task: Path


async def _run_task(t: _Task, bag: Bag, spec: JobSpec, results: Path) -> None:
    client, job_id, vm, run, task = t.client, t.job_id, t.vm, t.run, t.task
    workdir = f"t{run.index}-{run.attempt}"
    folder = results / task.name
    folder.mkdir(parents=True, exist_ok=True)
    argv = tuple(a.replace("{}", task.name) for a in spec.argv)
    started = time.monotonic()
    try:
        await client.put(job_id, vm.name, task, task.name, workdir)
        with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
            request = JobExec(
                job_id=job_id, vm=vm.name, argv=argv, workdir=workdir, timeout=spec.timeout
            )
            finished = await client.exec(request, out, err)
        for c in finished.changed:
            if c.path != task.name:
                await client.get(job_id, vm.name, c.path, folder, workdir)
    except VmmeshError as exc:
        bag.lost(vm.name, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return
    bag.finished(vm.name, finished.exit_code, time.monotonic() - started, vm.host)
