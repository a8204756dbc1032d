"""RPC over memory streams, then mutual TLS and RPC over real loopback sockets."""

from __future__ import annotations

import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from vmmesh.errors import AuthError, NotFound, PeerUnavailable, RemoteError
from vmmesh.mesh import pki
from vmmesh.net.rpc import CallContext, Handler, RpcConnection, connect_rpc, open_rpc
from vmmesh.net.tls import client_context, open_peer, serve_peers, server_context
from vmmesh.wire.envelope import Body, Call, Fail, decode, encode
from vmmesh.wire.framing import FrameDecoder, encode_frame

# --- handlers used by both halves ----------------------------------------------------


async def echo(ctx: CallContext, body: Body) -> Body:
    return {"echo": body, "peer": ctx.peer_id}


async def count(ctx: CallContext, body: Body) -> None:
    for i in range(body["n"]):
        await ctx.send_item({"i": i})


async def missing(ctx: CallContext, body: Body) -> Body:
    raise NotFound("no VM named web")


async def buggy(ctx: CallContext, body: Body) -> Body:
    raise ZeroDivisionError("oops")


HANDLERS: dict[str, Handler] = {
    "t.echo": echo,
    "t.count": count,
    "t.missing": missing,
    "t.buggy": buggy,
}


@asynccontextmanager
async def memory_pair(
    server_handlers: dict[str, Handler] | None = None,
) -> AsyncIterator[tuple[RpcConnection, RpcConnection]]:
    a, b = trio.testing.memory_stream_pair()
    async with (
        open_rpc(a, "client-side-peer", HANDLERS) as client,
        open_rpc(b, "server-side-peer", server_handlers or HANDLERS) as server,
    ):
        yield client, server


# --- RPC over memory streams ------------------------------------------------------------


async def test_call_both_directions() -> None:
    async with memory_pair() as (client, server):
        assert await client.call("t.echo", {"x": 1}) == {
            "echo": {"x": 1},
            "peer": "server-side-peer",
        }
        assert (await server.call("t.echo"))["peer"] == "client-side-peer"


async def test_concurrent_calls_are_multiplexed() -> None:
    results: dict[int, Body] = {}
    async with memory_pair() as (client, _):

        async def one(i: int) -> None:
            results[i] = await client.call("t.echo", {"i": i})

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert all(results[i]["echo"] == {"i": i} for i in range(50))


async def test_stream_call() -> None:
    async with memory_pair() as (client, _):
        items = [item async for item in client.stream_call("t.count", {"n": 5})]
        assert items == [{"i": i} for i in range(5)]
        assert [x async for x in client.stream_call("t.echo", {})] == [
            {"echo": {}, "peer": "server-side-peer"}
        ]


async def test_errors_become_fails(caplog: pytest.LogCaptureFixture) -> None:
    async with memory_pair() as (client, _):
        with pytest.raises(RemoteError) as info:
            await client.call("t.missing")
        assert (info.value.code, str(info.value)) == ("NotFound", "no VM named web")
        with pytest.raises(RemoteError) as info:
            await client.call("t.buggy")
        assert info.value.code == "InternalError"
        assert "ZeroDivisionError" in caplog.text
        with pytest.raises(RemoteError) as info:
            await client.call("t.nope")
        assert info.value.code == "UnknownMessage"
        assert (await client.call("t.echo"))["echo"] == {}  # still open


async def test_unsendable_reply_becomes_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    async def big(ctx: CallContext, body: Body) -> Body:
        return {"blob": b"x" * 2000}

    a, b = trio.testing.memory_stream_pair()
    async with (
        open_rpc(a, "client") as client,
        open_rpc(b, "server", {"t.big": big, "t.echo": echo}, max_frame=1024),
    ):
        with pytest.raises(RemoteError) as info:
            await client.call("t.big")
        assert info.value.code == "InternalError"
        assert await client.call("t.echo") == {"echo": {}, "peer": "server"}
    assert "cannot be sent" in caplog.text


async def test_early_exit_cancels_the_handler(autojump_clock: trio.testing.MockClock) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def forever(ctx: CallContext, body: Body) -> None:
        await ctx.send_item({"first": True})
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with memory_pair({"t.forever": forever}) as (client, _):
        async with aclosing(client.stream_call("t.forever")) as items:
            async for item in items:
                assert item == {"first": True}
                break
        await cancelled.wait()
        with trio.move_on_after(1):
            await client.call("t.forever")  # a caller's timeout cancels it too
        assert started.is_set()


