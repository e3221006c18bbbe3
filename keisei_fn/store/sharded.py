"""Sharded checkpoints of FSDP2 training through torch.distributed.checkpoint, never pickled.

``save_sharded`` runs on every rank of an FSDP2 (``fully_shard``) job: every rank writes its own
shards of the model and optimizer tensors, in parallel, through torch.distributed.checkpoint
(DCP) and its HuggingFace safetensors writer; rank 0 writes the rest of the training state and,
once every rank has finished and its files' digests are gathered, the sidecar: the commit
marker. ``load_sharded`` reads it back on any number of ranks (resharding), ``load_state`` as a
plain, full TrainState in one process (like any checkpoint), and ``consolidate`` turns it into
an ordinary single-file checkpoint that ``load_model`` reads on one CPU.

On disk, in a run directory::

    checkpoint_ts10240.json                   the sidecar: format version 2, layout "sharded"
    checkpoint_ts10240.<token>.shards/        a fresh directory per save (random token)
        shard-00001-model-00001-of-00001.safetensors    rank 0's shards, written by DCP
        shard-00002-model-00001-of-00001.safetensors    rank 1's shards
        state.safetensors                               rank 0: RNG, scheduler, extra tensors

Every file is a safetensors file. DCP's sharding offsets are in each shard's safetensors
metadata and the HF reader rebuilds DCP's metadata from those headers, so DCP's pickled
``.metadata`` file is never written nor read. A re-save gets a new directory, so no file that
a process may have mapped is ever written over.

Tensors named ``model/<key>`` and ``optimizer/state/<fqn>/<name>`` are in the shards: sharded
DTensors as every rank holds them, replicated plain tensors (BatchNorm buffers, Adam's ``step``)
as rank 0 holds them, like a single-file save on rank 0. Every other tensor (``rng/...``,
``scheduler/...``, ``extra/...``) is in ``state.safetensors``. The rest — optimizer
param_groups, step, episodes, stats, spec, scheduler and extra JSON — is in the sidecar,
encoded by ``keisei_fn.codec``.

The sidecar has format version 2 with ``"layout": "sharded"`` and a ``"shards"`` entry (see
``keisei_fn.meta.build_sharded_sidecar``). The rest of the store treats a sharded checkpoint like
any other: ``list_checkpoints``, ``latest_checkpoint`` (which returns its shards directory),
``verify_checkpoint``, ``prune``, ``resume``, and ``load_state``/``load_model`` (in full, in one
process). Sharded checkpoints live on local or mounted file systems: DCP's safetensors storage
writes local files.

Example (one process also works, without FSDP or a process group):
    >>> import tempfile, torch
    >>> from keisei_fn import ModelSpec, build_model, load_state
    >>> spec = ModelSpec(model_type="testmodel")
    >>> model = build_model(spec, seed=0)
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     meta = save_sharded(model, optimizer, run_dir, step=2048, spec=spec)
    ...     state = load_state(run_dir)
    >>> meta.format_version, meta.name, state.step, sorted(state.optimizer["state"])[:2]
    (2, 'checkpoint_ts2048', 2048, [0, 1])
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from keisei_fn.capture import Scheduler
from keisei_fn.codec import (
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    Store,
    check_storable,
    decode_json,
    decode_state,
    dumps,
    encode_header,
    loads,
    tensor_name,
)
from keisei_fn.distributed import (
    agreed,
    gather_rng,
    gathered,
    on_rank_zero,
    rank_and_world,
    rank_rng,
    reseed_rank,
)
from keisei_fn.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    KeiseiFnError,
    SpecError,
    StateMismatchError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from keisei_fn.meta import CheckpointMeta, build_sharded_sidecar
from keisei_fn.paths import PathArg, is_remote, run_path
from keisei_fn.rng import capture_rng, restore_rng_
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, TrainState, thaw
from keisei_fn.store._fs import (
    fsync_dir,
    hash_file,
    remove_durably,
    write_bytes_durably,
)
from keisei_fn.store.checkpoints import resolve_stem, save_state
from keisei_fn.store.listing import committed, read_listed, resume_candidates, shard_dirs
from keisei_fn.store.names import (
    RESUME_PREFIX,
    SHARDS_SUFFIX,
    checkpoint_stem,
    parse_stem,
    shards_stem,
    sidecar_path,
    weights_path,
)
from keisei_fn.store.weights import check_listed, read_weights, write_weights

if TYPE_CHECKING:  # torch.distributed.checkpoint and DTensor take ~0.8 s to import: lazily
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

__all__ = [
    "STATE_FILE",
    "consolidate",
    "load_full",
    "load_sharded",
    "save_sharded",
    "verify_sharded",
]

log = logging.getLogger("keisei_fn.store")

T = TypeVar("T")

#: Rank 0's file of the tensors that are not sharded (RNG, scheduler, extra).
STATE_FILE = "state.safetensors"
_DCP_SECTIONS = ("model/", "optimizer/")
_DCP_SUFFIX = ".safetensors"  # the HF reader reads every file of the directory that ends so
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class _NotShardedError(UnsupportedFormatError):
    """A valid single-file (version 1) checkpoint where a sharded one was looked for."""


def _in_shards(name: str) -> bool:
    """Whether a stored tensor goes through DCP (else: ``state.safetensors``)."""
    return name.startswith(_DCP_SECTIONS)


def _shard_file(rank: int) -> str:
    """The file DCP's HF writer names for ``rank`` (its plan's 1-based index), one file each."""
    return f"shard-{rank + 1:05d}-model-00001-of-00001{_DCP_SUFFIX}"


# --- DCP -------------------------------------------------------------------------------------


def _hf_storage() -> ModuleType:
    """torch.distributed.checkpoint's safetensors storage (imported on first use: ~0.8 s).

    Raises:
        SpecError: on a torch without it (sharded saves need torch >= 2.9).
    """
    try:
        from torch.distributed.checkpoint import hf_storage
    except ImportError as exc:
        raise SpecError(
            "sharded checkpoints need torch.distributed.checkpoint's safetensors storage "
            f"(torch >= 2.9); this is torch {torch.__version__}"
        ) from exc
    return hf_storage


def _failures(exc: CheckpointException) -> str:
    return "; ".join(f"rank {r}: {f[0]!r}" for r, f in sorted(exc.failures.items()))


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs in a single process (which is what we ask for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


def _local(path: PathArg) -> Path:
    """``path`` as a local path.

    Raises:
        SpecError: for an fsspec URL: DCP's HF storage writes and reads local files only (a
            network file system mounted on every node works).
    """
    resolved = run_path(path)
    if is_remote(resolved):
        raise SpecError(
            f"{path}: sharded checkpoints live on local or mounted file systems only (DCP's "
            "safetensors storage writes local files); consolidate them to upload"
        )
    return resolved


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


# --- encoding --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A rank's training state as stored: the sidecar's JSON part, the tensors that go through
    DCP (under their stored names) and rank 0's small-file tensors."""

    header: dict[str, Any]
    sharded: dict[str, torch.Tensor]
    small: dict[str, torch.Tensor]

    def for_dcp(self, rank: int) -> dict[str, torch.Tensor]:
        """What this rank hands DCP: its DTensor shards; plain tensors only from rank 0."""
        from torch.distributed.tensor import DTensor

        return {k: t for k, t in self.sharded.items() if rank == 0 or isinstance(t, DTensor)}


