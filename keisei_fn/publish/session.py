"""A W&B run to publish into, for the demo and the command line.

Example:
    >>> from keisei_fn.publish import publish
    >>> with wandb_run(name="my-run") as run:  # doctest: +SKIP
    ...     publish("runs/demo/final_model", run_name="my-run", run=run)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["wandb_run"]


@contextlib.contextmanager
def wandb_run(
    *,
    mode: str = "offline",
    project: str = "keisei-shogi-rl",
    name: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """Start a W&B run, yield it, and finish it on exit.

    Args:
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; used only when ``WANDB_MODE`` is
            not set (an online init on a machine without network would hang on the server).
        project: the W&B project (Keisei's by default).
        name: the run's name.
        directory: where wandb writes its files (wandb's default when None).
        config: the run's config.

    Yields:
        The run, or None when wandb is not installed (``publish`` then reports ``skipped``).
    """
    os.environ.setdefault("WANDB_MODE", mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        yield None
        return
    run = wandb.init(
        project=project,
        name=name,
        dir=str(Path(directory)) if directory is not None else None,
        config=dict(config or {}),
    )
    try:
        yield run
    finally:
        run.finish()