async def test_peer_closing_fails_pending_calls() -> None:
    entered = trio.Event()

    async def hang(ctx: CallContext, body: Body) -> None:
        entered.set()
        await trio.sleep_forever()

    async with memory_pair({"t.hang": hang}) as (client, server):

        async def close_server() -> None:
            await entered.wait()
            await server.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_server)
            with pytest.raises(PeerUnavailable):
                await client.call("t.hang")
        with pytest.raises(PeerUnavailable):
            await client.call("t.echo")


async def test_fail_zero_from_peer_ends_the_connection() -> None:
    raw, other = trio.testing.memory_stream_pair()
    async with open_rpc(other, "peer") as conn:
        await raw.send_all(encode_frame(encode(Fail(0, "ProtocolError", "you spoke nonsense"))))
        with pytest.raises(PeerUnavailable, match="you spoke nonsense"):
            await conn.call("t.echo")


def frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


VIOLATIONS = {
    "garbage": frame_raw(b"\xc1\xc1\xc1"),
    "oversize": struct.pack(">I", 0xFFFFFFFF),
    "wrong shape": encode_frame({"v": 1, "k": "call", "id": "one", "m": "t.echo", "b": {}}),
    "unknown kind": encode_frame({"v": 1, "k": "shout", "id": 1}),
    "not a map": encode_frame([1, 2, 3]),
}


async def read_until_closed(stream: trio.abc.ReceiveStream) -> list[object]:
    decoder = FrameDecoder()
    out: list[object] = []
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return out
        if not data:
            return out
        decoder.feed(data)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)


@pytest.mark.parametrize("kind", sorted(VIOLATIONS))
async def test_protocol_violation_closes_with_fail(kind: str) -> None:
    raw, other = trio.testing.memory_stream_pair()
    async with open_rpc(other, f"peer-{kind}", HANDLERS) as conn:
        await raw.send_all(VIOLATIONS[kind])
        got = await read_until_closed(raw)
        assert len(got) == 1
        fail = decode(got[0])
        assert isinstance(fail, Fail) and (fail.id, fail.code) == (0, "ProtocolError")
        with pytest.raises(PeerUnavailable):
            await conn.call("t.echo")


# --- mutual TLS over loopback ---------------------------------------------------------------


def add_host(
    admin: pki.Identity, pki_dir: Path, name: str, *, now: float | None = None, days: int = 365
) -> pki.Identity:
    """A member host of ``admin``'s mesh, as if it had joined."""
    key_pem, csr_pem = pki.make_key_and_csr(name)
    cert_pem = pki.sign_csr(pki.load_ca(admin.pki_dir), csr_pem, days=days, now=now)
    return pki.install_joined(
        pki_dir,
        key_pem,
        cert_pem,
        admin.ca_cert_path.read_bytes(),
        pki.current_crl(admin.pki_dir),
    )


class Mesh:
    def __init__(self, root: Path) -> None:
        self.alpha = pki.init_mesh(root / "alpha", "alpha")
        self.beta = add_host(self.alpha, root / "beta", "beta")
        self.old = add_host(self.alpha, root / "old", "old", now=time.time() - 30 * 86400, days=2)
        self.mallory = pki.init_mesh(root / "mallory", "mallory")  # another mesh


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path)


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.peers: list[str] = []


