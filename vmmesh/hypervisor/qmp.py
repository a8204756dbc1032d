"""QEMU Machine Protocol: a pure message layer and a thin trio client.

Theory of operation
-------------------
QMP is JSON objects, one per line, over a Unix socket.  QEMU speaks first with
a greeting (``{"QMP": {...}}``); the client must send ``qmp_capabilities``
before any other command.  Afterwards every command carries an ``id`` that QEMU
copies into its ``return`` or ``error`` reply, and asynchronous ``event``
objects may arrive between them at any time.

``QMPCodec`` is the whole protocol without I/O, h11 style: ``receive_data``
takes bytes, ``next_event`` hands out parsed messages, ``command`` returns the
bytes to send.  ``LineSplitter`` bounds memory: a line longer than its limit is
an error, never a growing buffer.  ``QMPClient`` only moves bytes between a
trio stream and the codec, and is used one short connection per operation (the
monitor accepts a single client at a time, so nothing is held open between
operations and a restarted node can attach to the same socket).
"""

from __future__ import annotations

import array
import itertools
import json
import shlex
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from vmmesh.errors import QMPError

DEFAULT_LINE_LIMIT = 1 << 20
_RECEIVE_CHUNK = 64 << 10


class LineSplitter:
    """Split a byte stream into ``\\n``-terminated lines, at most ``limit`` long.

    The buffer never holds more than ``limit`` bytes plus one received chunk:
    that is what makes a misbehaving QEMU or guest unable to grow our memory.
    """

    def __init__(self, limit: int = DEFAULT_LINE_LIMIT) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None if more bytes are needed."""
        end = self._buf.find(b"\n", 0, self.limit + 1)
        if end < 0:
            if len(self._buf) > self.limit:
                raise QMPError(f"monitor sent a line longer than {self.limit} bytes")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line


@dataclass(frozen=True)
class Greeting:
    """QEMU's first message: its version and offered capabilities."""

    version: dict[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Return:
    id: str | None
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    id: str | None
    error_class: str
    desc: str


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    timestamp: float


QMPMessage = Greeting | Return | ErrorReply | Event


class _State(Enum):
    GREETING = "greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"


def parse_message(line: bytes) -> QMPMessage:
    """Parse one QMP line; raises QMPError for anything that is not QMP."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise QMPError(f"monitor sent bad JSON: {line[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise QMPError(f"monitor sent a non-object: {line[:80]!r}")
    ident = obj.get("id")
    ident = ident if isinstance(ident, str) else None
    if "QMP" in obj:
        qmp = obj["QMP"]
        if not isinstance(qmp, dict):
            raise QMPError("malformed QMP greeting")
        version = qmp.get("version", {})
        caps = qmp.get("capabilities", [])
        return Greeting(
            version=version if isinstance(version, dict) else {},
            capabilities=tuple(str(c) for c in caps) if isinstance(caps, list) else (),
        )
    if "return" in obj:
        return Return(id=ident, value=obj["return"])
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict):
            raise QMPError("malformed QMP error")
        return ErrorReply(
            id=ident, error_class=str(err.get("class", "")), desc=str(err.get("desc", ""))
        )
    if "event" in obj:
        ts: Any = obj.get("timestamp")
        try:
            secs = float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
        except (TypeError, KeyError, ValueError):
            secs = 0.0  # a timestamp is informative only
        data = obj.get("data", {})
        return Event(
            name=str(obj["event"]), data=data if isinstance(data, dict) else {}, timestamp=secs
        )
    raise QMPError(f"unknown QMP message: {line[:80]!r}")


class QMPCodec:
    """The QMP client state machine without I/O.

    Events arrive in order: first the ``Greeting``; after the caller sent
    ``negotiate()`` a ``Return`` for it moves the codec to READY.  ``command``
    before READY is a usage bug, a second greeting is a peer bug.
    """

    def __init__(self, line_limit: int = DEFAULT_LINE_LIMIT) -> None:
        self._lines = LineSplitter(line_limit)
        self._state = _State.GREETING
        self._ids = itertools.count(1)
        self._negotiate_id: str | None = None

    @property
    def ready(self) -> bool:
        return self._state is _State.READY

    def receive_data(self, data: bytes | bytearray) -> None:
        self._lines.feed(data)

    def next_event(self) -> QMPMessage | None:
        while (line := self._lines.next_line()) is not None:
            if not line.strip():
                continue
            msg = parse_message(line)
            if isinstance(msg, Greeting):
                if self._state is not _State.GREETING:
                    raise QMPError("second QMP greeting")
                self._state = _State.NEGOTIATING
            elif self._state is _State.GREETING:
                raise QMPError("monitor spoke before its greeting")
            elif self._negotiate_id is not None and getattr(msg, "id", None) == self._negotiate_id:
                if isinstance(msg, ErrorReply):
                    raise QMPError(f"qmp_capabilities refused: {msg.desc}")
                self._negotiate_id = None
                self._state = _State.READY
            return msg
        return None

    def negotiate(self) -> bytes:
        """Bytes of the ``qmp_capabilities`` command that leaves negotiation mode."""
        if self._state is not _State.NEGOTIATING or self._negotiate_id is not None:
            raise RuntimeError("negotiate() needs a greeting and may be sent once")
        self._negotiate_id, data = self._encode("qmp_capabilities", None)
        return data

    def command(self, execute: str, arguments: dict[str, Any] | None = None) -> tuple[str, bytes]:
        """Return ``(id, bytes)`` for one command; the reply carries the same id."""
        if self._state is not _State.READY:
            raise RuntimeError("QMP command before capabilities negotiation")
        return self._encode(execute, arguments)

    def _encode(self, execute: str, arguments: dict[str, Any] | None) -> tuple[str, bytes]:
        ident = f"vmmesh-{next(self._ids)}"
        obj: dict[str, Any] = {"execute": execute, "id": ident}
        if arguments:
            obj["arguments"] = arguments
        return ident, json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class QMPClient:
    """One negotiated QMP connection; use through ``open_qmp``."""

    def __init__(self, stream: trio.abc.Stream, codec: QMPCodec) -> None:
        self._stream = stream
        self._codec = codec
        self._lock = trio.Lock()
        self.events: deque[Event] = deque(maxlen=256)

    async def _next(self) -> QMPMessage:
        while (msg := self._codec.next_event()) is None:
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except trio.BrokenResourceError as exc:
                raise QMPError("monitor connection broke") from exc
            if not data:
                raise QMPError("monitor hung up")
            self._codec.receive_data(data)
        return msg

    async def _handshake(self) -> None:
        msg = await self._next()
        if not isinstance(msg, Greeting):
            raise QMPError("monitor did not greet")
        try:  # a QEMU that greets and then exits (a failed start) breaks the pipe here
            await self._stream.send_all(self._codec.negotiate())
        except trio.BrokenResourceError as exc:
            raise QMPError("monitor connection broke") from exc
        while not self._codec.ready:
            msg = await self._next()
            if isinstance(msg, Event):
                self.events.append(msg)

    async def execute(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value; QMPError on an error reply."""
        async with self._lock:
            ident, data = self._codec.command(execute, arguments)
            try:
                await self._stream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise QMPError("monitor connection broke") from exc
            while True:
                msg = await self._next()
                if isinstance(msg, Event):
                    self.events.append(msg)
                elif isinstance(msg, Return) and msg.id == ident:
                    return msg.value
                elif isinstance(msg, ErrorReply) and msg.id == ident:
                    raise QMPError(f"{execute}: {msg.error_class}: {msg.desc}")

    async def execute_with_fd(self, execute: str, arguments: dict[str, Any], fd: int) -> Any:
        """Run one command with ``fd`` passed beside it (``getfd``: SCM_RIGHTS).

        The descriptor is QEMU's from then on (a duplicate; the caller still
        closes its own).  Needs a Unix socket stream.
        """
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            raise QMPError(f"{execute}: the monitor connection cannot pass descriptors")
        async with self._lock:
            ident, data = self._codec.command(execute, arguments)
            rights = array.array("i", [fd]).tobytes()
            try:
                await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            except OSError as exc:
                raise QMPError(f"{execute}: monitor connection broke: {exc}") from exc
            while True:
                msg = await self._next()
                if isinstance(msg, Event):
                    self.events.append(msg)
                elif isinstance(msg, Return) and msg.id == ident:
                    return msg.value
                elif isinstance(msg, ErrorReply) and msg.id == ident:
                    raise QMPError(f"{execute}: {msg.error_class}: {msg.desc}")


@asynccontextmanager
async def open_qmp(path: Path, line_limit: int = DEFAULT_LINE_LIMIT) -> AsyncIterator[QMPClient]:
    """Connect to a QMP socket, negotiate capabilities, close on exit."""
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        raise QMPError(f"cannot connect to monitor {path}: {exc}") from exc
    async with stream:
        client = QMPClient(stream, QMPCodec(line_limit))
        await client._handshake()
        yield client


def migrate_to_file_uri(dest: Path) -> str:
    """``migrate`` URI that writes the stream to ``dest`` (QEMU 7.2 has no ``file:``)."""
    return f"exec:cat > {shlex.quote(str(dest))}"


def incoming_from_file_uri(src: Path) -> str:
    """``-incoming`` URI that reads a stream written by ``migrate_to_file_uri``."""
    return f"exec:cat {shlex.quote(str(src))}"


def migration_finished(query_migrate: Any) -> bool:
    """True when a ``query-migrate`` answer says completed; QMPError when it failed."""
    if not isinstance(query_migrate, dict):
        raise QMPError("malformed query-migrate answer")
    status = query_migrate.get("status")
    if status == "completed":
        return True
    if status in {"failed", "cancelled"}:
        raise QMPError(f"migration {status}: {query_migrate.get('error-desc', '')}")
    return False


@dataclass(frozen=True)
class MigrationStats:
    """What ``query-migrate`` says about a migration, in bytes and milliseconds."""

    status: str
    total_ms: int = 0
    downtime_ms: int | None = None  # set once completed
    expected_downtime_ms: int | None = None
    setup_ms: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    dirty_pages_rate: int = 0  # pages per second
    mbps: float = 0.0
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.status in {"failed", "cancelled"}


def _int(raw: Any, key: str) -> int:
    value = raw.get(key) if isinstance(raw, dict) else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def migration_stats(answer: Any) -> MigrationStats:
    """``query-migrate``'s answer as ``MigrationStats``; QMPError when it is not one."""
    if not isinstance(answer, dict):
        raise QMPError("malformed query-migrate answer")
    ram = answer.get("ram", {})
    mbps = ram.get("mbps", 0.0) if isinstance(ram, dict) else 0.0
    return MigrationStats(
        status=str(answer.get("status", "none")),
        total_ms=_int(answer, "total-time"),
        downtime_ms=_int(answer, "downtime") if "downtime" in answer else None,
        expected_downtime_ms=(
            _int(answer, "expected-downtime") if "expected-downtime" in answer else None
        ),
        setup_ms=_int(answer, "setup-time"),
        ram_transferred=_int(ram, "transferred"),
        ram_remaining=_int(ram, "remaining"),
        ram_total=_int(ram, "total"),
        dirty_pages_rate=_int(ram, "dirty-pages-rate"),
        mbps=float(mbps) if isinstance(mbps, int | float) else 0.0,
        error=str(answer.get("error-desc", "")),
    )


@dataclass(frozen=True)
class MirrorJob:
    """One ``query-block-jobs`` entry: bytes copied of the bytes known to copy."""

    job_id: str
    ready: bool
    offset: int
    length: int
    status: str


def block_jobs(answer: Any) -> dict[str, MirrorJob]:
    """``query-block-jobs``'s answer by job id; QMPError when it is not one."""
    if not isinstance(answer, list):
        raise QMPError("malformed query-block-jobs answer")
    jobs = {}
    for raw in answer:
        if not isinstance(raw, dict) or not isinstance(raw.get("device"), str):
            raise QMPError("malformed block job")
        jobs[raw["device"]] = MirrorJob(
            job_id=raw["device"],
            ready=bool(raw.get("ready", False)),
            offset=_int(raw, "offset"),
            length=_int(raw, "len"),
            status=str(raw.get("status", "")),
        )
    return jobs
