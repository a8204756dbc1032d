"""RPC over memory streams, then mutual TLS and RPC over real loopback sockets."""

from __future__ import annotations

import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tests import rpcutil
from tests.rpcutil import (
    BIG,
    BUGGY,
    COUNT,
    ECHO,
    FOREVER,
    HANG,
    MISSING,
    RECORD,
    Note,
    Tick,
    echo,
    handlers,
)
from vmmesh.api.codec import Empty
from vmmesh.errors import (
    AuthError,
    InternalError,
    NotFound,
    PeerUnavailable,
    ProtocolError,
    Revoked,
    UnknownMessage,
    VmmeshError,
)
from vmmesh.mesh import pki
from vmmesh.net.peers import PeerPool, connect_rpc
from vmmesh.net.refusals import Cause, Refusals
from vmmesh.net.rpc import Context, Handlers, RpcConnection, open_rpc
from vmmesh.net.tls import client_context, open_peer, serve_peers, server_context
from vmmesh.wire.envelope import Call, Fail, decode, encode
from vmmesh.wire.framing import FrameDecoder, encode_frame


@asynccontextmanager
async def memory_pair(
    server_handlers: Handlers | None = None,
) -> AsyncIterator[tuple[RpcConnection, RpcConnection]]:
    a, b = trio.testing.memory_stream_pair()
    async with (
        open_rpc(a, "client-side-peer", handlers()) as client,
        open_rpc(b, "server-side-peer", server_handlers or handlers()) as server,
    ):
        yield client, server


# --- RPC over memory streams ------------------------------------------------------------


async def test_call_both_directions() -> None:
    async with memory_pair() as (client, server):
        reply = await client.request(ECHO, Note(text="x", n=1))
        assert (reply.note, reply.peer) == (Note(text="x", n=1), "server-side-peer")
        assert (await server.request(ECHO, Note())).peer == "client-side-peer"


async def test_concurrent_calls_are_multiplexed() -> None:
    results: dict[int, Note] = {}
    async with memory_pair() as (client, _):

        async def one(i: int) -> None:
            results[i] = (await client.request(ECHO, Note(n=i))).note

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert all(results[i].n == i for i in range(50))


async def test_stream_call() -> None:
    async with memory_pair() as (client, _):
        async with client.stream(COUNT, Note(n=5)) as answer:
            items = [item async for item in answer]
        assert items == [Tick(i) for i in range(5)]
        assert answer.result() == Empty()


async def test_errors_come_back_as_their_class(caplog: pytest.LogCaptureFixture) -> None:
    async with memory_pair() as (client, _):
        with pytest.raises(NotFound, match=r"^no VM named web$"):
            await client.request(MISSING, Empty())
        with pytest.raises(InternalError, match="internal error in"):
            await client.request(BUGGY, Empty())
        assert "ZeroDivisionError" in caplog.text
        with pytest.raises(UnknownMessage, match="unknown method"):
            await client.call("t.nope")
        assert (await client.request(ECHO, Note())).note == Note()  # still open


async def test_a_broken_invariant_is_logged_where_it_broke_and_travels_as_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def invariant(ctx: Context, body: Empty) -> Empty:
        raise InternalError("no open ask")

    served = handlers()
    served.add(BUGGY, invariant)
    async with memory_pair(served) as (client, _):
        with pytest.raises(InternalError, match=r"^no open ask$"):
            await client.request(BUGGY, Empty())
    assert "hit a bug" in caplog.text and "Traceback" in caplog.text


async def test_a_body_that_does_not_fit_its_method_is_refused() -> None:
    refusals = Refusals(logging.getLogger("test"))
    a, b = trio.testing.memory_stream_pair()
    server = RpcConnection(b, "server", handlers(), refusals=refusals)
    async with trio.open_nursery() as nursery, open_rpc(a, "client") as client:
        nursery.start_soon(server.run)
        for bad in ({"v": 1, "n": "many"}, {"v": 1, "n": -1}, {"v": 9}, {"v": 1, "text": 5}):
            with pytest.raises(UnknownMessage if bad["v"] == 9 else ProtocolError):
                await client.call("t.echo", bad)
        assert (await client.request(ECHO, Note(n=2))).note.n == 2  # the link stays open
        assert refusals.snapshot()["message"] == 4
        nursery.cancel_scope.cancel()


async def test_unsendable_reply_becomes_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    small = Handlers()
    small.add(BIG, rpcutil.big)
    small.add(ECHO, echo)
    a, b = trio.testing.memory_stream_pair()
    async with (
        open_rpc(a, "client") as client,
        open_rpc(b, "server", small, max_frame=1024),
    ):
        with pytest.raises(InternalError, match="bad reply"):
            await client.request(BIG, Empty())
        assert (await client.request(ECHO, Note())).peer == "server"
    assert "cannot be sent" in caplog.text


