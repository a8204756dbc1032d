"""QMP: the pure codec from bytes, and the trio client against a scripted monitor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmesh.errors import QMPError
from vmmesh.hypervisor.qmp import (
    ErrorReply,
    Event,
    Greeting,
    LineSplitter,
    QMPClient,
    QMPCodec,
    Return,
    incoming_from_file_uri,
    migrate_to_file_uri,
    migration_finished,
    open_qmp,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""},'
    b' "capabilities": ["oob"]}}\r\n'
)
EVENT = b'{"timestamp": {"seconds": 1700000000, "microseconds": 500000}, "event": "STOP"}\r\n'


def _ready_codec() -> QMPCodec:
    codec = QMPCodec()
    codec.receive_data(GREETING)
    assert isinstance(codec.next_event(), Greeting)
    neg = json.loads(codec.negotiate())
    assert neg["execute"] == "qmp_capabilities"
    codec.receive_data(json.dumps({"return": {}, "id": neg["id"]}).encode() + b"\n")
    assert isinstance(codec.next_event(), Return)
    assert codec.ready
    return codec


def test_greeting_negotiation_and_command_ids() -> None:
    codec = QMPCodec()
    assert codec.next_event() is None
    codec.receive_data(GREETING)
    greeting = codec.next_event()
    assert isinstance(greeting, Greeting)
    assert greeting.version["qemu"]["major"] == 7
    assert greeting.capabilities == ("oob",)
    with pytest.raises(RuntimeError):
        codec.command("query-status")

    codec = _ready_codec()
    ident, data = codec.command("migrate", {"uri": "exec:cat > /x"})
    assert data.endswith(b"\n")
    assert json.loads(data) == {
        "execute": "migrate",
        "id": ident,
        "arguments": {"uri": "exec:cat > /x"},
    }
    ident2, _ = codec.command("query-status")
    assert ident2 != ident

    codec.receive_data(EVENT + json.dumps({"return": {"status": "running"}, "id": ident}).encode())
    event = codec.next_event()
    assert event == Event("STOP", {}, 1700000000.5)
    assert codec.next_event() is None  # the reply line is not complete yet
    codec.receive_data(b"\n")
    assert codec.next_event() == Return(ident, {"status": "running"})


def test_event_with_a_bad_timestamp_still_parses() -> None:
    codec = _ready_codec()
    codec.receive_data(b'{"event": "RESUME", "data": {"x": 1}, "timestamp": {"seconds": "?"}}\n')
    assert codec.next_event() == Event("RESUME", {"x": 1}, 0.0)


def test_error_reply() -> None:
    codec = _ready_codec()
    codec.receive_data(
        b'{"id": "vmmesh-9", "error": {"class": "GenericError", "desc": "no such thing"}}\n'
    )
    assert codec.next_event() == ErrorReply("vmmesh-9", "GenericError", "no such thing")


def test_refused_negotiation_is_an_error() -> None:
    codec = QMPCodec()
    codec.receive_data(GREETING)
    codec.next_event()
    ident = json.loads(codec.negotiate())["id"]
    codec.receive_data(json.dumps({"error": {"class": "X", "desc": "no"}, "id": ident}).encode())
    with pytest.raises(QMPError, match="refused"):
        codec.receive_data(b"\n")
        codec.next_event()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"return": {}}\n', "before its greeting"),
        (GREETING + GREETING, "second QMP greeting"),
        (b"not json\n", "bad JSON"),
        (b"[1, 2]\n", "non-object"),
        (GREETING + b'{"what": 1}\n', "unknown QMP message"),
    ],
)
def test_peer_misbehaviour_is_qmp_error(data: bytes, match: str) -> None:
    codec = QMPCodec()
    codec.receive_data(data)
    with pytest.raises(QMPError, match=match):
        while codec.next_event() is not None:
            pass


def test_line_limit_bounds_memory() -> None:
    splitter = LineSplitter(limit=16)
    splitter.feed(b"0123456789abcdef\nrest")
    assert splitter.next_line() == b"0123456789abcdef"
    assert splitter.next_line() is None
    splitter.feed(b"x" * 20)
    with pytest.raises(QMPError, match="longer than 16 bytes"):
        splitter.next_line()


@settings(deadline=None)  # no wall-clock limits in tests: the machine is shared
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    stream = GREETING + EVENT + b'{"return": {}, "id": "a"}\n' + EVENT
    whole = QMPCodec()
    whole.receive_data(stream)
    expected = list(iter(whole.next_event, None))
    chunked = QMPCodec()
    got: list[Any] = []
    at = 0
    for cut in [*cuts, len(stream)]:
        chunked.receive_data(stream[at : at + cut])
        at += cut
        got += iter(chunked.next_event, None)
    assert got == expected


def test_migration_uris_quote_paths() -> None:
    path = Path("/var/lib/vmmesh/it's here.state")
    assert migrate_to_file_uri(path) == "exec:cat > '/var/lib/vmmesh/it'\"'\"'s here.state'"
    assert incoming_from_file_uri(Path("/s")) == "exec:cat /s"


def test_migration_finished() -> None:
    assert migration_finished({"status": "completed"})
    assert not migration_finished({"status": "active"})
    assert not migration_finished({})
    with pytest.raises(QMPError, match="failed: disk full"):
        migration_finished({"status": "failed", "error-desc": "disk full"})
    with pytest.raises(QMPError):
        migration_finished([])


# --- the trio client against a scripted monitor -------------------------------


async def _fake_monitor(stream: trio.abc.Stream, replies: dict[str, Any]) -> None:
    """Greets, then answers each command from ``replies`` (an event before each reply)."""
    await stream.send_all(GREETING)
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            answer = replies.get(cmd["execute"], {"return": {}})
            if answer == "hangup":
                await stream.aclose()
                return
            await stream.send_all(EVENT + json.dumps({**answer, "id": cmd["id"]}).encode() + b"\n")


async def test_client_execute_collects_events_and_raises_errors() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    replies = {
        "query-status": {"return": {"status": "running"}},
        "cont": {"error": {"class": "GenericError", "desc": "nope"}},
        "quit": "hangup",
    }
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_monitor, server_side, replies)
        client = QMPClient(client_side, QMPCodec())
        await client._handshake()
        assert await client.execute("query-status") == {"status": "running"}
        assert [e.name for e in client.events] == ["STOP", "STOP"]
        with pytest.raises(QMPError, match="cont: GenericError: nope"):
            await client.execute("cont")
        with pytest.raises(QMPError, match="hung up"):
            await client.execute("quit")


async def test_open_qmp_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        listener.listen(1)

        async def serve() -> None:
            sock, _ = await listener.accept()
            await _fake_monitor(
                trio.SocketStream(sock), {"query-kvm": {"return": {"enabled": False}}}
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with open_qmp(path) as client:
                assert await client.execute("query-kvm") == {"enabled": False}


async def test_open_qmp_without_a_monitor_is_qmp_error(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="cannot connect"):
        async with open_qmp(tmp_path / "nothing.sock"):
            pass


async def test_a_monitor_that_greets_and_goes_is_qmp_error() -> None:
    """A QEMU that fails to start can greet and exit before the negotiation is sent:
    the broken pipe is a QMPError (its caller then reads why QEMU exited)."""
    client_side, server_side = trio.testing.memory_stream_pair()
    await server_side.send_all(GREETING)
    await server_side.aclose()
    client = QMPClient(client_side, QMPCodec())
    with pytest.raises(QMPError, match="monitor connection broke"):
        await client._handshake()
