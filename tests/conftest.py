"""Shared test setup: Hypothesis profiles selected by KEISEI_FN_HYPOTHESIS_PROFILE."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("slow", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("KEISEI_FN_HYPOTHESIS_PROFILE", "dev"))
