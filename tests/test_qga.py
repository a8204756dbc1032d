"""Guest agent: the pure codec from bytes, and the trio client against a fake agent."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vmmesh.errors import GuestAgentError
from vmmesh.hypervisor.qga import (
    FILE_CHUNK,
    AgentCodec,
    AgentLink,
    ErrorReply,
    GuestAgentClient,
    Oversized,
    Reply,
    Synced,
    exec_arguments,
    parse_exec_status,
    salvage_exec_status,
)


def _events(codec: AgentCodec) -> list[Any]:
    return list(iter(codec.next_event, None))


def _synced_codec(line_limit: int = 1 << 20) -> AgentCodec:
    codec = AgentCodec(line_limit)
    codec.sync_request(5)
    codec.receive_data(b'\xff{"return": 5}\n')
    assert _events(codec) == [Synced(5)]
    return codec


def test_sync_request_resets_the_agent_parser_first() -> None:
    data = AgentCodec().sync_request(1234)
    assert data[:1] == b"\xff"
    assert json.loads(data[1:]) == {"execute": "guest-sync-delimited", "arguments": {"id": 1234}}


def test_sync_discards_junk_and_stale_replies() -> None:
    codec = AgentCodec()
    codec.receive_data(b'{"return": 99}\n')  # before we asked: dropped
    codec.sync_request(42)
    codec.receive_data(b'{"return": {}}\n{"return": 42}\n')  # stale, not delimited
    codec.receive_data(b'\xff{"return": 41}\n')  # an older client's sync
    codec.receive_data(b"garbage\xff")
    assert _events(codec) == []
    codec.receive_data(b'{"return": 42}\n{"return": {"version": "7.2"}}\n')
    assert _events(codec) == [Synced(42), Reply({"version": "7.2"})]


def test_sync_with_a_stale_delimiter_on_the_same_line() -> None:
    codec = AgentCodec()
    codec.sync_request(7)
    codec.receive_data(b'\xff{"ret\xff{"return": 7}\n')
    assert _events(codec) == [Synced(7)]


def test_sync_gives_up_on_an_endless_line_after_the_delimiter() -> None:
    codec = AgentCodec()
    codec.sync_request(7)
    codec.receive_data(b"\xff" + b"x" * 5000)
    assert _events(codec) == []
    codec.receive_data(b'\n\xff{"return": 7}\n')
    assert _events(codec) == [Synced(7)]


def test_resync_replaces_the_expected_id() -> None:
    codec = AgentCodec()
    codec.sync_request(1)
    codec.sync_request(2)
    codec.receive_data(b'\xff{"return": 1}\n\xff{"return": 2}\n')
    assert _events(codec) == [Synced(2)]


def test_commands_need_a_sync() -> None:
    with pytest.raises(RuntimeError):
        AgentCodec().command("guest-ping")
    data = _synced_codec().command("guest-file-read", {"handle": 3, "count": 10})
    assert json.loads(data) == {
        "execute": "guest-file-read",
        "arguments": {"handle": 3, "count": 10},
    }


def test_replies_and_errors() -> None:
    codec = _synced_codec()
    codec.receive_data(b'{"return": {}}\r\n\n{"error": {"class": "GenericError", "desc": "x"}}\n')
    assert _events(codec) == [Reply({}), ErrorReply("GenericError", "x")]
    codec.receive_data(b"{bad\n")
    with pytest.raises(GuestAgentError, match="bad JSON"):
        codec.next_event()
    codec.receive_data(b'{"event": "x"}\n')
    with pytest.raises(GuestAgentError, match="unknown"):
        codec.next_event()


def test_oversized_reply_keeps_a_prefix_and_skips_the_rest() -> None:
    codec = _synced_codec(line_limit=16)
    codec.receive_data(b'{"return": "' + b"A" * 100)
    assert _events(codec) == []
    codec.receive_data(b"A" * 10_000)  # skipped, not stored
    assert _events(codec) == []
    assert len(codec._buf) == 0
    codec.receive_data(b'A"}\n{"return": 1}\n')
    assert _events(codec) == [Oversized(b'{"return": "AAAA', {}), Reply(1)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_oversized_reply_scalars_are_found_anywhere(chunk: int) -> None:
    """The agent writes members in hash order: the exit code may follow the output."""
    line = (
        b'{"return": {"out-data": "' + b"QUJD" * 5000 + b'", "err-data": "'
        + b"REVG" * 5000 + b'", "exitcode": 123, "exited": true}}\n'
    )  # fmt: skip
    codec = _synced_codec(line_limit=100)
    for at in range(0, len(line), chunk):
        codec.receive_data(line[at : at + chunk])
        events = _events(codec)
        if at + chunk < len(line):
            assert events == []
    assert events == [Oversized(line[:100], {"exitcode": 123, "exited": True})]


def test_exec_arguments() -> None:
    args = exec_arguments(["/bin/sh", "-c", "x"], b"in", {"A": "1"})
    assert args == {
        "path": "/bin/sh",
        "arg": ["-c", "x"],
        "capture-output": True,
        "env": ["A=1"],
        "input-data": base64.b64encode(b"in").decode(),
    }
    assert "input-data" not in exec_arguments(["true"], None, None)
    with pytest.raises(ValueError):
        exec_arguments([], None, None)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_exec_status() -> None:
    running = parse_exec_status({"exited": False}, 100)
    assert not running.exited
    done = parse_exec_status(
        {"exited": True, "exitcode": 3, "out-data": _b64(b"out"), "err-data": _b64(b"err")}, 100
    )
    assert (done.exit_code, done.stdout, done.stderr, done.truncated) == (3, b"out", b"err", False)
    killed = parse_exec_status({"exited": True, "signal": 9}, 100)
    assert killed.exit_code == 137
    long = parse_exec_status({"exited": True, "exitcode": 0, "out-data": _b64(b"x" * 50)}, 10)
    assert (long.stdout, long.truncated) == (b"x" * 10, True)
    agent_cut = parse_exec_status({"exited": True, "exitcode": 0, "out-truncated": True}, 10)
    assert agent_cut.truncated
    with pytest.raises(GuestAgentError):
        parse_exec_status({"exitcode": 0}, 10)
    with pytest.raises(GuestAgentError, match="base64"):
        parse_exec_status({"exited": True, "out-data": "!!!!"}, 10)


def test_salvage_exec_status() -> None:
    line = json.dumps({"return": {"exited": True, "out-data": _b64(b"y" * 3000)}}).encode()
    status = salvage_exec_status(Oversized(line[:1001], {"exited": True, "exitcode": 3}), 500)
    assert (status.exit_code, status.truncated, status.stderr) == (3, True, b"")
    assert status.stdout == b"y" * 500
    err_first = salvage_exec_status(
        Oversized(b'{"return": {"err-data": "AAAA', {"exited": True}), 9
    )
    assert (err_first.exit_code, err_first.stdout) == (-1, b"")
    signalled = salvage_exec_status(Oversized(b"", {"exited": True, "signal": 15}), 10)
    assert signalled.exit_code == 143
    with pytest.raises(GuestAgentError, match="size limit"):
        salvage_exec_status(Oversized(b'{"return": "' + b"x" * 50, {}), 10)


# --- the trio client against a fake agent ----------------------------------------


class FakeAgent:
    """Speaks the agent side over a stream: ignores the first ``deaf`` syncs (a guest
    still booting), sends stale junk first, keeps files in memory."""

    def __init__(self, deaf: int = 0, exec_output: bytes = b"hi\n") -> None:
        self.deaf = deaf
        self.exec_output = exec_output
        self.files: dict[str, bytearray] = {"/etc/hostname": bytearray(b"guest\n")}
        self.handles: dict[int, tuple[str, int]] = {}
        self.commands: list[str] = []
        self.polls = 0
        self.mute: set[str] = {"guest-shutdown"}  # commands that get no answer

    async def serve(self, stream: trio.abc.Stream) -> None:
        await stream.send_all(b'{"return": {}}\n\xff{"return": 1}\n')  # a previous client's
        buf = b""
        while data := await stream.receive_some(1 << 16):
            buf += data
            buf = buf.rsplit(b"\xff", 1)[-1]  # 0xFF resets the agent's parser
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                self.commands.append(cmd["execute"])
                reply = self.handle(cmd["execute"], cmd.get("arguments", {}))
                if reply is not None:
                    await stream.send_all(reply)

    def handle(self, name: str, args: dict[str, Any]) -> bytes | None:
        ret: Any = {}
        if name == "guest-sync-delimited":
            if self.deaf > 0:
                self.deaf -= 1
                return None
            return b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
        if name in self.mute:
            return None
        if name == "guest-exec":
            ret = {"pid": 77}
        elif name == "guest-exec-status":
            self.polls += 1
            ret = {"exited": False}
            if self.polls >= 3:
                # members in hash order, as the real agent writes them
                ret = {"out-data": _b64(self.exec_output), "exitcode": 0, "exited": True}
        elif name == "guest-file-open":
            if args["path"] not in self.files and args["mode"] == "rb":
                return b'{"error": {"class": "GenericError", "desc": "No such file"}}\n'
            if args["mode"] == "wb":
                self.files[args["path"]] = bytearray()
            ret = len(self.handles) + 1
            self.handles[ret] = (args["path"], 0)
        elif name == "guest-file-write":
            path, pos = self.handles[args["handle"]]
            chunk = base64.b64decode(args["buf-b64"])
            assert len(chunk) <= FILE_CHUNK
            self.files[path] += chunk
            ret = {"count": len(chunk), "eof": False}
        elif name == "guest-file-read":
            path, pos = self.handles[args["handle"]]
            chunk = bytes(self.files[path][pos : pos + args["count"]])
            self.handles[args["handle"]] = (path, pos + len(chunk))
            ret = {"count": len(chunk), "buf-b64": _b64(chunk), "eof": not chunk}
        elif name == "guest-file-close":
            del self.handles[args["handle"]]
        return json.dumps({"return": ret}).encode() + b"\n"


async def _client(nursery: trio.Nursery, agent: FakeAgent) -> GuestAgentClient:
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(agent.serve, server_side)
    client = GuestAgentClient(client_side, AgentCodec())
    await client.sync()
    return client


async def test_sync_retries_until_a_late_agent_answers(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent(deaf=3)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        client = await _client(nursery, agent)
        assert trio.current_time() - start == pytest.approx(3.0)
        await client.ping()
        nursery.cancel_scope.cancel()


async def test_sync_gives_up_after_its_timeout(autojump_clock: trio.abc.Clock) -> None:
    client_side, _server_side = trio.testing.memory_stream_pair()
    client = GuestAgentClient(client_side, AgentCodec())
    with pytest.raises(GuestAgentError, match="within 10 s"):
        await client.sync()


async def test_exec_polls_until_exited(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent()
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        status = await client.exec(["echo", "hi"])
        assert (status.exit_code, status.stdout, status.truncated) == (0, b"hi\n", False)
        assert agent.commands.count("guest-exec-status") == 3
        nursery.cancel_scope.cancel()


async def test_exec_output_over_the_limit_is_truncated_not_buffered(
    autojump_clock: trio.abc.Clock,
) -> None:
    agent = FakeAgent(exec_output=b"z" * (4 << 20))
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        status = await client.exec(["yes"], output_limit=64 << 10)
        assert status.truncated
        assert status.stdout == b"z" * (64 << 10)
        await client.ping()  # the rest of the huge line was skipped: still in step
        nursery.cancel_scope.cancel()


async def test_exec_times_out(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent()
    agent.polls = -(10**6)  # never exits
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        with pytest.raises(GuestAgentError, match="did not finish within 5 s"):
            await client.exec(["sleep", "inf"], timeout=5)
        nursery.cancel_scope.cancel()


async def test_a_call_without_its_reply_needs_a_new_sync(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent()
    agent.mute.add("guest-ping")
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        with pytest.raises(GuestAgentError, match="did not answer guest-ping"):
            await client.ping()
        with pytest.raises(GuestAgentError, match="out of step"):
            await client.execute("guest-info")
        await client.sync()
        await client.execute("guest-info")
        nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_file_round_trip_in_chunks(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent()
    data = bytes(range(256)) * 1000  # 256 000 bytes: 6 chunks
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        await client.write_file("/tmp/x", data)
        assert agent.commands.count("guest-file-write") == 6
        assert await client.read_file("/tmp/x") == data
        assert await client.read_file("/etc/hostname") == b"guest\n"
        with pytest.raises(GuestAgentError, match="over 1000 bytes"):
            await client.read_file("/tmp/x", limit=1000)
        assert agent.handles == {}  # every handle closed, also after the error
        with pytest.raises(GuestAgentError, match="No such file"):
            await client.read_file("/nope")
        nursery.cancel_scope.cancel()


async def test_shutdown_expects_no_answer(autojump_clock: trio.abc.Clock) -> None:
    agent = FakeAgent()
    async with trio.open_nursery() as nursery:
        client = await _client(nursery, agent)
        await client.shutdown()
        await trio.sleep(0.1)
        assert agent.commands[-1] == "guest-shutdown"
        nursery.cancel_scope.cancel()


class AgentSocket:
    """A fake agent on a Unix socket, one client at a time as QEMU's chardev serves it;
    counts the connections made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.agent = FakeAgent()
        self.connections = 0


