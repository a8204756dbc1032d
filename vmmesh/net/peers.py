"""Where peers are, and one outgoing RPC connection per peer, dialed on demand.

The address book is fed by three sources — mDNS, static seeds and the "addr"
key peers gossip about themselves — and a later source never hides a fresher
one of higher trust: discovery and seeds are facts we saw on the network,
gossip is hearsay, so a gossiped address fills in only what we lack.

Connections are dialed with the expected node id, so the TLS layer checks the
certificate names the host we meant; a broken connection is dropped and the
next call dials again.  Inbound connections are served elsewhere (node.py);
both directions carry calls both ways.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from vmmesh.errors import PeerUnavailable
from vmmesh.mesh.pki import Identity
from vmmesh.net.rpc import Handler, RpcConnection
from vmmesh.net.tls import open_peer, peer_node_id

log = logging.getLogger("vmmesh.net.peers")

_TRUST = {"mdns": 3, "seed": 3, "inbound": 2, "gossip": 1}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    source: str  # mdns | seed | inbound | gossip


class PeerPool:
    def __init__(
        self,
        identity: Callable[[], Identity],
        handlers: Mapping[str, Handler],
        nursery: trio.Nursery,
    ) -> None:
        self._identity = identity
        self._handlers = handlers
        self._nursery = nursery
        self._endpoints: dict[str, Endpoint] = {}
        self._conns: dict[str, RpcConnection] = {}
        self._locks: dict[str, trio.Lock] = {}

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
            conn = RpcConnection(stream, node_id, self._handlers)
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

    async def call(
        self, node_id: str, method: str, body: dict[str, Any], timeout: float = 30.0
    ) -> dict[str, Any]:
        """One call to a peer; PeerUnavailable when it cannot be reached in time."""
        try:
            with trio.fail_after(timeout if math.isfinite(timeout) else 1e9):
                conn = await self._connection(node_id)
                return await conn.call(method, body)
        except trio.TooSlowError:
            self.drop(node_id)
            raise PeerUnavailable(f"node {node_id[:12]} did not answer {method} in time") from None
        except PeerUnavailable:
            self.drop(node_id)
            raise

    async def stream_call(
        self,
        node_id: str,
        method: str,
        body: dict[str, Any],
        on_item: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """A call whose answer streams items (progress); returns the last item."""
        conn = await self._connection(node_id)
        last: dict[str, Any] = {}
        try:
            async for item in conn.stream_call(method, body):
                if item.get("final"):
                    last = item
                else:
                    on_item(item)
        except PeerUnavailable:
            self.drop(node_id)
            raise
        return last

    async def dial_seed(self, host: str, port: int) -> str:
        """Connect to a seed whose node id we do not know yet; returns it."""
        stream = await open_peer(host, port, self._identity())
        node_id = peer_node_id(stream)
        self._endpoints[node_id] = Endpoint(host, port, "seed")
        conn = RpcConnection(stream, node_id, self._handlers)
        old = self._conns.pop(node_id, None)
        if old is not None:
            self._nursery.start_soon(old.aclose)
        await self._nursery.start(self._run, node_id, conn)
        return node_id

    def known(self) -> dict[str, Endpoint]:
        return dict(self._endpoints)
