"""Finding and checking a sharded checkpoint before it is read: the listed check (the sidecar,
every file's size), every file's digest (split between the ranks), the shards' chunk layout
against the sidecar, the small ``state.safetensors``; and, for a run directory, the newest
sharded resume checkpoint that passes, falling back past corrupt ones with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from keisei_fn.distributed import on_rank_zero
from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    UnsupportedFormatError,
)
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg
from keisei_fn.store._fs import hash_file
from keisei_fn.store.listing import read_listed, resume_candidates
from keisei_fn.store.locate import resolve_stem
from keisei_fn.store.names import shards_stem, sidecar_path
from keisei_fn.store.sharded_dcp import local_path, read_layout
from keisei_fn.store.sharded_layout import STATE_FILE, check_chunks, in_shards
from keisei_fn.store.weights import check_listed, read_weights

__all__ = ["verify_sharded"]

log = logging.getLogger("keisei_fn.store")

T = TypeVar("T")


class _NotShardedError(UnsupportedFormatError):
    """A valid single-file (version 1) checkpoint where a sharded one was looked for."""


def _read_sharded(stem: Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """``read_listed`` for a checkpoint that must be sharded.

    Raises:
        _NotShardedError: for a single-file checkpoint; and every error of ``read_listed``.
    """
    meta, sidecar = read_listed(stem)
    if not meta.sharded:
        raise _NotShardedError(
            f"{meta.sidecar_path}: a single-file checkpoint, not a sharded one; load it with "
            "keisei_fn.load_state"
        )
    return meta, sidecar


@dataclass(frozen=True, slots=True)
class Checked:
    """A checkpoint checked for loading: its meta, sidecar, shards directory and the tensors
    of its small file."""

    meta: CheckpointMeta
    sidecar: dict[str, Any]
    shards: Path
    small: dict[str, torch.Tensor]


def prepare(stem: Path, *, verify: bool, rank: int, world: int) -> Checked:
    """One rank's part of checking a checkpoint before loading: the listed check, the digests
    of every ``world``-th file from ``rank`` on, the shards' chunks, and the small file.

    Args:
        stem: the checkpoint's stem (local).
        verify: check the digests (else sizes only).
        rank, world: this rank's share of the digests (``0, 1``: every file).

    Returns:
        The checked checkpoint, with the small file's tensors read.

    Raises:
        IntegrityError, IncompleteCheckpointError: naming the file.
        UnsupportedFormatError: a newer format, or a single-file checkpoint.
        CheckpointNotFoundError: nothing at ``stem``.
    """
    meta, sidecar = _read_sharded(stem)
    shards = cast(Path, meta.weights_path)
    files = sidecar["shards"]["files"]
    if verify:
        for name in sorted(files)[rank::world]:
            path = shards / name
            try:
                size, digest = hash_file(path)
            except FileNotFoundError:
                raise IncompleteCheckpointError(f"{path} is missing") from None
            if (size, digest) != (files[name]["size"], files[name]["digest"]):
                raise IntegrityError(
                    f"{path}: digest is {digest} ({size} bytes), the sidecar records "
                    f"{files[name]['digest']} ({files[name]['size']} bytes)"
                )
    check_chunks(read_layout(shards), sidecar, shards)
    if STATE_FILE not in files:
        raise IntegrityError(f"{sidecar_path(stem)}: the shards' file table lacks {STATE_FILE}")
    small = read_weights(shards / STATE_FILE, size=files[STATE_FILE]["size"], digest=None)
    expected = {k: v for k, v in sidecar["tensors"].items() if not in_shards(k)}
    check_listed(small, expected, shards / STATE_FILE)
    return Checked(meta, sidecar, shards, small)


def _candidates(source: PathArg, prefix: str) -> tuple[bool, list[Path]]:
    """``(explicit, stems)``: the one checkpoint ``source`` names, or a run directory's
    resume checkpoints, highest step first.

    Raises:
        CheckpointNotFoundError: nothing there.
    """
    path = local_path(source)
    if path.is_dir() and shards_stem(path.name) is None:
        return False, [cast(Path, stem) for stem in resume_candidates(path, prefix)]
    return True, [cast(Path, resolve_stem(path))]


def first_valid(
    source: PathArg,
    prefix: str,
    check: Callable[[Path], T],
    *,
    alone: bool,
) -> T:
    """``check`` the checkpoint ``source`` names, or a run directory's newest sharded resume
    checkpoints until one passes (falling back past corrupt ones with a warning; single-file
    ones are skipped).

    Args:
        source: a run directory, a checkpoint's stem or either file, or its shards directory.
        prefix: the resume prefix, when ``source`` is a run directory.
        check: reads or checks one stem; raises IntegrityError, IncompleteCheckpointError or
            UnsupportedFormatError for an unusable one.
        alone: no collectives; else a collective (rank 0 lists the candidates), and ``check``
            must raise the same on every rank.

    Returns:
        What ``check`` returns for the first stem that passes.

    Raises:
        CheckpointNotFoundError: nothing there, or no sharded checkpoint in the run directory
            passes.
        SpecError: for a URL (sharded checkpoints are local).
        Every error of ``check`` for an explicitly named checkpoint.
    """
    if alone:
        explicit, stems = _candidates(source, prefix)
    else:
        explicit, stems = on_rank_zero(lambda: _candidates(source, prefix))
    for stem in stems:
        try:
            return check(stem)
        except (IntegrityError, IncompleteCheckpointError, UnsupportedFormatError) as exc:
            if explicit:
                raise
            if isinstance(exc, _NotShardedError):
                log.info("skipping single-file checkpoint %s", stem)
            else:
                log.warning(
                    "checkpoint %s is not usable, falling back to an older one: %s", stem, exc
                )
    raise CheckpointNotFoundError(f"no valid sharded {prefix}* checkpoint in {source}")


def verify_sharded(stem: PathArg) -> CheckpointMeta:
    """Fully verify a sharded checkpoint without loading it: sidecar, every file's size and
    digest, the shards' headers against the sidecar (each tensor covered exactly once), and
    the small state file (``verify_checkpoint`` calls it for sharded checkpoints).

    Args:
        stem: the checkpoint's stem.

    Returns:
        Its meta.

    Raises:
        SpecError: for a URL (sharded checkpoints are local).
        IntegrityError, IncompleteCheckpointError, UnsupportedFormatError: naming the file.
    """
    return prepare(local_path(stem), verify=True, rank=0, world=1).meta
