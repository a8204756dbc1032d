"""A job inside its VM: files in, the command run with its output followed, files out.

Everything goes through the guest agent (the only host-guest channel).  The
job's files live under ``/root/vmmesh-job/<job id>/<workdir>``; the command's
stdout and stderr go to files beside that directory (``.<workdir>.out/``),
which the host reads as they grow, so output reaches the caller while the
command runs (the agent itself only hands over output at the end).  A
listing of the working directory before and after tells which files and
directories the command created or changed (what Condor transfers back when
no output is named).
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vmmesh.api.jobs import CHUNK, Changed, JobExit, JobPut, Output
from vmmesh.errors import GuestAgentError, HypervisorError, JobError, JobOutputMissing
from vmmesh.hypervisor.base import Guest

JOB_ROOT = "/root/vmmesh-job"
# The command's end is polled for from POLL after its start, a fifth more each time up
# to MAX_POLL (one agent call each: `true` is seen to end 0.02-0.05 s after it does,
# not up to 0.4 s); its output, six agent calls a look, is read at most every
# FOLLOW_EVERY while it runs, and once more at its end.
POLL = 0.02
MAX_POLL = 1.0
FOLLOW_EVERY = 0.5

_FIND = "find . -mindepth 1 -maxdepth 1 -printf '%P\\t%y\\t%T@\\t%s\\n'"
_LIST = f'mkdir -p "$1" && cd "$1" && {_FIND}'
# $1 work dir, $2 output dir, $3 timeout (0: none), then the command.  The
# listings of the working directory before and after the command are taken by
# the same guest process (``before``, ``after`` beside stdout): under TCG a
# guest command costs 0.1-0.3 s, and these were two of them on every job.
_RUN = (
    'w=$1; o=$2; t=$3; shift 3; mkdir -p "$w" "$o"; : > "$o/stdout"; : > "$o/stderr"; '
    f'cd "$w" || exit 126; {_FIND} > "$o/before"; '
    'if [ "$t" != 0 ]; then timeout --signal=KILL "$t" "$@" >"$o/stdout" 2>"$o/stderr"; '
    'else "$@" >"$o/stdout" 2>"$o/stderr"; fi; '
    f's=$?; {_FIND} > "$o/after"; exit $s'
)


@dataclass(frozen=True)
class Place:
    """Where one job's files are in the guest."""

    job_id: str
    workdir: str

    @property
    def work(self) -> str:
        return f"{JOB_ROOT}/{self.job_id}/{self.workdir}"

    @property
    def out(self) -> str:
        return f"{JOB_ROOT}/{self.job_id}/.{self.workdir}.out"

    def path(self, relative: str) -> str:
        return f"{self.work}/{relative}"


Entry = tuple[str, float, int]  # kind, mtime, size


def parse_listing(text: str) -> dict[str, Entry]:
    """``find -printf '%P\\t%y\\t%T@\\t%s'`` lines -> name: (kind, mtime, size)."""
    out: dict[str, Entry] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        name, kind, mtime, size = parts
        try:
            out[name] = (kind, float(mtime), int(size))
        except ValueError:
            continue
    return out


def changed(before: dict[str, Entry], after: dict[str, Entry]) -> tuple[Changed, ...]:
    """Files and directories created or changed at the top of the working directory."""
    out = []
    for name, entry in sorted(after.items()):
        if entry[0] not in ("f", "d") or "\n" in name:
            continue
        if before.get(name) != entry:
            out.append(Changed(path=name, kind="dir" if entry[0] == "d" else "file"))
    return tuple(out)


async def listing(guest: Guest, place: Place) -> dict[str, Entry]:
    res = await guest.exec(["sh", "-c", _LIST, "sh", place.work], output_limit=8 << 20)
    if res.exit_code != 0:
        raise JobError(f"cannot list the job directory: {res.stderr[-200:]!r}")
    return parse_listing(res.stdout.decode("utf-8", "replace"))


async def _listed(guest: Guest, place: Place, which: str) -> dict[str, Entry] | None:
    """The listing the job's wrapper wrote (None if it wrote none: killed first)."""
    try:
        text = await guest.read_file(f"{place.out}/{which}", 8 << 20)
    except GuestAgentError:
        return None
    return parse_listing(text.decode("utf-8", "replace"))


