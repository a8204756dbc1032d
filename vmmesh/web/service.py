"""The web extension: the HTTPS listener, this host's web certificate, client certificates,
browser logins and the page's task log.

Everything the page shows is read where ``vmmesh status`` reads it: the node's
own control methods (``node.status``, ``node.peers``, ``vm.list``) called in
process (the status reply carries the extensions' figures, ``api.figures``),
the gossip view (``NodeContext.hosts``) and this host's VM rows
(``vm.list_local``), and each VM's sampled figures (``vmstats``).  The work
the transfer, migrate and job extensions have under way (``UnderWay``,
``JobCounts``) goes into gossip as the key ``work`` (rounded and throttled by
``work``), and every page shows every host's from the hosts' rows.  Kept here, in
memory only: the page's refusal counts, the last events (``events``), login
tokens and sessions (``login``), and the last ``/events`` snapshot, which
all open streams share for ``SNAPSHOT_AGE`` seconds (``vm.list`` asks every
host with VMs, once per snapshot, not once per browser).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from vmmesh.api.codec import Empty, WireType
from vmmesh.api.common import Progress
from vmmesh.api.node import PEERS, STATUS, StatusReply
from vmmesh.api.vm import LIST, LIST_LOCAL, VmList
from vmmesh.api.web import (
    CERTIFY,
    ISSUE,
    LOGIN,
    CertifyReply,
    CertifyRequest,
    IssueReply,
    IssueRequest,
    LoginReply,
)
from vmmesh.errors import AuthError, NotFound, StateError, UsageError, VmmeshError
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.gossip.core import EventKind
from vmmesh.mesh import pki
from vmmesh.net.refusals import Refusals
from vmmesh.net.rpc import Context, Handlers, LocalContext
from vmmesh.web import certs
from vmmesh.web.app import as_plain
from vmmesh.web.events import Event, EventLog, vm_changes
from vmmesh.web.login import COOKIE, Logins
from vmmesh.web.metrics import Figures, render, sd_targets
from vmmesh.web.server import serve_https, server_context
from vmmesh.web.vmstats import Sampler
from vmmesh.web.work import JobSession, WorkGossip, items

log = logging.getLogger("vmmesh.web")

RECHECK = 3600.0  # seconds between checks of a good certificate
RETRY = 5.0  # seconds before asking again after no host could sign
CERTIFY_TIMEOUT = 10.0
SNAPSHOT_AGE = 0.5  # seconds a snapshot is shared by the open streams, unless a change came
LOOK_EVERY = 0.25  # seconds between looks at the hosts' VM names (this host's own change
# no gossip event: a look is how its page learns of them)
BUSY_EVERY = 1.0  # seconds between the pushes that move progress bars while work is under way
GOSSIP_EVENTS = {
    EventKind.JOINED: "joined the mesh",
    EventKind.UP: "is up again",
    EventKind.SUSPECT: "is suspect (not heard)",
    EventKind.DOWN: "is down",
    EventKind.FORGOTTEN: "was forgotten (down too long)",
    EventKind.REFUSED: "sent a value this host refused",
}
REFUSAL_TEXT = {
    "tls": "TLS handshake failed (foreign or revoked certificate, or the client left)",
    "role": "a certificate's role may not read that path",
    "login": "a request without certificate or session, or a bad login link",
}


class UnderWay(Protocol):
    """Long work an extension has under way (``MigrateService``: VM name -> its
    migration's last progress; ``TransferService``: one entry per fetch)."""

    @property
    def active(self) -> Mapping[Any, Progress]: ...


class MigrationsUnderWay(UnderWay, Protocol):
    """``MigrateService``: its migrations under way and the host each moves to."""

    @property
    def targets(self) -> Mapping[str, str]: ...


class JobCounts(Protocol):
    """The job extension's open jobs (``JobService``)."""

    @property
    def sessions(self) -> Mapping[str, JobSession]: ...


class GuestSource(Protocol):
    """This host's running guests by VM name (``VmService.guests``)."""

    def guests(self) -> Mapping[str, object]: ...


class WebService(NodeExtension):
    def __init__(
        self,
        *,
        guests: GuestSource | None = None,
        transfers: UnderWay | None = None,
        migrations: MigrationsUnderWay | None = None,
        jobs: JobCounts | None = None,
    ) -> None:
        self.migrations = migrations
        self.transfers = transfers
        self.jobs = jobs
        self.sampler = Sampler(guests.guests) if guests is not None else None
        self._node: NodeContext | None = None
        self._peer = Handlers()
        self._control = Handlers()
        self._addresses: tuple[str, ...] = ()
        self.port: int | None = None
        self._off = ""  # why there is no page, when a port was wanted
        self._decided = False  # start() knows whether there is a page
        self.refused: dict[str, int] = {"tls": 0, "role": 0, "login": 0}
        self._refusals = Refusals(log)
        self.cert_ready = trio.Event()
        self._wake = trio.Event()  # a host came up: the CA host may be reachable now
        self.logins = Logins()
        self.events = EventLog()
        self._changed = trio.Event()  # set (and replaced) when the page's state changed
        self._vms_seen: dict[str, tuple[str, ...]] = {}
        self._changes = 0  # how many changes _notify told of
        self._snapshot = (b"", -1.0, -1)  # JSON, when made (trio time), _changes then
        self._snapshot_lock = trio.Lock()
        self.work = WorkGossip()  # when this host's work goes into gossip (key ``work``)

    @property
    def node(self) -> NodeContext:
        if self._node is None:
            raise StateError("the node is not running")
        return self._node

    @property
    def cert_path(self) -> Path:
        return self.node.data_dir / "web" / certs.CERT_FILE

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node, self._peer, self._control = node, peer_handlers, control_handlers
        peer_handlers.add(CERTIFY, self._certify)
        control_handlers.add(ISSUE, self._issue)
        control_handlers.add(LOGIN, self._login)
        port = node.cfg.web_listen_port
        if port is None:
            self._decided = True
            return
        bind = None if node.cfg.listen in ("0.0.0.0", "") else node.cfg.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=bind)
        except OSError as exc:  # the node runs on without its page, and says so
            self._off = f"off: cannot listen on port {port}: {exc.strerror or exc}"
            log.error("web page %s (set web_port)", self._off)
            self._decided = True
            return
        self.port = listeners[0].socket.getsockname()[1]
        self._decided = True
        # cookies are shared by every port of a host: one name per node's page
        self.logins.cookie_name = f"{COOKIE}_{self.port}"
        nursery.start_soon(self._look_at_vms)
        if self.sampler is not None:
            nursery.start_soon(self.sampler.run)
        nursery.start_soon(
            serve_https, listeners, self._tls_context, self, self._refusals, self._count
        )
        nursery.start_soon(self._keep_certificate)

    def publish(self, node: NodeContext) -> None:
        # the page's port, so that /sd on any host points at it (0: no page)
        if self._decided:
            node.publish(dataclasses.replace(node.published, web_port=self.port or 0))
        self._publish_work(node)

    def _publish_work(self, node: NodeContext) -> None:
        """This host's fetches, migrations and jobs into gossip, rounded and at most every
        ``work.MIN_GAP`` seconds (``work``), so that every host's page shows them."""
        t, m, j = self.transfers, self.migrations, self.jobs
        now = items(
            t.active if t else {},
            m.active if m else {},
            m.targets if m else {},
            sorted(j.sessions.values(), key=lambda s: s.opened) if j else [],
        )
        value = self.work.update(now, time.time(), trio.current_time())
        if value is not None:
            node.publish(dataclasses.replace(node.published, work=tuple(value)))
            self._notify()  # this host's own page: no gossip event for its own keys

    def facts(self) -> Mapping[str, str]:
        if self.port is None:
            return {"web": self._off} if self._off else {}
        host = self._addresses[0] if self._addresses else "localhost"
        if ":" in host:
            host = f"[{host}]"
        url = f"https://{host}:{self.port}/"
        if not self.cert_ready.is_set():
            url += " (certificate: not yet signed by the CA host)"
        return {"web": url}

    def on_event(self, node: NodeContext, kind: EventKind, node_id: str) -> None:
        if kind in (EventKind.JOINED, EventKind.UP) and not self.cert_ready.is_set():
            self._wake.set()
        if kind is not EventKind.CHANGED:  # VM changes: _look_at_vms
            name = next((h.name for h in node.hosts() if h.node_id == node_id), node_id[:12])
            text = f"{name} {GOSSIP_EVENTS.get(kind, kind.value)}"
            self.events.add(Event(time.time(), kind.value, name, text))
        self._notify()

    def _count(self, cause: str) -> None:
        self.refused[cause] = self.refused.get(cause, 0) + 1
        self.events.add(Event(time.time(), "web-refused", "", REFUSAL_TEXT.get(cause, cause)))
        self._notify()

    def _notify(self) -> None:
        self._changes += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _look_at_vms(self) -> None:
        """VMs that appeared on or left a host, into the task log, every ``LOOK_EVERY``
        seconds: this host's own VMs change without a gossip event, so it looks whether
        an event came or not.  It wakes the page's streams when something changed, and
        every ``BUSY_EVERY`` s while work is under way, so that progress bars move."""
        pushed = -BUSY_EVERY
        while True:
            self._publish_work(self.node)  # sooner than the publish loop's 2 s
            hosts = self.node.hosts()
            self._vms_seen, found = vm_changes(self._vms_seen, hosts, time.time())
            self.events.extend(found)
            busy = self._busy() and trio.current_time() - pushed >= BUSY_EVERY
            if found or busy:
                pushed = trio.current_time()
                self._notify()
            await trio.sleep(LOOK_EVERY)

    def _busy(self) -> bool:
        """Whether a fetch, a migration or a job's command is under way here."""
        t, m, j = self.transfers, self.migrations, self.jobs
        running = j is not None and any(s.commands.running for s in j.sessions.values())
        return bool((t and t.active) or (m and m.active) or running)

    def _tls_context(self) -> ssl.SSLContext:
        ident = self.node.identity
        cert = self.cert_path if self.cert_ready.is_set() else ident.host_cert_path
        return server_context(
            str(cert), str(ident.host_key_path), str(ident.ca_cert_path), str(ident.crl_path)
        )

    # --- what the page shows (app.Pages) ----------------------------------------

    async def _status(self) -> StatusReply:
        reply = await self._control.local(STATUS, LocalContext(self.node.node_id), Empty())
        self._addresses = reply.addresses
        return reply

    async def _scrape(self) -> Figures:
        status = await self._status()
        try:
            vms = (await self._peer.local(LIST_LOCAL, LocalContext(status.node_id), Empty())).vms
        except VmmeshError:
            vms = None  # no VM service here (no base image yet)
        return Figures(
            status=status,
            hosts=self.node.hosts(),
            now=time.time(),
            vms=vms,
            web_refusals=dict(self.refused),
            usage=self.sampler.current() if self.sampler is not None else (),
        )

    async def metrics(self) -> bytes:
        return render(await self._scrape())

    async def sd(self) -> bytes:
        cfg = self.node.cfg
        offset = (self.port or 0) - cfg.port
        return sd_targets(self.node.hosts(), self.node.identity.mesh_id, offset)

    def login(self, token: str) -> str | None:
        session = self.logins.redeem(token)
        if session is None:
            return None
        log.info("a browser logged in with a login link")
        return self.logins.set_cookie(session)

    def session(self, cookies: list[str]) -> bool:
        value = self.logins.session_of(cookies)
        return value is not None and self.logins.valid(value)

    def changes(self) -> int:
        return self._changes

    async def wait_change(self, timeout: float, since: int) -> None:
        # a change that came while the last snapshot was made or sent is not waited
        # for again: it was missed until the next look (up to 1 s late) before
        if self._changes != since:
            return
        with trio.move_on_after(timeout):
            await self._changed.wait()

    async def snapshot(self) -> bytes:
        """The page's state: the ``/api/v1`` bodies (the status reply with this host's
        figures), the work under way, the task log."""
        async with self._snapshot_lock:
            body, made, serial = self._snapshot
            if trio.current_time() - made < SNAPSHOT_AGE and serial == self._changes:
                return body  # the streams woken by one change share one snapshot
            serial = self._changes
            here = LocalContext(self.node.node_id)
            status = await self._status()
            peers = await self._control.local(PEERS, here, Empty())
            try:
                vms = await self._control.local(LIST, here, Empty())
            except VmmeshError as exc:
                vms = VmList(errors=(f"no VM list: {exc}",))
            state = {
                "now": time.time(),
                "status": as_plain(status),
                "hosts": as_plain(peers),
                "vms": as_plain(vms),
                "usage": self._usage(),
                "events": self.events.rows(),
            }
            body = json.dumps(state, separators=(",", ":"), default=str).encode()
            self._snapshot = (body, trio.current_time(), serial)
            return body

    def _usage(self) -> list[dict[str, object]]:
        """This host's VMs' sampled figures (every host's work under way is in the
        hosts' rows: gossip's ``work``)."""
        usage = self.sampler.current() if self.sampler is not None else ()
        return [asdict(u) for u in usage]

    async def _login(self, ctx: Context, req: Empty) -> LoginReply:
        """A single-use login link for a browser (``vmmesh web``)."""
        if self.port is None:
            raise StateError(f"the web page is {self._off or 'off (web_port = -1)'}")
        await self._status()
        host = self._addresses[0] if self._addresses else "localhost"
        if ":" in host:
            host = f"[{host}]"
        token = self.logins.new_token()
        return LoginReply(
            url=f"https://{host}:{self.port}/login?token={token}",
            expires=time.time() + self.logins.token_ttl,
        )

    async def api(self, name: str) -> WireType | None:
        here = LocalContext(self.node.node_id)
        if name == "status":
            return await self._control.local(STATUS, here, Empty())
        if name == "hosts":
            return await self._control.local(PEERS, here, Empty())
        if name == "vms":
            return await self._control.local(LIST, here, Empty())
        return None

    # --- certificates ---------------------------------------------------------------

    async def _certify(self, ctx: Context, req: CertifyRequest) -> CertifyReply:
        """Sign a host's web certificate (on the host holding the CA key)."""
        ca = pki.load_ca(self.node.identity.pki_dir)  # AuthError elsewhere: ask another
        names = {h.node_id: h.name for h in self.node.hosts()}
        if ctx.peer_id not in names:
            raise NotFound(f"node {ctx.peer_id[:12]} is not in this host's gossip yet")
        pem = pki.sign_web_server(
            ca, req.public_key, ctx.peer_id, names[ctx.peer_id], names=req.names
        )
        log.info("signed a web certificate for %s: %s", names[ctx.peer_id], ", ".join(req.names))
        return CertifyReply(cert=pem)

    async def _issue(self, ctx: Context, req: IssueRequest) -> IssueReply:
        ident = self.node.identity
        if not ident.holds_ca_key:
            raise UsageError(
                "this host does not hold the mesh CA key: run `vmmesh cert issue` on the host "
                "that ran `vmmesh init`"
            )
        ca = pki.load_ca(ident.pki_dir)
        key, cert = pki.issue_client(ca, req.role.value, req.label)
        expires = x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()
        log.info("issued a %s client certificate %r", req.role.value, req.label)
        ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
        return IssueReply(cert=cert, key=key, ca=ca_pem, role=req.role, expires=expires)

    async def _keep_certificate(self) -> None:
        failed_before = ""
        while True:
            try:
                await self._renew()
                failed_before = ""
                await trio.sleep(RECHECK)
            except VmmeshError as exc:
                if str(exc) != failed_before:
                    log.warning("no web certificate yet (serving the host's own): %s", exc)
                failed_before = str(exc)
                self._wake = trio.Event()
                with trio.move_on_after(RETRY):
                    await self._wake.wait()

    async def _renew(self) -> None:
        ident = self.node.identity
        status = await self._status()
        names = certs.wanted_names(status.addresses, ident.name)
        why = certs.needs_renewal(certs.load_cert(self.cert_path), names, dt.datetime.now(dt.UTC))
        if why is None:
            self.cert_ready.set()
            return
        req = CertifyRequest(public_key=pki.host_public_key(ident), names=tuple(names))
        order = certs.signers(
            self.node.hosts(), ident.node_id, certs.ca_holder_name(ident.ca_cert_path)
        )
        if ident.holds_ca_key:
            order.insert(0, ident.node_id)
        reasons = []
        for node_id in order:
            try:
                reply = await self.node.pool.call(node_id, CERTIFY, req, timeout=CERTIFY_TIMEOUT)
            except VmmeshError as exc:
                reasons.append(f"{node_id[:12]}: {exc}")
                continue
            self._check(reply.cert, req)
            await trio.to_thread.run_sync(certs.write_cert, self.cert_path, reply.cert)
            log.info("web certificate (%s) signed by %s for %s", why, node_id[:12], names)
            self.cert_ready.set()
            return
        raise StateError("no host could sign it: " + ("; ".join(reasons) or "no host is up"))

    def _check(self, pem: bytes, req: CertifyRequest) -> None:
        """A signer's answer must be our CA's certificate of our key for our names."""
        ident = self.node.identity
        cert = x509.load_pem_x509_certificate(pem)
        ca = x509.load_pem_x509_certificate(ident.ca_cert_path.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise AuthError("a web certificate not signed by the mesh CA") from None
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != req.public_key or certs.cert_names(cert) != set(req.names):
            raise AuthError("the signer certified another key or other names")
