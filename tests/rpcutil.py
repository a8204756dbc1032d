"""Typed test methods for the RPC layer (the node's own methods need a whole node)."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from vmmesh.api.codec import Bytes, Empty, Int, Message, Method, Nested, StreamMethod, Text, wire
from vmmesh.errors import NotFound
from vmmesh.net.rpc import Context, Handlers


@dataclass(frozen=True)
class Note(Message):
    text: str = wire(Text(10_000), default="")
    n: int = wire(Int(0, 10_000), default=0)
    blob: bytes = wire(Bytes(1 << 20), default=b"")


@dataclass(frozen=True)
class Echoed(Message):
    note: Note = wire(Nested(Note))
    peer: str = wire(Text(200))


@dataclass(frozen=True)
class Tick(Message):
    i: int = wire(Int())


ECHO = Method("t.echo", Note, Echoed)
COUNT = StreamMethod("t.count", Note, Empty, item=Tick)
MISSING = Method("t.missing", Empty, Empty)
BUGGY = Method("t.buggy", Empty, Empty)
BIG = Method("t.big", Empty, Note)
FOREVER = StreamMethod("t.forever", Empty, Empty, item=Tick)
HANG = Method("t.hang", Empty, Empty)
RECORD = Method("t.record", Note, Empty)


async def echo(ctx: Context, note: Note) -> Echoed:
    return Echoed(note=note, peer=ctx.peer_id)


async def count(ctx: Context, note: Note) -> Empty:
    for i in range(note.n):
        await ctx.send_item(Tick(i))
    return Empty()


async def missing(ctx: Context, body: Empty) -> Empty:
    raise NotFound("no VM named web")


async def buggy(ctx: Context, body: Empty) -> Empty:
    raise ZeroDivisionError("oops")


async def big(ctx: Context, body: Empty) -> Note:
    return Note(blob=b"x" * 2000)


async def hang(ctx: Context, body: Empty) -> Empty:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def handlers() -> Handlers:
    h = Handlers()
    h.add(ECHO, echo)
    h.add(COUNT, count)
    h.add(MISSING, missing)
    h.add(BUGGY, buggy)
    h.add(BIG, big)
    h.add(HANG, hang)
    return h
