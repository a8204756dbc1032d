"""Failpoints: a migration held at a named step, so that a test can cut it exactly there.

Test-only.  Inert unless the node was started with ``VMMESH_FAULTS`` set to a
directory (read once, when this module is imported).  Then ``hit(step,
side)`` looks for the file ``<dir>/<side>-<step>``: if it is there, it is
taken (one shot), ``<side>-<step>.held`` is written, and the whole node
stands still (a blocking sleep: no task of this node runs, no byte of the
migration moves, QEMU's stream stalls) until the test removes that file.
Meanwhile the test kills a node or takes a host's link down; a node killed
while held never returns from here.  ``tests/test_migrate_cuts.py`` names
the steps it cuts; ``STEPS`` lists where ``source.py`` calls ``hit``,
``TARGET_STEPS`` where ``target.py`` does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "VMMESH_FAULTS"
HOLD_POLL = 0.02

#: The steps of a live migration where the source calls ``hit``, in order.
STEPS = (
    "prepare",  # the target is prepared; nothing has streamed yet
    "mirror",  # the disk mirror runs
    "ram",  # the RAM stream runs (the guest too, unless paused for the copy: TCG)
    "paused",  # the guest is paused before the switchover; the mirror not completed yet
    "switchover",  # the RAM stream has completed (the target runs the guest); no commit yet
    "resumed",  # the target has committed (runs the VM); this copy is not deleted yet
)
#: Where the target calls ``hit(step, side="target")``.
TARGET_STEPS = (
    "committed",  # the guest runs here and its row says so; the source not yet told
)

_DIR = os.environ.get(ENV, "")


def hit(step: str, side: str = "source") -> None:
    """Hold the node here if the test armed ``<side>-<step>``; nothing otherwise."""
    if not _DIR:
        return
    armed = Path(_DIR) / f"{side}-{step}"
    try:
        armed.unlink()
    except FileNotFoundError:
        return
    held = armed.with_name(armed.name + ".held")
    held.write_text(f"{os.getpid()}\n")
    while held.exists():
        time.sleep(HOLD_POLL)  # blocking on purpose: the node stands still