async def test_early_exit_cancels_the_handler(autojump_clock: trio.testing.MockClock) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def forever(ctx: Context, body: Empty) -> Empty:
        await ctx.send_item(Tick(0))
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return Empty()

    server = handlers()
    server.add(FOREVER, forever)
    async with memory_pair(server) as (client, _):
        async with client.stream(FOREVER, Empty()) as answer:
            async for item in answer:
                assert item == Tick(0)
                break
        await cancelled.wait()
        with trio.move_on_after(1):
            await client.request(FOREVER, Empty())  # a caller's timeout cancels it too
        assert started.is_set()


async def test_cancelling_a_call_while_the_connection_closes() -> None:
    """A caller cancelled while its connection shuts down tells the peer nothing and
    raises nothing else (it used to start a task in the connection's closed nursery)."""
    a, b = trio.testing.memory_stream_pair()
    server = handlers()
    async with trio.open_nursery() as outer:
        outer.start_soon(RpcConnection(b, "server", server).run)
        conn = RpcConnection(a, "client")
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)

            async def caller() -> None:
                await conn.request(HANG, Empty())

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # connection and caller go down together
        outer.cancel_scope.cancel()


async def test_peer_closing_fails_pending_calls() -> None:
    entered = trio.Event()

    async def hang(ctx: Context, body: Empty) -> Empty:
        entered.set()
        await trio.sleep_forever()
        return Empty()

    server_handlers = handlers()
    server_handlers.add(HANG, hang)
    async with memory_pair(server_handlers) as (client, server):

        async def close_server() -> None:
            await entered.wait()
            await server.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_server)
            with pytest.raises(PeerUnavailable):
                await client.request(HANG, Empty())
        with pytest.raises(PeerUnavailable):
            await client.request(ECHO, Note())


async def test_fail_zero_from_peer_ends_the_connection() -> None:
    raw, other = trio.testing.memory_stream_pair()
    async with open_rpc(other, "peer") as conn:
        await raw.send_all(encode_frame(encode(Fail(0, "protocol", "you spoke nonsense"))))
        with pytest.raises(PeerUnavailable, match="you spoke nonsense"):
            await conn.request(ECHO, Note())


def frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def nested(depth: int) -> bytes:
    """msgpack of ``depth`` arrays, each holding the next (its error text is empty)."""
    return b"\x91" * depth + b"\x00"


