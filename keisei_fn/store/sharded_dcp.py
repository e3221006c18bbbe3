"""The adapter to torch.distributed.checkpoint (DCP): its state-dict API for FSDP2 models and
optimizers, and its HuggingFace safetensors storage, which writes and reads the shard files.

DCP and DTensor take ~0.8 s to import: every function imports them on first use. Errors come
out as keisei_fn's (or ``OSError``): DCP's ``CheckpointException``, raised on every rank, is a
``BaseException``. Only the safetensors storage is used, so DCP's pickled ``.metadata`` file is
never written nor read: its reader rebuilds the metadata from the shards' safetensors headers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from keisei_fn.errors import IntegrityError, SpecError
from keisei_fn.paths import PathArg, is_remote, run_path
from keisei_fn.store.sharded_layout import StoredTensor

if TYPE_CHECKING:
    from torch.distributed.checkpoint.api import CheckpointException

_DCP_SUFFIX = ".safetensors"  # the HF reader reads every file of the directory that ends so
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def hf_storage() -> ModuleType:
    """torch.distributed.checkpoint's safetensors storage (imported on first use: ~0.8 s).

    Returns:
        The ``torch.distributed.checkpoint.hf_storage`` module.

    Raises:
        SpecError: on a torch without it (sharded saves need torch >= 2.9).
    """
    try:
        from torch.distributed.checkpoint import hf_storage as storage
    except ImportError as exc:
        raise SpecError(
            "sharded checkpoints need torch.distributed.checkpoint's safetensors storage "
            f"(torch >= 2.9); this is torch {torch.__version__}"
        ) from exc
    return storage


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


def local_path(path: PathArg) -> Path:
    """``path`` as a local path.

    Args:
        path: a run directory, checkpoint stem or shards directory.

    Returns:
        The local path.

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


def shard_file(rank: int) -> str:
    """The file DCP's HF writer names for ``rank`` (its plan's 1-based index), one file each.

    Example:
        >>> shard_file(1)
        'shard-00002-model-00001-of-00001.safetensors'
    """
    return f"shard-{rank + 1:05d}-model-00001-of-00001{_DCP_SUFFIX}"


def live_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``get_state_dict``: the model's and optimizer's state as this rank holds it (DTensor
    shards under FSDP2). An optimizer without state yet gets it from ``get_state_dict``: one
    step with zero gradients and lr 0 (parameters unchanged, Adam's step counts 1).

    Args:
        model: the (``fully_shard``-ed or plain) model.
        optimizer: its optimizer, or None.

    Returns:
        ``(model state, FQN-keyed optimizer state or None)``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return dict(get_model_state_dict(model)), None
    model_state, optim_state = get_state_dict(model, optimizer)
    return dict(model_state), dict(optim_state)


def set_live_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
) -> None:
    """``set_state_dict``: load states keyed as :func:`live_state` gives them into the live
    model and optimizer, in place.

    Args:
        model: the model; every key of ``model_state`` must be its.
        optimizer: its optimizer, or None (the model only).
        model_state: the model's state dict.
        optim_state: the FQN-keyed optimizer state, or None (the model only). Not strict: params
            it keeps no state for (no gradient yet) stay without state, as
            ``Optimizer.load_state_dict`` does.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None or optim_state is None:
        set_model_state_dict(model, model_state)
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(strict=False),
    )


def write_shards(tensors: dict[str, torch.Tensor], shards: Path) -> None:
    """Write this rank's tensors into ``shards`` through DCP — a collective: call it on every
    rank (in one process without a process group it writes alone).

    Args:
        tensors: this rank's tensors by stored name (DTensor shards, plain tensors).
        shards: the shards directory (it exists); each rank writes :func:`shard_file`.

    Raises:
        OSError: when any rank failed (on every rank).
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    writer = hf_storage().HuggingFaceStorageWriter
    try:
        with _quiet_single_process():
            dcp_save(
                tensors,
                storage_writer=writer(str(shards), save_distributed=True),
                no_dist=_no_dist(),
            )
    except CheckpointException as exc:  # raised on every rank, a BaseException
        raise OSError(f"{shards}: writing the shards failed: {_failures(exc)}") from exc


def read_shards(targets: dict[str, torch.Tensor], shards: Path, *, alone: bool) -> None:
    """Read the shards into ``targets`` through DCP, in place (each rank reads the parts of
    the files that its own tensors need: any world size reshards).

    Args:
        targets: live tensors (DTensor shards or full tensors) by stored name.
        shards: the shards directory.
        alone: read in this process alone (no collectives), even in a distributed job; else a
            collective: call it on every rank.

    Raises:
        IntegrityError: when the shards do not load (on every rank).
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    try:
        with _quiet_single_process():
            reader = hf_storage().HuggingFaceStorageReader(str(shards))
            dcp_load(targets, storage_reader=reader, no_dist=alone or _no_dist())
    except CheckpointException as exc:  # raised on every rank, a BaseException
        raise IntegrityError(f"{shards}: the shards do not load: {_failures(exc)}") from exc


def read_layout(shards: Path) -> dict[str, StoredTensor | None]:
    """What the shards hold, from their safetensors headers (DCP's metadata, rebuilt).

    Args:
        shards: the shards directory.

    Returns:
        Stored name → the tensor's full dtype, shape and chunks (None: an entry that is not a
        tensor).

    Raises:
        IntegrityError: a header does not read.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = hf_storage().HuggingFaceStorageReader(str(shards)).read_metadata()
    except Exception as exc:  # safetensors' SafetensorError, JSON and key errors of headers
        raise IntegrityError(f"{shards}: the shards' headers do not read: {exc!r}") from exc
    return {
        name: StoredTensor(
            dtype=entry.properties.dtype,
            shape=tuple(entry.size),
            chunks=tuple((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks),
        )
        if isinstance(entry, TensorStorageMetadata)
        else None
        for name, entry in metadata.state_dict_metadata.items()
    }
