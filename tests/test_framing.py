"""The frame codec and the RPC envelope, from bytes, without I/O."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmesh.errors import FrameTooLarge, MalformedMessage, UnknownMessage
from vmmesh.wire.envelope import Call, Cancel, End, Fail, Item, Reply, decode, encode
from vmmesh.wire.framing import FrameDecoder, encode_frame


def drain(decoder: FrameDecoder) -> list[object]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def test_round_trip_one_frame() -> None:
    d = FrameDecoder()
    d.feed(encode_frame({"a": [1, b"x", "y"]}))
    assert d.next_message() == {"a": [1, b"x", "y"]}
    assert d.next_message() is None


def test_partial_frame_byte_by_byte() -> None:
    data = encode_frame({"k": "call", "b": {"x": 1}})
    d = FrameDecoder()
    for i, byte in enumerate(data):
        assert d.next_message() is None
        d.feed(bytes([byte]))
        if i < len(data) - 1:
            assert d.next_message() is None
    assert d.next_message() == {"k": "call", "b": {"x": 1}}


def test_several_frames_in_one_feed() -> None:
    d = FrameDecoder()
    d.feed(encode_frame(1) + encode_frame("two") + encode_frame([3]) + encode_frame(4)[:3])
    assert drain(d) == [1, "two", [3]]


def test_oversize_prefix_refused_before_body() -> None:
    d = FrameDecoder(max_frame=100)
    d.feed(struct.pack(">I", 101))  # no body at all: the prefix alone is enough
    with pytest.raises(FrameTooLarge):
        d.next_message()
    with pytest.raises(FrameTooLarge):  # stays broken
        d.feed(b"more")


def test_frame_at_the_limit_is_fine() -> None:
    body = msgpack.packb("x" * 95)
    d = FrameDecoder(max_frame=len(body))
    d.feed(struct.pack(">I", len(body)) + body)
    assert d.next_message() == "x" * 95


def test_encode_refuses_oversize() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 200, max_frame=100)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # array of 2 with only 1 element
        b"\x01\x02",  # trailing data
        msgpack.packb({1: "int key"}),
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        msgpack.packb(msgpack.Timestamp(1)),
        b"\xa3\xff\xfe\xfd",  # str that is not UTF-8
        b"\xc0",  # nil: None would read as "need more bytes"
    ],
)
def test_garbage_is_malformed(body: bytes) -> None:
    d = FrameDecoder()
    d.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(MalformedMessage):
        d.next_message()


def test_inner_length_over_frame_is_malformed() -> None:
    # a str header claiming 2**31 bytes inside a 5-byte frame
    body = b"\xdb\x80\x00\x00\x00"
    d = FrameDecoder()
    d.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(MalformedMessage):
        d.next_message()


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    body = b"\x91" * 5000 + b"\x01"
    d = FrameDecoder()
    d.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(MalformedMessage):
        d.next_message()


messages_st = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(messages_st.filter(lambda m: m is not None), max_size=8), st.data())
def test_any_split_gives_the_same_messages(msgs: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    d = FrameDecoder()
    got: list[object] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[prev:cut])
        prev = cut
        got.extend(drain(d))
    assert got == msgs


# --- envelope ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Call(1, "gossip.syn", {"digest": [1, 2]}),
        Reply(1, {"ok": True}),
        Fail(2, "TokenError", "join token expired"),
        Item(3, {"chunk": b"\x00" * 10}),
        End(3),
        Cancel(4),
    ],
)
def test_envelope_round_trip(msg: Any) -> None:
    d = FrameDecoder()
    d.feed(encode_frame(encode(msg)))
    assert decode(d.next_message()) == msg


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"k": "call"},  # no version
        {"v": 1, "k": "call", "id": -1, "m": "a.b", "b": {}},
        {"v": 1, "k": "call", "id": True, "m": "a.b", "b": {}},
        {"v": 1, "k": "call", "id": 1, "m": "../../etc", "b": {}},
        {"v": 1, "k": "call", "id": 1, "m": "a.b", "b": [1]},
        {"v": 1, "k": "fail", "id": 1, "c": 5, "e": "x"},
        {"v": "1", "k": "end", "id": 1},
    ],
)
def test_envelope_wrong_shape(obj: object) -> None:
    with pytest.raises(MalformedMessage):
        decode(obj)


@pytest.mark.parametrize(
    "obj",
    [{"v": 1, "k": "shout", "id": 1}, {"v": 2, "k": "end", "id": 1}],
)
def test_envelope_unknown_kind_or_version(obj: object) -> None:
    with pytest.raises(UnknownMessage):
        decode(obj)