VIOLATIONS = {
    "garbage": (frame_raw(b"\xc1\xc1\xc1"), "framing"),
    "oversize": (struct.pack(">I", 0xFFFFFFFF), "framing"),
    "length 2^31": (struct.pack(">I", 1 << 31), "framing"),
    "huge map": (frame_raw(b"\xdf\x40\x00\x00\x00"), "framing"),
    "deep nesting": (frame_raw(nested(100_000)), "framing"),
    "wrong shape": (
        encode_frame({"v": 1, "k": "call", "id": "one", "m": "t.echo", "b": {}}),
        "message",
    ),
    "unknown kind": (encode_frame({"v": 1, "k": "shout", "id": 1}), "message"),
    "not a map": (encode_frame([1, 2, 3]), "message"),
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
async def test_protocol_violation_closes_with_fail(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, cause = VIOLATIONS[kind]
    refusals = Refusals(logging.getLogger("vmmesh.refused"))
    raw, other = trio.testing.memory_stream_pair()
    conn = RpcConnection(other, f"peer-{kind}", handlers(), refusals=refusals)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await raw.send_all(data)
        got = await read_until_closed(raw)
    assert len(got) == 1
    fail = decode(got[0])
    assert isinstance(fail, Fail) and fail.id == 0 and fail.message.strip()
    assert refusals.snapshot()[cause] == 1
    logged = [r for r in caplog.records if f"peer-{kind}" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert logged[0].getMessage().rstrip().split(": ")[-1], "a refusal has a reason"
    with pytest.raises(PeerUnavailable):
        await conn.request(ECHO, Note())


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
        self.refusals = Refusals(logging.getLogger("vmmesh.refused"))


@asynccontextmanager
async def tls_server(
    identity: pki.Identity, served: Handlers | None = None
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server = Server(0)
        refusals = server.refusals

        async def handle(stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
            server.peers.append(peer)
            await RpcConnection(stream, peer, served or handlers(), refusals=refusals).run()

        listeners = await nursery.start(
            partial(serve_peers, host="127.0.0.1", refusals=refusals),
            0,
            lambda: server_context(identity),
            handle,
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
        reply = await conn.request(ECHO, Note(n=1))
        assert (reply.note.n, reply.peer) == (1, mesh.beta.node_id)
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
    server: Server,
    identity: pki.Identity,
    caplog: pytest.LogCaptureFixture,
    attempts: int = 1,
    refusal: type[VmmeshError] = PeerUnavailable,
) -> None:
    """Connect as ``identity``; the server must refuse it in the handshake (the
    client's calls raise ``refusal``)."""
    before = server.refusals.counts[Cause.TLS]
    for _ in range(attempts):
        # TLS 1.3: the client's handshake completes before the server checks it,
        # so the refusal shows on the first read
        stream = await open_peer("127.0.0.1", server.port, None, context=attacker_context(identity))
        with pytest.raises(refusal):
            async with open_rpc(stream, "server") as conn:
                await conn.request(ECHO, Note())
    await wait_for(lambda: server.refusals.counts[Cause.TLS] == before + attempts)
    assert server.peers == []  # the handler never saw this client


async def test_client_of_other_ca_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    async with tls_server(mesh.alpha) as server:
        await refused_client(server, mesh.mallory, caplog, attempts=3)
    refused = records(caplog, "vmmesh.refused", "refused tls")
    assert [r.levelno for r in refused] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "self-signed certificate" in refused[0].getMessage()


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
            await conn.request(ECHO, Note())
        crl = pki.revoke(mesh.alpha.pki_dir, mesh.beta.node_id)
        server.peers.clear()
        await refused_client(server, mesh.beta, caplog, refusal=Revoked)
    assert "revoked" in caplog.text
    # beta as a server is refused by a client that installed the CRL
    assert pki.install_crl(mesh.old.pki_dir, crl)
    async with tls_server(mesh.beta) as server:
        for client in (mesh.alpha, mesh.old):
            with pytest.raises(AuthError, match="revoked"):
                await open_peer("127.0.0.1", server.port, client)


async def test_a_pool_told_this_host_is_revoked_says_so_once_and_drops_the_link(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    pki.revoke(mesh.alpha.pki_dir, mesh.beta.node_id)
    async with tls_server(mesh.alpha) as server, trio.open_nursery() as nursery:
        pool = PeerPool(lambda: mesh.beta, Handlers(), nursery, self_id=mesh.beta.node_id)
        pool.set_endpoint(mesh.alpha.node_id, "127.0.0.1", server.port, "static")
        for _ in range(2):
            with pytest.raises(Revoked):
                await pool.call(mesh.alpha.node_id, ECHO, Note())
        nursery.cancel_scope.cancel()
    said = [r for r in caplog.records if "this host has been removed" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]


async def send_violation(port: int, identity: pki.Identity, data: bytes) -> list[object]:
    stream = await open_peer("127.0.0.1", port, identity)
    try:
        await stream.send_all(data)
        return await read_until_closed(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def test_bad_peer_over_tls_does_not_hurt_others(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kind of violation from one peer is logged once (a new kind at once, a
    repeat at DEBUG until the period is over), counted by cause, and harms nobody else."""
    caplog.set_level(logging.DEBUG, logger="vmmesh")
    text = f"from {mesh.beta.node_id}"
    async with tls_server(mesh.alpha) as server:
        async with connect_rpc("127.0.0.1", server.port, mesh.alpha) as good:
            for n, kind in enumerate(sorted(VIOLATIONS) * 2, start=1):
                got = await send_violation(server.port, mesh.beta, VIOLATIONS[kind][0])
                for msg in map(decode, got):  # a Fail if it arrived before the close
                    assert isinstance(msg, Fail) and msg.id == 0
                await wait_for(partial(logged, caplog, "vmmesh.refused", text, n))
                reply = await good.request(ECHO, Note(text=kind))
                assert reply.note.text == kind
        # unknown method: an error answer, and the connection stays open
        async with connect_rpc("127.0.0.1", server.port, mesh.beta) as conn:
            with pytest.raises(UnknownMessage, match="unknown method"):
                await conn.call("t.what")
            assert (await conn.request(ECHO, Note())).peer == mesh.beta.node_id
    levels = [r.levelno for r in records(caplog, "vmmesh.refused", text)]
    kinds = len(VIOLATIONS) - 1  # oversize and 2^31 are one kind: a frame over the limit
    assert levels.count(logging.WARNING) == kinds
    assert levels[len(VIOLATIONS) :] == [logging.DEBUG] * len(VIOLATIONS)
    counts = server.refusals.snapshot()
    assert counts["framing"] + counts["message"] == 2 * len(VIOLATIONS)


async def test_a_refusal_is_logged_again_after_the_period() -> None:
    clock = [0.0]
    refusals = Refusals(logging.getLogger("test"), clock=lambda: clock[0])
    seen: list[int] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.levelno)

    logger = logging.getLogger("test")
    logger.addHandler(catch := Catch())
    logger.setLevel(logging.DEBUG)
    try:
        for t in (0.0, 10.0, 599.0, 601.0):
            clock[0] = t
            refusals(Cause.FRAMING, "peer", "frame of 2147483648 bytes")
    finally:
        logger.removeHandler(catch)
    assert seen == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]
    assert refusals.snapshot()["framing"] == 4


async def test_valid_call_frame_after_garbage_is_not_served(mesh: Mesh) -> None:
    """Bytes after a violation are never dispatched."""
    seen: list[Note] = []

    async def record(ctx: Context, body: Note) -> Empty:
        seen.append(body)
        return Empty()

    served = Handlers()
    served.add(RECORD, record)
    async with tls_server(mesh.alpha, served) as server:
        data = VIOLATIONS["garbage"][0] + encode_frame(encode(Call(1, "t.record", {})))
        await send_violation(server.port, mesh.beta, data)
    assert seen == []
