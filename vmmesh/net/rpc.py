"""Multiplexed, typed calls over one framed stream, in both directions.

Theory of operation: an ``RpcConnection`` owns a byte stream (TLS to a
peer, the control socket, or a memory stream in tests) and runs two loops
inside ``run()``:

* the *reader* feeds received bytes to a ``FrameDecoder``, decodes each
  envelope and routes it: a ``Call`` starts a handler task (at most
  ``max_concurrent`` at once, which is the backpressure on a peer that
  floods us), a ``Cancel`` cancels one, and answers go to the waiting
  caller's channel;
* the *writer* is the only task that writes to the stream.  Everyone else
  hands it encoded frames through a bounded channel, so a caller cancelled
  mid-send can never leave half a frame on the wire.

Either side may call the other (gossip is symmetric).  Call ids are
per-direction counters starting at 1; id 0 is for connection-level errors.

Methods are typed (``vmmesh.api.codec.Method``): ``Handlers.add`` wraps a
handler that takes and returns typed bodies, ``request`` and ``stream`` are
the caller's side.  A streamed call sends ``Item``s, then the handler's
return value as the ``Reply``.  A handler's ``VmmeshError`` travels as
``Fail(code, message)`` and is raised at the caller as the same class
(``errors.from_code``).  A bug in a handler (``InternalError``, or any other
exception) is logged here with its traceback and travels as ``internal``.

What a peer breaks is refused at the edge and recorded (``Refusals``, once
per peer and kind per period, counted by cause): a bad frame or envelope
closes the connection after a ``Fail(0, ...)`` saying why; a body that does
not fit its method's types gets a ``Fail`` and the connection stays open,
as does an unknown *method*, so peers of different versions can talk.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from vmmesh.api.codec import Method, StreamMethod, WireType
from vmmesh.errors import (
    ErrorCode,
    InternalError,
    MalformedMessage,
    PeerUnavailable,
    ProtocolError,
    Revoked,
    UnknownMessage,
    VmmeshError,
    error_code,
    from_code,
)
from vmmesh.net.refusals import Cause, Refusals, describe
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

MAX_CONCURRENT = 64
REPLY_BUFFER = 64
OUTBOX = 16
LINGER = 5.0
_RECEIVE_SIZE = 256 << 10
_MAX_FAIL_TEXT = 1024

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)
It = TypeVar("It", bound=WireType)


class Context(Protocol):
    """What a handler knows about the call it serves (a peer's, or this host's own)."""

    @property
    def peer_id(self) -> str: ...

    async def send_item(self, item: WireType) -> None:
        """Send one item of a streamed reply."""
        ...


RawHandler = Callable[["CallContext", Body], Awaitable[Body | None]]
Handler = Callable[[Context, Req], Awaitable[Rep]]


@dataclass
class CallContext:
    """The ``Context`` of a call that came over a connection."""

    peer_id: str
    method: str
    _conn: RpcConnection
    _id: int
    streamed: bool = field(default=False, init=False)

    async def send_item(self, item: WireType) -> None:
        self.streamed = True
        await self._conn._send(Item(self._id, item.to_wire()))

    @property
    def connection(self) -> RpcConnection:
        """The connection the call came on, to call the caller back over it."""
        return self._conn


@dataclass
class LocalContext:
    """The ``Context`` of a call this host makes to itself: items go to ``on_item``."""

    peer_id: str
    on_item: Callable[[Any], Awaitable[None]] | None = None

    async def send_item(self, item: WireType) -> None:
        if self.on_item is not None:
            await self.on_item(item)


class Handlers:
    """The methods one listener serves, each with its typed handler."""

    def __init__(self) -> None:
        self._raw: dict[str, RawHandler] = {}
        self._typed: dict[str, Callable[[Context, Any], Awaitable[Any]]] = {}

    def add(self, method: Method[Req, Rep], handler: Handler[Req, Rep]) -> None:
        """Serve ``method`` with ``handler`` (typed request in, typed reply out)."""

        async def raw(ctx: CallContext, body: Body) -> Body | None:
            try:
                request = method.request.from_wire(body)
            except (MalformedMessage, UnknownMessage) as exc:
                ctx._conn._refused(Cause.MESSAGE, exc)
                raise
            reply: Body | None = (await handler(ctx, request)).to_wire()
            return reply

        self._raw[method.name] = raw
        self._typed[method.name] = handler

    def get(self, name: str) -> RawHandler | None:
        return self._raw.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._raw

    async def local(self, method: Method[Req, Rep], ctx: Context, request: Req) -> Rep:
        """Call this host's own handler for ``method`` directly, without the wire."""
        handler = self._typed.get(method.name)
        if handler is None:
            raise UnknownMessage(f"this host does not serve {method.name}")
        reply: Rep = await handler(ctx, request)
        return reply


