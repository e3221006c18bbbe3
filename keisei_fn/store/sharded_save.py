"""Saving a sharded checkpoint of FSDP2 training: every rank writes its own shards through DCP,
in parallel; rank 0 writes ``state.safetensors`` and, once every rank's files are written and
hashed, the sidecar, last: the commit marker (see ``keisei_fn.store.sharded`` for the layout).

The commit protocol is the store's (``keisei_fn.store.commit``), with a shards directory as the
payload: ``_start`` (rank 0, before DCP) takes the run directory's lock — held until the save
ends, so no prune runs meanwhile — refuses to replace a valid checkpoint and makes a fresh
shards directory; ``_commit`` (rank 0, after every rank wrote) checks the directory and commits
its sidecar, then removes what the replaced sidecar named. A failure before the commit removes
the new shards directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keisei_fn.capture import Scheduler
from keisei_fn.codec import dumps
from keisei_fn.distributed import agreed, gather_rng, gathered, on_rank_zero, rank_and_world
from keisei_fn.errors import (
    CheckpointExistsError,
    IntegrityError,
    SpecError,
)
from keisei_fn.meta import CheckpointMeta, build_sharded_sidecar
from keisei_fn.paths import PathArg
from keisei_fn.rng import capture_rng
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, TrainState
from keisei_fn.store._fs import fsync_dir, hash_file
from keisei_fn.store.commit import (
    commit,
    existing_checkpoint,
    fresh_payload,
    locked,
    names_payload,
    remove_payload,
)
from keisei_fn.store.names import RESUME_PREFIX, SHARDS_SUFFIX, checkpoint_stem, sidecar_path
from keisei_fn.store.sharded_codec import Encoded, encode
from keisei_fn.store.sharded_dcp import hf_storage, live_state, local_path, shard_file, write_shards
from keisei_fn.store.sharded_layout import STATE_FILE
from keisei_fn.store.weights import write_weights

__all__ = ["save_sharded"]


def save_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    run_dir: PathArg,
    *,
    step: int,
    spec: ModelSpec | None = None,
    episodes: int = 0,
    stats: GameStats | None = None,
    extra: Mapping[str, Any] | None = None,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    prefix: str = RESUME_PREFIX,
    kind: str = "periodic",
    overwrite: bool = False,
) -> CheckpointMeta:
    """Save an FSDP2 training run as a sharded checkpoint — a collective: call it on every rank.

    Every rank writes its shards of the model and optimizer (``get_state_dict``) through DCP
    into a fresh ``<run_dir>/<prefix><step>.<token>.shards/``; rank 0 writes the other tensors
    (every rank's RNG states, scheduler and extra tensors) into ``state.safetensors`` there.
    Once every rank has written and hashed its files, rank 0 writes the sidecar
    ``<prefix><step>.json`` durably, last: the commit marker. A crash (or a killed rank) at any
    instant leaves either the previous state of the run directory or the complete new
    checkpoint; a half-written shards directory is never referenced by a sidecar. In one
    process without a process group it saves a plain model the same way.

    Args:
        model: the model (``fully_shard``-ed, or plain in one process).
        optimizer: its optimizer, or None. Without state yet it gets one (a zero-lr step, as
            ``get_state_dict`` does).
        run_dir: the run directory (created if missing; shared by every rank).
        step: completed timesteps (> 0; the name uses it).
        spec: the model's architecture, or None for an arbitrary model.
        episodes: completed episodes.
        stats: game results.
        extra: JSON-able user state (tensors in it go to ``state.safetensors``), as rank 0
            has it.
        scheduler: an LR scheduler (rank 0's state is stored).
        scaler: the fp16 ``GradScaler`` (rank 0's state; a disabled one is stored as None).
        prefix: file name prefix (ASCII letters and underscores).
        kind: ``"periodic"`` or ``"final"``.
        overwrite: replace a valid checkpoint at the same step (its files are removed after
            the new sidecar is committed).

    Returns:
        The committed checkpoint's meta (``format_version`` 2), the same on every rank.

    Raises:
        SpecError: for a bad step, prefix or kind (on every rank, before anything is written).
        CheckpointExistsError: a valid checkpoint exists at this step and not ``overwrite``.
        UnsupportedDtypeError, UnsupportedValueError: the state cannot be stored exactly
            (before anything is written).
        IntegrityError: the shards directory does not hold what the ranks wrote.
        OSError: an I/O failure (the new shards directory is removed).
        Every error is raised on every rank.

    Example:
        >>> save_sharded(torch.nn.Linear(2, 2), None, "runs/x", step=0)
        Traceback (most recent call last):
        ...
        keisei_fn.errors.SpecError: a checkpoint needs step > 0 (completed timesteps), got 0
    """
    if kind not in ("periodic", "final"):
        raise SpecError(f"save_sharded kind must be 'periodic' or 'final', got {kind!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        raise SpecError(f"a checkpoint needs step > 0 (completed timesteps), got {step!r}")
    stem = local_path(run_dir) / checkpoint_stem(prefix, step)
    hf_storage()  # SpecError on a torch without DCP's safetensors storage, before any write

    rank, world = rank_and_world()
    model_state, optim_state = agreed(lambda: live_state(model, optimizer))
    rng = gather_rng(capture_rng())
    encoded = agreed(
        lambda: encode(
            TrainState(
                spec=spec,
                step=step,
                episodes=episodes,
                stats=stats if stats is not None else GameStats(),
                model=model_state,
                optimizer=optim_state,
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                rng=rng,
                extra=dict(extra or {}),
            )
        )
    )
    shards = stem.parent / on_rank_zero(lambda: fresh_payload(stem, SHARDS_SUFFIX).name)
    with contextlib.ExitStack() as lock:  # rank 0 holds the run directory's lock in it
        replaced: list[CheckpointMeta] = []  # rank 0: what the sidecar at ``stem`` named
        state_file = on_rank_zero(
            lambda: _start(stem, shards, encoded, overwrite=overwrite, lock=lock, old=replaced)
        )
        committed = False
        try:
            write_shards(encoded.for_dcp(rank), shards)
            written = gathered(lambda: _hash_own(shards, rank))
            sidecar = on_rank_zero(
                lambda: _commit(
                    stem,
                    shards,
                    encoded,
                    kind=kind,
                    world=world,
                    files=[{STATE_FILE: state_file}, *written],
                    replaced=replaced[0] if replaced else None,
                )
            )
            committed = True
        finally:
            if not committed and rank == 0 and not names_payload(stem, shards):
                remove_payload(shards)
    size = len(dumps(sidecar))  # the committed file's bytes
    return CheckpointMeta.from_sidecar(sidecar, run_dir=stem.parent, sidecar_size=size)


def _start(
    stem: Path,
    shards: Path,
    encoded: Encoded,
    *,
    overwrite: bool,
    lock: contextlib.ExitStack,
    old: list[CheckpointMeta],
) -> tuple[int, str]:
    """Rank 0, before DCP: take the run directory's lock (into ``lock``), refuse to replace a
    valid checkpoint (else record it in ``old``), make the shards directory, write
    ``state.safetensors``."""
    lock.enter_context(locked(stem.parent))
    existing = existing_checkpoint(stem, overwrite=overwrite)
    if existing is not None:
        if not overwrite:
            raise CheckpointExistsError(
                f"{sidecar_path(stem)} already holds a valid checkpoint; pass overwrite=True to "
                "replace it"
            )
        old.append(existing[0])
    shards.mkdir()
    try:
        written = write_weights(encoded.small, shards / STATE_FILE)
    except BaseException:
        shutil.rmtree(shards, ignore_errors=True)
        raise
    return written.size, written.digest


def _hash_own(shards: Path, rank: int) -> dict[str, tuple[int, str]]:
    """The file this rank wrote through DCP (none when it had nothing to write), hashed."""
    own = shards / shard_file(rank)
    return {own.name: hash_file(own)} if own.exists() else {}


def _commit(
    stem: Path,
    shards: Path,
    encoded: Encoded,
    *,
    kind: str,
    world: int,
    files: list[dict[str, tuple[int, str]]],
    replaced: CheckpointMeta | None,
) -> dict[str, Any]:
    """Rank 0, after every rank wrote: check the directory, commit its sidecar, last."""
    table: dict[str, tuple[int, str]] = {}
    for written in files:
        for name, record in written.items():
            if name in table:
                raise IntegrityError(f"{shards / name}: written by two ranks")
            table[name] = record
    fsync_dir(shards)
    present = sorted(os.listdir(shards))
    if present != sorted(table):
        raise IntegrityError(
            f"{shards}: holds {present}, the ranks wrote {sorted(table)}: is the run directory "
            "shared by every node? (else this torch's DCP writer names its files differently)"
        )
    fsync_dir(stem.parent)  # the shards directory's entry, before the sidecar can be
    sidecar = build_sharded_sidecar(
        encoded.header,
        name=stem.name,
        kind=kind,
        tensors={**encoded.sharded, **encoded.small},
        shards_dir=shards.name,
        world_size=world,
        files=table,
    )
    commit(stem, sidecar, payload=shards, replaced=replaced)
    return sidecar
