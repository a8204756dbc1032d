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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh state database under ``tmp_path/data`` (the managers' data dir)."""
    s = Store.open(tmp_path / "data" / "state.db")
    try:
        yield s
    finally:
        s.close()
