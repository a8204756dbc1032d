"""Counting one family of messages (gossip's) as they are sent and received.

``vmmesh status`` and ``/metrics`` say how much gossip costs a host: messages
and bytes each way.  The bytes are the message bodies as msgpack, measured by
packing each body once more: the frame's length prefix, the envelope around
the body and TLS are not counted (they are the same few dozen bytes on every
message, and a body is what grows with the mesh).  ``CountingHandlers``
counts what a host serves (a request in, its reply out); ``Traffic.call``
counts the calls a host makes (a request out, its reply in).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgpack

from vmmesh.api.codec import Method, WireType
from vmmesh.net.rpc import Context, Handler, Handlers

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)


def body_size(msg: WireType) -> int:
    """The bytes of ``msg``'s body as msgpack."""
    packed = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return len(packed) if isinstance(packed, bytes) else 0


@dataclass
class Traffic:
    """Messages and bytes of one family, each way, since the node started."""

    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def received(self, msg: WireType) -> None:
        self.messages_in += 1
        self.bytes_in += body_size(msg)

    def sent(self, msg: WireType) -> None:
        self.messages_out += 1
        self.bytes_out += body_size(msg)

    async def call(
        self,
        call: Callable[[Method[Req, Rep], Req], Awaitable[Rep]],
        method: Method[Req, Rep],
        request: Req,
    ) -> Rep:
        """``call(method, request)``, counting the request when it is made and the reply
        when it comes (a call that fails counted its request only)."""
        self.sent(request)
        reply = await call(method, request)
        self.received(reply)
        return reply


class CountingHandlers(Handlers):
    """Handlers that land in ``into``, each counted in ``traffic`` as it is served."""

    def __init__(self, into: Handlers, traffic: Traffic) -> None:
        super().__init__()
        self._into = into
        self._traffic = traffic

    def add(self, method: Method[Req, Rep], handler: Handler[Req, Rep]) -> None:
        traffic = self._traffic

        async def counted(ctx: Context, request: Req) -> Rep:
            traffic.received(request)
            reply = await handler(ctx, request)
            traffic.sent(reply)
            return reply

        self._into.add(method, counted)
