"""Progress from synchronous code to a streamed reply, without blocking the work.

Long work (a request's VMs, a transfer) makes ``api.common.Progress`` items
and hands them to a plain callback (``api.common.Emit``); the caller streams
them, as they are, to the CLI over a connection that may be slow or gone.
``progress_pump`` gives the work a callback that never blocks and forwards
the items from a task of its own; when the consumer lags, items are dropped
(progress is a view, the final reply is what counts), and a consumer that is
gone does not fail the work.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from vmmesh.api.common import Emit, Progress
from vmmesh.errors import VmmeshError
from vmmesh.nurseries import open_nursery

BUFFER = 256


@asynccontextmanager
async def progress_pump(send: Callable[[Progress], Awaitable[None]]) -> AsyncIterator[Emit]:
    """A non-blocking ``emit(item)`` whose items reach ``send`` in order."""
    tx, rx = trio.open_memory_channel[Progress](BUFFER)

    def emit(item: Progress) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            tx.send_nowait(item)

    async def pump() -> None:
        async for item in rx:
            with contextlib.suppress(VmmeshError):
                await send(item)

    async with open_nursery() as nursery:
        nursery.start_soon(pump)
        try:
            yield emit
        finally:
            tx.close()
