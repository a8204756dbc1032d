"""What each path answers, and to which role: requests in, ``Response`` out, no sockets.

A ``Pages`` (the service) hands over the bodies; this module decides only who
may read them and how they are framed.  The ``/api/v1`` bodies are the typed
replies the CLI prints with ``--json`` (``to_wire()`` without the version,
bytes as text), so the page has no schema of its own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from vmmesh.api.codec import WireType
from vmmesh.api.web import Role

JSON = "application/json"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class Pages(Protocol):
    """Where the bodies come from (the web service; a fake in tests)."""

    async def metrics(self) -> bytes: ...

    async def sd(self) -> bytes: ...

    async def api(self, name: str) -> WireType | None:
        """The typed body of ``/api/v1/<name>``; None if there is no such body."""
        ...


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def as_json(body: WireType) -> bytes:
    """A typed body as the CLI's ``--json`` prints it."""
    data = body.to_wire()
    data.pop("v", None)
    return json.dumps(_plain(data), indent=2, sort_keys=True, default=str).encode() + b"\n"


INDEX = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>vmmesh</title></head>
<body><h1>vmmesh</h1><ul>
<li><a href="/api/v1/status">/api/v1/status</a></li>
<li><a href="/api/v1/hosts">/api/v1/hosts</a></li>
<li><a href="/api/v1/vms">/api/v1/vms</a></li>
<li><a href="/metrics">/metrics</a> (Prometheus)</li>
<li><a href="/sd">/sd</a> (Prometheus HTTP service discovery)</li>
</ul></body></html>
"""

# Who may read what: a metrics certificate (Prometheus) only the scrape and its
# discovery, a viewer everything the page shows.
METRICS_PATHS = frozenset({"/metrics", "/sd"})


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
) -> Response:
    """The answer to one request of a client whose certificate carries ``role``."""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return Response(405, b"only GET and HEAD: this page is read-only\n")
    if not allowed(role, path):
        refused("role")
        what = f"a {role.value} certificate" if role else "a certificate without a role"
        return Response(403, f"{what} may not read {path}\n".encode())
    route: Callable[[], Awaitable[Response]] | None = {
        "/": _const(Response(200, INDEX, "text/html; charset=utf-8")),
        "/metrics": lambda: _metrics(pages),
        "/sd": lambda: _sd(pages),
    }.get(path)
    if route is not None:
        return await route()
    if path.startswith("/api/v1/"):
        body = await pages.api(path.removeprefix("/api/v1/"))
        if body is not None:
            return Response(200, as_json(body), JSON)
    return Response(404, f"nothing at {path}\n".encode())


def _const(response: Response) -> Callable[[], Awaitable[Response]]:
    async def get() -> Response:
        return response

    return get


async def _metrics(pages: Pages) -> Response:
    return Response(200, await pages.metrics(), CONTENT_TYPE_PLAIN_0_0_4)


async def _sd(pages: Pages) -> Response:
    return Response(200, await pages.sd(), JSON)
