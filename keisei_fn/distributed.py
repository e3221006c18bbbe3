"""Replicated (DDP) training support: one rank writes, every rank gets the same result, and
every rank's RNG state is captured and restored to that rank.

Without ``torch.distributed`` initialised (or with one process) every function here is the
identity of the single-process behaviour. With several ranks:

- ``capture`` gathers every rank's RNG state into the snapshot (``{"world_size", "ranks"}``);
- ``save_state``/``save_final_model``/``prune`` run on rank 0 only; the others wait until the
  checkpoint is committed and return the same result (or raise the same error);
- ``restore_`` gives each rank its own RNG state; resuming with a different world size loads
  model and optimizer, logs a warning and reseeds each rank deterministically from
  ``(step, rank)`` — never silently wrong.

``agreed``/``gathered``/``on_rank_zero`` are the collectives the store builds on: whatever
fails on one rank fails on every rank, so no rank waits forever for the others.

The collectives exchange Python objects between the job's own ranks in memory
(``torch.distributed`` pickles them for transport); nothing is ever unpickled from a file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "agreed",
    "gather_rng",
    "gathered",
    "on_rank_zero",
    "rank_and_world",
    "rank_rng",
    "reseed_rank",
]

log = logging.getLogger("keisei_fn.distributed")

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True, slots=True)
class _WireTensor:
    """A CPU tensor as plain bytes for object collectives (torch refuses tensors there)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _to_wire(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return _WireTensor(
            str(value.dtype).removeprefix("torch."), tuple(value.shape), flat.numpy().tobytes()
        )
    if isinstance(value, Mapping):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_wire(v) for v in value)
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, _WireTensor):
        raw = torch.frombuffer(bytearray(value.data), dtype=torch.uint8)
        return raw.view(getattr(torch, value.dtype)).reshape(value.shape)
    if isinstance(value, Mapping):
        return {k: _from_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_from_wire(v) for v in value)
    return value


def gather_rng(rng: dict[str, Any]) -> dict[str, Any]:
    """Every rank's RNG state (a collective: call it on every rank), or ``rng`` alone."""
    _, world = rank_and_world()
    if world == 1:
        return rng
    states: list[Any] = [None] * world
    dist.all_gather_object(states, _to_wire(rng))
    return {"world_size": world, "ranks": [_from_wire(s) for s in states]}


def _saved_world(rng: Mapping[str, Any]) -> int:
    return int(rng.get("world_size", 1)) if "ranks" in rng else 1


def rank_rng(rng: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """This rank's part of a captured RNG state; None when it was captured with another world
    size (or is a single-process state restored into several ranks, which would give every
    rank the same random streams): then see :func:`reseed_rank`."""
    rank, world = rank_and_world()
    if _saved_world(rng) != world:
        return None
    return rng["ranks"][rank] if "ranks" in rng else rng


def reseed_rank(rng: Mapping[str, Any], *, step: int) -> None:
    """Seed Python, NumPy and torch from ``(step, rank)`` after a world-size change, with a
    warning: deterministic, and different on every rank."""
    rank, world = rank_and_world()
    seed = (step * 1_000_003 + rank) % 2**32
    log.warning(
        "RNG state was captured with %d rank(s), resuming with %d: not restored; rank %d "
        "reseeded deterministically with %d",
        _saved_world(rng),
        world,
        rank,
        seed,
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _wire_error(exc: Exception) -> tuple[type[Exception], str]:
    """An error as (class, message) that every rank can rebuild: its nearest class of ours or a
    builtin one (they all take a single message)."""
    for kind in type(exc).__mro__:
        if (
            kind.__module__ in ("keisei_fn.errors", "builtins")
            and issubclass(kind, Exception)
            and not issubclass(kind, UnicodeError)
        ):
            return kind, str(exc)
    return RuntimeError, f"{type(exc).__name__}: {exc}"


def agreed(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and return this rank's result — a collective.

    When ``fn`` fails anywhere, every rank raises the error of the lowest failing rank: that
    rank its own exception, the others its type and message (prefixed ``"rank R: "``), so every
    rank takes the same path (a fallback or a raise) and none is left waiting in a later
    collective. Only the outcome travels between the ranks, not the result.

    Example:
        >>> agreed(lambda: 42)
        42
    """
    _, world = rank_and_world()
    if world == 1:
        return fn()
    failure: Exception | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # re-raised on every rank below
        failure = exc
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, None if failure is None else _wire_error(failure))
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            if rank == dist.get_rank() and failure is not None:
                raise failure
            kind, message = outcome
            raise kind(f"rank {rank}: {message}")
    return cast(T, result)


def gathered(fn: Callable[[], T]) -> list[T]:
    """:func:`agreed`, then every rank's result in rank order (results travel between the
    ranks: keep them small and plain).

    Example:
        >>> gathered(lambda: "only rank")
        ['only rank']
    """
    value = agreed(fn)
    _, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def on_rank_zero(fn: Callable[[], T], *, others: Callable[[], T] | None = None) -> T:
    """Run ``fn`` on rank 0 only; once it finished, every rank returns (or raises) alike — a
    collective: call it on every rank.

    Args:
        fn: the work, done by rank 0.
        others: how the other ranks get the result after rank 0 succeeded (e.g. read the
            committed checkpoint's meta back); by default rank 0's result is sent to them.

    Raises:
        Rank 0's error, on every rank (see :func:`agreed`).

    Example:
        >>> on_rank_zero(lambda: 42)
        42
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    if others is None:
        return cast(T, gathered(lambda: fn() if rank == 0 else None)[0])
    result = agreed(lambda: fn() if rank == 0 else None)
    return cast(T, result) if rank == 0 else others()