def _storing(sharded: dict[str, torch.Tensor], small: dict[str, torch.Tensor]) -> Store:
    """A ``store`` for ``codec.encode_header`` that files each tensor under its stored name:
    model and optimizer tensors in ``sharded`` (they go through DCP), the rest in ``small``."""

    def store(name: str, tensor: torch.Tensor) -> str:
        check_storable(name, tensor)
        table = sharded if _in_shards(name) else small
        if name in table:
            raise UnsupportedValueError(f"two entries would both be stored as {name!r}")
        table[name] = tensor
        return name

    return store


def _flatten(
    model_state: Mapping[str, Any], optim_state: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of ``get_state_dict``'s result under their stored names, and the
    optimizer's JSON (tensors as references)."""
    tensors: dict[str, torch.Tensor] = {}
    state = TrainState(spec=None, step=0, model=model_state, optimizer=optim_state, rng=None)
    header = encode_header(state, _storing(tensors, tensors))
    return tensors, header["optimizer"]


def _encode(state: TrainState) -> _Encoded:
    """A rank's training state (``model``/``optimizer`` as ``get_state_dict`` gives them) as
    stored: the sidecar's JSON part, the tensors for DCP and rank 0's small-file tensors."""
    sharded: dict[str, torch.Tensor] = {}
    small: dict[str, torch.Tensor] = {}
    header = encode_header(state, _storing(sharded, small))
    return _Encoded(loads(dumps(header)), sharded, small)  # the JSON as it will be read back


def _live_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``get_state_dict``: the model's and optimizer's state as this rank holds it (DTensor
    shards under FSDP2). An optimizer without state yet gets it from ``get_state_dict``: one
    step with zero gradients and lr 0 (parameters unchanged, Adam's step counts 1)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return dict(get_model_state_dict(model)), None
    model_state, optim_state = get_state_dict(model, optimizer)
    return dict(model_state), dict(optim_state)


# --- saving ----------------------------------------------------------------------------------


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
    stem = _local(run_dir) / checkpoint_stem(prefix, step)
    writer = _hf_storage().HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    rank, world = rank_and_world()
    model_state, optim_state = agreed(lambda: _live_state(model, optimizer))
    rng = gather_rng(capture_rng())
    encoded = agreed(
        lambda: _encode(
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
    token = on_rank_zero(lambda: secrets.token_hex(8))
    shards = stem.parent / f"{stem.name}.{token}{SHARDS_SUFFIX}"
    state_file = on_rank_zero(lambda: _start(stem, shards, encoded, overwrite=overwrite))
    committed = False
    try:
        try:
            with _quiet_single_process():
                dcp_save(
                    encoded.for_dcp(rank),
                    storage_writer=writer(str(shards), save_distributed=True),
                    no_dist=_no_dist(),
                )
        except CheckpointException as exc:  # raised on every rank, a BaseException
            raise OSError(f"{shards}: writing the shards failed: {_failures(exc)}") from exc
        written = gathered(lambda: _hash_own(shards, rank))
        sidecar = on_rank_zero(
            lambda: _commit(
                stem,
                shards,
                encoded,
                kind=kind,
                world=world,
                files=[{STATE_FILE: state_file}, *written],
            )
        )
        committed = True
    finally:
        if not committed and rank == 0 and not _referenced(stem, shards):
            shutil.rmtree(shards, ignore_errors=True)
    return CheckpointMeta.from_sidecar(sidecar, run_dir=stem.parent)


def _referenced(stem: Path, shards: Path) -> bool:
    """Whether the sidecar at ``stem`` commits ``shards`` (a failure after the sidecar was
    written must not remove what it refers to)."""
    try:
        return read_listed(stem)[0].shards_dir == shards.name
    except (KeiseiFnError, OSError):
        return False


def _start(stem: Path, shards: Path, encoded: _Encoded, *, overwrite: bool) -> tuple[int, str]:
    """Rank 0, before DCP: refuse to replace a valid checkpoint, make the shards directory,
    write ``state.safetensors``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        found = committed(stem) is not None
    except UnsupportedFormatError as exc:
        if not overwrite:
            raise CheckpointExistsError(
                f"{sidecar_path(stem)} holds a checkpoint this keisei_fn cannot read ({exc}); "
                "pass overwrite=True to replace it"
            ) from exc
        found = False
    if found and not overwrite:
        raise CheckpointExistsError(
            f"{sidecar_path(stem)} already holds a valid checkpoint; pass overwrite=True to "
            "replace it"
        )
    shards.mkdir()
    try:
        written = write_weights(encoded.small, shards / STATE_FILE)
        return written.size, written.digest
    except BaseException:
        shutil.rmtree(shards, ignore_errors=True)
        raise


def _hash_own(shards: Path, rank: int) -> dict[str, tuple[int, str]]:
    """The file this rank wrote through DCP (none when it had nothing to write), hashed."""
    own = shards / _shard_file(rank)
    return {own.name: hash_file(own)} if own.exists() else {}


def _commit(
    stem: Path,
    shards: Path,
    encoded: _Encoded,
    *,
    kind: str,
    world: int,
    files: list[dict[str, tuple[int, str]]],
) -> dict[str, Any]:
    """Rank 0, after every rank wrote: check the directory, write the sidecar last."""
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
    write_bytes_durably(sidecar_path(stem), dumps(sidecar))
    _remove_stale(stem, keep=shards)
    return sidecar


def _remove_stale(stem: Path, *, keep: Path) -> None:
    """After a commit: the files of whatever was at ``stem`` before, and shards directories of
    saves at this step that never committed (best effort: leftovers are harmless)."""
    with contextlib.suppress(OSError):
        remove_durably(
            weights_path(stem), *(d for d in shard_dirs(stem.parent, stem.name) if d != keep)
        )


# --- loading ---------------------------------------------------------------------------------


def _candidates(source: PathArg, prefix: str) -> tuple[bool, list[Path]]:
    """``(explicit, stems)``: the one checkpoint ``source`` names, or a run directory's
    resume checkpoints, highest step first.

    Raises:
        CheckpointNotFoundError: nothing there.
    """
    path = _local(source)
    if path.is_dir() and shards_stem(path.name) is None:
        return False, [cast(Path, stem) for stem in resume_candidates(path, prefix)]
    return True, [cast(Path, resolve_stem(path))]


def _tiles(chunks: list[ChunkStorageMetadata], shape: list[int]) -> bool:
    """Whether the non-empty chunks lie inside ``shape`` and cover it exactly once."""
    boxes = [(list(c.offsets), list(c.sizes)) for c in chunks if math.prod(c.sizes) > 0]
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return False
        if not all(o >= 0 and o + s <= d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return False
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
        return False
    for i, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[i + 1 :]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size, strict=True)
            ):
                return False
    return True


def _check_chunks(shards: Path, sidecar: Mapping[str, Any]) -> None:
    """The shards' DCP metadata (from their safetensors headers) against the sidecar: every
    sharded tensor has its recorded dtype and full shape and its chunks tile it exactly."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = _hf_storage().HuggingFaceStorageReader(str(shards)).read_metadata()
    except Exception as exc:  # safetensors' SafetensorError, JSON and key errors of headers
        raise IntegrityError(f"{shards}: the shards' headers do not read: {exc!r}") from exc
    recorded = sidecar["tensors"]
    found = metadata.state_dict_metadata
    for name in found:
        if name not in recorded:
            raise IntegrityError(
                f"{shards}: the shards hold {name!r}, the sidecar does not list it"
            )
    for name, info in recorded.items():
        if not _in_shards(name):
            continue
        entry = found.get(name)
        if not isinstance(entry, TensorStorageMetadata):
            raise IntegrityError(f"{shards}: no shard holds tensor {name!r}")
        if entry.properties.dtype != DTYPES_BY_NAME.get(info["dtype"]) or list(entry.size) != list(
            info["shape"]
        ):
            raise IntegrityError(
                f"{shards}: tensor {name!r} is {entry.properties.dtype}{list(entry.size)} in the "
                f"shards, {info['dtype']}{info['shape']} in the sidecar"
            )
        if not _tiles(entry.chunks, list(info["shape"])):
            raise IntegrityError(f"{shards}: the shards of {name!r} do not cover it exactly once")


@dataclass(frozen=True, slots=True)
class _Checked:
    """A checkpoint checked for loading: its meta, sidecar, shards directory and the tensors
    of its small file."""

    meta: CheckpointMeta
    sidecar: dict[str, Any]
    shards: Path
    small: dict[str, torch.Tensor]


def _prepare(stem: Path, *, verify: bool, rank: int, world: int) -> _Checked:
    """One rank's part of checking a checkpoint before loading: the listed check, the digests
    of every ``world``-th file from ``rank`` on, the shards' chunks, and the small file."""
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
    _check_chunks(shards, sidecar)
    if STATE_FILE not in files:
        raise IntegrityError(f"{sidecar_path(stem)}: the shards' file table lacks {STATE_FILE}")
    small = read_weights(shards / STATE_FILE, size=files[STATE_FILE]["size"], digest=None)
    expected = {k: v for k, v in sidecar["tensors"].items() if not _in_shards(k)}
    check_listed(small, expected, shards / STATE_FILE)
    return _Checked(meta, sidecar, shards, small)


def _dcp_load(targets: dict[str, torch.Tensor], shards: Path, *, no_dist: bool) -> None:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    try:
        with _quiet_single_process():
            reader = _hf_storage().HuggingFaceStorageReader(str(shards))
            dcp_load(targets, storage_reader=reader, no_dist=no_dist)
    except CheckpointException as exc:  # raised on every rank, a BaseException
        raise IntegrityError(f"{shards}: the shards do not load: {_failures(exc)}") from exc


def _first_valid(
    source: PathArg,
    prefix: str,
    check: Callable[[Path], T],
    *,
    alone: bool,
) -> T:
    """``check`` the checkpoint ``source`` names, or a run directory's newest sharded resume
    checkpoints until one passes (falling back past corrupt ones with a warning; single-file
    ones are skipped). ``alone``: no collectives, else rank 0 lists the candidates."""
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


def load_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    source: PathArg,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    verify: bool = True,
    rng: bool = True,
    prefix: str = RESUME_PREFIX,
) -> CheckpointMeta:
    """Load a sharded checkpoint into an FSDP2 job, in place — a collective: call it on every
    rank, with any number of ranks (resharding: each rank reads the parts of the shards that
    its own shards need).

    The ranks split the digest checks between them and agree on the outcome, then load through
    DCP into ``get_state_dict``'s structure and ``set_state_dict``. The optimizer's param_groups
    and non-tensor state come from the sidecar. Each rank gets its own RNG state back when the
    world size is the one saved; otherwise a warning is logged and each rank is reseeded
    deterministically from ``(step, rank)``.

    Args:
        model: the model, built and sharded the same way as the saved one (any world size).
        optimizer: its optimizer (same type and param groups), or None.
        source: a run directory (its newest valid sharded ``prefix`` checkpoint, falling back
            past corrupt ones with a warning; single-file checkpoints are skipped), a
            checkpoint's stem or sidecar path, or its shards directory.
        scheduler: an LR scheduler to restore; left fresh with a warning when none was saved.
        scaler: an enabled ``GradScaler`` to restore; left fresh with a warning when none was
            saved.
        verify: check every file's BLAKE3 digest (shared between the ranks).
        rng: restore (or reseed) the RNGs.
        prefix: the resume prefix, when ``source`` is a run directory.

    Returns:
        The loaded checkpoint's meta, the same on every rank.

    Raises:
        CheckpointNotFoundError: nothing there (or no valid sharded checkpoint in the directory).
        IntegrityError: a corrupt or missing shard, naming the file.
        IncompleteCheckpointError: a save that never committed, or a missing file.
        UnsupportedFormatError: a single-file checkpoint (use ``load_state``), a newer format.
        StateMismatchError: listing every key, dtype, shape and param group that does not fit
            the live model and optimizer, before the model or a loaded value is changed (an
            optimizer without state has by then been given zero state, as ``get_state_dict``
            does).
        Every error is raised on every rank.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    rank, world = rank_and_world()

    def check(stem: Path) -> _Checked:
        return agreed(lambda: _prepare(stem, verify=verify, rank=rank, world=world))

    checked = _first_valid(source, prefix, check, alone=False)
    meta, sidecar = checked.meta, checked.sidecar
    model_state, optim_state = agreed(lambda: _live_state(model, optimizer))
    targets = agreed(lambda: _targets(sidecar, model_state, optim_state))
    _dcp_load(targets, checked.shards, no_dist=_no_dist())
    header = sidecar["state"]
    lookup = {**targets, **checked.small}
    loaded_model: dict[str, Any] = {
        key: targets[tensor_name("model", (key,))] for key in header["model"]
    }
    if optimizer is not None:
        loaded_optim = decode_json(header["optimizer"], tensors=lookup)
        # not strict: params the saved optimizer kept no state for (no gradient yet) stay
        # without state, as Optimizer.load_state_dict does; the model's keys were checked
        set_state_dict(
            model,
            optimizer,
            model_state_dict=loaded_model,
            optim_state_dict=loaded_optim,
            options=StateDictOptions(strict=False),
        )
    else:
        set_model_state_dict(model, loaded_model)
    if scheduler is not None:
        if header["scheduler"] is None:
            log.warning("checkpoint %s holds no scheduler state: scheduler left fresh", meta.name)
        else:
            saved = decode_json(header["scheduler"], tensors=lookup)
            scheduler.load_state_dict(thaw(saved, on_tensor=torch.Tensor.clone))
    if scaler is not None and scaler.is_enabled():
        if header["scaler"] is None:
            log.warning("checkpoint %s holds no GradScaler state: scaler left fresh", meta.name)
        else:
            saved = decode_json(header["scaler"], tensors=lookup)
            scaler.load_state_dict(thaw(saved, on_tensor=torch.Tensor.clone))
    if rng and header["rng"] is not None:
        saved_rng = decode_json(header["rng"], tensors=lookup)
        own = rank_rng(saved_rng)
        if own is not None:
            restore_rng_(own)
        else:
            reseed_rank(saved_rng, step=meta.step)
    return meta


def _describe(dtype: str, shape: Any) -> str:
    return f"{dtype}{list(shape)}"


def _targets(
    sidecar: Mapping[str, Any],
    model_state: Mapping[str, Any],
    optim_state: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """The live tensors DCP loads into, by stored name, after checking that every saved tensor
    has a live counterpart of its dtype and full shape (all problems in one error)."""
    live, live_optim = _flatten(model_state, optim_state)
    header = sidecar["state"]
    recorded = sidecar["tensors"]
    problems = [
        f"missing key {k!r} (in the model, not in the checkpoint)"
        for k in model_state
        if k not in header["model"]
    ]
    problems += [
        f"unexpected key {k!r} (in the checkpoint, not in the model)"
        for k in header["model"]
        if k not in model_state
    ]
    if optim_state is not None and header["optimizer"] is None:
        problems.append("an optimizer was given, but the checkpoint holds no optimizer state")
    elif optim_state is not None:
        problems += _group_problems(header["optimizer"], live_optim)
    targets: dict[str, torch.Tensor] = {}
    for name, info in recorded.items():
        if not _in_shards(name):
            continue
        tensor = live.get(name)
        if tensor is None:
            if name.startswith("optimizer/") and optim_state is not None:
                problems.append(f"{name!r}: in the checkpoint, not in the live optimizer's state")
            continue
        saved = _describe(info["dtype"], info["shape"])
        have = _describe(DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tensor.shape)
        if saved != have:
            problems.append(f"{name!r}: checkpoint has {saved}, live {have}")
        targets[name] = tensor
    if problems:
        raise StateMismatchError(
            f"checkpoint {sidecar['name']} does not fit the live objects:\n  - "
            + "\n  - ".join(problems)
        )
    return targets


def _group_problems(saved: Any, live: Any) -> list[str]:
    saved_groups = [g.get("params") for g in saved.get("param_groups", [])]
    live_groups = [g.get("params") for g in live.get("param_groups", [])]
    if len(saved_groups) != len(live_groups):
        return [
            f"optimizer: checkpoint has {len(saved_groups)} param groups, "
            f"the optimizer {len(live_groups)}"
        ]
    problems = [
        f"optimizer param group {i}: checkpoint has params {s}, the optimizer {g}"
        for i, (s, g) in enumerate(zip(saved_groups, live_groups, strict=True))
        if s != g
    ]
    for i, (s, g) in enumerate(zip(saved["param_groups"], live["param_groups"], strict=True)):
        if missing := sorted(set(s) - set(g)):
            problems.append(
                f"optimizer param group {i}: the checkpoint's {missing} are not in the live "
                "optimizer's group (create the LR scheduler before loading)"
            )
    return problems


def _by_index(optim_state: Mapping[str, Any]) -> dict[str, Any]:
    """An FQN-keyed optimizer state (``get_state_dict``'s) in ``optimizer.state_dict()``'s
    layout: params numbered consecutively through the param groups, state keyed by number."""
    ids: dict[str, int] = {}
    groups = []
    for group in optim_state["param_groups"]:
        params = []
        for fqn in group["params"]:
            if fqn in ids:
                raise IntegrityError(f"optimizer param {fqn!r} is in two param groups")
            ids[fqn] = len(ids)
            params.append(ids[fqn])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    state = {}
    for fqn, entry in optim_state["state"].items():
        if fqn not in ids:
            raise IntegrityError(f"optimizer state for {fqn!r}, which no param group lists")
        state[ids[fqn]] = entry
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _decode(sidecar: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TrainState:
    """The full TrainState of a sharded checkpoint, from its sidecar and full tensors, with
    the optimizer state in ``optimizer.state_dict()``'s layout."""
    state = decode_state(tensors, {}, sidecar["state"])
    if state.optimizer is None:
        return state
    return state.replace(optimizer=_by_index(state.optimizer))


def verify_sharded(stem: PathArg) -> CheckpointMeta:
    """Fully verify a sharded checkpoint without loading it: sidecar, every file's size and
    digest, the shards' headers against the sidecar (each tensor covered exactly once), and
    the small state file (``verify_checkpoint`` calls it for sharded checkpoints).

    Raises:
        SpecError: for a URL (sharded checkpoints are local).
        IntegrityError, IncompleteCheckpointError, UnsupportedFormatError: naming the file.
    """
    return _prepare(_local(stem), verify=True, rank=0, world=1).meta


def load_full(stem: PathArg, *, verify: bool) -> tuple[TrainState, CheckpointMeta]:
    """A sharded checkpoint, written by any number of ranks, as one full TrainState, read in
    this process alone (``load_state`` calls it for sharded checkpoints).

    The result is laid out like a single-file checkpoint's and like ``keisei_fn.capture`` of
    the unsharded model: ``model`` is the canonical full state dict, ``optimizer`` is
    ``optimizer.state_dict()``'s layout (params numbered through the param groups), ``rng``
    holds every saved rank's RNG state (``{"world_size", "ranks"}``).

    Raises:
        SpecError: for a URL (sharded checkpoints are local).
        IntegrityError, IncompleteCheckpointError, UnsupportedFormatError: as ``load_state``.
    """
    checked = _prepare(_local(stem), verify=verify, rank=0, world=1)
    targets = {
        name: torch.empty(tuple(info["shape"]), dtype=DTYPES_BY_NAME[info["dtype"]])
        for name, info in checked.sidecar["tensors"].items()
        if _in_shards(name)
    }
    _dcp_load(targets, checked.shards, no_dist=True)
    return _decode(checked.sidecar, {**targets, **checked.small}), checked.meta


def consolidate(sharded: PathArg, out_run_dir: PathArg) -> CheckpointMeta:
    """Turn a sharded checkpoint into an ordinary single-file one in another run directory.

    Loads it with ``load_state`` (in full, in this process) and saves it with ``save_state``
    under the same
    prefix, step and kind: ``<out_run_dir>/<prefix><step>.safetensors`` + ``.json``, which
    ``keisei_fn.load_model`` and ``load_state`` read on one CPU. Call it in one process, or on
    every rank of a job (each rank reads the whole checkpoint; rank 0 writes).

    Args:
        sharded: as ``source`` for :func:`load_sharded`.
        out_run_dir: the run directory to write to (not the sharded checkpoint's own).

    Returns:
        The single-file checkpoint's meta.

    Raises:
        SpecError: ``out_run_dir`` is the sharded checkpoint's run directory (same name).
        CheckpointExistsError: a different checkpoint is there at that step.
        and every error of ``load_state``.
    """
    state, meta = _first_valid(sharded, RESUME_PREFIX, partial(load_full, verify=True), alone=True)
    out = run_path(out_run_dir)
    if not is_remote(out) and out.resolve() == cast(Path, meta.run_dir).resolve():
        raise SpecError(
            f"consolidate {meta.name} into another run directory than {meta.run_dir}: "
            "both would be named the same"
        )
    parsed = parse_stem(meta.name)
    prefix = parsed.prefix if parsed is not None and parsed.step is not None else RESUME_PREFIX
    return save_state(state, out, kind=meta.kind, prefix=prefix)
