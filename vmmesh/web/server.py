"""The HTTPS listener: TLS with client certificates of the mesh CA, HTTP/1.1 by h11.

Each connection: the TLS handshake (the context asks for a client
certificate but lets a client come without one, as a browser does; one that
is presented must chain to the mesh CA and not be on its CRL, else the
handshake fails and is counted as ``tls``), the role read from the verified
certificate, then requests one after another on the same connection
(keep-alive, as Prometheus scrapes) until the client closes, a request is
malformed (400, then close) or the connection idles for ``IDLE`` seconds.
A client without a certificate is anonymous unless a request carries an
open session's cookie (``app`` answers 401 to it everywhere but
``/login``).  ``GET /events`` turns the connection into a server-sent event
stream (``stream_events``) until the client goes.  h11 is the protocol;
this module only moves bytes between it and the stream, so
``serve_connection`` runs over any ``trio.abc.Stream`` (tests use memory
streams).
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
from vmmesh.web.app import Pages, Response, compressed, respond

log = logging.getLogger("vmmesh.web")

HANDSHAKE_TIMEOUT = 10.0
IDLE = 60.0  # seconds a connection may wait for its next request
PUSH_EVERY = 2.0  # seconds between snapshots on /events when nothing changed
MAX_STREAMS = 8  # open /events streams per node; more get 503
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


def _headers(resp: Response) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", resp.content_type.encode()),
        (b"server", SERVER),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),  # a login link never leaves in a Referer
        *((k.encode(), v.encode()) for k, v in resp.headers),
    ]


async def _send(conn: h11.Connection, stream: trio.abc.Stream, resp: Response, head: bool) -> None:
    headers = [*_headers(resp), (b"content-length", str(len(resp.body)).encode())]
    out = conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
    if not head:
        out += conn.send(h11.Data(data=resp.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def stream_events(
    conn: h11.Connection, stream: trio.abc.Stream, resp: Response, pages: Pages
) -> None:
    """``/events``: a snapshot now, then one on every change and every ``PUSH_EVERY`` s,
    until the client closes (noticed by reading, so at once) or a send fails."""
    out = conn.send(h11.Response(status_code=200, headers=_headers(resp))) or b""
    await stream.send_all(out)  # no length: h11 sends the body chunked

    async with trio.open_nursery() as nursery:

        async def until_closed() -> None:
            try:
                while await stream.receive_some(READ):
                    pass  # a client says nothing more on an event stream
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(until_closed)
        try:
            while True:
                seen = pages.changes()  # before the snapshot: a change during it counts
                event = b"data: " + await pages.snapshot() + b"\n\n"
                with trio.fail_after(IDLE):  # a client that stopped reading goes
                    await stream.send_all(conn.send(h11.Data(data=event)) or b"")
                await pages.wait_change(PUSH_EVERY, seen)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            nursery.cancel_scope.cancel()


async def serve_connection(
    stream: trio.abc.Stream,
    role: Role | None,
    pages: Pages,
    refused: Callable[[str], None] = lambda cause: None,
    *,
    certified: bool = True,
    streams: trio.CapacityLimiter | None = None,
) -> None:
    """Answer requests on one connection until either side ends it.

    ``certified``: the client presented a certificate (``role`` is its role);
    if not, each request is a viewer's with an open session's cookie, else
    anonymous.  ``streams`` bounds the open ``/events`` streams.
    """
    streams = streams or trio.CapacityLimiter(MAX_STREAMS)
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
        if certified:
            who, anonymous = role, False
        else:
            cookies = [v.decode("latin-1") for k, v in event.headers if k == b"cookie"]
            anonymous = not pages.session(cookies)
            who = None if anonymous else Role.VIEWER
        resp = await respond(pages, method, target, who, refused, anonymous=anonymous)
        accept = b",".join(v for k, v in event.headers if k == b"accept-encoding")
        resp = compressed(resp, accept.decode("latin-1"))
        if resp.events:
            try:
                streams.acquire_on_behalf_of_nowait(conn)
            except trio.WouldBlock:
                resp = Response(503, b"too many open event streams on this node\n")
            else:
                try:
                    await stream_events(conn, stream, resp, pages)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the headers did not go out: the client went
                finally:
                    streams.release_on_behalf_of(conn)
                return
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


async def serve_tls_connection(
    stream: trio.SSLStream[Any],
    pages: Pages,
    refused: Callable[[str], None] = lambda cause: None,
    streams: trio.CapacityLimiter | None = None,
) -> None:
    """``serve_connection`` after the handshake: with its certificate's role, or none."""
    certified = bool(stream.getpeercert(binary_form=True))
    await serve_connection(
        stream, role_of(stream), pages, refused, certified=certified, streams=streams
    )


async def serve_https(
    listeners: list[trio.SocketListener],
    context_factory: Callable[[], ssl.SSLContext],
    pages: Pages,
    refusals: Refusals,
    counted: Callable[[str], None],
) -> None:
    """Accept, shake hands, serve: nothing a client does stops the loop."""

    streams = trio.CapacityLimiter(MAX_STREAMS)

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
            await serve_tls_connection(stream, pages, counted, streams)
        except Exception:
            log.exception("web connection from %s failed", address)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(serve_one, listeners)


def server_context(cert: str, key: str, ca: str, crl: str) -> ssl.SSLContext:
    """TLS 1.2+ (browsers and Prometheus), client certificates of the mesh CA asked for.

    Optional, so that a browser with a session cookie gets in without one; a
    certificate that is presented is verified all the same (another CA or a
    revoked one fails the handshake), and ``app`` refuses a request with
    neither certificate nor session."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.load_verify_locations(cafile=crl)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    return ctx