class RpcConnection:
    """Calls to and from one peer over one stream; start ``run()`` in a nursery."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer_id: str,
        handlers: Handlers | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_concurrent: int = MAX_CONCURRENT,
        refusals: Refusals | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._stream = stream
        self._handlers = handlers or Handlers()
        self._max_frame = max_frame
        self._refusals = refusals or Refusals(log)
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Envelope]] = {}
        self._serving: dict[int, trio.CancelScope] = {}
        self._slots = trio.Semaphore(max_concurrent)
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[bytes](OUTBOX)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._close_reason = f"connection to {peer_id} closed"
        self._close_error: type[PeerUnavailable | Revoked] = PeerUnavailable
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
                    self._broke(exc)
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
            while True:
                try:
                    obj = decoder.next_message()
                except ProtocolError as exc:
                    self._refused(Cause.FRAMING, exc)
                    raise
                if obj is None:
                    break
                try:
                    proceed = await self._dispatch(decode(obj))
                except ProtocolError as exc:
                    self._refused(Cause.MESSAGE, exc)
                    raise
                if not proceed:
                    return

    async def _writer(self) -> None:
        try:
            async for frame in self._outbox_recv:
                await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broke(exc)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        finally:
            self._writer_done.set()

    def _broke(self, exc: BaseException) -> None:
        """Record why the stream broke: what every call raises from now on."""
        # Here, not at the top: net.tls imports cryptography, 30 ms of every CLI
        # command's start (the CLI's control socket has no TLS, so never gets here).
        from vmmesh.net.tls import describe_error, refused_as_revoked

        self._close_reason = f"connection to {self.peer_id} broke: {describe_error(exc)}"
        if refused_as_revoked(exc):  # the peer refused our certificate: we are removed
            self._close_error = Revoked

    def gone(self) -> PeerUnavailable | Revoked:
        """The error for a call on this closed connection (``Revoked`` if the peer
        refused this host as removed from the mesh, else PeerUnavailable)."""
        return self._close_error(self._close_reason)

    def _refused(self, cause: Cause, exc: BaseException) -> None:
        self._refusals(cause, self.peer_id, describe(exc))

    async def _protocol_error(self, exc: ProtocolError) -> None:
        """Tell the peer why (``_reader`` recorded it), let the writer flush that, give up."""
        self._close_reason = f"{self.peer_id} broke the protocol: {describe(exc)}"
        with trio.move_on_after(LINGER):
            try:
                await self._send(Fail(0, exc.code.value, describe(exc)[:_MAX_FAIL_TEXT]))
                await self._outbox_send.aclose()
                await self._writer_done.wait()
            except (PeerUnavailable, Revoked):
                pass

    def _frame(self, msg: Envelope) -> bytes:
        return encode_frame(encode(msg), self._max_frame)

    async def _send(self, msg: Envelope) -> None:
        await self._queue(self._frame(msg))

    async def _queue(self, frame: bytes) -> None:
        """Hand a frame to the writer; ``gone()`` once the connection is gone."""
        try:
            await self._outbox_send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self.gone() from None

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
                    text = f"bad reply: {describe(exc)}"[:200]
                    frame = self._frame(Fail(call.id, ErrorCode.INTERNAL.value, text))
                with suppress(PeerUnavailable, Revoked):
                    await self._queue(frame)
        finally:
            del self._serving[call.id]
            self._slots.release()

    async def _answer(self, call: Call) -> Envelope:
        handler = self._handlers.get(call.method)
        if handler is None:
            text = f"unknown method {call.method!r}"
            return Fail(call.id, ErrorCode.UNKNOWN_MESSAGE.value, text)
        ctx = CallContext(self.peer_id, call.method, self, call.id)
        try:
            body = await handler(ctx, call.body)
            if body is not None and not isinstance(body, dict):
                raise TypeError(f"handler returned {type(body).__name__}, not a map")
            if ctx.streamed and body is None:
                return End(call.id)
            return Reply(call.id, body or {})
        except InternalError as exc:  # a bug: its traceback goes where the user is sent
            log.exception("handler for %s from %s hit a bug", call.method, self.peer_id)
            return Fail(call.id, error_code(exc).value, describe(exc)[:_MAX_FAIL_TEXT])
        except VmmeshError as exc:
            return Fail(call.id, error_code(exc).value, describe(exc)[:_MAX_FAIL_TEXT])
        except Exception:
            log.exception("handler for %s from %s failed", call.method, self.peer_id)
            return Fail(call.id, ErrorCode.INTERNAL.value, f"internal error in {call.method}")

    # --- outgoing ------------------------------------------------------------

    async def request(self, method: Method[Req, Rep], request: Req) -> Rep:
        """Call ``method`` and return its typed reply (items of a stream are skipped).

        The peer's error is raised as its own class (``from_code``);
        PeerUnavailable if the connection closed first (Revoked if the peer
        refused this host as removed); MalformedMessage if the answer does not
        fit the method's types.
        """
        async with self.call_raw(method.name, request.to_wire()) as call:
            while True:
                msg = await call.next()
                if isinstance(msg, Reply):
                    return method.reply.from_wire(msg.body)
                if isinstance(msg, End):
                    raise MalformedMessage(f"{self.peer_id} ended {method.name} without a reply")

    @asynccontextmanager
    async def stream(
        self, method: StreamMethod[Req, Rep, It], request: Req
    ) -> AsyncIterator[ReplyStream[It, Rep]]:
        """Call ``method``; iterate the answer for its items, then ``.result()``.

        Errors as for ``request``.  Leaving the block before the answer is
        complete cancels the call at the peer.
        """
        async with self.call_raw(method.name, request.to_wire()) as call:
            yield ReplyStream(call, method.reply, method.item, self.peer_id)

    async def call(self, method: str, body: Body | None = None) -> Body:
        """An untyped call (tests that speak garbage, tools); returns the reply body."""
        async with self.call_raw(method, body or {}) as call:
            while True:
                msg = await call.next()
                if isinstance(msg, Reply):
                    return msg.body
                if isinstance(msg, End):
                    return {}

    @asynccontextmanager
    async def call_raw(self, method: str, body: Body) -> AsyncIterator[OpenCall]:
        check_method(method)
        if self._closed:
            raise self.gone()
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[Envelope](REPLY_BUFFER)
        self._pending[call_id] = send
        call = OpenCall(receive, self)
        try:
            async with receive:
                await self._queue(self._frame(Call(call_id, method, body)))
                yield call
        finally:
            self._pending.pop(call_id, None)
            if not call.answered and not self._closed:
                self._cancel_nowait(call_id)

    def _cancel_nowait(self, call_id: int) -> None:
        """Tell the peer we gave up on ``call_id``, without waiting and without a task.

        This runs in ``finally`` blocks of cancelled callers, possibly while
        the connection is closing; a full outbox or a closed one only means
        the peer's answer will be dropped when it comes (``_dispatch``).
        """
        with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._outbox_send.send_nowait(self._frame(Cancel(call_id)))


class OpenCall:
    """The caller's end of one call: answers arrive here in order."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Envelope], conn: RpcConnection) -> None:
        self._receive = receive
        self._conn = conn
        self.answered = False

    async def next(self) -> Envelope:
        try:
            msg = await self._receive.receive()
        except trio.EndOfChannel:
            raise self._conn.gone() from None
        if isinstance(msg, Fail):
            self.answered = True
            raise from_code(msg.code, msg.message)
        if isinstance(msg, Reply | End):
            self.answered = True
        return msg


