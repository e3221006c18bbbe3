"""Shared test setup. Hypothesis profiles come from keisei_fn's own pytest plugin
(``keisei_fn.testing.plugin``): ``keisei-dev`` unless KEISEI_FN_HYPOTHESIS_PROFILE names another
(``.ci/run`` uses ``keisei-ci``; ``keisei-slow`` for long runs)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KEISEI_FN_HYPOTHESIS_PROFILE", "keisei-dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests run only with KEISEI_FN_SLOW=1 (or when selected with ``-m slow``)."""
    if os.environ.get("KEISEI_FN_SLOW") == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: set KEISEI_FN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
