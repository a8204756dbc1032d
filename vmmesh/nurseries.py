"""Nurseries whose single failure surfaces as itself.

trio wraps every error leaving a nursery in an ExceptionGroup.  Where a
nursery only runs helpers beside one main piece of work (a progress pump
beside a build), callers want the work's own error — a PackageInstallError,
not a group holding one — so that it maps to a clear one-line message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one leaf exception of a (nested) group, or None if there are several."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf = _single(group)
        if leaf is None:
            raise
        raise leaf from None
