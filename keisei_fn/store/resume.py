"""Resuming a run: Keisei's ``--resume latest`` without its silent failures.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     resume(run_dir) is None  # nothing to resume: a fresh start
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from keisei_fn.distributed import on_rank_zero
from keisei_fn.errors import CheckpointNotFoundError
from keisei_fn.paths import PathArg, RunPath, is_remote, run_path
from keisei_fn.state import TrainState
from keisei_fn.store._fs import (
    copy_file,
    list_file_names,
    make_dirs,
)
from keisei_fn.store.checkpoints import load_state_with_meta
from keisei_fn.store.listing import latest_checkpoint, read_listed
from keisei_fn.store.locate import resolve_stem
from keisei_fn.store.names import RESUME_PREFIX

__all__ = ["Resumed", "resume"]

log = logging.getLogger("keisei_fn.store")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Resumed:
    """A successful resume: the loaded state and the weights path it came from."""

    state: TrainState
    path: RunPath


def _copy_checkpoint(source_stem: RunPath, run_dir: RunPath) -> None:
    """Copy a checkpoint into ``run_dir`` with the durable protocol, sidecar last."""
    meta = read_listed(source_stem)[0]
    make_dirs(run_dir)
    if meta.sharded:
        make_dirs(run_dir / meta.weights_path.name)
        for name in list_file_names(meta.weights_path):
            copy_file(meta.weights_path / name, run_dir / meta.weights_path.name / name)
    else:
        copy_file(meta.weights_path, run_dir / meta.weights_path.name)
    copy_file(meta.sidecar_path, run_dir / meta.sidecar_path.name)


def resume(
    run_dir: PathArg,
    *,
    resume: PathArg | bool | None = "latest",
    search_parent: bool = True,
    prefix: str = RESUME_PREFIX,
) -> Resumed | None:
    """Decide where a run starts from and load it.

    Args:
        run_dir: the run's directory (local or an fsspec URL).
        resume: ``"latest"``/None/True → the latest valid checkpoint (falling back past one that
            fails verification, with a warning), or a fresh start when there is none;
            ``"never"``/False → a fresh start; a path → exactly that checkpoint.
        search_parent: when ``run_dir`` has no checkpoint, look in its parent directory and copy
            the latest one found there into ``run_dir`` (Keisei's behaviour), with a warning.
        prefix: the resume prefix.

    Returns:
        None for a fresh start, else ``Resumed(state, path)``.

    Raises:
        CheckpointNotFoundError: an explicit path that does not exist (Keisei silently started
            fresh), or a run directory whose checkpoints all fail verification.
        IntegrityError, UnsupportedFormatError: an explicit checkpoint that is corrupt or legacy.
    """
    if resume in ("never", False):
        return None
    run_dir = run_path(run_dir)
    if resume not in ("latest", None, True):
        assert not isinstance(resume, bool)
        stem = resolve_stem(resume)
        state, meta = load_state_with_meta(stem)
        return Resumed(state=state, path=meta.weights_path)
    if latest_checkpoint(run_dir, prefix=prefix) is None and search_parent:
        parent = run_dir.parent if is_remote(run_dir) else run_dir.resolve().parent
        parent_latest = latest_checkpoint(parent, prefix=prefix)
        if parent_latest is not None:
            stem = resolve_stem(parent_latest)
            log.warning("no checkpoint in %s; resuming from the parent's %s", run_dir, stem)
            on_rank_zero(lambda: _copy_checkpoint(stem, run_dir))
    if latest_checkpoint(run_dir, prefix=prefix) is None:
        return None
    try:
        state, meta = load_state_with_meta(run_dir, prefix=prefix)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{run_dir} has checkpoints but none passed verification; refusing to start fresh "
            "silently (pass resume='never' to start over)"
        ) from exc
    return Resumed(state=state, path=meta.weights_path)
