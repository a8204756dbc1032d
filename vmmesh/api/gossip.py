"""The gossip's messages, defined once for both ends like every other method:
Scuttlebutt's exchange (``gossip.syn``, ``gossip.ack2``) and SWIM's datagrams
carried over the peer links (``gossip.swim``).

An exchange is Syn (the sender's digest: for every host it holds, the highest
version of its keys and of its heartbeat), Ack (the deltas the Syn's sender
lacks, the hosts whose keys the answering node lacks, newer heartbeats) and
Ack2 (the deltas the Ack asked for).  A version is ``(generation, counter)``,
packed into one int for the core's comparisons (``pack_version``) and sent as
its two parts.  The bodies are compact lists rather than maps (a digest
carries every host of the mesh), so they are written by hand rather than with
``codec.Record``, but they meet the same contract: ``from_wire`` checks every
field and bound, and a peer's bytes never reach the core unchecked.  The
values inside deltas are checked by the host state's schema
(``gossip.hoststate``) when the core stores them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from vmmesh.api.codec import Bytes, Empty, Message, Method, wire
from vmmesh.api.names import check_hex_id
from vmmesh.errors import MalformedMessage

WIRE_VERSION = 1
COUNTER_BITS = 32
COUNTER_MASK = (1 << COUNTER_BITS) - 1
KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
# Hard limits on what a peer may send, whatever its own configuration says.
MAX_WIRE_DIGEST = 100_000
MAX_WIRE_DELTAS = 10_000


def pack_version(generation: int, counter: int) -> int:
    """The internal, totally ordered form of ``(generation, counter)``."""
    return generation << COUNTER_BITS | counter


def unpack_version(version: int) -> tuple[int, int]:
    return version >> COUNTER_BITS, version & COUNTER_MASK


class Delta(NamedTuple):
    """One key of one host at one version.

    A NamedTuple rather than a dataclass: messages carry hundreds of these and
    the simulator creates millions, so construction cost matters.
    """

    node_id: str
    key: str
    version: int  # packed (generation, counter)
    value: Any


def _check_version(gen: object, ctr: object) -> int:
    if (
        not isinstance(gen, int)
        or not isinstance(ctr, int)
        or isinstance(gen, bool)
        or isinstance(ctr, bool)
        or not 0 <= gen < 1 << 63
        or not 0 <= ctr <= COUNTER_MASK
    ):
        raise MalformedMessage(f"bad version: {gen!r:.40}, {ctr!r:.40}")
    return pack_version(gen, ctr)


def _check_header(d: object, kind: str) -> tuple[dict[Any, Any], str]:
    if not isinstance(d, dict):
        raise MalformedMessage(f"gossip {kind} is not a map")
    if d.get("v") != WIRE_VERSION:
        raise MalformedMessage(f"unsupported gossip version: {d.get('v')!r:.20}")
    if d.get("t") != kind:
        raise MalformedMessage(f"expected gossip {kind}, got {d.get('t')!r:.20}")
    return d, check_hex_id(d.get("from"), "sender id")


def _digest_to_wire(digest: Mapping[str, int]) -> list[list[Any]]:
    return [[nid, v >> COUNTER_BITS, v & COUNTER_MASK] for nid, v in digest.items()]


def _digest_from_wire(raw: object) -> dict[str, int]:
    if not isinstance(raw, list) or len(raw) > MAX_WIRE_DIGEST:
        raise MalformedMessage("digest is not a bounded list")
    out: dict[str, int] = {}
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 3:
            raise MalformedMessage("digest entry is not [id, gen, counter]")
        out[check_hex_id(entry[0], "node id")] = _check_version(entry[1], entry[2])
    return out


def _deltas_to_wire(deltas: Iterable[Delta]) -> list[list[Any]]:
    return [
        [d.node_id, d.key, d.version >> COUNTER_BITS, d.version & COUNTER_MASK, d.value]
        for d in deltas
    ]


def _deltas_from_wire(raw: object) -> tuple[Delta, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_WIRE_DELTAS:
        raise MalformedMessage("deltas are not a bounded list")
    out = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 5:
            raise MalformedMessage("delta is not [id, key, gen, counter, value]")
        nid = check_hex_id(entry[0], "node id")
        key = entry[1]
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise MalformedMessage(f"bad gossip key: {key!r:.40}")
        out.append(Delta(nid, key, _check_version(entry[2], entry[3]), entry[4]))
    return tuple(out)


def _syn_digest_to_wire(digest: Mapping[str, int], beats: Mapping[str, int]) -> list[list[Any]]:
    """Entries ``[id, gen, keys counter, hb counter]`` when both versions share
    a generation (nearly always: it saves a 9-byte int per host), else
    ``[id, gen, keys counter, hb gen, hb counter]``.  Counter 0 means none."""
    out = []
    for nid, v in digest.items():
        hb = beats.get(nid, 0)
        gen, hb_gen = v >> COUNTER_BITS, hb >> COUNTER_BITS
        if not v or not hb or gen == hb_gen:
            out.append([nid, gen or hb_gen, v & COUNTER_MASK, hb & COUNTER_MASK])
        else:
            out.append([nid, gen, v & COUNTER_MASK, hb_gen, hb & COUNTER_MASK])
    return out


def _syn_digest_from_wire(raw: object) -> tuple[dict[str, int], dict[str, int]]:
    if not isinstance(raw, list) or len(raw) > MAX_WIRE_DIGEST:
        raise MalformedMessage("digest is not a bounded list")
    digest: dict[str, int] = {}
    beats: dict[str, int] = {}
    for entry in raw:
        if not isinstance(entry, list) or len(entry) not in (4, 5):
            raise MalformedMessage("digest entry is not [id, gen, counter, (hb gen,) hb counter]")
        nid = check_hex_id(entry[0], "node id")
        hb_gen = entry[1] if len(entry) == 4 else entry[3]
        v = _check_version(entry[1], entry[2])
        hb = _check_version(hb_gen, entry[-1])
        digest[nid] = v if v & COUNTER_MASK else 0
        beats[nid] = hb if hb & COUNTER_MASK else 0
    return digest, beats


@dataclass(frozen=True)
class Syn:
    """Opens an exchange: for every host the sender holds, the highest version
    of its keys (``digest``) and of its heartbeat (``beats``, same hosts)."""

    sender: str
    digest: dict[str, int]
    beats: dict[str, int]
    version: int = WIRE_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "t": "syn",
            "from": self.sender,
            "digest": _syn_digest_to_wire(self.digest, self.beats),
        }

    @classmethod
    def from_wire(cls, d: object) -> Syn:
        body, sender = _check_header(d, "syn")
        return cls(sender, *_syn_digest_from_wire(body.get("digest")))


@dataclass(frozen=True)
class Ack:
    """Answer to a Syn: deltas the Syn's sender lacks, the hosts where the
    answering node lacks keys (its version of them, 0 if none), and newer
    heartbeats than the Syn showed."""

    sender: str
    deltas: tuple[Delta, ...]
    request: dict[str, int]
    beats: dict[str, int]
    version: int = WIRE_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "t": "ack",
            "from": self.sender,
            "deltas": _deltas_to_wire(self.deltas),
            "request": _digest_to_wire(self.request),
            "beats": _digest_to_wire(self.beats),
        }

    @classmethod
    def from_wire(cls, d: object) -> Ack:
        body, sender = _check_header(d, "ack")
        return cls(
            sender,
            _deltas_from_wire(body.get("deltas")),
            _digest_from_wire(body.get("request")),
            _digest_from_wire(body.get("beats")),
        )


@dataclass(frozen=True)
class Ack2:
    """Closes an exchange: the deltas the Ack requested."""

    sender: str
    deltas: tuple[Delta, ...]
    version: int = WIRE_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "t": "ack2",
            "from": self.sender,
            "deltas": _deltas_to_wire(self.deltas),
        }

    @classmethod
    def from_wire(cls, d: object) -> Ack2:
        body, sender = _check_header(d, "ack2")
        return cls(sender, _deltas_from_wire(body.get("deltas")))


SYN = Method("gossip.syn", Syn, Ack)
ACK2 = Method("gossip.ack2", Ack2, Empty)


MAX_DATAGRAM = 4 << 20  # a SWIM Sync of 10,000 hosts is ~0.5 MB


@dataclass(frozen=True)
class SwimDatagram(Message):
    """One SWIM message (msgpack, as ``gossip.swim_wire`` encodes it) carried over a
    peer link: the node's SWIM transport when ``gossip = "swim"``.  Its content is
    checked by ``swim_driver.deliver``, its sender against the link's certificate."""

    data: bytes = wire(Bytes(MAX_DATAGRAM))


SWIM = Method("gossip.swim", SwimDatagram, Empty)
