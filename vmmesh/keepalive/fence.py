"""Self-fencing: a watchdog process that kills this host's keep-alive VMs when the
node stops vouching for them.

The node touches ``fence/heartbeat`` every second while it may run
keep-alive VMs (it has the quorum, or the mesh is too small to vote) and
lists their QEMUs in ``fence/guests.json``.  The watchdog is a separate
process in its own session (``python -m vmmesh.keepalive.fence DATA_DIR``),
so it outlives a node that crashed or hangs: when the heartbeat is older
than ``FENCE`` seconds it SIGKILLs every listed QEMU that still is that QEMU
(its command line names its run directory), as Proxmox's watchdog resets a
host that lost quorum.  The other hosts recover those VMs only after a grace
period longer than ``FENCE`` plus failure detection, so a VM never runs twice.
The watchdog ends once no keep-alive VM is listed and the node has been
silent for a minute; the node starts it again when it needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FENCE = 6.0  # seconds of silence after which the watchdog kills keep-alive VMs
POLL = 0.5
IDLE_EXIT = 60.0
DIR = "fence"
HEARTBEAT = "heartbeat"
GUESTS = "guests.json"
PIDFILE = "watchdog.pid"
LOG = "fence.log"


def fence_dir(data_dir: Path) -> Path:
    return data_dir / DIR


def beat(data_dir: Path) -> None:
    """The node vouches for its keep-alive VMs for another ``FENCE`` seconds."""
    d = fence_dir(data_dir)
    d.mkdir(exist_ok=True)
    path = d / HEARTBEAT
    path.touch()
    os.utime(path)


def list_guests(data_dir: Path, guests: list[tuple[int, str]]) -> None:
    """The keep-alive QEMUs (pid, run directory) the watchdog guards; written whole."""
    d = fence_dir(data_dir)
    d.mkdir(exist_ok=True)
    tmp = d / (GUESTS + ".tmp")
    tmp.write_text(json.dumps([{"pid": p, "run_dir": r} for p, r in guests]))
    os.replace(tmp, d / GUESTS)


def watchdog_alive(data_dir: Path) -> bool:
    try:
        pid = int((fence_dir(data_dir) / PIDFILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"vmmesh.keepalive.fence" in cmdline


def start_watchdog(data_dir: Path) -> None:
    """Start the watchdog unless one runs for this data directory."""
    if watchdog_alive(data_dir):
        return
    d = fence_dir(data_dir)
    d.mkdir(exist_ok=True)
    with open(d / LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmmesh.keepalive.fence", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (d / PIDFILE).write_text(str(proc.pid))


def _is_that_qemu(pid: int, run_dir: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return run_dir.encode() in cmdline and b"qemu" in cmdline


def _guests(d: Path) -> list[tuple[int, str]]:
    try:
        raw = json.loads((d / GUESTS).read_text())
        return [(int(g["pid"]), str(g["run_dir"])) for g in raw]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def fence_once(data_dir: Path, now: float) -> list[int]:
    """Kill the listed keep-alive QEMUs if the heartbeat is stale; returns the pids."""
    d = fence_dir(data_dir)
    try:
        silent = now - (d / HEARTBEAT).stat().st_mtime
    except OSError:
        silent = float("inf")
    if silent < FENCE:
        return []
    killed = []
    for pid, run_dir in _guests(d):
        if _is_that_qemu(pid, run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def main(argv: list[str]) -> int:
    data_dir = Path(argv[1])
    d = fence_dir(data_dir)
    while True:
        now = time.time()
        for pid in fence_once(data_dir, now):
            print(f"{time.strftime('%F %T')} fenced: killed QEMU {pid}", flush=True)
        try:
            silent = now - (d / HEARTBEAT).stat().st_mtime
        except OSError:
            silent = float("inf")
        if silent > IDLE_EXIT and not any(_is_that_qemu(p, r) for p, r in _guests(d)):
            return 0
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