class ReplyStream(Generic[It, Rep]):
    """The items of a streamed answer, then its typed reply."""

    def __init__(self, call: OpenCall, reply: type[Rep], item: type[It], peer_id: str) -> None:
        self._call = call
        self._reply_type = reply
        self._item_type = item
        self._peer_id = peer_id
        self._result: Rep | None = None

    def __aiter__(self) -> ReplyStream[It, Rep]:
        return self

    async def __anext__(self) -> It:
        if self._call.answered:
            raise StopAsyncIteration
        msg = await self._call.next()
        if isinstance(msg, Item):
            return self._item_type.from_wire(msg.body)
        if isinstance(msg, Reply):
            self._result = self._reply_type.from_wire(msg.body)
        raise StopAsyncIteration

    def result(self) -> Rep:
        if self._result is None:
            raise MalformedMessage(f"{self._peer_id} ended the call without a reply")
        return self._result


@asynccontextmanager
async def open_rpc(
    stream: trio.abc.Stream,
    peer_id: str,
    handlers: Handlers | None = None,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[RpcConnection]:
    """Run an RpcConnection over ``stream`` for the duration of the block.

    An exception from the block comes out as itself, not wrapped in the
    ExceptionGroup of the connection's nursery, so callers can write
    ``except NotFound``.
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
