"""Byte pipes over the mesh's RPC: a local byte stream on each host, joined.

A migration moves bytes that are not RPC bodies: QEMU's RAM stream, the
NBD connection of the disk mirror (both ways), whole files.  Each such
*channel* of a *session* has a local end on both hosts (an ``End``: read and
write bytes, say end-of-file).  The host that starts the channel calls
``migrate.pipe`` over a connection of its own to the other host; the callee
answers with the bytes its end reads, as ``Chunk`` items, and pulls the
caller's bytes the other way with a ``migrate.pipe`` call back over the same
connection (``CallContext.connection``).  Each direction ends at its
reader's end-of-file: the other side then half-closes its local end, so
QEMU and NBD see the close they expect.  Bytes are counted per direction.

No byte arrives unasked: a pipe names a session the callee holds, opened
for that very peer; anything else is ``NotFound``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vmmesh.api.migrate import CHUNK, PIPE, Channel, Chunk, PipeEnd, PipeRequest
from vmmesh.errors import NotFound, PeerUnavailable, TransferError
from vmmesh.net.rpc import Context, RpcConnection
from vmmesh.nurseries import open_nursery

END_WAIT = 60.0  # seconds a pipe waits for its local end to be made (QEMU to connect)


class End:
    """One host's end of a channel."""

    async def read(self) -> bytes:
        """The next bytes, b"" at end-of-file."""
        return b""

    async def write(self, data: bytes) -> None:
        raise TransferError("this end of the pipe takes no bytes")

    async def write_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class StreamEnd(End):
    """A socket (QEMU's migration fd, an NBD connection)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def read(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(CHUNK))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransferError(f"the local end of the pipe closed: {exc}") from exc

    async def write_eof(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class FileSource(End):
    """A file sent whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: trio._file_io.AsyncIOWrapper[Any] | None = None

    async def read(self) -> bytes:
        if self._file is None:
            self._file = await trio.open_file(self.path, "rb")
        return bytes(await self._file.read(CHUNK))

    async def aclose(self) -> None:
        if self._file is not None:
            await self._file.aclose()


class FileSink(End):
    """A file received whole: written to ``path.part``, renamed at end-of-file (the
    pipe has checked the count against the sender's); at most ``limit`` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.part = path.with_name(path.name + ".part")
        self.received = 0
        self._file: trio._file_io.AsyncIOWrapper[Any] | None = None
        self.done = False

    async def write(self, data: bytes) -> None:
        if self._file is None:
            self._file = await trio.open_file(self.part, "wb")
        self.received += len(data)
        if self.received > self.limit:
            raise TransferError(f"{self.path.name}: more than {self.limit} bytes")
        await self._file.write(data)

    async def write_eof(self) -> None:
        if self._file is None:
            self._file = await trio.open_file(self.part, "wb")
        await self._file.aclose()
        self.part.rename(self.path)
        self.done = True

    async def aclose(self) -> None:
        if self._file is not None:
            await self._file.aclose()
        if not self.done:
            self.part.unlink(missing_ok=True)


@dataclass
class Counts:
    """Bytes moved per channel, each way."""

    sent: dict[Channel, int] = field(default_factory=dict)
    received: dict[Channel, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.sent.values()) + sum(self.received.values())


Opener = Callable[[Channel], Awaitable[End]]


class PipeSession:
    """The ends of one migration session on one host."""

    def __init__(self, session: str, peer_id: str, opener: Opener | None = None) -> None:
        self.session = session
        self.peer_id = peer_id
        self.counts = Counts()
        self._ends: dict[Channel, End] = {}
        self._ready: dict[Channel, trio.Event] = {}
        self._opener = opener
        self.started: set[Channel] = set()  # channels this host started (``join``)

    def put(self, channel: Channel, end: End) -> None:
        self._ends[channel] = end
        self._ready.setdefault(channel, trio.Event()).set()

    async def end(self, channel: Channel) -> End:
        """The local end of ``channel``: made by the opener, or waited for."""
        if channel not in self._ends and self._opener is not None:
            self.put(channel, await self._opener(channel))
        event = self._ready.setdefault(channel, trio.Event())
        with trio.move_on_after(END_WAIT):
            await event.wait()
        end = self._ends.get(channel)
        if end is None:
            raise NotFound(f"migration {self.session[:8]}: no {channel} end here")
        return end

    async def aclose(self) -> None:
        for end in self._ends.values():
            with trio.CancelScope(shield=True):
                await end.aclose()


async def _pump_out(end: End, send: Callable[[Chunk], Awaitable[None]]) -> int:
    """Send what ``end`` reads until its end-of-file; returns the bytes."""
    count = 0
    while data := await end.read():
        count += len(data)
        await send(Chunk(data=data))
    return count


async def _pump_in(conn: RpcConnection, req: PipeRequest, end: End) -> int:
    """Call ``migrate.pipe`` and write what comes into ``end``; half-close it after."""
    count = 0
    async with conn.stream(PIPE, req) as answer:
        async for chunk in answer:
            count += len(chunk.data)
            await end.write(chunk.data)
    sent = answer.result().bytes
    if sent != count:
        raise TransferError(f"{req.channel}: {count} bytes came of the {sent} sent")
    await end.write_eof()
    return count


async def join(conn: RpcConnection, sessions: PipeSession, channel: Channel) -> None:
    """Start ``channel`` from this host: bytes flow both ways until both ends are done."""
    end = await sessions.end(channel)
    sessions.started.add(channel)
    req = PipeRequest(session=sessions.session, channel=channel)
    sessions.counts.received[channel] = await _pump_in(conn, req, end)


async def serve(
    ctx: Context, req: PipeRequest, lookup: Callable[[str], PipeSession | None]
) -> PipeEnd:
    """The handler of ``migrate.pipe``: stream this end's bytes; for the first call of a
    channel (the caller's), also pull the caller's bytes back over the same connection."""
    session = lookup(req.session)
    if session is None or session.peer_id != ctx.peer_id:
        raise NotFound(f"no migration {req.session[:8]} from {ctx.peer_id[:12]} here")
    end = await session.end(req.channel)
    connection = getattr(ctx, "connection", None)
    if not isinstance(connection, RpcConnection):
        raise PeerUnavailable("a pipe needs a connection to the other host")
    sent = 0
    back = req.channel in session.started  # the call back to the starter: send only

    async def out() -> None:
        nonlocal sent
        sent = await _pump_out(end, ctx.send_item)
        session.counts.sent[req.channel] = sent

    if back:
        await out()
        return PipeEnd(bytes=sent)
    async with open_nursery() as nursery:
        nursery.start_soon(out)
        session.counts.received[req.channel] = await _pump_in(connection, req, end)
    return PipeEnd(bytes=sent)
