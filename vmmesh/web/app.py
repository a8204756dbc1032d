"""What each path answers, and to whom: requests in, ``Response`` out, no sockets.

A ``Pages`` (the service) hands over the bodies; this module decides only who
may read them and how they are framed.  The ``/api/v1`` bodies are the typed
replies the CLI prints with ``--json`` (``to_wire()`` without the version,
bytes as text), so the page has no schema of its own; ``/events`` streams
snapshots made of the same bodies (``server`` runs the stream).

Who: a client that presented a certificate of the mesh CA has its role
(none for a host certificate); one without a certificate is a viewer if it
sends an open session's cookie (``login``), else anonymous.  Anonymous gets
401 everywhere but ``/login``, which trades a login token for that cookie;
a role may read what ``allowed`` says, anything else is 403.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from vmmesh.api.codec import WireType
from vmmesh.api.web import Role
from vmmesh.web import page

JSON = "application/json"
HTML = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    events: bool = False  # the body is the event stream (``server`` runs it)


GZIP_MIN = 1024  # bodies smaller than this go as they are
GZIP_LEVEL = 1  # /metrics of a 1000-member mesh: 1.45 MB to about a tenth, in ~10 ms


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value takes gzip (Prometheus and browsers send it);
    ``gzip;q=0`` refuses it."""
    for part in accept_encoding.split(","):
        token, _, params = part.strip().partition(";")
        if token.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def compressed(resp: Response, accept_encoding: str) -> Response:
    """``resp`` gzipped when the client takes it and the body is worth it (never the
    event stream, which is written as it goes)."""
    if resp.events or len(resp.body) < GZIP_MIN or not accepts_gzip(accept_encoding):
        return resp
    body = gzip.compress(resp.body, compresslevel=GZIP_LEVEL, mtime=0)
    extra = (("content-encoding", "gzip"), ("vary", "accept-encoding"))
    return dataclasses.replace(resp, body=body, headers=(*resp.headers, *extra))


class Pages(Protocol):
    """Where the bodies come from (the web service; a fake in tests)."""

    async def metrics(self) -> bytes: ...

    async def sd(self) -> bytes: ...

    async def api(self, name: str) -> WireType | None:
        """The typed body of ``/api/v1/<name>``; None if there is no such body."""
        ...

    def login(self, token: str) -> str | None:
        """Spend a login token: the ``Set-Cookie`` value of a new session, or None."""
        ...

    def session(self, cookies: list[str]) -> bool:
        """Whether these ``Cookie`` headers carry an open session."""
        ...

    async def snapshot(self) -> bytes:
        """The page's state now, as one line of JSON (``/events``)."""
        ...

    def changes(self) -> int:
        """A number that grows with every change the page shows."""
        ...

    async def wait_change(self, timeout: float, since: int) -> None:
        """Return when something the page shows changed since ``changes()`` was
        ``since`` (at once if it already has), or after ``timeout`` seconds."""
        ...


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def as_plain(body: WireType) -> Any:
    """A typed body as plain JSON values, as the CLI's ``--json`` has it."""
    data = body.to_wire()
    data.pop("v", None)
    return _plain(data)


def as_json(body: WireType) -> bytes:
    """A typed body as the CLI's ``--json`` prints it."""
    return json.dumps(as_plain(body), indent=2, sort_keys=True, default=str).encode() + b"\n"


# Who may read what: a metrics certificate (Prometheus) only the scrape and its
# discovery, a viewer (certificate or session) everything the page shows.
METRICS_PATHS = frozenset({"/metrics", "/sd"})
LOGIN = "/login"
EVENTS = "/events"


def allowed(role: Role | None, path: str) -> bool:
    if role is Role.VIEWER:
        return True
    return role is Role.METRICS and path in METRICS_PATHS


async def respond(
    pages: Pages,
    method: str,
    target: str,
    role: Role | None,
    refused: Callable[[str], None] = lambda cause: None,
    *,
    anonymous: bool = False,
) -> Response:
    """The answer to one request: ``role`` is the client's (its certificate's, or
    VIEWER for a session); ``anonymous``, it has neither certificate nor session."""
    path, _, query = target.partition("?")
    if method not in ("GET", "HEAD"):
        return Response(405, b"only GET and HEAD: this page is read-only\n")
    if path == LOGIN:
        return _login(pages, query, refused)
    if anonymous:
        refused("login")
        return Response(
            401,
            b"log in: a client certificate of the mesh CA (vmmesh cert issue), "
            b"or the link `vmmesh web` prints\n",
        )
    if not allowed(role, path):
        refused("role")
        what = f"a {role.value} certificate" if role else "a certificate without a role"
        return Response(403, f"{what} may not read {path}\n".encode())
    route: Callable[[], Awaitable[Response]] | None = {
        "/": _const(Response(200, page.INDEX, HTML, (("content-security-policy", page.CSP),))),
        "/metrics": lambda: _metrics(pages),
        "/sd": lambda: _sd(pages),
        EVENTS: _const(Response(200, b"", "text/event-stream", events=method == "GET")),
    }.get(path)
    if route is not None:
        return await route()
    if path.startswith("/api/v1/"):
        body = await pages.api(path.removeprefix("/api/v1/"))
        if body is not None:
            return Response(200, as_json(body), JSON)
    return Response(404, f"nothing at {path}\n".encode())


def _login(pages: Pages, query: str, refused: Callable[[str], None]) -> Response:
    tokens = urllib.parse.parse_qs(query).get("token", [])
    cookie = pages.login(tokens[0]) if len(tokens) == 1 else None
    if cookie is None:
        refused("login")
        return Response(
            401,
            b"this login link is used, expired or wrong: `vmmesh web` prints a new one\n",
        )
    return Response(303, b"logged in\n", headers=(("location", "/"), ("set-cookie", cookie)))


def _const(response: Response) -> Callable[[], Awaitable[Response]]:
    async def get() -> Response:
        return response

    return get


async def _metrics(pages: Pages) -> Response:
    return Response(200, await pages.metrics(), CONTENT_TYPE_PLAIN_0_0_4)


async def _sd(pages: Pages) -> Response:
    return Response(200, await pages.sd(), JSON)
