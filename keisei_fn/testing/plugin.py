"""The ``keisei_fn`` pytest plugin: namespaced Hypothesis profiles for keisei_fn's users.

Registers the Hypothesis profiles ``keisei-dev`` (25 examples, no deadline), ``keisei-ci``
(40 derandomized examples, no deadline, slow data generation allowed) and ``keisei-slow`` (300
examples, for nightly runs) when pytest starts, if
Hypothesis is installed, and loads the one named by the environment variable
``KEISEI_FN_HYPOTHESIS_PROFILE``; any other value (or none) leaves Hypothesis's own choice alone,
and so does an explicit ``--hypothesis-profile``. Without Hypothesis the plugin does nothing.

This module imports neither torch nor Hypothesis at its top: Hypothesis is imported in
``pytest_configure``, and only if it is installed.

Example:
    .. code-block:: console

        $ KEISEI_FN_HYPOTHESIS_PROFILE=keisei-ci pytest
"""

from __future__ import annotations

import os

import pytest

__all__ = ["PROFILES", "PROFILE_ENV", "pytest_configure"]

#: The environment variable that selects a profile.
PROFILE_ENV = "KEISEI_FN_HYPOTHESIS_PROFILE"
#: The profiles this plugin registers.
PROFILES = ("keisei-dev", "keisei-ci", "keisei-slow")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Register the profiles (before Hypothesis's plugin loads any) and load the chosen one.

    Args:
        config: pytest's configuration.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile("keisei-dev", max_examples=25, deadline=None)
    settings.register_profile(
        "keisei-ci",
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("keisei-slow", max_examples=300, deadline=None)
    chosen = os.environ.get(PROFILE_ENV)
    if chosen in PROFILES and not config.getoption("hypothesis_profile", None):
        settings.load_profile(chosen)
