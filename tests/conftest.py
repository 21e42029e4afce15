"""Shared test settings.

Hypothesis profiles: ``dev`` (the default: quick, random) and ``ci`` (derandomized, so a
CI failure reproduces exactly). Select with ``HYPOTHESIS_PROFILE=ci``. Both have
``deadline=None`` because the first call of a Numba kernel compiles it.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
