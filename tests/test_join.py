"""Joining a mesh with a token, over real TLS on loopback."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.rpcutil import Note
from vmmesh.api.codec import Method
from vmmesh.errors import AuthError, PeerUnavailable, TokenError
from vmmesh.mesh import pki
from vmmesh.mesh.join import MemoryInviteBook, join_handler, join_mesh, join_server_context
from vmmesh.net.peers import connect_rpc
from vmmesh.net.rpc import Context, Handlers, RpcConnection
from vmmesh.net.tls import serve_peers, server_context

ECHO_WHO = Method("t.whoami", Note, Note)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # certificates issued at this time must be valid

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def alpha(tmp_path: Path) -> pki.Identity:
    return pki.init_mesh(tmp_path / "alpha", "alpha")


@asynccontextmanager
async def inviter(
    identity: pki.Identity, book: MemoryInviteBook, clock: Clock
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve_peers, host="127.0.0.1"),
            0,
            lambda: join_server_context(identity),
            join_handler(identity.pki_dir, book.consume, clock=clock),
        )
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


def invite(
    identity: pki.Identity, port: int, book: MemoryInviteBook, clock: Clock, ttl: int = 600
) -> str:
    token, secret_hash = pki.generate_invite(identity, [f"127.0.0.1:{port}"], ttl, clock.now)
    book.add(secret_hash, clock.now, token.expires)
    return pki.encode_token(token)


async def test_join_once_then_talk(tmp_path: Path, alpha: pki.Identity) -> None:
    book, clock = MemoryInviteBook(), Clock()
    async with inviter(alpha, book, clock) as port:
        token = invite(alpha, port, book, clock)
        beta = await join_mesh(token, tmp_path / "beta", "beta", now=clock.now)
        assert (beta.mesh_id, beta.name, beta.is_admin) == (alpha.mesh_id, "beta", False)
        assert not beta.holds_ca_key
        assert beta.node_id != alpha.node_id

        with pytest.raises(TokenError, match=r"^join token already used$"):
            await join_mesh(token, tmp_path / "gamma", "gamma", now=clock.now)
        assert not (tmp_path / "gamma").exists()

    # the new host is a full member: mutual TLS with the inviter's mesh port
    async def whoami(ctx: Context, body: Note) -> Note:
        return Note(text=ctx.peer_id)

    served = Handlers()
    served.add(ECHO_WHO, whoami)

    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
            await RpcConnection(stream, peer, served).run()

        listeners = await nursery.start(
            partial(serve_peers, host="127.0.0.1"), 0, lambda: server_context(alpha), handle
        )
        mesh_port = listeners[0].socket.getsockname()[1]
        async with connect_rpc("127.0.0.1", mesh_port, beta, alpha.node_id) as conn:
            assert (await conn.request(ECHO_WHO, Note())).text == beta.node_id
        nursery.cancel_scope.cancel()


async def test_expired_token_refused(tmp_path: Path, alpha: pki.Identity) -> None:
    book, clock = MemoryInviteBook(), Clock()
    async with inviter(alpha, book, clock) as port:
        token = invite(alpha, port, book, clock, ttl=60)
        # the joiner's clock is behind, the inviter's says the token expired
        clock.now += 61
        with pytest.raises(TokenError, match=r"^join token expired$"):
            await join_mesh(token, tmp_path / "beta", "beta", now=clock.now - 61)
        # the joiner checks too, before connecting
        with pytest.raises(TokenError, match=r"^join token expired$"):
            await join_mesh(token, tmp_path / "beta", "beta", now=clock.now)
    assert not (tmp_path / "beta").exists()


async def test_ca_fingerprint_mismatch(tmp_path: Path, alpha: pki.Identity) -> None:
    book, clock = MemoryInviteBook(), Clock()
    other = pki.init_mesh(tmp_path / "other", "other")
    async with inviter(alpha, book, clock) as port:
        token = pki.decode_token(invite(alpha, port, book, clock))
        forged = dataclasses.replace(token, ca_fingerprint=other.ca_fingerprint)
        with pytest.raises(AuthError, match=r"^CA fingerprint mismatch: "):
            await join_mesh(pki.encode_token(forged), tmp_path / "beta", "beta", now=clock.now)
    assert book.used == set()  # the secret never left the joiner
    assert not (tmp_path / "beta").exists()


async def test_unknown_secret_refused(tmp_path: Path, alpha: pki.Identity) -> None:
    book, clock = MemoryInviteBook(), Clock()
    async with inviter(alpha, book, clock) as port:
        token, _ = pki.generate_invite(alpha, [f"127.0.0.1:{port}"], 600, clock.now)  # not added
        with pytest.raises(TokenError, match="unknown"):
            await join_mesh(pki.encode_token(token), tmp_path / "b", "beta", now=clock.now)


async def test_unreachable_inviter(tmp_path: Path, alpha: pki.Identity) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: connection refused
    token, _ = pki.generate_invite(alpha, [f"127.0.0.1:{port}"], 600, 0)
    with pytest.raises(PeerUnavailable, match=f"^cannot reach inviter at 127.0.0.1:{port}: "):
        await join_mesh(pki.encode_token(token), tmp_path / "beta", "beta", now=0)


async def test_malformed_token(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="malformed join token"):
        await join_mesh("vmm1-xyz", tmp_path / "beta", "beta")
