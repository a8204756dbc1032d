"""The node: wiring of identity, state, gossip, discovery, peers and control.

Theory of operation
-------------------
This is the only module that starts the node's tasks.  It makes no decision
of its own: it carries what one module learned to the module that decides.
One trio nursery holds:

* the peer listener (mutual TLS, ``net.tls.serve_peers``) and, on admin
  hosts, the join listener on ``port + 1``;
* the gossip driver, which every interval exchanges digests with a few
  peers over ``PeerPool`` connections;
* discovery (mDNS) and the seed dialer, which only feed the address book
  and tell gossip that a host exists;
* the event loop, which hands what gossip learned to whoever cares:
  addresses to the address book, CRLs to ``Revocations``, refused values to
  the refusal log, everything to the extensions;
* the publisher, which puts this host's state into gossip when it changes;
* the extensions (the VM service and what later issues add), started before
  the listeners so their handlers exist when the first peer calls;
* the control socket, started last, so that a CLI that reaches it finds a
  node that is fully up.

Decisions live where they are owned, mostly in pure functions: which gossip
values to accept (``gossip.hoststate``), whether a gossiped CRL is adopted
(``mesh.revocation.crl_to_adopt``, through ``Revocations.consider``; the node
gossips an adopted CRL on as its own), which gossiped address to dial
(``mesh.discovery.gossiped_endpoint``; the address book's trust order is
``net.peers``), who is revoked (``Revocations.revoked``, which the node looks
up before it takes an inbound link or an mDNS sighting), where VMs go
(``placement``).  The node's own control methods are ``mesh.service``, the VM
methods ``vmservice``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from vmmesh.api.codec import Empty, Method, WireType
from vmmesh.api.figures import Figure, Unit, counter
from vmmesh.api.gossip import SWIM, SwimDatagram
from vmmesh.api.host import Capacity
from vmmesh.config import RELOADABLE, Config
from vmmesh.errors import AuthError, PeerUnavailable, StateError, VmmeshError
from vmmesh.extension import NodeExtension
from vmmesh.gossip import hoststate
from vmmesh.gossip.core import EventKind, GossipConfig, GossipCore, GossipEvent
from vmmesh.gossip.detector import DetectorConfig
from vmmesh.gossip.driver import add_handlers, run_gossip
from vmmesh.gossip.hoststate import HostState, HostView, changed_keys
from vmmesh.gossip.swim import PROFILES
from vmmesh.gossip.swim_node import SwimGossip
from vmmesh.gossip.view import MeshView
from vmmesh.host.capacity import CapacityPolicy, Usage, compute_capacity, probe_host
from vmmesh.host.store import Store
from vmmesh.mesh import pki
from vmmesh.mesh.discovery import (
    PeerEvent,
    PeerGone,
    PeerSeen,
    gossiped_endpoint,
    parse_seed,
    run_discovery,
)
from vmmesh.mesh.invites import InviteBook
from vmmesh.mesh.join import join_handler, join_server_context
from vmmesh.mesh.revocation import Revocations
from vmmesh.mesh.service import MeshService
from vmmesh.net import control
from vmmesh.net.addresses import local_addresses
from vmmesh.net.peers import PeerPool
from vmmesh.net.refusals import Cause, Refusals
from vmmesh.net.rpc import Context, Handlers, RpcConnection
from vmmesh.net.tls import serve_peers, server_context
from vmmesh.net.traffic import CountingHandlers, Traffic

log = logging.getLogger("vmmesh.node")

PUBLISH_EVERY = 2.0
SEED_RETRY = 3.0

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One node per data directory (flock, released by the kernel on any exit)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"another node is running on {data_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


class Node:
    """One host of the mesh (see the module docstring); ``run`` it in a nursery."""

    def __init__(
        self,
        cfg: Config,
        reload: Callable[[], Config] | None = None,
        extensions: Sequence[NodeExtension] = (),
    ) -> None:
        self.cfg = cfg
        self._reload = reload
        self.identity = pki.load_identity(cfg.pki_dir)
        self.node_id = self.identity.node_id
        self.started = time.time()
        self.generation = int(self.started * 1000)
        self.refusals = Refusals(logging.getLogger("vmmesh.refused"))
        self.core: GossipCore | SwimGossip
        if cfg.gossip == "swim":
            self.core = SwimGossip(
                self.node_id,
                self.generation,
                check=hoststate.check_value,
                config=PROFILES[cfg.swim_profile],
            )
        else:
            self.core = GossipCore(
                self.node_id,
                self.generation,
                config=GossipConfig(detector=DetectorConfig(first_interval=cfg.gossip_interval)),
                check=hoststate.check_value,
            )
        self.view = MeshView(self.core, self.wall)
        self.rng = random.Random()
        self.addresses = list(cfg.advertise) or local_addresses() or ["127.0.0.1"]
        if cfg.listen not in ("0.0.0.0", "::", ""):
            self.addresses = [cfg.listen] + [a for a in self.addresses if a != cfg.listen]
        self.extensions = list(extensions)
        self.peer_handlers = Handlers()
        self.control_handlers = Handlers()
        self._store: Store | None = None
        self._pool: PeerPool | None = None
        self._inbound: dict[str, set[RpcConnection]] = {}
        self._published = HostState()
        self.revocations: Revocations | None = None
        self.gossip_traffic = Traffic()
        self.suspicions = 0  # hosts this node's gossip came to suspect
        self.ready = trio.Event()

    # --- what extensions see (NodeContext) ----------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise StateError("the node is not running")
        return self._store

    @property
    def pool(self) -> PeerPool:
        if self._pool is None:
            raise StateError("the node is not running")
        return self._pool

    @property
    def data_dir(self) -> Path:
        return self.cfg.data_dir

    @staticmethod
    def now() -> float:
        return trio.current_time()

    def wall(self, t: float) -> float:
        """A trio clock reading as unix time (for people)."""
        return time.time() - (trio.current_time() - t)

    def hosts(self) -> list[HostView]:
        """The mesh as gossip knows it, this host included (placement input)."""
        return self.view.hosts(self.now())

    @property
    def published(self) -> HostState:
        return self._published

    def publish(self, state: HostState) -> None:
        """Gossip ``state`` as this host's: the keys of the fields that changed."""
        for key, value in changed_keys(self._published, state).items():
            self.core.set_local(key, value)
        self._published = state

    def capacity(self) -> Capacity:
        for ext in self.extensions:
            cap = ext.capacity()
            if cap is not None:
                return cap
        probe = probe_host(self.cfg.data_dir)
        policy = CapacityPolicy.from_config(self.cfg)
        return compute_capacity(probe, Usage(), policy, blocked="this host runs no VMs")

    def publish_capacity(self) -> None:
        self.publish(dataclasses.replace(self._published, capacity=self.capacity()))

    # --- running --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with _data_dir_lock(self.cfg.data_dir):
            self._store = Store.open(self.cfg.db_path)
            try:
                await self._run(task_status)
            finally:
                self._store.close()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        self.revocations = Revocations(self.cfg.pki_dir, self.store, self.node_id, self._cut_off)
        self.revocations.load()
        self._mesh_service().register(self.control_handlers)
        counted = CountingHandlers(self.peer_handlers, self.gossip_traffic)
        if isinstance(self.core, SwimGossip):
            swim = self.core

            async def on_datagram(ctx: Context, body: SwimDatagram) -> Empty:
                swim.deliver(ctx.peer_id, body.data)
                return Empty()

            counted.add(SWIM, on_datagram)
        else:
            add_handlers(counted, self.core)
        async with trio.open_nursery() as nursery:
            self._pool = PeerPool(
                lambda: self.identity,
                self.peer_handlers,
                nursery,
                self_id=self.node_id,
                refusals=self.refusals,
            )
            for ext in self.extensions:
                await ext.start(self, nursery, self.peer_handlers, self.control_handlers)
            self._publish_identity()
            self.publish_capacity()
            await self._start_tasks(nursery)
            await nursery.start(control.serve_control, self.cfg.socket_path, self.control_handlers)
            self._log_started()
            self.ready.set()
            task_status.started()

    def _mesh_service(self) -> MeshService:
        assert self.revocations is not None
        return MeshService(
            cfg=self.cfg,
            identity=self.identity,
            addresses=self.addresses,
            generation=self.generation,
            view=self.view,
            revocations=self.revocations,
            refusals=self.refusals,
            invites=InviteBook(self.store),
            capacity=self.capacity,
            facts=self._facts,
            publish_crl=lambda pem: self.publish(dataclasses.replace(self._published, crl=pem)),
            started=self.started,
            figures=self._figures,
        )

    def _figures(self) -> list[Figure]:
        """What gossip cost this host, then the extensions' figures."""
        t = self.gossip_traffic
        messages = "Gossip messages this host received (in) and sent (out) since it started."
        size = "Bytes of those gossip messages (msgpack bodies; framing and TLS not counted)."
        suspected = "Times this host's gossip came to suspect a host (not heard from in time)."
        return [
            counter("gossip_messages", messages, t.messages_in, direction="in"),
            counter("gossip_messages", messages, t.messages_out, direction="out"),
            counter("gossip_bytes", size, t.bytes_in, Unit.BYTES, direction="in"),
            counter("gossip_bytes", size, t.bytes_out, Unit.BYTES, direction="out"),
            counter("gossip_suspicions", suspected, self.suspicions),
            *(f for ext in self.extensions for f in ext.figures()),
        ]

    def _facts(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ext in self.extensions:
            out.update(ext.facts())
        return out

    async def _start_tasks(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve_peers)
        if self.identity.holds_ca_key:
            await nursery.start(self._serve_join)
        nursery.start_soon(self._gossip)
        nursery.start_soon(self._event_loop)
        nursery.start_soon(self._publish_loop)
        if self.cfg.mdns:
            nursery.start_soon(self._discovery)
        if self.cfg.peers:
            nursery.start_soon(self._seed_loop)
        if self._reload is not None:
            nursery.start_soon(self._reload_on_sighup)

    def _log_started(self) -> None:
        log.info(
            "node %s (%s) of mesh %s listening on %s:%d%s",
            self.identity.name,
            self.node_id,
            self.identity.mesh_id,
            ",".join(self.addresses),
            self.cfg.port,
            f", join port {self.cfg.join_port}" if self.identity.holds_ca_key else "",
        )

    # --- listeners ------------------------------------------------------------

    def _bind_host(self) -> str | None:
        return None if self.cfg.listen in ("0.0.0.0", "") else self.cfg.listen

    async def _serve_peers(self, *, task_status: trio.TaskStatus[Any]) -> None:
        await serve_peers(
            self.cfg.port,
            lambda: server_context(self.identity),
            self._inbound_peer,
            host=self._bind_host(),
            refusals=self.refusals,
            task_status=task_status,
        )

    async def _serve_join(self, *, task_status: trio.TaskStatus[Any]) -> None:
        handler = join_handler(self.cfg.pki_dir, InviteBook(self.store).consume)
        await serve_peers(
            self.cfg.join_port,
            lambda: join_server_context(self.identity),
            handler,
            host=self._bind_host(),
            refusals=self.refusals,
            task_status=task_status,
        )

    async def _inbound_peer(self, stream: trio.SSLStream[trio.SocketStream], peer_id: str) -> None:
        assert self.revocations is not None
        if peer_id in self.revocations.revoked:
            return  # belt and braces: the CRL already refuses it in the handshake
        conn = self.pool.connection(stream, peer_id)
        self._inbound.setdefault(peer_id, set()).add(conn)
        self.core.learn(peer_id, self.now())
        try:
            await conn.run()
        finally:
            conns = self._inbound.get(peer_id)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._inbound[peer_id]

    # --- gossip -----------------------------------------------------------------

    async def _gossip(self) -> None:
        if isinstance(self.core, SwimGossip):
            async with trio.open_nursery() as nursery:
                datagrams = _PoolDatagrams(self.pool, nursery, self.gossip_traffic)
                await self.core.run(datagrams)
            return
        timeout = max(5.0, self.cfg.gossip_interval)
        await run_gossip(
            self.core,
            _PoolTransport(self.pool, timeout=timeout, traffic=self.gossip_traffic),
            interval=self.cfg.gossip_interval,
            fanout=self.cfg.gossip_fanout,
            rng=self.rng,
            exchange_timeout=timeout,
        )

    def _publish_identity(self) -> None:
        assert self.revocations is not None
        self.publish(
            dataclasses.replace(
                self._published,
                name=self.identity.name,
                addresses=tuple(f"{a}:{self.cfg.port}" for a in self.addresses),
                crl=self.revocations.current(),
            )
        )

    async def _reload_on_sighup(self) -> None:
        """SIGHUP re-reads the config: capacity settings apply at once (others at restart)."""
        assert self._reload is not None
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    new = self._reload()
                except VmmeshError as exc:
                    log.error("config reload failed, keeping the old one: %s", exc)
                    continue
                changes = {k: getattr(new, k) for k in RELOADABLE}
                self.cfg = dataclasses.replace(self.cfg, **changes)
                for ext in self.extensions:
                    ext.reconfigure(self)
                self.publish_capacity()
                log.info("config reloaded")

    async def _publish_loop(self) -> None:
        while True:
            try:
                self.publish_capacity()
            except (VmmeshError, OSError) as exc:
                log.warning("cannot measure capacity: %s", exc)
            for ext in self.extensions:
                try:
                    ext.publish(self)
                except VmmeshError as exc:
                    log.warning("cannot publish state: %s", exc)
            await trio.sleep(PUBLISH_EVERY)

    async def _event_loop(self) -> None:
        while True:
            for ev in self.core.drain_events():
                self._on_event(ev)
                for ext in self.extensions:
                    ext.on_event(self, ev.kind, ev.node_id)
            await trio.sleep(min(0.25, self.cfg.gossip_interval))

    def _on_event(self, ev: GossipEvent) -> None:
        name = self.view.name_of(ev.node_id)
        if ev.kind in (EventKind.JOINED, EventKind.CHANGED):
            state = self.view.state(ev.node_id)
            if "addr" in ev.keys or ev.kind is EventKind.JOINED:
                self._learn_address(ev.node_id, state.addresses)
            crl = state.crl if "crl" in ev.keys else b""
            if crl and self.revocations is not None and self.revocations.consider(crl, name):
                self.publish(dataclasses.replace(self._published, crl=crl))
            if ev.kind is EventKind.JOINED:
                log.info("host %s joined", name)
        elif ev.kind is EventKind.REFUSED:
            key = next(iter(ev.keys), "?")
            via = self.view.name_of(ev.via) if ev.via else "?"
            self.refusals(Cause.GOSSIP, f"host {name} via {via}", ev.reason, key)
        elif ev.kind is EventKind.SUSPECT:
            self.suspicions += 1
            log.info("host %s is %s", name, ev.kind.value)
        elif ev.kind is EventKind.DOWN:
            log.warning("host %s is down", name)
            self.pool.drop(ev.node_id)
        elif ev.kind is EventKind.FORGOTTEN:
            log.info("host %s forgotten", ev.node_id)
            self.pool.forget(ev.node_id)
        else:
            log.info("host %s is %s", name, ev.kind.value)

    def _learn_address(self, node_id: str, addrs: tuple[str, ...]) -> None:
        held = self.pool.endpoint(node_id)
        found = gossiped_endpoint(node_id, addrs, held.source if held is not None else None)
        if found is not None:
            self.pool.set_endpoint(node_id, *found, "gossip")

    # --- revocation -------------------------------------------------------------

    def _cut_off(self, node_id: str) -> None:
        """A revoked host: forget it, refuse its gossip, close its connections."""
        log.warning("host %s is revoked: cutting it off", self.view.name_of(node_id))
        self.core.remove(node_id)
        if self._pool is not None:
            self._pool.forget(node_id)
        for inbound in list(self._inbound.get(node_id, ())):
            trio.lowlevel.spawn_system_task(inbound.aclose)

    # --- discovery and seeds ------------------------------------------------------

    async def _discovery(self) -> None:
        send, receive = trio.open_memory_channel[PeerEvent](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_discovery, send)
            async for event in receive:
                self._on_discovery(event)

    async def _run_discovery(self, events: trio.MemorySendChannel[PeerEvent]) -> None:
        try:
            await run_discovery(
                node_id=self.node_id,
                mesh_id=self.identity.mesh_id,
                name=self.identity.name,
                port=self.cfg.port,
                addresses=self.addresses,
                events=events,
                refusals=self.refusals,
            )
        except VmmeshError as exc:
            log.warning("mDNS discovery stopped: %s (static --peer seeds still work)", exc)

    def _on_discovery(self, event: PeerEvent) -> None:
        assert self.revocations is not None
        if isinstance(event, PeerSeen):
            if event.node_id in self.revocations.revoked or not event.addresses:
                return
            self.pool.set_endpoint(event.node_id, event.addresses[0], event.port, "mdns")
            self.core.learn(event.node_id, self.now())
            log.debug("mDNS: saw %s at %s:%d", event.name, event.addresses[0], event.port)
        elif isinstance(event, PeerGone):
            log.debug("mDNS: %s withdrew its record", event.node_id)

    async def _seed_loop(self) -> None:
        seeds = [parse_seed(s) for s in self.cfg.peers]
        known: set[tuple[str, int]] = set()
        while True:
            for host, port in seeds:
                if (host, port) in known:
                    continue
                try:
                    nid = await self.pool.dial_seed(host, port)
                except (PeerUnavailable, AuthError) as exc:
                    log.info("seed %s:%d: %s", host, port, exc)
                    continue
                known.add((host, port))
                if nid != self.node_id:
                    self.core.learn(nid, self.now())
                    log.info("seed %s:%d is node %s", host, port, nid)
            await trio.sleep(SEED_RETRY)


class _PoolDatagrams:
    """SWIM's datagrams over the peer links (``gossip.swim`` calls), counted in
    ``traffic``.  A send never waits: each goes in a task of its own, at most
    ``PER_PEER`` at a time per peer (more are dropped, as a full socket buffer would
    drop them), so a peer that is slow or unreachable costs its own datagrams only."""

    PER_PEER = 8
    TIMEOUT = 2.0

    def __init__(self, pool: PeerPool, nursery: trio.Nursery, traffic: Traffic) -> None:
        self._pool = pool
        self._nursery = nursery
        self._traffic = traffic
        self._in_flight: dict[str, int] = {}

    async def send(self, node_id: str, data: bytes) -> None:
        if self._in_flight.get(node_id, 0) >= self.PER_PEER:
            raise PeerUnavailable(f"node {node_id[:12]}: {self.PER_PEER} datagrams in flight")
        self._in_flight[node_id] = self._in_flight.get(node_id, 0) + 1
        self._nursery.start_soon(self._send, node_id, SwimDatagram(data=data))

    async def _send(self, node_id: str, datagram: SwimDatagram) -> None:
        try:

            async def call(m: Method[SwimDatagram, Empty], r: SwimDatagram) -> Empty:
                return await self._pool.call(node_id, m, r, timeout=self.TIMEOUT)

            await self._traffic.call(call, SWIM, datagram)
        except (VmmeshError, OSError) as exc:
            log.debug("gossip datagram to %s lost: %s", node_id[:12], exc)
        finally:
            left = self._in_flight.get(node_id, 1) - 1
            if left > 0:
                self._in_flight[node_id] = left
            else:
                self._in_flight.pop(node_id, None)


class _PoolTransport:
    """The gossip driver's transport over the peer pool, counted in ``traffic``."""

    def __init__(self, pool: PeerPool, timeout: float, traffic: Traffic) -> None:
        self._pool = pool
        self._timeout = timeout
        self._traffic = traffic

    async def exchange(self, node_id: str, method: Method[Req, Rep], request: Req) -> Rep:
        async def call(m: Method[Req, Rep], r: Req) -> Rep:
            return await self._pool.call(node_id, m, r, timeout=self._timeout)

        return await self._traffic.call(call, method, request)


__all__ = ["Node"]
