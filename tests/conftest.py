"""Test-wide settings.

Hypothesis's per-example deadline is a wall-clock limit; these machines are
shared and noisy, so it is off everywhere (a slow example is not a failure).
"""

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.bootcensus import BootCensus
from vmmesh.host.store import Store

settings.register_profile("vmmesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmmesh")


CENSUS = BootCensus()


def _xdist_controller(config: pytest.Config) -> bool:
    """This process hands tests to pytest-xdist workers and runs none itself."""
    workers = getattr(config.option, "numprocesses", None)
    return bool(workers) and not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Under xdist the workers count (each its own descendants) and the controller
    # adds their figures up: counting here too would count every guest twice.
    if not _xdist_controller(session.config):
        CENSUS.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Charge the guests a test (and the fixtures it sets up) starts to that test."""
    CENSUS.current = item.nodeid
    try:
        return (yield)
    finally:
        CENSUS.current = "(between tests)"


def pytest_sessionfinish(session: pytest.Session) -> None:
    CENSUS.stop()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints the sum
        workeroutput["boot_census"] = {
            "totals": dict(CENSUS.totals),
            "by_test": {t: dict(c) for t, c in CENSUS.by_test.items()},
        }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """(xdist controller) add up what a worker counted."""
    census = getattr(node, "workeroutput", {}).get("boot_census")
    if census:
        CENSUS.add(census["totals"], census["by_test"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if CENSUS.totals or not terminalreporter.config.getoption("markexpr", ""):
        terminalreporter.write_sep("=", "boot census")
        for line in CENSUS.report():
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


# Fixtures that need root and network namespaces, or QEMU: a test that uses one
# is in the slow group even if its author forgot the mark (see scripts/test.sh --quick).
LAB_FIXTURES = frozenset({"lab3", "fake_lab", "lab"})
QEMU_FIXTURES = frozenset({"probe_vm", "guests", "debian", "base_spec", "host", "real_host"})


# The modules that take longest (minutes of lab and guests, from the full run's
# durations), longest first.  They run first: with ``--dist loadfile`` each
# module goes whole to the next free worker, so the long ones start at once and
# the many short ones fill in behind them (longest-first keeps both workers
# busy to the end).  Without xdist the order changes nothing else.
SLOW_MODULES = (
    "test_migrate_cuts.py",
    "test_mesh_vms.py",
    "test_transfer_lab.py",
    "test_jobs_lab.py",
    "test_vm_real.py",
    "test_qemu.py",
    "test_keepalive_lab.py",
    "test_warm_real.py",
    "test_install.py",
    "test_migrate_lab.py",
    "test_web_vm_lab.py",
    "test_web_lab.py",
    "test_lab.py",
    "test_mesh_lab.py",
)


def _module_rank(item: pytest.Item) -> int:
    name = item.path.name
    return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_module_rank)  # stable: each module keeps its own order
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & LAB_FIXTURES:
            item.add_marker(pytest.mark.lab)
        if names & QEMU_FIXTURES or any(m.name == "needs_qemu" for m in item.iter_markers()):
            item.add_marker(pytest.mark.qemu)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh state database under ``tmp_path/data`` (the managers' data dir)."""
    s = Store.open(tmp_path / "data" / "state.db")
    try:
        yield s
    finally:
        s.close()
