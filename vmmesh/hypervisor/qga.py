"""QEMU guest agent protocol: a pure message layer and a thin trio client.

Theory of operation
-------------------
The agent speaks QMP-like JSON lines over a virtio-serial port that QEMU
exposes on the host as a Unix socket.  Unlike the monitor it has no greeting
and keeps no per-connection state: after a host reconnect, or when the agent
starts late, the stream may hold stale replies to an earlier client's
commands or half a line.  So every connection starts with a *sync*: the client
sends ``0xFF`` (which makes the agent reset its JSON parser) followed by
``guest-sync-delimited`` with a fresh random id.  The agent answers with
``0xFF`` then ``{"return": id}``.  ``AgentCodec`` discards everything until a
``0xFF`` whose following line returns *our* id; from then on replies arrive
strictly in command order, one command at a time.

Guest output is untrusted and size-bounded.  A reply longer than the line
limit is an error, except for ``guest-exec-status``: there the codec keeps
the reply's first ``limit`` bytes, streams over the rest without storing it
while picking out small scalar members (``"exitcode": 0``; base64 holds no
``"``, so such a match is always a real key) and hands out both as
``Oversized`` when the line ends.  The agent writes JSON members in hash
order, not schema order, so the exit code may come after megabytes of
output: scanning the whole line is what makes it reliable.
``salvage_exec_status`` then returns the exit code and the start of stdout,
marked truncated.

``GuestAgentClient`` moves bytes between a trio stream and the codec and
implements the commands the node uses: ping, exec (with exec-status polling),
chunked file upload and download, and shutdown.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from vmmesh.errors import GuestAgentError, GuestAgentSilent

DEFAULT_LINE_LIMIT = 1 << 20
FILE_CHUNK = 48 << 10  # raw bytes per guest-file-read/write: 64 KiB of base64
_RECEIVE_CHUNK = 64 << 10
_DELIM = 0xFF


@dataclass(frozen=True)
class Synced:
    """The agent echoed our sync id: the stream is aligned."""

    sync_id: int


@dataclass(frozen=True)
class Reply:
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    error_class: str
    desc: str


@dataclass(frozen=True)
class Oversized:
    """A reply over the line limit: its first ``limit`` bytes and its scalar members."""

    prefix: bytes
    scalars: dict[str, int | bool]


AgentEvent = Synced | Reply | ErrorReply | Oversized


class _State(Enum):
    UNSYNCED = "unsynced"
    SEEK_DELIMITER = "seek-delimiter"
    SYNC_LINE = "sync-line"
    READY = "ready"
    SKIP_LINE = "skip-line"


class AgentCodec:
    """The guest-agent client state machine without I/O."""

    def __init__(self, line_limit: int = DEFAULT_LINE_LIMIT) -> None:
        self.line_limit = line_limit
        self._buf = bytearray()
        self._state = _State.UNSYNCED
        self._sync_id = 0
        self._prefix = b""
        self._scalars: dict[str, int | bool] = {}
        self._tail = b""

    @property
    def synced(self) -> bool:
        return self._state in {_State.READY, _State.SKIP_LINE}

    def sync_request(self, sync_id: int | None = None) -> bytes:
        """Bytes that (re)start a sync; replies before its echo are discarded."""
        self._sync_id = secrets.randbelow(1 << 53) if sync_id is None else sync_id
        self._state = _State.SEEK_DELIMITER
        return bytes([_DELIM]) + encode_command("guest-sync-delimited", {"id": self._sync_id})

    def command(self, execute: str, arguments: Mapping[str, Any] | None = None) -> bytes:
        if not self.synced:
            raise RuntimeError("guest agent command before sync")
        return encode_command(execute, arguments)

    def desync(self) -> None:
        """Forget the stream's position: commands are refused until the next sync."""
        self._state = _State.UNSYNCED
        self._buf.clear()

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._state is _State.UNSYNCED:
            return  # nothing asked yet: whatever arrives is stale
        self._buf += data

    def next_event(self) -> AgentEvent | None:
        while True:
            if self._state is _State.SEEK_DELIMITER:
                at = self._buf.find(bytes([_DELIM]))
                if at < 0:
                    self._buf.clear()
                    return None
                del self._buf[: at + 1]
                self._state = _State.SYNC_LINE
            elif self._state is _State.SYNC_LINE:
                line = self._take_line()
                if line is None:
                    if len(self._buf) > 4096:  # a sync reply is tiny: this is junk
                        self._buf.clear()
                        self._state = _State.SEEK_DELIMITER
                    return None
                # a stale delimiter may precede ours on the same line
                if _is_sync_reply(line.rsplit(bytes([_DELIM]), 1)[-1], self._sync_id):
                    self._state = _State.READY
                    return Synced(self._sync_id)
                self._state = _State.SEEK_DELIMITER
            elif self._state is _State.SKIP_LINE:
                end = self._buf.find(b"\n")
                region = self._tail + bytes(self._buf[: end if end >= 0 else len(self._buf)])
                self._scalars.update(_scalars(region))
                if end < 0:
                    self._tail = region[-_TAIL:]
                    self._buf.clear()
                    return None
                del self._buf[: end + 1]
                self._state = _State.READY
                return Oversized(self._prefix, self._scalars)
            elif self._state is _State.READY:
                end = self._buf.find(b"\n", 0, self.line_limit + 1)
                if end < 0:
                    if len(self._buf) <= self.line_limit:
                        return None
                    # over the limit: keep a prefix, scan the rest as it streams by
                    self._prefix = bytes(self._buf[: self.line_limit])
                    self._scalars = {}
                    self._tail = b""
                    self._state = _State.SKIP_LINE
                    continue
                line = bytes(self._buf[:end]).strip(b"\r\n\t \xff")
                del self._buf[: end + 1]
                if line:
                    return parse_reply(line)
            else:
                return None

    def _take_line(self) -> bytes | None:
        end = self._buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line


