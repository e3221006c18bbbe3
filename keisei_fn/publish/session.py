"""A W&B run to publish into, for the demo and the command line.

Where W&B's files go — one rule for ``keisei-fn demo``, ``publish`` and ``flush``: under
``<run_dir>/wandb`` (beside the checkpoints they are about) unless ``WANDB_DIR`` is set, which
always wins. A run directory on object storage has no local ``wandb`` folder: there W&B uses
``WANDB_DIR`` or its own default (``./wandb``).

Example:
    >>> from keisei_fn.publish import publish
    >>> with wandb_run(name="my-run", directory="runs/demo") as run:  # doctest: +SKIP
    ...     publish("runs/demo/final_model", run_name="my-run", run=run)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from keisei_fn.paths import PathArg, is_remote, run_path

__all__ = ["wandb_dir", "wandb_run"]


def wandb_dir(run_dir: PathArg | None) -> Path | None:
    """The directory to hand ``wandb.init(dir=...)`` for a run directory (W&B then writes
    under ``<that>/wandb``): ``WANDB_DIR`` when it is set (passed explicitly: wandb reads its
    environment once per process), else the run directory itself; None — W&B's own default —
    when there is no run directory or it is on object storage. Made absolute: wandb-core, one
    service process per Python process, resolves a relative directory against the working
    directory it was started in, not the caller's current one.

    Args:
        run_dir: the run directory the published checkpoints are in, or None.

    Returns:
        A local directory, or None.

    Example:
        >>> import os
        >>> wandb_dir("runs/demo") == Path(os.environ.get("WANDB_DIR") or "runs/demo").absolute()
        True
    """
    if os.environ.get("WANDB_DIR"):
        return Path(os.environ["WANDB_DIR"]).absolute()
    if run_dir is None:
        return None
    path = run_path(run_dir)
    return None if is_remote(path) else Path(path).absolute()


@contextlib.contextmanager
def wandb_run(
    *,
    mode: str = "offline",
    project: str = "keisei-shogi-rl",
    name: str | None = None,
    directory: PathArg | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """Start a W&B run, yield it, and finish it on exit.

    Args:
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; used only when ``WANDB_MODE`` is
            not set (an online init on a machine without network would hang on the server).
        project: the W&B project (Keisei's by default).
        name: the run's name.
        directory: the run directory whose checkpoints are published: W&B's files go under
            ``<directory>/wandb`` unless ``WANDB_DIR`` is set (see :func:`wandb_dir`; W&B's
            own default, ``./wandb``, when None).
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
    root = wandb_dir(directory)
    run = wandb.init(
        project=project,
        name=name,
        dir=str(root) if root is not None else None,
        config=dict(config or {}),
    )
    try:
        yield run
    finally:
        run.finish()
