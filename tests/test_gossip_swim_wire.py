"""The SWIM messages on the wire: every message survives msgpack and ``decode``
unchanged, and anything else a peer may send is refused as MalformedMessage."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmesh.api.gossip import Delta, pack_version
from vmmesh.errors import MalformedMessage
from vmmesh.gossip.swim_wire import (
    Ack,
    Alive,
    Dead,
    Entry,
    Fact,
    Give,
    Gossip,
    Message,
    Nack,
    News,
    Ping,
    PingReq,
    Suspect,
    Sync,
    SyncReply,
    Want,
    decode,
)

IDS = st.sampled_from([f"{i:02x}" * 8 for i in range(1, 6)])
VERSIONS = st.builds(pack_version, st.integers(0, 2**40), st.integers(0, 2**32 - 1))
SEQS = st.integers(0, 2**40)
KEYS = st.sampled_from(["name", "addr", "capacity", "vms", "crl"])
VALUES = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.text(max_size=8))


@st.composite
def news(draw: st.DrawFn) -> News:
    author = draw(IDS)
    after = draw(st.integers(0, 2**50))
    steps = draw(st.lists(st.integers(1, 1000), max_size=4))
    deltas, v = [], after
    for step in steps:
        v += step
        deltas.append(Delta(author, draw(KEYS), v, draw(VALUES)))
    return News(author, after, tuple(deltas))


FACTS: st.SearchStrategy[Fact] = st.one_of(
    st.builds(Alive, IDS, VERSIONS),
    st.builds(Suspect, IDS, VERSIONS, IDS),
    st.builds(Dead, IDS, VERSIONS, IDS),
    news(),
)
FACT_LISTS = st.lists(FACTS, max_size=4).map(tuple)
NEWS_LISTS = st.lists(news(), max_size=3).map(tuple)
ENTRIES = st.lists(st.builds(Entry, IDS, VERSIONS, st.integers(0, 3), VERSIONS), max_size=4)
MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, IDS, SEQS, FACT_LISTS),
    st.builds(Ack, IDS, SEQS, FACT_LISTS),
    st.builds(PingReq, IDS, SEQS, IDS, FACT_LISTS),
    st.builds(Nack, IDS, SEQS),
    st.builds(Gossip, IDS, FACT_LISTS),
    st.builds(Sync, IDS, ENTRIES.map(tuple)),
    st.builds(SyncReply, IDS, ENTRIES.map(tuple), NEWS_LISTS),
    st.builds(Want, IDS, st.lists(st.tuples(IDS, VERSIONS), max_size=3).map(tuple)),
    st.builds(Give, IDS, NEWS_LISTS),
)


def roundtrip(msg: Message) -> Message:
    return decode(msgpack.unpackb(msgpack.packb(msg.to_wire())))


@given(MESSAGES)
def test_every_message_survives_the_wire(msg: Message) -> None:
    assert roundtrip(msg) == msg


JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=30,
)


KINDS = ["ping", "ack", "ping-req", "nack", "gossip", "sync", "sync-reply", "want", "give"]


@given(JUNK, st.sampled_from(KINDS), st.lists(JUNK, max_size=4))
def test_junk_is_refused_as_malformed_and_nothing_else(
    raw: Any, kind: str, fields: list[Any]
) -> None:
    """Whole junk, and junk in the fields of a real message kind."""
    for candidate in (raw, [1, kind, "01" * 8, *fields]):
        with contextlib.suppress(MalformedMessage):
            decode(candidate)


A, B = "01" * 8, "02" * 8


@pytest.mark.parametrize(
    "raw",
    [
        [2, "nack", A, 1],  # another wire version
        [1, "nack", A, True],  # a bool is no sequence number
        [1, "nack", A, -1],
        [1, "nack", A],
        [1, "shout", A, 1],
        [1, "nack", "not-hex", 1],
        [1, "gossip", A, [[3, B, 0, 5, [["name", 0, 5, "x"]]]]],  # not above its start
        [1, "gossip", A, [[3, B, 0, 0, [["name", 0, 2, "x"], ["vms", 0, 1, []]]]]],
        [1, "gossip", A, [[3, B, 0, 0, [["Bad Key", 0, 1, "x"]]]]],
        [1, "gossip", A, [[0, B, 0, 2**32]]],  # counter too big
        [1, "give", A, [[0, B, 0, 1]]],  # only news in a Give
        [1, "sync", A, [[B, 0, 1, 9, 0, 1]]],  # no such member state
        [1, "gossip", A, [[0, B, 0, 1]] * 300],  # too many facts
    ],
)
def test_what_a_peer_may_not_send(raw: Any) -> None:
    with pytest.raises(MalformedMessage):
        decode(raw)
