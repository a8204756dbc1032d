"""How the CLI shows things: rich tables and progress for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# Not a terminal (a pipe, a log): do not wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def error_line(message: str) -> None:
    """One line on stderr, no traceback."""
    first = " ".join(str(message).split()) or "unknown error"
    sys.stderr.write(f"vmmesh: error: {first}\n")


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
    """Turns streamed progress items ({"task", "phase", "fraction"}) into bars."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def update(self, item: dict[str, Any]) -> None:
        key = str(item.get("task", "work"))
        phase = str(item.get("phase", ""))
        fraction = item.get("fraction")
        desc = f"{key}: {phase}" if phase else key
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(desc, total=1.0)
        task_id = self._tasks[key]
        if isinstance(fraction, int | float):
            self._progress.update(task_id, description=desc, completed=float(fraction))
        else:
            self._progress.update(task_id, description=desc)


@contextmanager
def progress_view(enabled: bool) -> Iterator[ProgressView | None]:
    if not enabled:
        yield None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        yield ProgressView(progress)
