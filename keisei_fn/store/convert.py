"""Conversions to an ordinary single-file checkpoint, which ``load_model`` and ``load_state``
read on one CPU and ``publish`` uploads: ``consolidate`` for a sharded (FSDP) checkpoint; the
import of a legacy Keisei ``.pth`` is ``keisei_fn.store.legacy.import_legacy``.

Example:
    >>> consolidate("runs/none", "runs/single")
    Traceback (most recent call last):
    ...
    keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import cast

from keisei_fn.errors import SpecError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, is_remote, run_path
from keisei_fn.store.checkpoints import save_state
from keisei_fn.store.names import RESUME_PREFIX, parse_stem
from keisei_fn.store.sharded_check import first_valid
from keisei_fn.store.sharded_load import load_full

__all__ = ["consolidate"]


def consolidate(sharded: PathArg, out_run_dir: PathArg) -> CheckpointMeta:
    """Turn a sharded checkpoint into an ordinary single-file one in another run directory.

    Loads it in full, in this process (as ``load_state`` does), and saves it with
    ``save_state`` under the same prefix, step and kind:
    ``<out_run_dir>/<prefix><step>.json`` and the weights file it names, which
    ``keisei_fn.load_model`` and ``load_state`` read on one CPU. Call it in one process, or on
    every rank of a job (each rank reads the whole checkpoint; rank 0 writes).

    Args:
        sharded: as ``source`` for :func:`keisei_fn.store.sharded.load_sharded_`.
        out_run_dir: the run directory to write to (not the sharded checkpoint's own).

    Returns:
        The single-file checkpoint's meta.

    Raises:
        SpecError: ``out_run_dir`` is the sharded checkpoint's run directory (same name).
        CheckpointExistsError: a different checkpoint is there at that step.
        and every error of ``load_state``.
    """
    state, meta = first_valid(sharded, RESUME_PREFIX, partial(load_full, verify=True), alone=True)
    out = run_path(out_run_dir)
    if not is_remote(out) and out.resolve() == cast(Path, meta.run_dir).resolve():
        raise SpecError(
            f"consolidate {meta.name} into another run directory than {meta.run_dir}: "
            "both would be named the same"
        )
    parsed = parse_stem(meta.name)
    prefix = parsed.prefix if parsed is not None and parsed.step is not None else RESUME_PREFIX
    return save_state(state, out, kind=meta.kind, prefix=prefix)
