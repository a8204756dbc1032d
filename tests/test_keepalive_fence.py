"""The self-fencing watchdog: it kills the listed keep-alive QEMUs only when the
node has stopped vouching for them, and only processes that still are them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vmmesh.keepalive import fence


def _cmdline_has(pid: int, needle: bytes) -> None:
    """Wait until the new process shows its own command line (just after the fork it
    may still show ours)."""
    for _ in range(400):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                return
        except OSError:
            pass
        time.sleep(0.025)
    raise AssertionError(f"process {pid} never showed {needle!r}")


def _fake_qemu(run_dir: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names a run directory and "qemu", as a guest's does."""
    code = "import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, "qemu-system-x86_64", str(run_dir)])
    _cmdline_has(proc.pid, str(run_dir).encode())
    return proc


def test_a_fresh_heartbeat_keeps_the_guests_and_a_stale_one_kills_them(tmp_path: Path) -> None:
    run = tmp_path / "run" / "vm1"
    guest = _fake_qemu(run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        fence.beat(tmp_path)
        # the second entry's pid is not a QEMU of that run directory: never killed
        fence.list_guests(tmp_path, [(guest.pid, str(run)), (other.pid, str(run))])
        now = time.time()
        assert fence.fence_once(tmp_path, now) == []
        assert guest.poll() is None
        assert fence.fence_once(tmp_path, now + fence.FENCE + 1) == [guest.pid]
        assert guest.wait(timeout=30) == -9
        assert other.poll() is None
    finally:
        for p in (guest, other):
            p.kill()
            p.wait()


def test_no_heartbeat_at_all_is_silence(tmp_path: Path) -> None:
    run = tmp_path / "run" / "vm2"
    guest = _fake_qemu(run)
    try:
        fence.list_guests(tmp_path, [(guest.pid, str(run))])
        assert fence.fence_once(tmp_path, time.time()) == [guest.pid]
    finally:
        guest.kill()
        guest.wait()


def test_the_watchdog_runs_once_per_data_directory(tmp_path: Path) -> None:
    fence.beat(tmp_path)
    fence.start_watchdog(tmp_path)
    try:
        _cmdline_has(int((tmp_path / fence.DIR / fence.PIDFILE).read_text()), b"fence")
        assert fence.watchdog_alive(tmp_path)
        pid = int((tmp_path / fence.DIR / fence.PIDFILE).read_text())
        fence.start_watchdog(tmp_path)
        assert int((tmp_path / fence.DIR / fence.PIDFILE).read_text()) == pid
    finally:
        os.kill(int((tmp_path / fence.DIR / fence.PIDFILE).read_text()), 9)
