"""Multiplexed calls over one framed stream, in both directions.

Theory of operation: an ``RpcConnection`` owns a byte stream (TLS to a
peer, or a memory stream in tests) and runs two loops inside ``run()``:

* the *reader* feeds received bytes to a ``FrameDecoder``, decodes each
  envelope and routes it: a ``Call`` starts a handler task (at most
  ``max_concurrent`` at once, which is the backpressure on a peer that
  floods us), a ``Cancel`` cancels one, and replies go to the waiting
  caller's channel;
* the *writer* is the only task that writes to the stream.  Everyone else
  hands it encoded frames through a bounded channel, so a caller cancelled
  mid-send can never leave half a frame on the wire.

Either side may call the other (gossip is symmetric).  Call ids are
per-direction counters starting at 1; id 0 is for connection-level errors.

When the peer breaks the protocol (garbage, oversized frame, wrong shape,
unknown kind or version) the connection answers ``Fail(0, "ProtocolError")``
if it can, logs once per peer and closes; other connections are untouched.
An unknown *method* is not a protocol break: it gets
``Fail(id, "UnknownMessage")`` and the connection stays open, so peers of
different versions can talk.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from vmmesh.errors import PeerUnavailable, ProtocolError, RemoteError, VmmeshError
from vmmesh.mesh.pki import Identity
from vmmesh.net.tls import WarnOnce, describe_error, open_peer, peer_node_id
from vmmesh.wire.envelope import (
    Body,
    Call,
    Cancel,
    End,
    Envelope,
    Fail,
    Item,
    Reply,
    check_method,
    decode,
    encode,
)
from vmmesh.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

log = logging.getLogger(__name__)
_warn_once = WarnOnce(log)

MAX_CONCURRENT = 64
REPLY_BUFFER = 64
OUTBOX = 16
LINGER = 5.0
_RECEIVE_SIZE = 256 << 10
_MAX_FAIL_TEXT = 1024


@dataclass
class CallContext:
    """What a handler knows about the call it serves."""

    peer_id: str
    method: str
    _conn: RpcConnection
    _id: int
    streamed: bool = field(default=False, init=False)

    async def send_item(self, body: Body) -> None:
        """Send one item of a streamed reply (the call then ends with End)."""
        self.streamed = True
        await self._conn._send(Item(self._id, body))


Handler = Callable[[CallContext, Body], Awaitable[Body | None]]


class RpcConnection:
    """Calls to and from one peer over one stream; start ``run()`` in a nursery."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer_id: str,
        handlers: Mapping[str, Handler] | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self.peer_id = peer_id
        self._stream = stream
        self._handlers: Mapping[str, Handler] = handlers or {}
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Envelope]] = {}
        self._serving: dict[int, trio.CancelScope] = {}
        self._slots = trio.Semaphore(max_concurrent)
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[bytes](OUTBOX)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._close_reason = f"connection to {peer_id} closed"
        self._writer_done = trio.Event()

    # --- running ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until the peer hangs up, breaks the protocol or we close."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                task_status.started()
                try:
                    await self._reader()
                except ProtocolError as exc:
                    await self._protocol_error(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._close_reason = (
                        f"connection to {self.peer_id} broke: {describe_error(exc)}"
                    )
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self._outbox_send.close()  # wakes callers blocked on a full outbox
            for channel in self._pending.values():
                channel.close()
            self._pending.clear()
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection; pending calls raise PeerUnavailable."""
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        else:
            await trio.aclose_forcefully(self._stream)

    async def _reader(self) -> None:
        decoder = FrameDecoder(self._max_frame)
        while True:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return
            decoder.feed(data)
            while (obj := decoder.next_message()) is not None:
                if not await self._dispatch(decode(obj)):
                    return

    async def _writer(self) -> None:
        try:
            async for frame in self._outbox_recv:
                await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._close_reason = f"connection to {self.peer_id} broke: {describe_error(exc)}"
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        finally:
            self._writer_done.set()

    async def _protocol_error(self, exc: ProtocolError) -> None:
        """Tell the peer why, let the writer flush that for a moment, then give up."""
        _warn_once(
            self.peer_id, "closing connection to %s: %s: %s", self.peer_id, type(exc).__name__, exc
        )
        self._close_reason = f"{self.peer_id} broke the protocol: {exc}"
        with trio.move_on_after(LINGER), contextlib.suppress(PeerUnavailable):
            await self._send(Fail(0, "ProtocolError", str(exc)[:_MAX_FAIL_TEXT]))
            await self._outbox_send.aclose()
            await self._writer_done.wait()

    def _frame(self, msg: Envelope) -> bytes:
        return encode_frame(encode(msg), self._max_frame)

    async def _send(self, msg: Envelope) -> None:
        await self._queue(self._frame(msg))

    async def _queue(self, frame: bytes) -> None:
        """Hand a frame to the writer; PeerUnavailable once the connection is gone."""
        try:
            await self._outbox_send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerUnavailable(self._close_reason) from None

    # --- incoming -------------------------------------------------------------

    async def _dispatch(self, msg: Envelope) -> bool:
        """Route one envelope; False when the peer said it is closing."""
        match msg:
            case Call():
                if msg.id == 0 or msg.id in self._serving:
                    raise ProtocolError(f"call id {msg.id} is reserved or already in use")
                await self._slots.acquire()
                scope = trio.CancelScope()
                self._serving[msg.id] = scope
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_call, msg, scope)
            case Cancel():
                if (target := self._serving.get(msg.id)) is not None:
                    target.cancel()
            case Fail(id=0):
                self._close_reason = (
                    f"{self.peer_id} closed the connection: {msg.code}: {msg.message}"
                )
                return False
            case Reply() | Fail() | Item() | End():
                channel = self._pending.get(msg.id)
                if channel is None:
                    return True  # the caller gave up (Cancel crossed the answer on the wire)
                try:
                    await channel.send(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._pending.pop(msg.id, None)
        return True

    async def _serve_call(self, call: Call, scope: trio.CancelScope) -> None:
        try:
            with scope:
                answer = await self._answer(call)
                try:
                    frame = self._frame(answer)
                except Exception as exc:  # not packable or over the frame limit
                    log.exception("reply to %s from %s cannot be sent", call.method, self.peer_id)
                    frame = self._frame(Fail(call.id, "InternalError", f"bad reply: {exc}"[:200]))
                with contextlib.suppress(PeerUnavailable):
                    await self._queue(frame)
        finally:
            del self._serving[call.id]
            self._slots.release()

    async def _answer(self, call: Call) -> Envelope:
        handler = self._handlers.get(call.method)
        if handler is None:
            return Fail(call.id, "UnknownMessage", f"unknown method {call.method!r}")
        ctx = CallContext(self.peer_id, call.method, self, call.id)
        try:
            body = await handler(ctx, call.body)
            if body is not None and not isinstance(body, dict):
                raise TypeError(f"handler returned {type(body).__name__}, not a map")
            if ctx.streamed:
                if body:
                    await self._send(Item(call.id, body))
                return End(call.id)
            return Reply(call.id, body or {})
        except VmmeshError as exc:
            return Fail(call.id, type(exc).__name__, str(exc)[:_MAX_FAIL_TEXT])
        except Exception:
            log.exception("handler for %s from %s failed", call.method, self.peer_id)
            return Fail(call.id, "InternalError", f"internal error in {call.method}")

    # --- outgoing ------------------------------------------------------------

    async def call(self, method: str, body: Body | None = None) -> Body:
        """Call ``method`` on the peer and return its reply body.

        RemoteError(code, message) if the peer answered with a Fail;
        PeerUnavailable if the connection closed first.  The items of a
        streamed answer are skipped (use ``stream_call`` for those).
        """
        async with self._open_call(method, body) as call:
            while True:
                msg = await call.next()
                if isinstance(msg, Reply):
                    return msg.body
                if isinstance(msg, End):
                    return {}

    async def stream_call(
        self, method: str, body: Body | None = None
    ) -> AsyncGenerator[Body, None]:
        """Call ``method`` and yield each streamed item until the peer's End.

        A peer that answers with a plain Reply yields its body (if any) as
        the one item.  Leaving the loop early cancels the call at the peer
        (promptly when iterated under ``contextlib.aclosing``).
        """
        async with self._open_call(method, body) as call:
            while True:
                msg = await call.next()
                if isinstance(msg, Item):
                    yield msg.body
                    continue
                if isinstance(msg, Reply) and msg.body:
                    yield msg.body
                return

    @asynccontextmanager
    async def _open_call(self, method: str, body: Body | None) -> AsyncIterator[_OpenCall]:
        check_method(method)
        if self._closed:
            raise PeerUnavailable(self._close_reason)
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[Envelope](REPLY_BUFFER)
        self._pending[call_id] = send
        call = _OpenCall(receive, self)
        try:
            async with receive:
                await self._queue(self._frame(Call(call_id, method, body or {})))
                yield call
        finally:
            self._pending.pop(call_id, None)
            if not call.answered and not self._closed and self._nursery is not None:
                # The connection may be closing under us (node shutdown).
                with contextlib.suppress(RuntimeError):
                    self._nursery.start_soon(self._send_cancel, call_id)

    async def _send_cancel(self, call_id: int) -> None:
        with contextlib.suppress(PeerUnavailable):
            await self._send(Cancel(call_id))


class _OpenCall:
    """The caller's end of one call: answers arrive here in order."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Envelope], conn: RpcConnection) -> None:
        self._receive = receive
        self._conn = conn
        self.answered = False

    async def next(self) -> Envelope:
        try:
            msg = await self._receive.receive()
        except trio.EndOfChannel:
            raise PeerUnavailable(self._conn._close_reason) from None
        if isinstance(msg, Fail):
            self.answered = True
            raise RemoteError(msg.code, msg.message)
        if isinstance(msg, Reply | End):
            self.answered = True
        return msg


async def serve_rpc(stream: trio.abc.Stream, peer_id: str, handlers: Mapping[str, Handler]) -> None:
    """A ``serve_peers`` handler body: answer calls from one peer until it leaves."""
    await RpcConnection(stream, peer_id, handlers).run()


@asynccontextmanager
async def open_rpc(
    stream: trio.abc.Stream,
    peer_id: str,
    handlers: Mapping[str, Handler] | None = None,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[RpcConnection]:
    """Run an RpcConnection over ``stream`` for the duration of the block.

    An exception from the block comes out as itself, not wrapped in the
    ExceptionGroup of the connection's nursery, so callers can write
    ``except RemoteError``.
    """
    conn = RpcConnection(stream, peer_id, handlers, max_frame=max_frame)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def connect_rpc(
    host: str,
    port: int,
    identity: Identity,
    expect_node_id: str | None = None,
    handlers: Mapping[str, Handler] | None = None,
) -> AsyncIterator[RpcConnection]:
    """Open a mutual-TLS connection to a peer and run RPC over it."""
    stream = await open_peer(host, port, identity, expect_node_id)
    try:
        peer_id = expect_node_id or peer_node_id(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    async with open_rpc(stream, peer_id, handlers) as conn:
        yield conn
