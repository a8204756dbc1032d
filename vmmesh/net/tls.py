"""Mutual TLS 1.3 between mesh hosts, and the accept loop that enforces it.

Theory of operation: trust is decided by OpenSSL inside the handshake, never
by code that runs after a message was read.  Both sides load only the mesh
CA as trust anchor plus the mesh CRL with VERIFY_CRL_CHECK_LEAF, and both
require a certificate from the other: a host with a certificate of another
CA, an expired one or a revoked one fails the handshake, and the server's
handler is never called.  Contexts are built fresh for every connection
(cheap next to a handshake) so a CRL installed by gossip applies to the next
connection without a restart.

Host names play no part: ``check_hostname`` is off and a client that knows
which node it wants compares the node id in the server's certificate (CN and
SAN, see ``pki``) with the one it expected.

Note on TLS 1.3: the client finishes its handshake before the server has
checked the client certificate, so a refused client learns it on its first
read (as PeerUnavailable; as ``Revoked`` when the server's alert says its
certificate is on the CRL, ``refused_as_revoked``); the server never hands
such a stream on.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any

import trio
from cryptography import x509

from vmmesh.errors import AuthError, PeerUnavailable
from vmmesh.mesh.pki import Identity, cert_node_id
from vmmesh.net.refusals import Cause, Refusals

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0

PeerHandler = Callable[[trio.SSLStream[trio.SocketStream], str], Awaitable[None]]


def _base_context(identity: Identity, purpose: ssl.Purpose) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(identity.host_cert_path, identity.host_key_path)
    ctx.load_verify_locations(cafile=identity.ca_cert_path)
    ctx.load_verify_locations(cafile=identity.crl_path)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """Context for accepting mesh peers (client certificate required)."""
    ctx = _base_context(identity, ssl.Purpose.CLIENT_AUTH)
    ctx.num_tickets = 0  # no resumption: every connection is checked against today's CRL
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """Context for connecting to mesh peers."""
    return _base_context(identity, ssl.Purpose.SERVER_AUTH)


def peer_node_id(stream: trio.SSLStream[Any]) -> str:
    """The node id in the verified certificate of the other end."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        raise AuthError("peer presented no certificate")
    return cert_node_id(x509.load_der_x509_certificate(der))


# OpenSSL's reason code for the TLS alert certificate_revoked (44): the peer
# found our certificate on its CRL.  A code (``ssl.SSLError.reason``), not text.
ALERT_CERTIFICATE_REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"


def refused_as_revoked(exc: BaseException) -> bool:
    """Whether ``exc`` (a broken stream) is the peer's TLS alert that this host's
    certificate is revoked: this host has been removed from the mesh."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return cause.reason == ALERT_CERTIFICATE_REVOKED
        cause = cause.__cause__ or cause.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """The most telling reason in an exception chain (the SSL error if any)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_message or str(cause)
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


async def open_peer(
    host: str,
    port: int,
    identity: Identity | None,
    expect_node_id: str | None = None,
    *,
    context: ssl.SSLContext | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> trio.SSLStream[trio.SocketStream]:
    """Connect and finish the TLS handshake with a mesh peer.

    PeerUnavailable when the peer cannot be reached or hangs up; AuthError
    when its certificate does not check out or names another node.
    ``identity`` may be None only with an explicit ``context`` (joining).
    """
    where = f"{host}:{port}"
    if context is not None:
        ctx = context
    elif identity is not None:
        ctx = client_context(identity)
    else:
        raise ValueError("open_peer needs an identity or a context")
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"cannot reach {where}: {describe_error(exc)}") from exc
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    try:
        with trio.fail_after(connect_timeout):
            await stream.do_handshake()
        if ctx.verify_mode == ssl.CERT_REQUIRED:
            node_id = peer_node_id(stream)
            if expect_node_id is not None and node_id != expect_node_id:
                raise AuthError(f"{where} is node {node_id}, expected {expect_node_id}")
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(stream)
        raise PeerUnavailable(f"TLS handshake with {where} timed out") from exc
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise AuthError(f"{where} failed verification: {describe_error(exc)}") from exc
        raise PeerUnavailable(f"TLS handshake with {where} failed: {describe_error(exc)}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _send_alert(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the alert OpenSSL wrote when it refused a client (certificate_revoked,
    unknown_ca, ...), so the client learns why instead of an EOF.

    A TLS 1.3 client has finished its side of the handshake before the server
    checks its certificate; trio gives up on the failed handshake without
    sending what OpenSSL left in the stream's outgoing buffer, so it is sent here.
    """
    alert = stream._outgoing.read()  # trio keeps it there (no public way to flush it)
    if alert:
        with trio.move_on_after(1.0), suppress(trio.BrokenResourceError, OSError):
            await stream.transport_stream.send_all(alert)


async def serve_peers(
    listeners: int | Sequence[trio.SocketListener],
    context_factory: Callable[[], ssl.SSLContext],
    handler: PeerHandler,
    *,
    host: str | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    refusals: Refusals | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP connections, do the TLS handshake, hand each peer to ``handler``.

    ``handler(stream, peer_id)`` gets the node id of a verified peer; with a
    context that does not ask for client certificates (the join port) it
    gets "anonymous@ADDRESS" instead.  A failed handshake is a refusal
    (``refusals``: counted, logged once per address and reason per period)
    and is dropped; nothing a peer does stops the loop.
    The stream is closed when the handler returns.  ``task_status`` gets
    the listeners (so a caller of port 0 learns the port).
    """
    if isinstance(listeners, int):
        listeners = await trio.open_tcp_listeners(listeners, host=host)
    listeners = list(listeners)
    refused = refusals or Refusals(log)

    async def serve_one(tcp: trio.SocketStream) -> None:
        try:
            address = str(tcp.socket.getpeername()[0])
        except OSError:
            address = "?"
        ctx = context_factory()
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            try:
                with trio.fail_after(handshake_timeout):
                    await stream.do_handshake()
                if ctx.verify_mode == ssl.CERT_REQUIRED:
                    peer = peer_node_id(stream)
                else:
                    peer = f"anonymous@{address}"
            except (trio.BrokenResourceError, trio.TooSlowError, AuthError) as exc:
                reason = describe_error(exc)
                refused(Cause.TLS, address, f"TLS handshake failed: {reason}")
                await _send_alert(stream)
                return
            try:
                await handler(stream, peer)
            except Exception:
                log.exception("peer handler for %s (%s) failed", peer, address)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(serve_one, listeners, task_status=task_status)
