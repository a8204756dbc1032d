"""The HTTPS listener: TLS with client certificates of the mesh CA, HTTP/1.1 by h11.

Each connection: the TLS handshake (the context requires a client
certificate that chains to the mesh CA and is not on its CRL; one that does
not is refused there and counted as ``tls``), the role read from the
verified certificate, then requests one after another on the same
connection (keep-alive, as Prometheus scrapes) until the client closes, a
request is malformed (400, then close) or the connection idles for
``IDLE`` seconds.  h11 is the protocol; this module only moves bytes between
it and the stream, so ``serve_connection`` runs over any ``trio.abc.Stream``
(tests use memory streams).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import h11
import trio
from cryptography import x509

from vmmesh.api.web import Role
from vmmesh.mesh.pki import cert_role
from vmmesh.net.refusals import Cause, Refusals
from vmmesh.net.tls import describe_error
from vmmesh.web.app import Pages, Response, respond

log = logging.getLogger("vmmesh.web")

HANDSHAKE_TIMEOUT = 10.0
IDLE = 60.0  # seconds a connection may wait for its next request
MAX_HEADERS = 16 << 10
READ = 16 << 10
SERVER = b"vmmesh"


def role_of(stream: trio.SSLStream[Any]) -> Role | None:
    """The role of the verified client certificate (None: it carries none)."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        return None
    role = cert_role(x509.load_der_x509_certificate(der))
    return Role(role) if role else None


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.fail_after(IDLE):
            data = await stream.receive_some(READ)
        conn.receive_data(bytes(data))


async def _send(conn: h11.Connection, stream: trio.abc.Stream, resp: Response, head: bool) -> None:
    headers = [
        (b"content-type", resp.content_type.encode()),
        (b"content-length", str(len(resp.body)).encode()),
        (b"server", SERVER),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    out = conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
    if not head:
        out += conn.send(h11.Data(data=resp.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def serve_connection(
    stream: trio.abc.Stream,
    role: Role | None,
    pages: Pages,
    refused: Callable[[str], None] = lambda cause: None,
) -> None:
    """Answer requests on one connection until either side ends it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
    while True:
        try:
            event = await _next_event(conn, stream)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(conn, stream, Response(exc.error_status_hint, b"bad request\n"), False)
            return
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if isinstance(event, h11.ConnectionClosed):
            return
        if not isinstance(event, h11.Request):
            continue  # Data and EndOfMessage of a request already answered
        method, target = event.method.decode("ascii"), event.target.decode("ascii", "replace")
        resp = await respond(pages, method, target, role, refused)
        try:
            await _send(conn, stream, resp, method == "HEAD")
            while conn.their_state is h11.SEND_BODY:  # a body nobody reads: drop it
                if isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                    break
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.RemoteProtocolError,
        ):
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def serve_https(
    listeners: list[trio.SocketListener],
    context_factory: Callable[[], ssl.SSLContext],
    pages: Pages,
    refusals: Refusals,
    counted: Callable[[str], None],
) -> None:
    """Accept, shake hands, serve: nothing a client does stops the loop."""

    async def serve_one(tcp: trio.SocketStream) -> None:
        try:
            address = str(tcp.socket.getpeername()[0])
        except OSError:
            address = "?"
        stream = trio.SSLStream(tcp, context_factory(), server_side=True)
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                counted("tls")
                refusals(Cause.TLS, address, f"web: TLS handshake failed: {describe_error(exc)}")
                return
            await serve_connection(stream, role_of(stream), pages, counted)
        except Exception:
            log.exception("web connection from %s failed", address)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(serve_one, listeners)


def server_context(cert: str, key: str, ca: str, crl: str) -> ssl.SSLContext:
    """TLS 1.2+ (browsers and Prometheus), client certificates of the mesh CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.load_verify_locations(cafile=crl)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    return ctx
