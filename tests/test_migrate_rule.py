"""The migrate-or-restart rule (thesis §5.4) from given figures: both outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmesh.migrate.rule import Figures, decide

MB = 1_000_000


def test_a_vm_that_ran_long_is_moved() -> None:
    # 200 MB at 100 MB/s = 2 s, plus 0.5 s to resume; a fresh VM takes 0.6 s
    d = decide(Figures(run_seconds=60, bytes_to_move=200 * MB, rate=100 * MB,
                       resume_seconds=0.5, start_seconds=0.6))  # fmt: skip
    assert d.migrate
    assert d.migrate_seconds == pytest.approx(2.5)
    assert d.break_even == pytest.approx(1.9)
    assert "at least the 1.9 s" in d.why


def test_a_vm_that_just_started_is_restarted_when_moving_costs_more() -> None:
    # the thesis's case: a slow link, a big state, a fresh start much quicker
    d = decide(Figures(run_seconds=30, bytes_to_move=1000 * MB, rate=10 * MB,
                       resume_seconds=2.0, start_seconds=37.0))  # fmt: skip
    assert not d.migrate
    assert d.break_even == pytest.approx(65.0)  # the thesis's break-even, from these figures
    assert "restart" in d.why


def test_with_no_rate_measured_the_work_is_kept() -> None:
    d = decide(Figures(run_seconds=1, bytes_to_move=10**9, rate=None,
                       resume_seconds=1, start_seconds=1))  # fmt: skip
    assert d.migrate and d.break_even is None


def test_a_move_cheaper_than_a_fresh_start_always_pays() -> None:
    d = decide(Figures(run_seconds=0, bytes_to_move=MB, rate=100 * MB,
                       resume_seconds=0.1, start_seconds=11.0))  # fmt: skip
    assert d.break_even == 0.0
    assert d.migrate  # even a VM that just started moves: a move is quicker than a start


def test_drain_reads_its_figures_from_this_hosts_own_migrations(tmp_path: Path) -> None:
    from vmmesh.api.migrate import MigrateReport, Mode, Phase
    from vmmesh.host.store import Store
    from vmmesh.migrate import drain
    from vmmesh.vm.rows import VmRecord
    from vmmesh.vm.state import VmState

    store = Store.open(tmp_path / "state.db")
    rec = VmRecord(vm_id="ab" * 8, name="web-1", template_id=None, state=VmState.RUNNING,
                   disk="x.qcow2", vcpus=1, memory_mb=512, pid=1, created=0.0, started=1000.0,
                   stopped=0.0, stop_reason="", request_id="", start_seconds=0.7)  # fmt: skip
    first = drain.figures(store, rec, overlay_bytes=10 * MB, starts=[], now=1100.0)
    assert first.rate is None and decide(first).migrate  # nothing measured: keep the work
    assert first.start_seconds == 0.7  # the VM's own start, with no other to go by
    for wire_bytes, seconds in ((400 * MB, 4.0), (300 * MB, 1.0), (200 * MB, 1.0)):
        report = MigrateReport(vm="web-1", source="h1", target="h2", mode=Mode.LIVE,
                               seconds=seconds, wire_bytes=wire_bytes,
                               phases=(Phase(name="commit", seconds=0.4),))  # fmt: skip
        drain.record_migration(store, report)
    fig = drain.figures(store, rec, overlay_bytes=10 * MB, starts=[0.5, 0.6, 9.0], now=1100.0)
    assert fig.rate == 200 * MB  # median of 100, 300, 200 MB/s
    assert fig.resume_seconds == pytest.approx(0.4)
    assert fig.start_seconds == 0.6
    assert fig.run_seconds == 100.0
    assert fig.bytes_to_move == 512 * (1 << 20) + 10 * MB
    store.close()
