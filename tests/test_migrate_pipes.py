"""Migration's byte pipes over the RPC layer: both directions, end-of-file, files, and
what a peer may not do (a session it does not hold, a short file)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from vmmesh.api.migrate import CHUNK, PIPE, Channel, PipeEnd, PipeRequest
from vmmesh.errors import NotFound, TransferError
from vmmesh.migrate import pipes
from vmmesh.migrate.pipes import FileSink, FileSource, PipeSession, StreamEnd
from vmmesh.net.rpc import Context, Handlers, RpcConnection, open_rpc

SESSION = "ab" * 16


def _handlers(lookup: Callable[[str], PipeSession | None]) -> Handlers:
    h = Handlers()

    async def serve(ctx: Context, req: PipeRequest) -> PipeEnd:
        return await pipes.serve(ctx, req, lookup)

    h.add(PIPE, serve)
    return h


@asynccontextmanager
async def _pair(
    src: PipeSession, dst: PipeSession
) -> AsyncIterator[tuple[RpcConnection, RpcConnection]]:
    """Two connected RPC ends: "src" serves the source's sessions, "dst" the target's."""
    a, b = trio.testing.memory_stream_pair()
    async with (
        open_rpc(a, "dst", _handlers(lambda s: src if s == src.session else None)) as on_src,
        open_rpc(b, "src", _handlers(lambda s: dst if s == dst.session else None)) as on_dst,
    ):
        yield on_src, on_dst


def _end(sock: socket.socket) -> StreamEnd:
    return StreamEnd(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


async def test_a_duplex_channel_carries_both_ways_and_closes_each_way() -> None:
    """As the NBD bridge: the source's QEMU and the target's server talk through it."""
    src_local, src_qemu = socket.socketpair()
    dst_local, dst_server = socket.socketpair()
    src = PipeSession(SESSION, "dst")
    dst = PipeSession(SESSION, "src")
    src.put(Channel.NBD, _end(src_local))
    dst.put(Channel.NBD, _end(dst_local))
    request = bytes(range(256)) * 4096  # 1 MiB: several chunks
    reply = b"reply" * 1000
    qemu = trio.SocketStream(trio.socket.from_stdlib_socket(src_qemu))
    server = trio.SocketStream(trio.socket.from_stdlib_socket(dst_server))
    got: dict[str, bytes] = {}

    async def read_all(name: str, stream: trio.SocketStream) -> None:
        data = bytearray()
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
        got[name] = bytes(data)

    async with _pair(src, dst) as (on_src, _on_dst), trio.open_nursery() as n:
        n.start_soon(pipes.join, on_src, src, Channel.NBD)
        n.start_soon(read_all, "server", server)
        n.start_soon(read_all, "qemu", qemu)
        await qemu.send_all(request)
        await qemu.send_eof()
        await server.send_all(reply)
        await server.send_eof()
    assert got == {"server": request, "qemu": reply}
    assert src.counts.received[Channel.NBD] == len(reply)
    assert dst.counts.received[Channel.NBD] == len(request)
    assert src.counts.sent[Channel.NBD] == len(request)


async def test_a_file_goes_whole_and_only_then_has_its_name(tmp_path: Path) -> None:
    data = b"x" * (3 * CHUNK + 17)
    (tmp_path / "overlay").write_bytes(data)
    dest = tmp_path / "got" / "overlay"
    dest.parent.mkdir()
    src = PipeSession(SESSION, "dst")
    src.put(Channel.OVERLAY, FileSource(tmp_path / "overlay"))
    dst = PipeSession(SESSION, "src")
    dst.put(Channel.OVERLAY, FileSink(dest, limit=len(data)))
    async with _pair(src, dst) as (on_src, _):
        await pipes.join(on_src, src, Channel.OVERLAY)
    assert dest.read_bytes() == data
    assert not dest.with_name("overlay.part").exists()


async def test_a_file_over_its_limit_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"y" * 1000)
    dest = tmp_path / "got"
    src = PipeSession(SESSION, "dst")
    src.put(Channel.STATE, FileSource(tmp_path / "state"))
    dst = PipeSession(SESSION, "src")
    sink = FileSink(dest, limit=999)
    dst.put(Channel.STATE, sink)
    with pytest.raises(TransferError, match="more than 999 bytes"):
        async with _pair(src, dst) as (on_src, _):
            await pipes.join(on_src, src, Channel.STATE)
    await sink.aclose()
    assert list(tmp_path.iterdir()) == [tmp_path / "state"]


async def test_a_pipe_of_a_session_not_held_for_that_peer_is_refused() -> None:
    src = PipeSession(SESSION, "dst")
    stranger = PipeSession(SESSION, "someone-else")  # opened for another host
    src.put(Channel.RAM, FileSource(Path("/dev/null")))
    async with _pair(src, stranger) as (on_src, _):
        with pytest.raises(NotFound, match="no migration"):
            await pipes.join(on_src, src, Channel.RAM)
        with pytest.raises(NotFound, match="no migration"):
            req = PipeRequest(session="cd" * 16, channel=Channel.RAM)
            async with on_src.stream(PIPE, req) as answer:
                async for _ in answer:
                    pass
