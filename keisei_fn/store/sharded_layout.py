"""Where a sharded checkpoint keeps each tensor, and the pure checks of a shards directory's
layout: which tensors go through DCP's shards (``model/...``, ``optimizer/...``) and which into
rank 0's ``state.safetensors``; whether the shards' chunks cover every tensor exactly once.

No file system and no torch.distributed here: ``keisei_fn.store.sharded_dcp`` reads the shards'
layout (:class:`StoredTensor`) from their safetensors headers.

Example:
    >>> in_shards("model/stem.weight"), in_shards("rng/torch")
    (True, False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keisei_fn.codec import DTYPES_BY_NAME
from keisei_fn.errors import IntegrityError

#: Rank 0's file of the tensors that are not sharded (RNG, scheduler, extra).
STATE_FILE = "state.safetensors"
_DCP_SECTIONS = ("model/", "optimizer/")

#: One chunk of a tensor in the shards: its offsets and sizes along every dimension.
Chunk = tuple[tuple[int, ...], tuple[int, ...]]


def in_shards(name: str) -> bool:
    """Whether a stored tensor goes through DCP (else: ``state.safetensors``).

    Args:
        name: the tensor's stored name, e.g. ``"optimizer/state/fc.weight/exp_avg"``.

    Returns:
        True for model and optimizer tensors.
    """
    return name.startswith(_DCP_SECTIONS)


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """A tensor as the shards hold it: its full dtype and shape, and the chunks of it that the
    shard files hold (as DCP's metadata, rebuilt from their safetensors headers, says)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def tiles(chunks: tuple[Chunk, ...], shape: tuple[int, ...]) -> bool:
    """Whether the non-empty chunks lie inside ``shape`` and cover it exactly once.

    Args:
        chunks: ``(offsets, sizes)`` of every chunk.
        shape: the full tensor's shape.

    Returns:
        True when they tile it.

    Example:
        >>> tiles((((0, 0), (1, 2)), ((1, 0), (1, 2))), (2, 2)), tiles((((0,), (1,)),), (2,))
        (True, False)
    """
    boxes = [(offsets, sizes) for offsets, sizes in chunks if math.prod(sizes) > 0]
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


def check_chunks(
    found: Mapping[str, StoredTensor | None], sidecar: Mapping[str, Any], shards: Path
) -> None:
    """The shards' layout against the sidecar: they hold nothing it does not list, and every
    sharded tensor has its recorded dtype and full shape and its chunks tile it exactly.

    Args:
        found: what the shards hold, by stored name (None: an entry that is not a tensor).
        sidecar: the checked sidecar.
        shards: the shards directory, for error messages.

    Raises:
        IntegrityError: naming the first tensor that does not fit.
    """
    recorded = sidecar["tensors"]
    for name in found:
        if name not in recorded:
            raise IntegrityError(
                f"{shards}: the shards hold {name!r}, the sidecar does not list it"
            )
    for name, info in recorded.items():
        if not in_shards(name):
            continue
        entry = found.get(name)
        if entry is None:
            raise IntegrityError(f"{shards}: no shard holds tensor {name!r}")
        if entry.dtype != DTYPES_BY_NAME.get(info["dtype"]) or list(entry.shape) != list(
            info["shape"]
        ):
            raise IntegrityError(
                f"{shards}: tensor {name!r} is {entry.dtype}{list(entry.shape)} in the "
                f"shards, {info['dtype']}{info['shape']} in the sidecar"
            )
        if not tiles(entry.chunks, tuple(info["shape"])):
            raise IntegrityError(f"{shards}: the shards of {name!r} do not cover it exactly once")
