"""Test-wide settings.

Hypothesis's per-example deadline is a wall-clock limit; these machines are
shared and noisy, so it is off everywhere (a slow example is not a failure).
"""

from collections.abc import Generator

import pytest
from hypothesis import HealthCheck, settings

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