_SCALAR = re.compile(rb'"([a-z-]{1,32})"\s*:\s*(-?\d{1,20}|true|false)')
_TAIL = 64  # longer than any _SCALAR match: a member split across chunks is still seen


def _scalars(data: bytes | bytearray) -> dict[str, int | bool]:
    found: dict[str, int | bool] = {}
    for m in _SCALAR.finditer(data):
        value = m.group(2)
        found[m.group(1).decode()] = (
            value == b"true" if value in {b"true", b"false"} else int(value)
        )
    return found


def encode_command(execute: str, arguments: Mapping[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"execute": execute}
    if arguments:
        obj["arguments"] = dict(arguments)
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _is_sync_reply(line: bytes, sync_id: int) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("return") == sync_id


def parse_reply(line: bytes) -> Reply | ErrorReply:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise GuestAgentError(f"guest agent sent bad JSON: {line[:80]!r}") from exc
    if isinstance(obj, dict) and "return" in obj:
        return Reply(obj["return"])
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        return ErrorReply(str(err.get("class", "")), str(err.get("desc", "")))
    raise GuestAgentError(f"guest agent sent an unknown message: {line[:80]!r}")


# --- guest-exec ----------------------------------------------------------


@dataclass(frozen=True)
class ExecStatus:
    exited: bool
    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool


def exec_arguments(
    argv: list[str], input_data: bytes | None, env: Mapping[str, str] | None
) -> dict[str, Any]:
    """``guest-exec`` arguments; output is captured (stdout and stderr apart)."""
    if not argv:
        raise ValueError("empty argv")
    args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if env is not None:
        args["env"] = [f"{k}={v}" for k, v in env.items()]
    if input_data is not None:
        args["input-data"] = base64.b64encode(input_data).decode()
    return args


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    text = text[: len(text) - len(text) % 4]
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise GuestAgentError("guest agent sent bad base64") from exc


def parse_exec_status(value: Any, output_limit: int) -> ExecStatus:
    """Turn a ``guest-exec-status`` answer into bounded output.

    A process killed by a signal gets ``128 + signal`` as its exit code, the
    shell convention, so callers need to look at one number only.
    """
    if not isinstance(value, dict) or not isinstance(value.get("exited"), bool):
        raise GuestAgentError("malformed guest-exec-status answer")
    out, err = _b64(value.get("out-data")), _b64(value.get("err-data"))
    truncated = bool(value.get("out-truncated") or value.get("err-truncated"))
    truncated |= len(out) > output_limit or len(err) > output_limit
    code = value.get("exitcode")
    if not isinstance(code, int):
        signal = value.get("signal")
        code = 128 + signal if isinstance(signal, int) else -1
    return ExecStatus(value["exited"], code, out[:output_limit], err[:output_limit], truncated)


_OUT_DATA = re.compile(rb'"out-data"\s*:\s*"([A-Za-z0-9+/=]*)')


def salvage_exec_status(reply: Oversized, output_limit: int) -> ExecStatus:
    """Recover what we can from an oversized ``guest-exec-status`` reply.

    The exit code comes from the scalar members seen anywhere in the line;
    stdout is what of ``out-data`` fits in the prefix (nothing when the agent
    wrote ``err-data`` first); stderr is lost.  Always marked truncated.
    """
    if reply.scalars.get("exited") is not True:
        raise GuestAgentError("guest agent reply over the size limit")
    code = reply.scalars.get("exitcode")
    if not isinstance(code, int) or isinstance(code, bool):
        signal = reply.scalars.get("signal")
        code = 128 + signal if isinstance(signal, int) and not isinstance(signal, bool) else -1
    out = b""
    if m := _OUT_DATA.search(reply.prefix):
        out = _b64(m.group(1).decode())[:output_limit]
    return ExecStatus(True, code, out, b"", True)


# --- the trio client -------------------------------------------------------


class GuestAgentClient:
    """One synced connection to a guest agent; use through ``open_agent``.

    Every command has a deadline (``timeout``): a guest that stops answering
    must not hang the node.
    """

    def __init__(self, stream: trio.abc.Stream, codec: AgentCodec) -> None:
        self._stream = stream
        self._codec = codec
        self._lock = trio.Lock()

    @property
    def in_step(self) -> bool:
        """Synced, and no command left without its reply since."""
        return self._codec.synced

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(_RECEIVE_CHUNK)
        except trio.BrokenResourceError as exc:
            raise GuestAgentError("guest agent connection broke") from exc
        if not data:
            raise GuestAgentError("guest agent socket hung up")
        self._codec.receive_data(data)

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise GuestAgentError("guest agent connection broke") from exc

    async def sync(
        self,
        attempt_timeout: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        """Sync, re-sending a fresh id every ``attempt_timeout`` until ``timeout``.

        The agent may not run yet (guest still booting): QEMU accepts the
        connection and the bytes, and nobody reads them.  Re-sending is how a
        late agent gets to see a request.
        """
        async with self._lock:
            with trio.move_on_after(timeout):
                while True:
                    await self._send(self._codec.sync_request())
                    with trio.move_on_after(attempt_timeout):
                        while True:
                            event = self._codec.next_event()
                            if isinstance(event, Synced):
                                return
                            if event is None:
                                await self._receive()
            raise GuestAgentSilent(f"guest agent did not answer guest-sync within {timeout:g} s")

    async def call(
        self,
        execute: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        line_limit: int = DEFAULT_LINE_LIMIT,
    ) -> Reply | Oversized:
        """Send one command and wait for its reply; ErrorReply becomes GuestAgentError.

        A call that ends without its reply (timeout, cancellation, hangup)
        leaves the stream out of step, since the late reply would be taken
        for the next command's; so the codec must be synced again first.
        """
        async with self._lock:
            if not self._codec.synced:
                raise GuestAgentError("guest agent stream out of step: sync again")
            self._codec.line_limit = line_limit
            answered = False
            try:
                with trio.move_on_after(timeout):
                    await self._send(self._codec.command(execute, arguments))
                    while True:
                        event = self._codec.next_event()
                        if event is None:
                            await self._receive()
                            continue
                        answered = True
                        if isinstance(event, ErrorReply):
                            raise GuestAgentError(f"{execute}: {event.error_class}: {event.desc}")
                        if isinstance(event, Reply | Oversized):
                            return event
            finally:
                if not answered:
                    self._codec.desync()
            raise GuestAgentError(f"guest agent did not answer {execute} within {timeout:g} s")

    async def execute(
        self,
        execute: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        reply = await self.call(execute, arguments, timeout=timeout)
        if isinstance(reply, Oversized):
            raise GuestAgentError(f"{execute}: reply over {DEFAULT_LINE_LIMIT} bytes")
        return reply.value

    async def send_only(self, execute: str, arguments: Mapping[str, Any] | None = None) -> None:
        """Send a command that does not answer on success (``guest-shutdown``)."""
        async with self._lock:
            await self._send(self._codec.command(execute, arguments))

    async def ping(self, timeout: float = 5.0) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def exec(
        self,
        argv: list[str],
        *,
        input_data: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        output_limit: int = 1 << 20,
        poll_interval: float = 0.02,
    ) -> ExecStatus:
        """Run ``argv`` in the guest and wait for it; output bounded by ``output_limit``.

        Polling starts fast and backs off by a fifth each time to one second,
        so a command is seen to end within about a fifth of its own time
        (0.02 s after a 0.1 s one, 0.07 s after a 0.3 s one: these are on the
        path of every VM made) and long ones cost about one round trip a
        second.
        """
        started = await self.execute("guest-exec", exec_arguments(argv, input_data, env))
        if not isinstance(started, dict) or not isinstance(started.get("pid"), int):
            raise GuestAgentError("malformed guest-exec answer")
        pid = started["pid"]
        line_limit = max(DEFAULT_LINE_LIMIT, 3 * output_limit + (64 << 10))
        interval = poll_interval
        with trio.move_on_after(timeout):
            while True:
                reply = await self.call("guest-exec-status", {"pid": pid}, line_limit=line_limit)
                if isinstance(reply, Oversized):
                    return salvage_exec_status(reply, output_limit)
                status = parse_exec_status(reply.value, output_limit)
                if status.exited:
                    return status
                await trio.sleep(interval)
                interval = min(interval * 1.2, 1.0)
        raise GuestAgentError(f"{argv[0]} did not finish within {timeout:g} s")

    async def spawn(self, argv: list[str], env: Mapping[str, str] | None = None) -> int:
        """Start ``argv`` in the guest without waiting (output not captured); its pid."""
        args = exec_arguments(argv, None, env)
        args["capture-output"] = False
        started = await self.execute("guest-exec", args)
        if not isinstance(started, dict) or not isinstance(started.get("pid"), int):
            raise GuestAgentError("malformed guest-exec answer")
        return int(started["pid"])

    async def exec_status(self, pid: int) -> ExecStatus:
        reply = await self.call("guest-exec-status", {"pid": pid})
        if isinstance(reply, Oversized):
            return salvage_exec_status(reply, 0)
        return parse_exec_status(reply.value, 0)

    async def read_range(self, guest_path: str, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes of a guest file from ``offset`` (b"" at its end)."""
        handle = await self.execute("guest-file-open", {"path": guest_path, "mode": "rb"})
        if not isinstance(handle, int):
            raise GuestAgentError("malformed guest-file-open answer")
        out = bytearray()
        try:
            if offset:
                await self.execute(
                    "guest-file-seek", {"handle": handle, "offset": offset, "whence": "set"}
                )
            while len(out) < count:
                want = min(FILE_CHUNK, count - len(out))
                res = await self.execute("guest-file-read", {"handle": handle, "count": want})
                if not isinstance(res, dict):
                    raise GuestAgentError("malformed guest-file-read answer")
                out += _b64(res.get("buf-b64"))
                if res.get("eof") or not res.get("count"):
                    break
        finally:
            with trio.CancelScope(shield=True):
                await self.execute("guest-file-close", {"handle": handle}, timeout=10.0)
        return bytes(out)

    async def write_file(self, guest_path: str, data: bytes, append: bool = False) -> None:
        """Upload in ``FILE_CHUNK`` pieces; the file is closed even on error."""
        mode = "ab" if append else "wb"
        handle = await self.execute("guest-file-open", {"path": guest_path, "mode": mode})
        if not isinstance(handle, int):
            raise GuestAgentError("malformed guest-file-open answer")
        try:
            for at in range(0, len(data), FILE_CHUNK):
                chunk = data[at : at + FILE_CHUNK]
                res = await self.execute(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                )
                if not isinstance(res, dict) or res.get("count") != len(chunk):
                    raise GuestAgentError(f"short write to {guest_path} in the guest")
        finally:
            with trio.CancelScope(shield=True):
                await self.execute("guest-file-close", {"handle": handle}, timeout=10.0)

    async def read_file(self, guest_path: str, limit: int = 64 << 20) -> bytes:
        """Download in ``FILE_CHUNK`` pieces; a file over ``limit`` bytes is an error."""
        handle = await self.execute("guest-file-open", {"path": guest_path, "mode": "rb"})
        if not isinstance(handle, int):
            raise GuestAgentError("malformed guest-file-open answer")
        out = bytearray()
        try:
            while True:
                res = await self.execute("guest-file-read", {"handle": handle, "count": FILE_CHUNK})
                if not isinstance(res, dict):
                    raise GuestAgentError("malformed guest-file-read answer")
                out += _b64(res.get("buf-b64"))
                if len(out) > limit:
                    raise GuestAgentError(f"{guest_path} in the guest is over {limit} bytes")
                if res.get("eof") or not res.get("count"):
                    return bytes(out)
        finally:
            with trio.CancelScope(shield=True):
                await self.execute("guest-file-close", {"handle": handle}, timeout=10.0)

    async def shutdown(self) -> None:
        """Ask the guest OS to power off; the agent does not answer on success."""
        await self.send_only("guest-shutdown", {"mode": "powerdown"})


async def connect_agent(path: Path) -> trio.SocketStream:
    """The agent's socket, connected (not synced yet)."""
    try:
        return await trio.open_unix_socket(str(path))
    except OSError as exc:
        raise GuestAgentError(f"cannot connect to guest agent {path}: {exc}") from exc


class AgentLink:
    """One guest's agent over a connection kept open from command to command.

    Each ``use`` has the connection to itself and syncs it first, as a new
    connection would, so a restarted agent or a late reply never puts it out
    of step; that sync costs a few ms.  A new connection per command cost
    80-90 ms a command on a guest that runs something (measured under TCG:
    the agent takes a new client late), and a job polls its command, and a
    new VM is asked to become itself, on the path the user waits on.  A use
    that leaves the stream out of step (timed out, cancelled, the channel
    broke) drops the connection; the next one connects again.  Only one
    client at a time reaches a guest's agent: the link is the guest's.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = trio.Lock()
        self._conn: tuple[trio.SocketStream, GuestAgentClient] | None = None
        self._close_after = False

    @asynccontextmanager
    async def use(
        self, *, sync_timeout: float = 10.0, attempt_timeout: float = 1.0
    ) -> AsyncIterator[GuestAgentClient]:
        """The agent, synced, for one command or a few."""
        async with self._lock:
            if self._conn is None:
                stream = await connect_agent(self.path)
                self._conn = (stream, GuestAgentClient(stream, AgentCodec()))
            client = self._conn[1]
            try:
                await client.sync(attempt_timeout=attempt_timeout, timeout=sync_timeout)
                yield client
            finally:
                if self._close_after or not client.in_step:
                    await self._drop()

    async def aclose(self) -> None:
        """Close the connection (the guest is gone); a use under way closes it as it ends."""
        if self._lock.locked():
            self._close_after = True
        else:
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn, self._close_after = self._conn, None, False
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn[0].aclose()
