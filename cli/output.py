"""How the CLI shows things: rich tables and progress for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from vmmesh.api.common import Progress

# Not a terminal (a pipe, a log): do not wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def _plain(value: Any) -> Any:
    """A body as JSON can show it: bytes as text, sets as sorted lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def print_json(data: Any) -> None:
    """A typed body (or plain data) as JSON on stdout, for scripts."""
    if hasattr(data, "to_wire"):
        data = data.to_wire()
        data.pop("v", None)
    sys.stdout.write(json.dumps(_plain(data), indent=2, sort_keys=True, default=str) + "\n")


def error_line(message: str) -> None:
    """One line on stderr, no traceback."""
    first = " ".join(str(message).split()) or "unknown error"
    sys.stderr.write(f"vmmesh: error: {first}\n")


EXIT_BUG = 70  # EX_SOFTWARE (sysexits): an InternalError, a bug in vmmesh

NODE_LOG = "journalctl -u vmmesh-node, or the stderr of `vmmesh node`"


def bug_line(exc: BaseException) -> None:
    """The one line for an InternalError: not the user's fault, and where to look."""
    error_line(
        f"a bug in vmmesh: {exc} (please report it; the node's log has the details: {NODE_LOG})"
    )


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table; with all column names empty it is a key/value list without a header."""
    t = Table(title=title, title_justify="left", header_style="bold", show_header=any(columns))
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def ago(ts: float, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.1f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def mb(n: int | float) -> str:
    return f"{n / 1024:.1f} GB" if n >= 1024 else f"{n:.0f} MB"


class ProgressView:
    """Turns streamed ``Progress`` items into bars: one per task (a host, a transfer)."""

    def __init__(self, progress: RichProgress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def update(self, item: Progress) -> None:
        desc = f"{item.task}: {item.phase}" if item.phase else item.task
        if item.rate:
            desc += f" ({rate(item.rate)}{', ' + item.note if item.note else ''})"
        if item.task not in self._tasks:
            self._tasks[item.task] = self._progress.add_task(desc, total=1.0)
        task_id = self._tasks[item.task]
        if item.fraction is not None:
            self._progress.update(task_id, description=desc, completed=item.fraction)
        else:
            self._progress.update(task_id, description=desc)


def rate(bytes_per_second: float) -> str:
    """A transfer rate for people: 12.3 MB/s."""
    return f"{bytes_per_second / 1e6:.1f} MB/s"


@contextmanager
def progress_view(enabled: bool) -> Iterator[ProgressView | None]:
    if not enabled:
        yield None
        return
    with RichProgress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        yield ProgressView(progress)