@pytest.fixture
async def agent_socket(tmp_path: Path) -> AsyncIterator[AgentSocket]:
    served = AgentSocket(tmp_path / "qga.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(served.path))
        listener.listen(1)

        async def serve() -> None:
            while True:
                sock, _ = await listener.accept()
                served.connections += 1
                async with trio.SocketStream(sock) as stream:
                    await served.agent.serve(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield served
            nursery.cancel_scope.cancel()


async def test_agent_link_over_a_unix_socket(agent_socket: AgentSocket) -> None:
    async with AgentLink(agent_socket.path).use() as agent:
        await agent.ping()


async def test_agent_link_without_a_socket(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match="cannot connect"):
        async with AgentLink(tmp_path / "none.sock").use():
            pass


async def test_agent_link_keeps_its_connection_and_syncs_each_use(
    agent_socket: AgentSocket,
) -> None:
    # A new connection per command cost 80-90 ms under TCG; a sync on a kept one, a few.
    link = AgentLink(agent_socket.path)
    for _ in range(3):
        async with link.use() as agent:
            await agent.ping()
    assert agent_socket.connections == 1
    assert agent_socket.agent.commands.count("guest-sync-delimited") == 3
    await link.aclose()


async def test_agent_link_connects_again_after_a_use_left_out_of_step(
    agent_socket: AgentSocket,
) -> None:
    agent_socket.agent.mute.add("guest-info")
    link = AgentLink(agent_socket.path)
    with pytest.raises(GuestAgentError, match="did not answer guest-info"):
        async with link.use() as agent:
            await agent.execute("guest-info", timeout=0.1)
    async with link.use() as agent:  # a late reply of the old stream cannot be taken
        await agent.ping()
    assert agent_socket.connections == 2
    await link.aclose()


async def test_agent_link_closed_during_a_use_closes_after_it(agent_socket: AgentSocket) -> None:
    link = AgentLink(agent_socket.path)
    async with link.use() as agent:
        await link.aclose()  # the guest went while a command was under way
        await agent.ping()
    async with link.use() as agent:
        await agent.ping()
    assert agent_socket.connections == 2
    await link.aclose()
