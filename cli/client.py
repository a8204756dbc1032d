"""Calls from the CLI to the local node over its control socket, typed like the node's handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from vmmesh.api.codec import Method, StreamMethod, WireType
from vmmesh.config import Config
from vmmesh.net.control import connect_control

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)
It = TypeVar("It", bound=WireType)


def call(cfg: Config, method: Method[Req, Rep], request: Req) -> Rep:
    """One call to the local node; its error is raised as its own class."""

    async def go() -> Rep:
        async with connect_control(cfg.socket_path) as conn:
            return await conn.request(method, request)

    return trio.run(go)


def stream(
    cfg: Config,
    method: StreamMethod[Req, Rep, It],
    request: Req,
    on_item: Callable[[It], None] | None,
) -> Rep:
    """A call whose answer streams items (progress) before its reply."""

    async def go() -> Rep:
        async with connect_control(cfg.socket_path) as conn, conn.stream(method, request) as answer:
            async for item in answer:
                if on_item is not None:
                    on_item(item)
        return answer.result()

    return trio.run(go)
