"""Test-wide settings.

Hypothesis's per-example deadline is a wall-clock limit; these machines are
shared and noisy, so it is off everywhere (a slow example is not a failure).
"""

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from vmmesh.host.store import Store

settings.register_profile("vmmesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmmesh")


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
