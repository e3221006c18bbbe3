"""A private temporary run directory, one per Hypothesis example.

A function-scoped pytest ``tmp_path`` is shared by all examples of a ``@given`` test (and
Hypothesis' health check refuses it); use :func:`fresh_run_dir` inside the test instead.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fresh_run_dir"]


@contextlib.contextmanager
def fresh_run_dir(*, name: str = "run") -> Iterator[Path]:
    """Create an empty run directory in a new private temporary parent; remove both on exit.

    The parent holds nothing else, so ``resume(..., search_parent=True)`` finds nothing there
    unless the test puts it there.

    Args:
        name: the run directory's name (dots and other characters allowed, no slashes).

    Returns:
        A context manager yielding the run directory's path.

    Example:
        >>> with fresh_run_dir(name="run.v1") as run_dir:
        ...     run_dir.is_dir(), list(run_dir.iterdir())
        (True, [])
    """
    with tempfile.TemporaryDirectory(prefix="keisei_fn-") as parent:
        run_dir = Path(parent) / name
        run_dir.mkdir()
        yield run_dir
