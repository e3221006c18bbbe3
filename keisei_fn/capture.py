"""The bridges between live torch objects and TrainState snapshots: ``capture`` and ``restore_``.

``capture`` clones every tensor (``state_dict()`` returns live tensors that the next optimizer
step would change), keeping tensors that share storage shared (tied weights). ``restore_`` checks
every key, shape and dtype first and reports all mismatches in one ``StateMismatchError``, then
hands torch *copies* (``Optimizer.load_state_dict`` keeps the tensors it is given, so one step
would otherwise change the snapshot), and restores the RNGs last.

A ``LambdaLR``/``MultiplicativeLR`` saves no functions: rebuild the scheduler with the same
lambdas before ``restore_``.

Example:
    >>> import torch
    >>> from keisei_fn import ModelSpec, build_model, capture, restore_
    >>> spec = ModelSpec(model_type="testmodel")
    >>> model = build_model(spec, seed=0)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> state = capture(spec, model, opt, step=10)
    >>> restore_(state, build_model(spec), torch.optim.Adam(model.parameters()))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from keisei_fn.distributed import gather_rng, rank_rng, reseed_rank
from keisei_fn.errors import StateMismatchError
from keisei_fn.nets import canonical_state_dict, unwrap_model
from keisei_fn.rng import Generators, capture_rng, restore_rng_, rng_problems
from keisei_fn.spec import ModelSpec
from keisei_fn.staging import PinnedBuffers, copy_to_device, copy_to_host
from keisei_fn.state import (
    GameStats,
    TrainState,
    describe_tensor,
    iter_tensors,
    layout_problems,
    thaw,
    view_key,
)

__all__ = [
    "capture",
    "optimizer_problems",
    "restore_",
    "restore_loop_state_",
]

log = logging.getLogger(__name__)

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau

_EXTRA_STATE = "_extra_state"  # the state_dict key suffix of Module.get_extra_state()

# Optimizer state entries that always have their parameter's shape (SGD, Adam(W), RMSprop, ...).
_PARAM_SHAPED = frozenset(
    {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "square_avg",
        "sum",
        "acc_delta",
        "grad_avg",
        "ax",
        "prev",
        "step_size",
        "exp_inf",
        "mu_product",
    }
)


#: The tensor types ``capture`` copies to the host (a subclass may not be plain memory).
_PLAIN = (torch.Tensor, nn.Parameter)


class _Cloner:
    """Clones tensors contiguously, once per distinct view, so shared storage stays shared.
    Plain CUDA tensors are copied to (page-locked) host memory, all at once by :meth:`stage`."""

    def __init__(self, staging: PinnedBuffers | None = None) -> None:
        self._seen: dict[tuple[Any, ...], torch.Tensor] = {}
        self._staging = staging

    def stage(self, values: Iterable[Any]) -> None:
        """Copy every distinct view of a CUDA tensor in ``values`` to the host in one batch
        (see ``keisei_fn.staging.copy_to_host``); ``__call__`` then hands out those copies."""
        pending: dict[tuple[Any, ...], torch.Tensor] = {}
        for value in values:
            for _, tensor in iter_tensors(value):
                if tensor.device.type != "cuda" or type(tensor) not in _PLAIN:
                    continue  # tensor subclasses (DTensor, ...) are cloned as they are
                key = view_key(tensor)
                if key is not None and key not in self._seen:
                    pending.setdefault(key, tensor.detach())
        if pending:
            hosts = copy_to_host(list(pending.values()), self._staging)
            self._seen.update(zip(pending, hosts, strict=True))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            key = view_key(value)
            if key is None:  # no storage to share (empty)
                staged = value.device.type == "cuda" and type(value) in _PLAIN
                return value.to("cpu", copy=True) if staged else value.clone()
            if key not in self._seen:
                self._seen[key] = value.clone(memory_format=torch.contiguous_format)
            return self._seen[key]
        if isinstance(value, Mapping):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        return value


def capture(
    spec: ModelSpec | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step: int,
    episodes: int = 0,
    stats: GameStats | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
    generators: Generators | None = None,
    staging: PinnedBuffers | None = None,
) -> TrainState:
    """Snapshot a live training run into an immutable :class:`TrainState`.

    CUDA tensors are copied into page-locked host memory (``keisei_fn.staging.copy_to_host``:
    non-blocking copies on a side stream ordered after the current stream), so the snapshot
    costs no GPU memory; the call returns once the copies are complete, so training steps
    queued after it cannot reach the snapshot. CPU tensors, and tensor subclasses such as
    DTensor, are cloned where they are.

    Args:
        spec: the model's architecture, or None for an arbitrary user model.
        model: the model; torch.compile and DDP wrappers are stripped (canonical keys).
        optimizer: its optimizer, if any.
        scheduler: an LR scheduler (its ``state_dict`` is stored as JSON).
        scaler: a ``GradScaler``; a disabled one is stored as None.
        step: completed timesteps (the checkpoint's name uses it).
        episodes: completed episodes.
        stats: game results.
        extra: JSON-able user state (e.g. ``{"elo_state": ..., "metrics_history": ...}``).
        rng: capture Python's, NumPy's, torch's (and CUDA's) global RNG states.
        generators: user-held generators to capture, by name (see ``keisei_fn.rng``).
        staging: where the host copies of CUDA tensors go, for reuse across snapshots (e.g.
            ``AsyncSaver.staging``); a buffer is reused only once no tensor of an earlier
            snapshot in it is alive. None: a fresh page-locked buffer.

    Returns:
        The snapshot (CPU tensors); later training steps do not change it.

    Raises:
        StateMismatchError: for invalid counters or unsupported generator types.
    """
    clone = _Cloner(staging)
    model_state = canonical_state_dict(unwrap_model(model).state_dict())
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    enabled_scaler = scaler is not None and scaler.is_enabled()
    scaler_state = scaler.state_dict() if enabled_scaler and scaler is not None else None
    extra_state = dict(extra or {})
    clone.stage([model_state, optimizer_state, scheduler_state, scaler_state, extra_state])
    return TrainState(
        spec=spec,
        step=step,
        episodes=episodes,
        stats=stats if stats is not None else GameStats(),
        model=clone(model_state),
        optimizer=clone(optimizer_state),
        scheduler=clone(scheduler_state),
        scaler=clone(scaler_state),
        rng=gather_rng(capture_rng(generators)) if rng else None,
        extra=clone(extra_state),
    )


def optimizer_problems(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    """Every way a saved optimizer ``state_dict`` does not fit a live optimizer: group and
    parameter counts, and state tensors whose shape differs from their parameter's (torch
    would load those silently).

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
        >>> optimizer_problems(opt.state_dict(), opt)
        []
    """
    groups = saved.get("param_groups", ())
    live_groups = optimizer.param_groups
    if len(groups) != len(live_groups):
        return [
            f"optimizer: state has {len(groups)} param groups, optimizer has {len(live_groups)}"
        ]
    problems = []
    params: dict[int, torch.Tensor] = {}
    for i, (group, live_group) in enumerate(zip(groups, live_groups, strict=True)):
        if len(group["params"]) != len(live_group["params"]):
            problems.append(
                f"optimizer param group {i}: state has {len(group['params'])} params, "
                f"optimizer has {len(live_group['params'])}"
            )
            continue
        params.update(zip(group["params"], live_group["params"], strict=True))
    if problems:
        return problems
    live_state = optimizer.state
    for index, entries in saved.get("state", {}).items():
        if index not in params:
            problems.append(f"optimizer state for param {index!r}, which no param group lists")
            continue
        param = params[index]
        current = live_state.get(param, {})
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            where = f"optimizer state[{index}][{name!r}]"
            if name in _PARAM_SHAPED and value.shape != param.shape:
                problems.append(
                    f"{where}: state has {describe_tensor(value)}, "
                    f"param is {describe_tensor(param)}"
                )
            elif isinstance(current.get(name), torch.Tensor) and (
                current[name].shape != value.shape
            ):
                problems.append(
                    f"{where}: state has {describe_tensor(value)}, "
                    f"live {describe_tensor(current[name])}"
                )
    return problems


def restore_(
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rng: bool = True,
    generators: Generators | None = None,
) -> None:
    """Load a snapshot into live objects, in place. The snapshot itself is never changed.

    Args:
        state: the snapshot.
        model: the model (wrappers are stripped); every key, shape and dtype must match.
        optimizer: the optimizer to restore, if any (state lands on its parameters' devices).
        scheduler: the LR scheduler; left fresh with a warning when the state holds none.
        scaler: the GradScaler; an enabled one is left fresh with a warning when the state holds
            none (e.g. a CPU-saved run resumed on a GPU).
        rng: restore the RNG states (last); a state without RNG part leaves the RNGs alone.
        generators: user-held generators to restore, by the names used at capture.

    Raises:
        StateMismatchError: before anything is changed: a line per kind of difference of the
            model (missing and unexpected keys, other shapes and dtypes: how many, the first
            few named; see ``keisei_fn.state.layout_problems``), and every optimizer
            difference and generator that cannot be restored.
    """
    net = unwrap_model(model)
    problems = layout_problems(state.model, net.state_dict())
    if optimizer is not None and state.optimizer is None:
        problems.append("an optimizer was given, but the state holds no optimizer state")
    elif optimizer is not None and state.optimizer is not None:
        problems += optimizer_problems(state.optimizer, optimizer)
    own_rng = rank_rng(state.rng) if rng and state.rng is not None else None
    if own_rng is not None:
        problems += rng_problems(own_rng, generators)
    if problems:
        raise StateMismatchError.listing(
            f"state (step {state.step}) does not fit the live objects", problems
        )
    # load_state_dict copies into parameters and buffers, but hands each ``_extra_state`` over
    # as it is (a module's set_extra_state may keep it): those get copies. Host tensors bound
    # for CUDA go there first, through page-locked staging.
    live = net.state_dict()
    moved = _on_devices(
        (tensor, live[key].device)
        for key, tensor in state.model.items()
        if key.rsplit(".", 1)[-1] != _EXTRA_STATE
    )
    model_state = {
        key: moved.get(id(tensor), tensor)
        if key.rsplit(".", 1)[-1] != _EXTRA_STATE
        else tensor.clone()
        for key, tensor in state.model.items()
    }
    net.load_state_dict(model_state, strict=True)
    del model_state, moved
    if optimizer is not None and state.optimizer is not None:
        optimizer.load_state_dict(_optimizer_copy(state.optimizer, optimizer))
    restore_loop_state_(
        f"state (step {state.step})",
        step=state.step,
        scheduler=scheduler,
        scheduler_state=state.scheduler,
        scaler=scaler,
        scaler_state=state.scaler,
        rng_state=state.rng if rng else None,
        generators=generators,
    )


def _on_devices(pairs: Iterable[tuple[torch.Tensor, torch.device]]) -> dict[int, torch.Tensor]:
    """``id(tensor)`` → a copy on its CUDA target device, for each host tensor bound for one
    (through page-locked staging, one batch per device); other tensors are left out."""
    bound: dict[torch.device, dict[int, torch.Tensor]] = {}
    for tensor, device in pairs:
        if device.type == "cuda" and tensor.device.type == "cpu":
            bound.setdefault(device, {})[id(tensor)] = tensor
    moved: dict[int, torch.Tensor] = {}
    for device, tensors in bound.items():
        moved.update(zip(tensors, copy_to_device(list(tensors.values()), device), strict=True))
    return moved


def _optimizer_copy(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """A plain copy of a saved optimizer ``state_dict`` for ``load_state_dict`` (which keeps
    the tensors it is given): the state tensors torch would move to their parameter's CUDA
    device (all but ``step``, which torch places itself) are copied there directly, the rest
    cloned. ``step`` tensors are handed over on the CPU whatever device they were loaded to
    (``load_state(map_location="cuda")``): torch keeps a given ``step`` where it is, and a
    non-capturable optimizer with CUDA ``step`` tensors would synchronise on every step of
    every parameter; a capturable or fused one moves it to its parameter's device itself.
    Assumes :func:`optimizer_problems` found nothing."""
    params: dict[Any, torch.Tensor] = {}
    for group, live_group in zip(
        saved.get("param_groups", ()), optimizer.param_groups, strict=True
    ):
        params.update(zip(group["params"], live_group["params"], strict=True))
    tensors = [
        (name, value, params[index].device)
        for index, entries in saved.get("state", {}).items()
        for name, value in entries.items()
        if isinstance(value, torch.Tensor)
    ]
    moved = _on_devices((value, device) for name, value, device in tensors if name != "step")
    steps = {id(value) for name, value, _ in tensors if name == "step"}

    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) in moved:
            return moved[id(t)]
        return t.to("cpu", copy=True) if id(t) in steps else t.clone()

    return thaw(saved, on_tensor=copy)


def restore_loop_state_(
    source: str,
    *,
    step: int,
    scheduler: Scheduler | None,
    scheduler_state: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    scaler_state: Mapping[str, Any] | None,
    rng_state: Mapping[str, Any] | None,
    generators: Generators | None = None,
) -> None:
    """Restore an LR scheduler, a GradScaler and this rank's RNGs from saved state, in place:
    what a restore does after the model and optimizer (``restore_`` and the sharded load share
    it). The saved state is never changed: torch gets copies of its tensors.

    Args:
        source: what the state comes from, for warnings (e.g. ``"checkpoint checkpoint_ts10"``).
        step: the saved step (the seed when the RNGs are reseeded).
        scheduler: the LR scheduler, or None; left fresh with a warning when
            ``scheduler_state`` is None.
        scheduler_state: its saved ``state_dict``, or None.
        scaler: the GradScaler, or None; an enabled one is left fresh with a warning when
            ``scaler_state`` is None (e.g. a CPU-saved run resumed on a GPU); a disabled one is
            left alone.
        scaler_state: its saved ``state_dict``, or None.
        rng_state: the saved RNG state (one process's, or every rank's ``{"world_size",
            "ranks"}``), or None to leave the RNGs alone. Each rank gets its own back; saved
            with another world size, each rank is reseeded from ``(step, rank)`` with a warning.
        generators: user-held generators to restore, by the names used at capture.

    Raises:
        StateMismatchError: a generator that cannot be restored (``restore_`` checks this
            before it changes anything).

    Example:
        >>> import torch
        >>> from keisei_fn.rng import capture_rng
        >>> saved, expected = capture_rng(), torch.rand(1)
        >>> restore_loop_state_("a test", step=1, scheduler=None, scheduler_state=None,
        ...     scaler=None, scaler_state=None, rng_state=saved)
        >>> bool(torch.rand(1) == expected)
        True
    """
    if scheduler is not None:
        if scheduler_state is None:
            log.warning("%s holds no scheduler state: scheduler left fresh", source)
        else:
            scheduler.load_state_dict(thaw(scheduler_state, on_tensor=torch.Tensor.clone))
    if scaler is not None and scaler.is_enabled():
        if scaler_state is None:
            log.warning("%s holds no GradScaler state: scaler left fresh", source)
        else:
            scaler.load_state_dict(thaw(scaler_state, on_tensor=torch.Tensor.clone))
    if rng_state is None:
        return
    own = rank_rng(rng_state)
    if own is not None:
        restore_rng_(own, generators)
    else:
        reseed_rank(rng_state, step=step)
