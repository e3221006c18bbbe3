"""Resuming a run: Keisei's ``--resume latest`` without its silent failures.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     resume(run_dir) is None  # nothing to resume: a fresh start
    True
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass

from keisei_fn.distributed import on_rank_zero
from keisei_fn.errors import CheckpointNotFoundError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, RunPath, is_remote, run_path
from keisei_fn.state import TrainState
from keisei_fn.store._fs import (
    copy_file,
    entry_exists,
    list_file_names,
    make_dirs,
)
from keisei_fn.store.checkpoints import load_state_with_meta
from keisei_fn.store.commit import locked
from keisei_fn.store.listing import (
    is_run_dir,
    latest_checkpoint,
    read_listed,
    resume_candidates,
    unhealthy_note,
)
from keisei_fn.store.locate import LEGACY_SUFFIXES, resolve_stem
from keisei_fn.store.names import RESUME_PREFIX, sidecar_path

__all__ = ["Resumed", "resume"]

log = logging.getLogger("keisei_fn.store")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Resumed:
    """A successful resume.

    Attributes:
        state: the loaded state.
        path: the weights file (or shards directory) it was loaded from, inside the run
            directory.
        copied_from: when the run directory had no checkpoint and ``resume`` adopted its parent
            directory's latest one (Keisei's behaviour), the parent's weights path that was
            copied to ``path``; None when the checkpoint was the run directory's own (or an
            explicit path).
    """

    state: TrainState
    path: RunPath
    copied_from: RunPath | None = None

    def __str__(self) -> str:
        """Where the run resumes from, then the state's table."""
        where = f"resumed at step {self.state.step} from {self.path}"
        if self.copied_from is not None:
            where += f" (a copy of the parent directory's {self.copied_from})"
        return f"{where}\n{self.state}"

    def _repr_html_(self) -> str:
        """The same, as HTML for Jupyter."""
        where = html.escape(str(self).splitlines()[0])
        return f"<p>{where}</p>{self.state._repr_html_()}"


def _copy_checkpoint(meta: CheckpointMeta, run_dir: RunPath) -> None:
    """Copy a checkpoint into ``run_dir`` under its lock, payload first, sidecar last (the
    commit)."""
    with locked(run_dir):
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
    include_unhealthy: bool = False,
) -> Resumed | None:
    """Decide where a run starts from and load it.

    Args:
        run_dir: the run's directory (local or an fsspec URL).
        resume: ``"latest"``/None/True → the latest valid checkpoint (falling back past one that
            fails verification, with a warning), or a fresh start when there is none;
            ``"never"``/False → a fresh start; a path → exactly that checkpoint.
        search_parent: when ``run_dir`` has no checkpoint, look in its parent directory and copy
            the latest one found there into ``run_dir`` (Keisei's behaviour), with a warning;
            the result's ``copied_from`` then names the parent's checkpoint.
        prefix: the resume prefix.
        include_unhealthy: also resume from a checkpoint the health gate marked unhealthy
            (``keisei_fn.health``). By default "latest" skips those with a warning and takes
            the newest healthy one; an explicit path loads whatever its mark.

    Returns:
        None for a fresh start, else ``Resumed(state, path, copied_from)``.

    Raises:
        CheckpointNotFoundError: an explicit path that does not exist (Keisei silently started
            fresh), or a run directory that holds checkpoint files (ours, or Keisei's ``.pth``:
            the message names ``keisei-fn convert``) of which none is usable, or every usable
            one marked unhealthy (the message names the newest and its problems): never a
            silent fresh start.
        IntegrityError, UnsupportedFormatError: an explicit checkpoint that is corrupt or legacy.
    """
    if resume in ("never", False):
        return None
    run_dir = run_path(run_dir)
    if resume not in ("latest", None, True):
        assert not isinstance(resume, bool)
        state, meta = load_state_with_meta(resolve_stem(resume))
        return Resumed(state=state, path=meta.weights_path)
    if not is_run_dir(run_dir) and entry_exists(run_dir):
        raise CheckpointNotFoundError(f"{run_dir} is not a run directory (pass resume=<path>)")
    found = _load_latest(run_dir, prefix, include_unhealthy)
    copied_from = None
    if found is None and search_parent and not _committed_files(run_dir, prefix):
        parent = run_dir.parent if is_remote(run_dir) else run_dir.resolve().parent
        parent_latest = latest_checkpoint(
            parent, prefix=prefix, include_unhealthy=include_unhealthy
        )
        if parent_latest is not None:
            source = read_listed(resolve_stem(parent_latest))[0]
            log.warning(
                "no checkpoint in %s; resuming from a copy of the parent's %s",
                run_dir,
                source.weights_path,
            )
            on_rank_zero(lambda: _copy_checkpoint(source, run_dir))
            found = _load_latest(run_dir, prefix, include_unhealthy)
            if found is not None and found[1].name == source.name:
                copied_from = source.weights_path
    if found is not None:
        return Resumed(state=found[0], path=found[1].weights_path, copied_from=copied_from)
    if files := _committed_files(run_dir, prefix):
        legacy = [name for name in files if name.endswith(LEGACY_SUFFIXES)]
        how = (
            f"; {legacy[0]} is a Keisei checkpoint: convert it once with `keisei-fn convert "
            f"{run_dir / legacy[0]} {run_dir}` (or keisei_fn.import_legacy)"
            if legacy and len(legacy) == len(files)
            else "; see `keisei-fn verify` for why each is unusable"
        )
        if not include_unhealthy and (unhealthy := unhealthy_note(run_dir, prefix)):
            how = unhealthy
        raise CheckpointNotFoundError(
            f"{run_dir} holds checkpoint files ({', '.join(files[:3])}"
            f"{', ...' if len(files) > 3 else ''}) but no usable {prefix}* checkpoint; refusing "
            f"to start fresh silently (pass resume='never' to start over){how}"
        )
    return None


def _load_latest(
    run_dir: RunPath, prefix: str, include_unhealthy: bool
) -> tuple[TrainState, CheckpointMeta] | None:
    """The newest loadable checkpoint (falling back past unusable ones and, unless
    ``include_unhealthy``, unhealthy ones), or None."""
    try:
        return load_state_with_meta(run_dir, prefix=prefix, include_unhealthy=include_unhealthy)
    except CheckpointNotFoundError:
        return None


def _committed_files(run_dir: RunPath, prefix: str) -> list[str]:
    """Names of the sidecars of ``prefix`` checkpoints in ``run_dir``, usable or not, and of
    Keisei's pickled checkpoints. Weights without a sidecar are not among them: a save killed
    before its commit leaves nothing to resume from (prune removes such leftovers)."""
    if not is_run_dir(run_dir):
        return []
    sidecars = [sidecar_path(stem).name for stem in resume_candidates(run_dir, prefix)]
    return sidecars + sorted(n for n in list_file_names(run_dir) if n.endswith(LEGACY_SUFFIXES))
