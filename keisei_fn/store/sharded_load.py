"""Loading a sharded checkpoint: into a live FSDP2 job on any number of ranks (resharding),
or in full, as one TrainState, in one process.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from keisei_fn.capture import Scheduler, restore_loop_state_
from keisei_fn.codec import DTYPES_BY_NAME, decode_json, stored_layout, tensor_name
from keisei_fn.distributed import agreed, rank_and_world
from keisei_fn.errors import StateMismatchError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg
from keisei_fn.state import TrainState, describe_layout, layout_problems, tensor_layout
from keisei_fn.store.names import RESUME_PREFIX
from keisei_fn.store.sharded_check import Checked, first_valid, prepare
from keisei_fn.store.sharded_codec import decode_full, flatten
from keisei_fn.store.sharded_dcp import live_state, local_path, read_shards, set_live_state
from keisei_fn.store.sharded_layout import in_shards

__all__ = ["load_full", "load_sharded", "load_sharded_"]

P = ParamSpec("P")
R = TypeVar("R")


def load_sharded_(
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
    deterministically from ``(step, rank)``. (Its former name ``load_sharded`` still works,
    with a ``DeprecationWarning``.)

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
    rank, world = rank_and_world()

    def check(stem: Path) -> Checked:
        return agreed(lambda: prepare(stem, verify=verify, rank=rank, world=world))

    checked = first_valid(source, prefix, check, alone=False)
    meta, sidecar = checked.meta, checked.sidecar
    model_state, optim_state = agreed(lambda: live_state(model, optimizer))
    targets = agreed(lambda: _targets(sidecar, model_state, optim_state))
    read_shards(targets, checked.shards, alone=False)
    header = sidecar["state"]
    lookup = {**targets, **checked.small}

    def saved(section: str) -> Any:
        return None if header[section] is None else decode_json(header[section], tensors=lookup)

    loaded_model = {key: targets[tensor_name("model", (key,))] for key in header["model"]}
    set_live_state(
        model, optimizer, loaded_model, saved("optimizer") if optimizer is not None else None
    )
    restore_loop_state_(
        f"checkpoint {meta.name}",
        step=meta.step,
        scheduler=scheduler,
        scheduler_state=saved("scheduler"),
        scaler=scaler,
        scaler_state=saved("scaler"),
        rng_state=saved("rng") if rng else None,
    )
    return meta


def _targets(
    sidecar: Mapping[str, Any],
    model_state: Mapping[str, Any],
    optim_state: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """The live tensors DCP loads into, by stored name, after checking that every saved tensor
    has a live counterpart of its dtype and full shape (all problems in one error; the model's
    summarised by ``keisei_fn.state.layout_problems``, as ``restore_`` does)."""
    live, live_optim = flatten(model_state, optim_state)
    header = sidecar["state"]
    recorded = sidecar["tensors"]
    saved_model = {k: stored_layout(recorded[tensor_name("model", (k,))]) for k in header["model"]}
    problems = layout_problems(
        saved_model, model_state, found_name="the checkpoint", expected_name="the model"
    )
    if optim_state is not None and header["optimizer"] is None:
        problems.append("an optimizer was given, but the checkpoint holds no optimizer state")
    elif optim_state is not None:
        problems += _group_problems(header["optimizer"], live_optim)
    targets: dict[str, torch.Tensor] = {}
    for name, info in recorded.items():
        if not in_shards(name):
            continue
        tensor = live.get(name)
        if tensor is None:
            if name.startswith("optimizer/") and optim_state is not None:
                problems.append(f"{name!r}: in the checkpoint, not in the live optimizer's state")
            continue
        saved, have = stored_layout(info), tensor_layout(tensor)
        if saved != have and not name.startswith("model/"):  # the model's: compared above
            problems.append(
                f"{name!r}: checkpoint has {describe_layout(saved)}, live {describe_layout(have)}"
            )
        targets[name] = tensor
    if problems:
        raise StateMismatchError.listing(
            f"checkpoint {sidecar['name']} does not fit the live objects", problems
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


def load_full(stem: PathArg, *, verify: bool) -> tuple[TrainState, CheckpointMeta]:
    """A sharded checkpoint, written by any number of ranks, as one full TrainState, read in
    this process alone (``load_state`` calls it for sharded checkpoints).

    The result is laid out like a single-file checkpoint's and like ``keisei_fn.capture`` of
    the unsharded model: ``model`` is the canonical full state dict, ``optimizer`` is
    ``optimizer.state_dict()``'s layout (params numbered through the param groups), ``rng``
    holds every saved rank's RNG state (``{"world_size", "ranks"}``).

    Args:
        stem: the checkpoint's stem (local).
        verify: check every file's digest.

    Returns:
        ``(state, meta)``.

    Raises:
        SpecError: for a URL (sharded checkpoints are local).
        IntegrityError, IncompleteCheckpointError, UnsupportedFormatError: as ``load_state``.
    """
    checked = prepare(local_path(stem), verify=verify, rank=0, world=1)
    targets = {
        name: torch.empty(tuple(info["shape"]), dtype=DTYPES_BY_NAME[info["dtype"]])
        for name, info in checked.sidecar["tensors"].items()
        if in_shards(name)
    }
    read_shards(targets, checked.shards, alone=True)
    return decode_full(checked.sidecar, {**targets, **checked.small}), checked.meta


def _renamed(new: Callable[P, R], *, old: str) -> Callable[P, R]:
    """``new`` under its former name ``old``: each call warns, then forwards."""

    @functools.wraps(new)
    def alias(*args: P.args, **kwargs: P.kwargs) -> R:
        warnings.warn(
            f"{old} is deprecated: it is called {new.__name__} now (it changes its arguments); "
            "the arguments are the same",
            DeprecationWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated: use :func:`{new.__name__}` (same arguments)."
    return alias


#: The former name of :func:`load_sharded_`; warns (``DeprecationWarning``), then forwards.
load_sharded = _renamed(load_sharded_, old="load_sharded")
