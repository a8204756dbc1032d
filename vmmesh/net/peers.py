"""Where peers are, and one outgoing RPC connection per peer, dialed on demand.

The address book is fed by three sources — mDNS, static seeds and the "addr"
key peers gossip about themselves — and a later source never hides a fresher
one of higher trust: discovery and seeds are facts we saw on the network,
gossip is hearsay, so a gossiped address fills in only what we lack.

Connections are dialed with the expected node id, so the TLS layer checks the
certificate names the host we meant; a broken connection is dropped and the
next call dials again.  Inbound connections are served elsewhere (node.py);
both directions carry calls both ways.

A call to this host's own node id does not touch the network: it runs the
local handler of the same typed method (``Handlers.local``), so code that
fans out over the mesh treats this host like any other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from vmmesh.api.codec import Method, StreamMethod, WireType
from vmmesh.errors import PeerUnavailable, Revoked
from vmmesh.mesh.pki import Identity
from vmmesh.net.refusals import LogOnce, Refusals
from vmmesh.net.rpc import Handlers, LocalContext, RpcConnection, open_rpc
from vmmesh.net.tls import open_peer, peer_node_id

log = logging.getLogger("vmmesh.peers")

_TRUST = {"mdns": 3, "seed": 3, "inbound": 2, "gossip": 1}

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)
It = TypeVar("It", bound=WireType)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    source: str  # mdns | seed | inbound | gossip


class PeerPool:
    def __init__(
        self,
        identity: Callable[[], Identity],
        handlers: Handlers,
        nursery: trio.Nursery,
        *,
        self_id: str = "",
        refusals: Refusals | None = None,
    ) -> None:
        self._identity = identity
        self.handlers = handlers
        self._nursery = nursery
        self._self_id = self_id
        self._refusals = refusals
        self._endpoints: dict[str, Endpoint] = {}
        self._conns: dict[str, RpcConnection] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._revoked_log = LogOnce(log)

    # --- the address book -------------------------------------------------

    def set_endpoint(self, node_id: str, host: str, port: int, source: str) -> None:
        old = self._endpoints.get(node_id)
        new = Endpoint(host, port, source)
        if old == new:
            return
        if old is not None and _TRUST[old.source] > _TRUST[source]:
            return
        self._endpoints[node_id] = new
        if old is not None and (old.host, old.port) != (host, port):
            self.drop(node_id)

    def endpoint(self, node_id: str) -> Endpoint | None:
        return self._endpoints.get(node_id)

    def forget(self, node_id: str) -> None:
        self._endpoints.pop(node_id, None)
        self.drop(node_id)

    # --- connections ----------------------------------------------------

    def drop(self, node_id: str) -> None:
        conn = self._conns.pop(node_id, None)
        if conn is not None:
            self._nursery.start_soon(conn.aclose)

    def connection(self, stream: trio.abc.Stream, node_id: str) -> RpcConnection:
        """An RpcConnection serving this node's handlers over ``stream``."""
        return RpcConnection(stream, node_id, self.handlers, refusals=self._refusals)

    async def _connection(self, node_id: str) -> RpcConnection:
        conn = self._conns.get(node_id)
        if conn is not None:
            return conn
        lock = self._locks.setdefault(node_id, trio.Lock())
        async with lock:
            conn = self._conns.get(node_id)
            if conn is not None:
                return conn
            ep = self._endpoints.get(node_id)
            if ep is None:
                raise PeerUnavailable(f"no known address for node {node_id}")
            stream = await open_peer(ep.host, ep.port, self._identity(), node_id)
            conn = self.connection(stream, node_id)
            await self._nursery.start(self._run, node_id, conn)
            return conn

    async def _run(
        self, node_id: str, conn: RpcConnection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        self._conns[node_id] = conn
        try:
            await conn.run(task_status=task_status)
        finally:
            if self._conns.get(node_id) is conn:
                del self._conns[node_id]

    def _revoked(self, node_id: str, exc: Revoked) -> None:
        """``node_id`` refused this host as removed from the mesh (its certificate in
        the TLS handshake, which a TLS 1.3 client learns on its first read, or its
        gossip): said once per peer and period."""
        self.drop(node_id)
        self._revoked_log(
            ("revoked", node_id),
            "this host has been removed from the mesh: %s refused it (%s)",
            node_id[:12],
            exc,
        )

    async def call(
        self, node_id: str, method: Method[Req, Rep], request: Req, timeout: float = 30.0
    ) -> Rep:
        """One typed call to a peer (or to this host); PeerUnavailable when it cannot be
        reached in time, Revoked when it refused this host as removed, the peer's
        error as its own class."""
        if node_id == self._self_id:
            return await self.handlers.local(method, LocalContext(node_id), request)
        try:
            with trio.fail_after(timeout if math.isfinite(timeout) else 1e9):
                conn = await self._connection(node_id)
                return await conn.request(method, request)
        except trio.TooSlowError:
            self.drop(node_id)
            raise PeerUnavailable(
                f"node {node_id[:12]} did not answer {method.name} in time"
            ) from None
        except Revoked as exc:
            self._revoked(node_id, exc)
            raise
        except PeerUnavailable:
            self.drop(node_id)
            raise

    async def stream(
        self,
        node_id: str,
        method: StreamMethod[Req, Rep, It],
        request: Req,
        on_item: Callable[[It], Awaitable[None]],
    ) -> Rep:
        """A call whose answer streams items (progress, pieces) to ``on_item``."""
        if node_id == self._self_id:
            ctx = LocalContext(node_id, on_item)
            return await self.handlers.local(method, ctx, request)
        try:
            conn = await self._connection(node_id)
            async with conn.stream(method, request) as answer:
                async for item in answer:
                    await on_item(item)
            return answer.result()
        except Revoked as exc:
            self._revoked(node_id, exc)
            raise
        except PeerUnavailable:
            self.drop(node_id)
            raise

    @asynccontextmanager
    async def dedicated(self, node_id: str) -> AsyncIterator[RpcConnection]:
        """A connection of its own to ``node_id`` (same port, same mutual TLS), serving
        this node's handlers, for the length of the block: bulk bytes that a slow
        reader holds back (a migration) never stall the gossip of the shared one."""
        ep = self._endpoints.get(node_id)
        if ep is None:
            raise PeerUnavailable(f"no known address for node {node_id}")
        stream = await open_peer(ep.host, ep.port, self._identity(), node_id)
        async with open_rpc(stream, node_id, self.handlers) as conn:
            yield conn

    async def dial_seed(self, host: str, port: int) -> str:
        """Connect to a seed whose node id we do not know yet; returns it."""
        stream = await open_peer(host, port, self._identity())
        node_id = peer_node_id(stream)
        self._endpoints[node_id] = Endpoint(host, port, "seed")
        conn = self.connection(stream, node_id)
        old = self._conns.pop(node_id, None)
        if old is not None:
            self._nursery.start_soon(old.aclose)
        await self._nursery.start(self._run, node_id, conn)
        return node_id


@asynccontextmanager
async def connect_rpc(
    host: str,
    port: int,
    identity: Identity,
    expect_node_id: str | None = None,
    handlers: Handlers | None = None,
) -> AsyncIterator[RpcConnection]:
    """Open a mutual-TLS connection to a peer and run RPC over it (tools and tests)."""
    stream = await open_peer(host, port, identity, expect_node_id)
    try:
        peer_id = expect_node_id or peer_node_id(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    async with open_rpc(stream, peer_id, handlers) as conn:
        yield conn


__all__ = ["Endpoint", "PeerPool", "connect_rpc"]
