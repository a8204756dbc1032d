"""The node: wiring of identity, state, gossip, discovery, peers and control.

Theory of operation
-------------------
This is the only module that starts tasks.  One trio nursery holds:

* the peer listener (mutual TLS, ``tls.serve_peers``) and, on admin hosts,
  the join listener on ``port + 1``;
* the gossip driver, which every interval exchanges digests with a few
  peers over ``PeerPool`` connections;
* discovery (mDNS) and the seed dialer, which only feed the address book
  and tell gossip that a host exists;
* the event loop, which reacts to what gossip learned: addresses go to the
  address book, a newer CRL is verified and installed (revoked hosts are
  cut off), hosts that went down are logged;
* the publisher, which puts this host's capacity, templates and VMs into
  gossip when they change;
* the control socket, started last, so that a CLI that reaches it finds a
  node that is fully up.

Everything the node decides is in pure modules (gossip core, placement,
pki); the handlers here translate between RPC bodies and those modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from vmmesh.api.host import HEX_ID, Capacity, HostView, TemplateInfo
from vmmesh.config import Config
from vmmesh.errors import (
    AuthError,
    NotFound,
    PeerUnavailable,
    StateError,
    UsageError,
    VmmeshError,
)
from vmmesh.gossip.core import EventKind, GossipConfig, GossipCore
from vmmesh.gossip.detector import DetectorConfig
from vmmesh.gossip.driver import make_handlers, run_gossip
from vmmesh.host.capacity import CapacityPolicy, Usage, compute_capacity, probe_host
from vmmesh.host.store import Store
from vmmesh.mesh import pki
from vmmesh.mesh.discovery import PeerEvent, PeerGone, PeerSeen, parse_seed, run_discovery
from vmmesh.mesh.invites import InviteBook
from vmmesh.mesh.join import join_handler, join_server_context
from vmmesh.net import control
from vmmesh.net.peers import PeerPool
from vmmesh.net.rpc import CallContext, Handler, RpcConnection
from vmmesh.net.tls import serve_peers, server_context

log = logging.getLogger("vmmesh.node")

PUBLISH_EVERY = 2.0
RELOADABLE = (
    "storage_quota_mb",
    "cpu_overcommit",
    "memory_reserve_mb",
    "vm_vcpus",
    "vm_memory_mb",
    "vm_disk_allowance_mb",
    "apt_sources",
    "drain_on_stop",
    "log_level",
)
SEED_RETRY = 3.0

Body = dict[str, Any]


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


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (its network namespace)."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for _idx, ifname in socket.if_nameindex():
            if ifname == "lo":
                continue
            addr = _ipv4_of(ifname)
            if addr:
                out.append(addr)
    return out


def _ipv4_of(ifname: str) -> str | None:
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


class Node:
    def __init__(self, cfg: Config, reload: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self._reload = reload
        self.identity = pki.load_identity(cfg.pki_dir)
        self.node_id = self.identity.node_id
        self.started = time.time()
        self.generation = int(self.started * 1000)
        self.core = GossipCore(
            self.node_id,
            self.generation,
            config=GossipConfig(detector=DetectorConfig(first_interval=cfg.gossip_interval)),
        )
        self.rng = random.Random()
        self.addresses = list(cfg.advertise) or local_addresses() or ["127.0.0.1"]
        if cfg.listen not in ("0.0.0.0", "::", ""):
            self.addresses = [cfg.listen] + [a for a in self.addresses if a != cfg.listen]
        self.store: Store | None = None
        self.pool: PeerPool | None = None
        self._inbound: dict[str, set[RpcConnection]] = {}
        self._published: dict[str, Any] = {}
        self._crl_number = 0
        self._revoked: frozenset[str] = frozenset()
        self.extensions: list[NodeExtension] = []
        self.capacity: Callable[[], Capacity] = self._probe_capacity
        self.ready = trio.Event()

    # --- time ---------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return trio.current_time()

    def wall(self, t: float) -> float:
        """A trio clock reading as unix time (for people)."""
        return time.time() - (trio.current_time() - t)

    # --- running --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with _data_dir_lock(self.cfg.data_dir):
            self.store = Store.open(self.cfg.db_path)
            try:
                await self._run(task_status)
            finally:
                self.store.close()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        cfg = self.cfg
        assert self.store is not None
        self._load_crl()
        self.invites = InviteBook(self.store)
        peer_handlers: dict[str, Handler] = dict(make_handlers(self.core))
        control_handlers: dict[str, Handler] = {
            "node.status": self._ctl_status,
            "node.peers": self._ctl_peers,
            "mesh.invite": self._ctl_invite,
            "mesh.remove": self._ctl_remove,
        }
        async with trio.open_nursery() as nursery:
            self.pool = PeerPool(lambda: self.identity, peer_handlers, nursery)
            for ext in self.extensions:
                await ext.start(self, nursery, peer_handlers, control_handlers)
            self._publish_identity()
            self.publish("capacity", self.capacity().to_wire())
            await nursery.start(self._serve_peers)
            if self.identity.holds_ca_key:
                await nursery.start(self._serve_join)
            nursery.start_soon(self._gossip)
            nursery.start_soon(self._event_loop)
            nursery.start_soon(self._publish_loop)
            if cfg.mdns:
                nursery.start_soon(self._discovery)
            if cfg.peers:
                nursery.start_soon(self._seed_loop)
            if self._reload is not None:
                nursery.start_soon(self._reload_on_sighup)
            await nursery.start(control.serve_control, cfg.socket_path, control_handlers)
            log.info(
                "node %s (%s) of mesh %s listening on %s:%d%s",
                self.identity.name,
                self.node_id,
                self.identity.mesh_id,
                ",".join(self.addresses),
                cfg.port,
                f", join port {cfg.join_port}" if self.identity.holds_ca_key else "",
            )
            self.ready.set()
            task_status.started()

    # --- listeners ------------------------------------------------------------

    async def _serve_peers(self, *, task_status: trio.TaskStatus[Any]) -> None:
        await serve_peers(
            self.cfg.port,
            lambda: server_context(self.identity),
            self._inbound_peer,
            host=None if self.cfg.listen in ("0.0.0.0", "") else self.cfg.listen,
            task_status=task_status,
        )

    async def _serve_join(self, *, task_status: trio.TaskStatus[Any]) -> None:
        handler = join_handler(self.cfg.pki_dir, self.invites.consume)
        await serve_peers(
            self.cfg.join_port,
            lambda: join_server_context(self.identity),
            handler,
            host=None if self.cfg.listen in ("0.0.0.0", "") else self.cfg.listen,
            task_status=task_status,
        )

    async def _inbound_peer(self, stream: trio.SSLStream[trio.SocketStream], peer_id: str) -> None:
        if peer_id in self._revoked:
            return  # belt and braces: the CRL already refuses it in the handshake
        assert self.pool is not None
        conn = RpcConnection(stream, peer_id, self.pool._handlers)
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
        assert self.pool is not None
        await run_gossip(
            self.core,
            _PoolTransport(self.pool, timeout=max(5.0, self.cfg.gossip_interval)),
            interval=self.cfg.gossip_interval,
            fanout=self.cfg.gossip_fanout,
            rng=self.rng,
            exchange_timeout=max(5.0, self.cfg.gossip_interval),
        )

    def _publish_identity(self) -> None:
        self.publish("name", self.identity.name)
        self.publish("addr", [f"{a}:{self.cfg.port}" for a in self.addresses])
        self.publish("crl", pki.current_crl(self.cfg.pki_dir))
        self.publish("draining", False)

    def publish(self, key: str, value: Any) -> None:
        """Set a gossip key of this host if its value changed."""
        if self._published.get(key, _MISSING) != value:
            self._published[key] = value
            self.core.set_local(key, value)

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
                self.cfg = dataclasses.replace(
                    self.cfg,
                    **{k: getattr(new, k) for k in RELOADABLE},
                )
                for ext in self.extensions:
                    ext.reconfigure(self)
                self.publish("capacity", self.capacity().to_wire())
                log.info("config reloaded")

    def _probe_capacity(self) -> Capacity:
        """What this host offers before any VM layer counts what it uses."""
        probe = probe_host(self.cfg.data_dir)
        return compute_capacity(probe, Usage(), CapacityPolicy.from_config(self.cfg))

    async def _publish_loop(self) -> None:
        while True:
            try:
                self.publish("capacity", self.capacity().to_wire())
            except (VmmeshError, OSError) as exc:
                log.warning("cannot measure capacity: %s", exc)
            for ext in self.extensions:
                try:
                    ext.publish(self)
                except VmmeshError as exc:
                    log.warning("cannot publish state: %s", exc)
            await trio.sleep(PUBLISH_EVERY)

    async def _event_loop(self) -> None:
        assert self.pool is not None
        while True:
            for ev in self.core.drain_events():
                if ev.kind in (EventKind.JOINED, EventKind.CHANGED):
                    state = self._state(ev.node_id)
                    if "addr" in ev.keys or ev.kind is EventKind.JOINED:
                        self._learn_address(ev.node_id, state.get("addr"))
                    if "crl" in ev.keys and state.get("crl"):
                        self._consider_crl(state["crl"], ev.node_id)
                    if ev.kind is EventKind.JOINED:
                        log.info("host %s (%s) joined", state.get("name", "?"), ev.node_id)
                elif ev.kind is EventKind.DOWN:
                    log.warning("host %s is down", self._name_of(ev.node_id))
                    self.pool.drop(ev.node_id)
                elif ev.kind is EventKind.UP:
                    log.info("host %s is up again", self._name_of(ev.node_id))
                elif ev.kind is EventKind.SUSPECT:
                    log.info("host %s is suspect", self._name_of(ev.node_id))
                elif ev.kind is EventKind.FORGOTTEN:
                    log.info("host %s forgotten", ev.node_id)
                    self.pool.forget(ev.node_id)
                for ext in self.extensions:
                    ext.on_event(self, ev.kind, ev.node_id)
            await trio.sleep(min(0.25, self.cfg.gossip_interval))

    def _state(self, node_id: str) -> dict[str, Any]:
        try:
            return self.core.state_of(node_id)
        except NotFound:
            return {}

    def _name_of(self, node_id: str) -> str:
        name = self._state(node_id).get("name")
        return f"{name} ({node_id[:12]})" if isinstance(name, str) else node_id

    def _learn_address(self, node_id: str, addrs: object) -> None:
        assert self.pool is not None
        if not isinstance(addrs, list) or not addrs:
            return
        endpoint = self.pool.endpoint(node_id)
        if endpoint is not None and endpoint.source != "gossip":
            return
        try:
            host, port = parse_seed(str(addrs[0]))
        except UsageError:
            log.debug("host %s gossips a bad address %r", node_id, addrs[0])
            return
        self.pool.set_endpoint(node_id, host, port, "gossip")

    # --- revocation -------------------------------------------------------------

    def _load_crl(self) -> None:
        pem = pki.current_crl(self.cfg.pki_dir)
        number, serials = pki.verify_crl(pki.load_ca_cert(self.cfg.pki_dir), pem)
        self._crl_number = number
        self._apply_revocations(pki.revoked_node_ids(serials))

    def _consider_crl(self, pem: object, source: str) -> None:
        if not isinstance(pem, bytes):
            return
        try:
            number, serials = pki.verify_crl(pki.load_ca_cert(self.cfg.pki_dir), pem)
        except AuthError as exc:
            log.warning("host %s gossips a CRL that does not verify: %s", source, exc)
            return
        if number <= self._crl_number:
            return
        pki.install_crl(self.cfg.pki_dir, pem)
        self._crl_number = number
        self.publish("crl", pem)
        log.info("installed CRL #%d from %s", number, self._name_of(source))
        self._apply_revocations(pki.revoked_node_ids(serials))

    def _apply_revocations(self, revoked: frozenset[str]) -> None:
        new = revoked - self._revoked
        self._revoked = revoked
        assert self.store is not None
        now = time.time()
        with self.store.transaction() as db:
            for nid in revoked:
                db.execute(
                    "INSERT OR IGNORE INTO revocations (node_id, serial, revoked_at) "
                    "VALUES (?, ?, ?)",
                    (nid, str(pki.serial_of_node(nid)), now),
                )
        for nid in new:
            if nid == self.node_id:
                log.error("this host has been removed from the mesh")
                continue
            log.warning("host %s is revoked: cutting it off", self._name_of(nid))
            self.core.remove(nid)
            if self.pool is not None:
                self.pool.forget(nid)
            for inbound in list(self._inbound.get(nid, ())):
                trio.lowlevel.spawn_system_task(inbound.aclose)

    # --- discovery and seeds ------------------------------------------------------

    async def _discovery(self) -> None:
        send, receive = trio.open_memory_channel[PeerEvent](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _run_discovery_logged,
                dict(
                    node_id=self.node_id,
                    mesh_id=self.identity.mesh_id,
                    name=self.identity.name,
                    port=self.cfg.port,
                    addresses=self.addresses,
                    events=send,
                ),
            )
            async for event in receive:
                self._on_discovery(event)

    def _on_discovery(self, event: PeerEvent) -> None:
        assert self.pool is not None
        if isinstance(event, PeerSeen):
            if event.node_id in self._revoked or not event.addresses:
                return
            self.pool.set_endpoint(event.node_id, event.addresses[0], event.port, "mdns")
            self.core.learn(event.node_id, self.now())
            log.debug("mDNS: saw %s at %s:%d", event.name, event.addresses[0], event.port)
        elif isinstance(event, PeerGone):
            log.debug("mDNS: %s withdrew its record", event.node_id)

    async def _seed_loop(self) -> None:
        assert self.pool is not None
        seeds = [parse_seed(s) for s in self.cfg.peers]
        known: dict[tuple[str, int], str] = {}
        while True:
            for host, port in seeds:
                if (host, port) in known:
                    continue
                try:
                    nid = await self.pool.dial_seed(host, port)
                except (PeerUnavailable, AuthError) as exc:
                    log.info("seed %s:%d: %s", host, port, exc)
                    continue
                if nid == self.node_id:
                    known[(host, port)] = nid
                    continue
                known[(host, port)] = nid
                self.core.learn(nid, self.now())
                log.info("seed %s:%d is node %s", host, port, nid)
            await trio.sleep(SEED_RETRY)

    # --- views ----------------------------------------------------------------------

    def hosts(self) -> list[HostView]:
        """The mesh as gossip knows it, this host included (placement input)."""
        now = self.now()
        out = []
        for m in self.core.members(now):
            st = m.state
            try:
                cap = Capacity.from_wire(st.get("capacity"))
            except VmmeshError:
                cap = Capacity(0, 0, 0, 0, 0, 0)
            templates: list[TemplateInfo] = []
            for t in st.get("templates") or []:
                with contextlib.suppress(VmmeshError):
                    templates.append(TemplateInfo.from_wire(t))
            addrs = st.get("addr") or []
            vms = st.get("vms") or []
            out.append(
                HostView(
                    node_id=m.node_id,
                    name=str(st.get("name", m.node_id[:12])),
                    status=str(m.status),
                    capacity=cap,
                    templates=tuple(templates),
                    vms=tuple(str(v) for v in vms if isinstance(v, str)),
                    draining=bool(st.get("draining", False)),
                    address=str(addrs[0]) if isinstance(addrs, list) and addrs else "",
                    last_heard=self.wall(m.last_heard),
                )
            )
        return out

    def resolve_host(self, name_or_id: str) -> HostView:
        matches = [h for h in self.hosts() if name_or_id in (h.node_id, h.name)]
        if not matches:
            matches = [h for h in self.hosts() if h.node_id.startswith(name_or_id)]
        if len(matches) != 1:
            what = "no host" if not matches else "more than one host"
            raise NotFound(f"{what} called {name_or_id!r:.80} in this mesh")
        return matches[0]

    # --- control handlers ---------------------------------------------------------

    async def _ctl_status(self, ctx: CallContext, body: Body) -> Body:
        hosts = self.hosts()
        me = next(h for h in hosts if h.node_id == self.node_id)
        others = [h for h in hosts if h.node_id != self.node_id]
        out: Body = {
            "node_id": self.node_id,
            "name": self.identity.name,
            "mesh_id": self.identity.mesh_id,
            "admin": self.identity.holds_ca_key,
            "address": self.addresses[0],
            "addresses": self.addresses,
            "port": self.cfg.port,
            "uptime": time.time() - self.started,
            "generation": self.generation,
            "peers_total": len(others),
            "peers_up": sum(1 for h in others if h.status == "up"),
            "capacity": {**me.capacity.to_wire(), "free_slots": me.capacity.free_slots},
            "templates": len(me.templates),
            "vms": list(me.vms),
            "crl_number": self._crl_number,
            "data_dir": str(self.cfg.data_dir),
        }
        for ext in self.extensions:
            out.update(ext.status(self))
        return out

    async def _ctl_peers(self, ctx: CallContext, body: Body) -> Body:
        rows = []
        for h in self.hosts():
            rows.append(
                {
                    "node_id": h.node_id,
                    "name": h.name,
                    "self": h.node_id == self.node_id,
                    "status": h.status,
                    "address": h.address,
                    "last_heard": h.last_heard if h.node_id != self.node_id else time.time(),
                    "capacity": {**h.capacity.to_wire(), "free_slots": h.capacity.free_slots},
                    "templates": [t.to_wire() for t in h.templates],
                    "vms": list(h.vms),
                    "draining": h.draining,
                }
            )
        return {"mesh_id": self.identity.mesh_id, "node_id": self.node_id, "hosts": rows}

    async def _ctl_invite(self, ctx: CallContext, body: Body) -> Body:
        if not self.identity.holds_ca_key:
            raise UsageError(
                "this host does not hold the mesh CA key: run `vmmesh invite` on the host "
                "that ran `vmmesh init`"
            )
        ttl = body.get("ttl", 3600)
        if not isinstance(ttl, int | float) or not 0 < ttl <= 30 * 86400:
            raise UsageError("invite ttl must be between 1 second and 30 days")
        addresses = [f"{a}:{self.cfg.join_port}" for a in self.addresses]
        token, secret_hash = pki.generate_invite(self.identity, addresses, ttl=int(ttl))
        assert self.invites is not None
        self.invites.add(secret_hash, time.time(), float(token.expires))
        return {"token": pki.encode_token(token), "expires": token.expires, "addresses": addresses}

    async def _ctl_remove(self, ctx: CallContext, body: Body) -> Body:
        target = body.get("host")
        if not isinstance(target, str) or not target:
            raise UsageError("remove needs a host name or node id")
        if not self.identity.holds_ca_key:
            raise UsageError("only an admin host (one holding the mesh CA key) can remove hosts")
        try:
            host = self.resolve_host(target)
            node_id, name = host.node_id, host.name
        except NotFound:
            # A host that is gone from gossip can still be revoked by its full id.
            if not HEX_ID.match(target) or len(target) != 32:
                raise
            node_id, name = target, target
        if node_id == self.node_id:
            raise UsageError("a host cannot remove itself")
        pem = pki.revoke(self.cfg.pki_dir, node_id)
        number, serials = pki.verify_crl(pki.load_ca_cert(self.cfg.pki_dir), pem)
        self._crl_number = number
        self.publish("crl", pem)
        self._apply_revocations(pki.revoked_node_ids(serials))
        return {"node_id": node_id, "name": name, "crl_number": number}


_MISSING = object()


async def _run_discovery_logged(kwargs: dict[str, Any]) -> None:
    try:
        await run_discovery(**kwargs)
    except VmmeshError as exc:
        log.warning("mDNS discovery stopped: %s (static --peer seeds still work)", exc)


class _PoolTransport:
    """The gossip driver's transport over the peer pool."""

    def __init__(self, pool: PeerPool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def exchange(self, node_id: str, method: str, body: Body) -> Body:
        return await self._pool.call(node_id, method, body, timeout=self._timeout)


class NodeExtension:
    """A feature that plugs into the node (VMs, later migration).

    It registers its handlers and starts its tasks in ``start``, puts its
    share of this host's state into gossip in ``publish`` and reacts to
    gossip events in ``on_event``.
    """

    async def start(
        self,
        node: Node,
        nursery: trio.Nursery,
        peer_handlers: dict[str, Handler],
        control_handlers: dict[str, Handler],
    ) -> None:
        return None

    def publish(self, node: Node) -> None:
        return None

    def on_event(self, node: Node, kind: EventKind, node_id: str) -> None:
        return None

    def status(self, node: Node) -> Body:
        return {}

    def reconfigure(self, node: Node) -> None:
        """``node.cfg`` changed (SIGHUP)."""
        return None


__all__ = ["Node", "NodeExtension"]
