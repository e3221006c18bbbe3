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


def pytest_collection_modifyitems(config, items):
    """Slow tests run only with KEISEI_FN_SLOW=1 (or when selected with ``-m slow``)."""
    import pytest

    if os.environ.get("KEISEI_FN_SLOW") == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: set KEISEI_FN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