async def put(guest: Guest, place: Place, chunk: JobPut) -> None:
    """Append a chunk of an input file (``offset`` 0 starts it, ``last`` sets its mode)."""
    path, offset, data, mode, last = chunk.path, chunk.offset, chunk.data, chunk.mode, chunk.last
    target = place.path(path)
    if offset == 0:
        parent = target.rsplit("/", 1)[0]
        res = await guest.exec(["mkdir", "-p", parent])
        if res.exit_code != 0:
            raise JobError(f"cannot make {parent} in the guest")
    await guest.write_file(target, data, append=offset > 0)
    if last:
        await guest.exec(["chmod", f"{mode & 0o7777:o}", target])


Emit = Callable[[Output], Awaitable[None]]


async def run(guest: Guest, place: Place, argv: list[str], timeout: float, emit: Emit) -> JobExit:
    """Run ``argv`` in the job directory; stream its output; how it ended and what changed."""
    started = trio.current_time()
    seconds = f"{timeout:.0f}" if timeout else "0"
    pid = await guest.spawn(["sh", "-c", _RUN, "sh", place.work, place.out, seconds, *argv])
    offsets = {"stdout": 0, "stderr": 0}
    interval = POLL
    followed = started
    while True:
        status = await guest.exec_status(pid)
        now = trio.current_time()
        if status is not None or now - followed >= FOLLOW_EVERY:
            followed = now
            while await _follow(guest, place, offsets, emit):
                pass
        if status is not None:
            break
        await trio.sleep(interval)
        interval = min(MAX_POLL, interval * 1.2)
    elapsed = trio.current_time() - started
    before = await _listed(guest, place, "before") or {}
    after = await _listed(guest, place, "after")
    if after is None:  # the wrapper itself was killed: list from outside
        after = await listing(guest, place)
    timed_out = bool(timeout) and status.exit_code == 137 and elapsed >= timeout - 0.5
    return JobExit(
        exit_code=status.exit_code,
        timed_out=timed_out,
        seconds=round(elapsed, 3),
        changed=changed(before, after),
    )


async def _follow(guest: Guest, place: Place, offsets: dict[str, int], emit: Emit) -> bool:
    """Pass on what stdout and stderr gained; True if anything was read."""
    any_read = False
    for stream in ("stdout", "stderr"):
        try:
            data = await guest.read_range(f"{place.out}/{stream}", offsets[stream], CHUNK)
        except GuestAgentError:
            continue  # not made yet
        if data:
            offsets[stream] += len(data)
            any_read = True
            await emit(Output(stream=stream, data=data))
    return any_read


async def fetch(
    guest: Guest, place: Place, path: str, emit: Callable[[bytes], Awaitable[None]]
) -> tuple[str, int, int]:
    """Send ``path`` of the working directory: a file as it is, a directory as a tar.
    Returns (kind, size, mode)."""
    target = place.path(path)
    res = await guest.exec(["stat", "-L", "-c", "%F\t%a", target])
    if res.exit_code != 0:
        raise JobOutputMissing(f"the job made no {path!r}")
    kind_text, _, mode_text = res.stdout.decode().strip().partition("\t")
    mode = int(mode_text, 8) if mode_text.isdigit() else 0o644
    source, kind = target, "file"
    if kind_text == "directory":
        source, kind = f"{place.out}/get.tar", "tar"
        tar = f"tar -C {shlex.quote(place.work)} -cf {shlex.quote(source)} -- {shlex.quote(path)}"
        res = await guest.exec(["sh", "-c", tar], timeout=3600.0)
        if res.exit_code != 0:
            raise JobError(f"cannot pack {path!r}: {res.stderr[-200:]!r}")
    elif kind_text not in ("regular file", "regular empty file"):
        raise JobError(f"{path!r} is a {kind_text}, not a file or directory")
    size = 0
    while True:
        try:
            data = await guest.read_range(source, size, CHUNK)
        except HypervisorError as exc:
            raise JobError(f"cannot read {path!r} from the guest: {exc}") from None
        if not data:
            break
        size += len(data)
        await emit(data)
    return kind, size, mode
