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
they travel as the pair.  ``decode`` is the one place where peer input
becomes these types: it checks shape, ids, keys, bounds and that a News
range ascends above its ``after``, and raises ``MalformedMessage`` otherwise,
so the core past it trusts its types (values themselves meet the core's
injected ``check``).  No driver speaks this yet: the running node still
speaks ``core``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from vmmesh.api.gossip import COUNTER_BITS, KEY_RE, Delta
from vmmesh.api.names import check_hex_id
from vmmesh.errors import MalformedMessage

WIRE_VERSION = 1
_MASK = (1 << COUNTER_BITS) - 1
# hard limits on what a peer may send, whatever its own configuration says
MAX_FACTS = 256
MAX_DELTAS = 10_000
MAX_ENTRIES = 100_000

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


# --- decoding peer input --------------------------------------------------------


def _list(raw: object, what: str, limit: int) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise MalformedMessage(f"{what} is not a list of at most {limit}")
    return raw


def _int(raw: object, what: str, limit: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= limit:
        raise MalformedMessage(f"bad {what}: {raw!r:.40}")
    return raw


def _version(gen: object, ctr: object) -> int:
    return _int(gen, "generation", (1 << 63) - 1) << COUNTER_BITS | _int(ctr, "counter", _MASK)


def _seq(raw: object) -> int:
    return _int(raw, "sequence number", (1 << 63) - 1)


def _news(raw: list[Any]) -> News:
    if len(raw) != 5:
        raise MalformedMessage("news is not [3, author, gen, counter, deltas]")
    author = check_hex_id(raw[1], "author id")
    after = prev = _version(raw[2], raw[3])
    deltas = []
    for d in _list(raw[4], "deltas", MAX_DELTAS):
        if not isinstance(d, list) or len(d) != 4:
            raise MalformedMessage("delta is not [key, gen, counter, value]")
        key = d[0]
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise MalformedMessage(f"bad gossip key: {key!r:.40}")
        version = _version(d[1], d[2])
        if version <= prev:
            raise MalformedMessage("news does not ascend above its start")
        prev = version
        deltas.append(Delta(author, key, version, d[3]))
    return News(author, after, tuple(deltas))


def decode_fact(raw: object) -> Fact:
    if not isinstance(raw, list) or not raw:
        raise MalformedMessage("fact is not a tagged list")
    tag = raw[0]
    if tag == 3:
        return _news(raw)
    if tag == 0 and len(raw) == 4:
        return Alive(check_hex_id(raw[1], "node id"), _version(raw[2], raw[3]))
    if tag in (1, 2) and len(raw) == 5:
        cls = Suspect if tag == 1 else Dead
        return cls(
            check_hex_id(raw[1], "node id"), _version(raw[2], raw[3]), check_hex_id(raw[4], "id")
        )
    raise MalformedMessage(f"unknown fact: {tag!r:.20}")


def _fact_list(raw: object) -> tuple[Fact, ...]:
    return tuple(decode_fact(f) for f in _list(raw, "facts", MAX_FACTS))


def _news_list(raw: object) -> tuple[News, ...]:
    out = []
    for fact in _fact_list(raw):
        if not isinstance(fact, News):
            raise MalformedMessage("only news may travel here")
        out.append(fact)
    return tuple(out)


def _entry_list(raw: object) -> tuple[Entry, ...]:
    out = []
    for e in _list(raw, "entries", MAX_ENTRIES):
        if not isinstance(e, list) or len(e) != 6:
            raise MalformedMessage("entry is not [id, gen, counter, state, gen, counter]")
        out.append(
            Entry(
                check_hex_id(e[0], "node id"),
                _version(e[1], e[2]),
                _int(e[3], "member state", GONE),
                _version(e[4], e[5]),
            )
        )
    return tuple(out)


def _want_list(raw: object) -> tuple[tuple[str, int], ...]:
    out = []
    for w in _list(raw, "want", MAX_ENTRIES):
        if not isinstance(w, list) or len(w) != 3:
            raise MalformedMessage("want is not [id, gen, counter]")
        out.append((check_hex_id(w[0], "node id"), _version(w[1], w[2])))
    return tuple(out)


# message kind -> (fields after the sender, builder)
_DECODERS: dict[str, tuple[int, Callable[[str, list[Any]], Message]]] = {
    "ping": (2, lambda s, r: Ping(s, _seq(r[0]), _fact_list(r[1]))),
    "ack": (2, lambda s, r: Ack(s, _seq(r[0]), _fact_list(r[1]))),
    "ping-req": (
        3,
        lambda s, r: PingReq(s, _seq(r[0]), check_hex_id(r[1], "target id"), _fact_list(r[2])),
    ),
    "nack": (1, lambda s, r: Nack(s, _seq(r[0]))),
    "gossip": (1, lambda s, r: Gossip(s, _fact_list(r[0]))),
    "sync": (1, lambda s, r: Sync(s, _entry_list(r[0]))),
    "sync-reply": (2, lambda s, r: SyncReply(s, _entry_list(r[0]), _news_list(r[1]))),
    "want": (1, lambda s, r: Want(s, _want_list(r[0]))),
    "give": (1, lambda s, r: Give(s, _news_list(r[0]))),
}


def decode(raw: object) -> Message:
    """A message from a peer, checked; raise MalformedMessage if it is not one."""
    if not isinstance(raw, list) or len(raw) < 3:
        raise MalformedMessage("gossip message is not [version, kind, sender, ...]")
    if raw[0] != WIRE_VERSION:
        raise MalformedMessage(f"unsupported gossip version: {raw[0]!r:.20}")
    kind = raw[1]
    spec = _DECODERS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise MalformedMessage(f"unknown gossip message: {kind!r:.20}")
    fields, build = spec
    if len(raw) != 3 + fields:
        raise MalformedMessage(f"gossip {kind} has {len(raw) - 3} fields, not {fields}")
    return build(check_hex_id(raw[2], "sender id"), raw[3:])
