"""Boot census: every QEMU guest a test run starts, cold or resumed, and the test
that started it.

A daemon thread reads ``/proc`` every 0.2 s for ``qemu-system-*`` processes that
descend from this pytest process (lab nodes and their guests included, anybody
else's guests not).  A guest started with ``-incoming`` resumes a saved state;
any other boots cold.  Each guest is counted once (by pid and start time) and
charged to the test that was running when it was first seen.  A guest that lives
less than 0.2 s may be missed: it never booted far enough to cost anything.

The full run prints the totals and the tests that booted most (``conftest.py``),
so a change that adds cold boots shows in CI's output.  Under pytest-xdist each
worker counts its own and the controller adds them up.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 0.2


def guest_kind(argv: list[str]) -> str | None:
    """``"cold"``, ``"resume"``, or None for a process that is not a QEMU guest."""
    if not argv:
        return None
    # ``nice -n 10 qemu-system-x86_64 ...`` counts as the QEMU it runs.
    binaries = [os.path.basename(a) for a in argv[:4]]
    if not any(b.startswith("qemu-system-") for b in binaries):
        return None
    if not {"-machine", "-M", "-kernel", "-drive", "-blockdev"} & set(argv):
        return None  # ``qemu-system-x86_64 --version`` (a node reading QEMU's version)
    return "resume" if "-incoming" in argv else "cold"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, or None if it is gone."""
    raw = _read(f"/proc/{pid}/stat").decode(errors="replace")
    tail = raw.rpartition(")")[2].split()
    if len(tail) < 20:
        return None
    return int(tail[1]), tail[19]


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        st = _stat(pid)
        if st is None or st[0] <= 1:
            return False
        pid = st[0]
    return False


@dataclass
class BootCensus:
    """Counts guests started under ``root_pid``; ``current`` names the running test."""

    root_pid: int = field(default_factory=os.getpid)
    current: str = "(no test)"
    seen: set[tuple[int, str]] = field(default_factory=set)
    totals: Counter[str] = field(default_factory=Counter)
    by_test: dict[str, Counter[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="boot-census", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            argv = [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0")]
            kind = guest_kind([a for a in argv if a])
            st = _stat(pid) if kind else None
            if kind is None or st is None or (pid, st[1]) in self.seen:
                continue
            if not _descends_from(pid, self.root_pid):
                continue
            self.seen.add((pid, st[1]))
            self.totals[kind] += 1
            self.by_test.setdefault(self.current, Counter())[kind] += 1

    def add(self, totals: dict[str, int], by_test: dict[str, dict[str, int]]) -> None:
        """Fold in another census's figures (an xdist worker's)."""
        self.totals.update(totals)
        for test, counts in by_test.items():
            self.by_test.setdefault(test, Counter()).update(counts)

    def report(self, top: int = 15) -> list[str]:
        lines = [
            f"QEMU guests started: {self.totals['cold']} cold boots, "
            f"{self.totals['resume']} resumes from a saved state"
        ]
        ranked = sorted(self.by_test.items(), key=lambda kv: (-kv[1]["cold"], kv[0]))
        for test, counts in ranked[:top]:
            if counts["cold"] or counts["resume"]:
                lines.append(f"  {counts['cold']:3d} cold {counts['resume']:3d} resumed  {test}")
        return lines
