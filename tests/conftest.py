"""Test-wide settings.

Hypothesis's per-example deadline is a wall-clock limit; these machines are
shared and noisy, so it is off everywhere (a slow example is not a failure).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("vmmesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmmesh")
