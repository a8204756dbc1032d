"""Bodies every method family uses: progress items and the limits they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmmesh.api.codec import Float, Int, Message, Optional, Text, wire

MAX_TEXT = 4096
MAX_ERRORS = 256
ErrorText = Text(MAX_TEXT)


@dataclass(frozen=True)
class Progress(Message):
    """One step of long work, streamed while it runs (building, installing, moving bytes).

    ``task`` names the bar (a host, a VM, a blob); ``fraction`` is None while
    the end is unknown.  Transfers also say how many bytes are ``done`` of
    ``total``, the ``rate`` in bytes per second and a ``note`` (the holders).
    """

    task: str = wire(Text(128))
    phase: str = wire(Text(200))
    fraction: float | None = wire(Optional(Float(0.0, 1.0)), default=None)
    done: int = wire(Int(), default=0)
    total: int = wire(Int(), default=0)
    rate: float = wire(Float(0.0), default=0.0)
    note: str = wire(Text(200), default="")


Emit = Callable[[Progress], None]
"""Where long work tells its ``Progress``: a callback that must not block (the node's
``progress.progress_pump`` gives one that streams the items, as they are, to the caller)."""
