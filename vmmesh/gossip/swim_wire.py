"""The messages of the SWIM gossip core (``swim``): facts, probes, repair.

Theory of operation
-------------------
Two kinds of things travel.  *Facts* are small, self-contained claims that
spread by infection: ``Alive``/``Suspect``/``Dead`` say what a host's
liveness is at one incarnation, and ``News`` carries a range of one
author's key writes, ``(after, last]``, complete and in ascending version
order, so that a host holding ``after`` or more of that author can apply it
and stay prefix closed (see ``core``: holding version v of X means holding
every key of X whose latest write is at most v).  A holder of less than
``after`` has a gap; it asks the relay with ``Want`` and gets ``Give``.

*Messages* carry facts between two hosts: ``Ping``/``Ack`` (a direct probe,
facts piggybacked), ``PingReq`` (probe that host for me) and ``Nack`` (I
could not reach it: the prober's own health is fine), ``Gossip`` (facts
alone, a few random hosts each gossip interval, only when there is news),
and the repair exchange ``Sync`` -> ``SyncReply`` -> ``Give``: one entry
per host ``(node, incarnation, state, version)`` each way, the news the
other side lacks back.  No message carries a heartbeat of every host; only
the rare ``Sync`` carries one entry per host.

Every type is a frozen dataclass with ``to_wire()`` giving msgpack-able
lists, so the simulator counts bytes by encoding what is sent.  Versions and
incarnations are packed ``generation << 32 | counter`` ints; on the wire
they travel as the pair.  Decoding peer input (``from_wire``) and its
validation belong to the driver wiring, which is not done yet: the running
node still speaks ``core``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from vmmesh.gossip.core import COUNTER_BITS, Delta

WIRE_VERSION = 1
_MASK = (1 << COUNTER_BITS) - 1

# member states, in the order a host moves through them
ALIVE = 0
SUSPECT = 1
DEAD = 2
GONE = 3  # forgotten: a tombstone that only a newer incarnation or version passes


def _pair(v: int) -> tuple[int, int]:
    return v >> COUNTER_BITS, v & _MASK


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation``; only the node itself raises it."""

    node: str
    incarnation: int

    def to_wire(self) -> list[Any]:
        return [0, self.node, *_pair(self.incarnation)]


@dataclass(frozen=True, slots=True)
class Suspect:
    """``by`` could not reach ``node`` at ``incarnation``."""

    node: str
    incarnation: int
    by: str

    def to_wire(self) -> list[Any]:
        return [1, self.node, *_pair(self.incarnation), self.by]


@dataclass(frozen=True, slots=True)
class Dead:
    """``by`` let its suspicion of ``node`` at ``incarnation`` run out."""

    node: str
    incarnation: int
    by: str

    def to_wire(self) -> list[Any]:
        return [2, self.node, *_pair(self.incarnation), self.by]


@dataclass(frozen=True, slots=True)
class News:
    """Every write of ``author`` in ``(after, deltas[-1].version]``, ascending."""

    author: str
    after: int
    deltas: tuple[Delta, ...]

    @property
    def last(self) -> int:
        return self.deltas[-1].version if self.deltas else self.after

    def to_wire(self) -> list[Any]:
        return [
            3,
            self.author,
            *_pair(self.after),
            [[d.key, *_pair(d.version), d.value] for d in self.deltas],
        ]


Fact = Alive | Suspect | Dead | News


class Entry(NamedTuple):
    """One host in a ``Sync``: its liveness and the version of its keys held."""

    node: str
    incarnation: int
    state: int
    version: int


def _facts(facts: tuple[Fact, ...]) -> list[Any]:
    return [f.to_wire() for f in facts]


@dataclass(frozen=True, slots=True)
class Ping:
    sender: str
    seq: int
    facts: tuple[Fact, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "ping", self.sender, self.seq, _facts(self.facts)]


@dataclass(frozen=True, slots=True)
class Ack:
    sender: str
    seq: int
    facts: tuple[Fact, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "ack", self.sender, self.seq, _facts(self.facts)]


@dataclass(frozen=True, slots=True)
class PingReq:
    sender: str
    seq: int
    target: str
    facts: tuple[Fact, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "ping-req", self.sender, self.seq, self.target, _facts(self.facts)]


@dataclass(frozen=True, slots=True)
class Nack:
    sender: str
    seq: int

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "nack", self.sender, self.seq]


@dataclass(frozen=True, slots=True)
class Gossip:
    sender: str
    facts: tuple[Fact, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "gossip", self.sender, _facts(self.facts)]


def _entries(entries: tuple[Entry, ...]) -> list[Any]:
    return [[e.node, *_pair(e.incarnation), e.state, *_pair(e.version)] for e in entries]


@dataclass(frozen=True, slots=True)
class Sync:
    """Opens a repair exchange: every host the sender holds."""

    sender: str
    entries: tuple[Entry, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "sync", self.sender, _entries(self.entries)]


@dataclass(frozen=True, slots=True)
class SyncReply:
    """Every host the answering side holds, and the news the opener lacks."""

    sender: str
    entries: tuple[Entry, ...]
    news: tuple[News, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "sync-reply", self.sender, _entries(self.entries), _facts(self.news)]


@dataclass(frozen=True, slots=True)
class Want:
    """Send me what you hold of these authors above these versions."""

    sender: str
    want: tuple[tuple[str, int], ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "want", self.sender, [[n, *_pair(v)] for n, v in self.want]]


@dataclass(frozen=True, slots=True)
class Give:
    """News asked for by ``Want``, or closing a repair exchange."""

    sender: str
    news: tuple[News, ...]

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, "give", self.sender, _facts(self.news)]


Message = Ping | Ack | PingReq | Nack | Gossip | Sync | SyncReply | Want | Give
