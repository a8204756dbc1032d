"""Calls from the CLI to the local node over its control socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from vmmesh.config import Config
from vmmesh.net.control import connect_control


def call(cfg: Config, method: str, body: dict[str, Any]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with connect_control(cfg.socket_path) as conn:
            return await conn.call(method, body)

    return trio.run(go)


def stream(
    cfg: Config,
    method: str,
    body: dict[str, Any],
    on_item: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """A call whose answer streams progress items; returns the final item."""

    async def go() -> dict[str, Any]:
        final: dict[str, Any] = {}
        async with connect_control(cfg.socket_path) as conn:
            async for item in conn.stream_call(method, body):
                if item.get("final"):
                    final = item
                elif on_item is not None:
                    on_item(item)
        return final

    return trio.run(go)