@asynccontextmanager
async def tls_server(
    identity: pki.Identity, handlers: dict[str, Handler] = HANDLERS
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server = Server(0)

        async def handle(stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
            server.peers.append(peer)
            await RpcConnection(stream, peer, handlers).run()

        listeners = await nursery.start(
            partial(serve_peers, host="127.0.0.1"), 0, lambda: server_context(identity), handle
        )
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def records(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and text in r.getMessage()]


def logged(caplog: pytest.LogCaptureFixture, logger: str, text: str, n: int) -> bool:
    return len(records(caplog, logger, text)) == n


async def wait_for(predicate: Callable[[], bool]) -> None:
    # caplog has no async hook; the server logs from its own task
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def test_mutual_tls_call(mesh: Mesh) -> None:
    async with (
        tls_server(mesh.alpha) as server,
        connect_rpc("127.0.0.1", server.port, mesh.beta, mesh.alpha.node_id) as conn,
    ):
        assert await conn.call("t.echo", {"a": 1}) == {"echo": {"a": 1}, "peer": mesh.beta.node_id}
    assert server.peers == [mesh.beta.node_id]


async def test_wrong_node_id_refused_by_client(mesh: Mesh) -> None:
    async with tls_server(mesh.alpha) as server:
        with pytest.raises(AuthError, match="expected"):
            await open_peer("127.0.0.1", server.port, mesh.beta, mesh.beta.node_id)


async def test_server_of_other_ca_refused_by_client(mesh: Mesh) -> None:
    async with tls_server(mesh.mallory) as server:
        with pytest.raises(AuthError, match="failed verification"):
            await open_peer("127.0.0.1", server.port, mesh.beta)
    assert server.peers == []


def attacker_context(identity: pki.Identity) -> ssl.SSLContext:
    """A client that presents its certificate but trusts any server."""
    ctx = client_context(identity)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def refused_client(
    server: Server, identity: pki.Identity, caplog: pytest.LogCaptureFixture, attempts: int = 1
) -> None:
    """Connect as ``identity``; the server must refuse it in the handshake."""
    before = len(records(caplog, "vmmesh.net.tls", "refused TLS connection"))
    for _ in range(attempts):
        # TLS 1.3: the client's handshake completes before the server checks it,
        # so the refusal shows on the first read
        stream = await open_peer("127.0.0.1", server.port, None, context=attacker_context(identity))
        with pytest.raises(PeerUnavailable):
            async with open_rpc(stream, "server") as conn:
                await conn.call("t.echo")
    await wait_for(
        lambda: (
            len(records(caplog, "vmmesh.net.tls", "refused TLS connection")) == before + attempts
        )
    )
    assert server.peers == []  # the handler never saw this client


async def test_client_of_other_ca_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    async with tls_server(mesh.alpha) as server:
        await refused_client(server, mesh.mallory, caplog, attempts=3)
    refused = records(caplog, "vmmesh.net.tls", "refused TLS connection")
    assert [r.levelno for r in refused] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


async def test_expired_certificate_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    async with tls_server(mesh.alpha) as server:
        await refused_client(server, mesh.old, caplog)
    assert "expired" in caplog.text
    async with tls_server(mesh.old) as server:  # and as a server
        with pytest.raises(AuthError, match="expired"):
            await open_peer("127.0.0.1", server.port, mesh.beta)


async def test_revoked_host_refused_after_crl(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    async with tls_server(mesh.alpha) as server:
        async with connect_rpc("127.0.0.1", server.port, mesh.beta) as conn:
            await conn.call("t.echo")
        crl = pki.revoke(mesh.alpha.pki_dir, mesh.beta.node_id)
        server.peers.clear()
        await refused_client(server, mesh.beta, caplog)
    assert "revoked" in caplog.text
    # beta as a server is refused by a client that installed the CRL
    assert pki.install_crl(mesh.old.pki_dir, crl)
    async with tls_server(mesh.beta) as server:
        for client in (mesh.alpha, mesh.old):
            with pytest.raises(AuthError, match="revoked"):
                await open_peer("127.0.0.1", server.port, client)


async def send_violation(port: int, identity: pki.Identity, data: bytes) -> list[object]:
    stream = await open_peer("127.0.0.1", port, identity)
    try:
        await stream.send_all(data)
        return await read_until_closed(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def test_bad_peer_over_tls_does_not_hurt_others(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    text = f"closing connection to {mesh.beta.node_id}"
    async with tls_server(mesh.alpha) as server:
        async with connect_rpc("127.0.0.1", server.port, mesh.alpha) as good:
            for n, kind in enumerate(sorted(VIOLATIONS), start=1):
                got = await send_violation(server.port, mesh.beta, VIOLATIONS[kind])
                for msg in map(decode, got):  # a Fail if it arrived before the close
                    assert isinstance(msg, Fail) and (msg.id, msg.code) == (0, "ProtocolError")
                await wait_for(partial(logged, caplog, "vmmesh.net.rpc", text, n))
                assert (await good.call("t.echo", {"after": kind}))["echo"] == {"after": kind}
        # unknown method: an error answer, and the connection stays open
        async with connect_rpc("127.0.0.1", server.port, mesh.beta) as conn:
            with pytest.raises(RemoteError, match="unknown method"):
                await conn.call("t.what")
            assert (await conn.call("t.echo"))["peer"] == mesh.beta.node_id
    levels = [r.levelno for r in records(caplog, "vmmesh.net.rpc", text)]
    assert levels == [logging.WARNING] + [logging.DEBUG] * (len(VIOLATIONS) - 1)


async def test_valid_call_frame_after_garbage_is_not_served(mesh: Mesh) -> None:
    """Bytes after a violation are never dispatched."""
    seen: list[Body] = []

    async def record(ctx: CallContext, body: Body) -> None:
        seen.append(body)

    async with tls_server(mesh.alpha, {"t.record": record}) as server:
        data = VIOLATIONS["garbage"] + encode_frame(encode(Call(1, "t.record", {})))
        await send_violation(server.port, mesh.beta, data)
    assert seen == []
