"""The health gate: is a training state fit to be a resume point or a published model?

:func:`check_health` is pure: it looks at a :class:`~keisei_fn.state.TrainState` (and the
previous checkpoint's, for the norm jump) and returns the problems it finds, empty when the
state is healthy. Three checks, each switched by a :class:`HealthPolicy` field:

- **non-finite values**: a NaN or an infinity in any floating tensor of the model (parameters
  and buffers, such as BatchNorm's running statistics) or of the optimizer's state (Adam's
  moments, momentum buffers, float step counters);
- **a parameter-norm jump**: the L2 norm of all the model's floating tensors grew or shrank by
  more than ``max_norm_ratio`` since the previous checkpoint (skipped without one);
- **a saturated value head**: the network, built from ``state.spec`` with ``build_model``, gives
  a value of magnitude ``>= value_bound`` on at least ``saturated_fraction`` of the evaluation
  positions (Keisei's value head has no tanh: its targets lie in [-1, 1], so a healthy head
  stays near that range). Skipped, with an INFO log line, for a state without a spec (an
  arbitrary user model), a spec whose model type has no builder or whose feature set has no
  encoder, and a model state that does not fit the spec.

``Checkpointer(health=...)`` and ``AsyncSaver(health=...)`` run it on every state they save
and record the outcome in the checkpoint's sidecar (``CheckpointMeta.health``); see
``keisei_fn.store`` for what an unhealthy mark changes.

Example:
    >>> import torch
    >>> from keisei_fn.state import TrainState
    >>> state = TrainState(spec=None, step=1, model={"w": torch.tensor([1.0, float("nan")])})
    >>> [str(p) for p in check_health(state)]
    ['non_finite: model w has 1 NaN of 2 elements']
    >>> check_health(state.replace(model={"w": torch.ones(2)}))
    ()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from keisei_fn.errors import SpecError
from keisei_fn.state import TrainState, iter_tensors

__all__ = [
    "EVALUATION_POSITIONS",
    "HealthPolicy",
    "HealthProblem",
    "check_health",
    "parameter_norm",
]

log = logging.getLogger("keisei_fn.health")

#: The default evaluation positions: the start, two openings, a bishop exchange with a bishop in
#: hand (White to move) and a bare endgame.
EVALUATION_POSITIONS: tuple[str, ...] = (
    "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1",
    "lnsgkgsnl/1r5b1/pppppp1pp/6p2/9/2P6/PP1PPPPPP/1B5R1/LNSGKGSNL b - 3",
    "lnsgkgsnl/1r5b1/p1ppppppp/9/1p5P1/9/PPPPPPP1P/1BG4R1/LNS1KGSNL w - 6",
    "lnsgkg1nl/1r5s1/pppppp1pp/6p2/5B3/2P6/PP1PPPPPP/7R1/LNSGKGSNL w b 6",
    "4k4/9/9/9/9/9/9/9/4K4 b 2P 1",
)

Check = Literal["non_finite", "norm_jump", "value_saturated", "check_failed"]
#: How many tensors a non-finite problem names before it says "and N more".
_NAMED = 5


@dataclass(frozen=True, slots=True)
class HealthProblem:
    """One thing :func:`check_health` found wrong.

    Attributes:
        check: ``"non_finite"``, ``"norm_jump"`` or ``"value_saturated"``; the savers record
            ``"check_failed"`` when the check itself raised (the state is saved, not trusted).
        detail: what, for people.

    ``str()`` is ``"<check>: <detail>"``, the form recorded in a sidecar.

    Example:
        >>> str(HealthProblem("norm_jump", "parameter norm 40 is 20x the previous 2"))
        'norm_jump: parameter norm 40 is 20x the previous 2'
    """

    check: Check
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


def _positive(name: str, value: Any, *, above_one: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= (1 if above_one else 0)
    ):
        bound = "> 1" if above_one else "> 0"
        raise SpecError(f"HealthPolicy.{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPolicy:
    """What :func:`check_health` counts as unhealthy. ``Checkpointer(health=True)`` uses the
    defaults.

    Args:
        finite: flag any NaN or infinity in the model's or the optimizer's floating tensors.
        max_norm_ratio: flag a parameter norm more than this factor above, or below, the
            previous checkpoint's (None: no norm check). The default 4.0 is far beyond what
            one checkpoint interval of a stable run moves (weight decay and Adam change the
            norm by a few percent), and well below a divergence's jump.
        value_bound: a value of at least this magnitude is saturated (targets lie in [-1, 1]).
        saturated_fraction: flag the value head when at least this fraction of the evaluation
            positions is saturated (in (0, 1]).
        positions: the evaluation positions, as SFENs (empty: no value check); checked (and
            cshogi imported) when the policy is made.

    Raises:
        SpecError: for a bound or ratio that is not a finite number above its minimum, or a
            fraction outside (0, 1].
        InvalidPositionError: for a malformed SFEN.

    Example:
        >>> HealthPolicy(max_norm_ratio=10.0).max_norm_ratio
        10.0
    """

    finite: bool = True
    max_norm_ratio: float | None = 4.0
    value_bound: float = 3.0
    saturated_fraction: float = 0.9
    positions: tuple[str, ...] = EVALUATION_POSITIONS

    def __post_init__(self) -> None:
        if self.max_norm_ratio is not None:
            _positive("max_norm_ratio", self.max_norm_ratio, above_one=True)
        _positive("value_bound", self.value_bound)
        _positive("saturated_fraction", self.saturated_fraction)
        if self.saturated_fraction > 1:
            raise SpecError(
                f"HealthPolicy.saturated_fraction must be in (0, 1], got {self.saturated_fraction}"
            )
        if isinstance(self.positions, str) or not all(isinstance(p, str) for p in self.positions):
            raise SpecError("HealthPolicy.positions must be a sequence of SFEN strings")
        object.__setattr__(self, "positions", tuple(self.positions))
        if self.positions:
            from keisei_fn.sfen import board_from_sfen

            for sfen in self.positions:
                board_from_sfen(sfen)  # raises InvalidPositionError

    def replace(self, **changes: Any) -> HealthPolicy:
        """Return a copy with ``changes`` applied (checked again)."""
        return replace(self, **changes)


def _floating(value: Any, part: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every floating tensor of a state part, named for people."""
    for path, tensor in iter_tensors(value):
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        if tensor.is_floating_point():
            yield " ".join([part, ".".join(str(p) for p in path)]), tensor.detach()


def _norm(tensor: torch.Tensor) -> float:
    """A tensor's L2 norm: one pass in float32 (float64 for float64), again in float64 only
    when a finite tensor's norm overflowed float32; ``nan``/``inf`` for non-finite values."""
    if tensor.numel() == 0:
        return 0.0
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    norm = float(torch.linalg.vector_norm(tensor, dtype=wide))
    if math.isinf(norm) and bool(torch.isfinite(tensor).all()):
        norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
    return norm


def _model_norms(state: TrainState) -> dict[str, tuple[torch.Tensor, float]]:
    """Name → (tensor, norm) of the model's floating tensors."""
    return {name: (t, _norm(t)) for name, t in _floating(state.model, "model")}


def _total(norms: dict[str, tuple[torch.Tensor, float]]) -> float:
    return math.sqrt(sum(norm * norm for _, norm in norms.values()))


def parameter_norm(state: TrainState) -> float:
    """The L2 norm of all the model's floating tensors (parameters and buffers), in float64.

    Returns:
        The norm; ``nan`` or ``inf`` when a tensor holds a non-finite value.

    Example:
        >>> import torch
        >>> parameter_norm(TrainState(spec=None, step=1, model={"w": torch.tensor([3.0, 4.0])}))
        5.0
    """
    return _total(_model_norms(state))


def _non_finite(
    state: TrainState, model: dict[str, tuple[torch.Tensor, float]]
) -> HealthProblem | None:
    found = []
    optimizer = ((name, (t, _norm(t))) for name, t in _floating(state.optimizer, "optimizer"))
    for name, (tensor, norm) in [*model.items(), *optimizer]:
        if math.isfinite(norm):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if not (nan or inf):  # finite values whose norm overflows even float64
            continue
        counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
        found.append(f"{name} has {counts} of {tensor.numel()} elements")
    if not found:
        return None
    more = f"; and {len(found) - _NAMED} more tensors" if len(found) > _NAMED else ""
    return HealthProblem("non_finite", "; ".join(found[:_NAMED]) + more)


def _norm_jump(norm: float, previous: float, ratio: float) -> HealthProblem | None:
    if not (math.isfinite(norm) and math.isfinite(previous)) or previous <= 0 or norm <= 0:
        return None  # nothing to compare: non-finite values are the finite check's
    factor = norm / previous
    if 1 / ratio <= factor <= ratio:
        return None
    return HealthProblem(
        "norm_jump",
        f"parameter norm {norm:.6g} is {factor:.3g}x the previous checkpoint's {previous:.6g} "
        f"(allowed: {1 / ratio:.3g}x to {ratio:.3g}x)",
    )


def _values(state: TrainState, positions: tuple[str, ...]) -> torch.Tensor | None:
    """The value head's outputs on ``positions``, or None (logged) when they cannot be had."""
    from keisei_fn.nets import build_model
    from keisei_fn.sfen import board_from_sfen

    if state.spec is None:
        log.info("health: no value-head check for a state without a spec")
        return None
    try:
        encoder = state.spec.feature_spec.load_encoder()
        model = build_model(state.spec, device="meta")
        model.load_state_dict(dict(state.model), strict=True, assign=True)
        weights = [t for t in model.state_dict().values() if t.is_floating_point()]
        if not weights or any(t.is_meta for t in model.state_dict().values()):
            raise SpecError("the model state does not fill the network")
        obs = torch.stack([encoder(board_from_sfen(sfen)) for sfen in positions])
        model.eval()
        with torch.no_grad():
            _, value = model(obs.to(device=weights[0].device, dtype=weights[0].dtype))
    except (SpecError, RuntimeError) as exc:  # not the state's health: a mismatch, a dtype
        log.info("health: no value-head check: %s", exc)
        return None
    values: torch.Tensor = value.reshape(-1).float()
    return values


def _saturated(state: TrainState, policy: HealthPolicy) -> HealthProblem | None:
    values = _values(state, policy.positions)
    if values is None:
        return None
    saturated = ~(values.abs() < policy.value_bound)  # NaN counts as saturated
    count = int(saturated.sum())
    if count < policy.saturated_fraction * len(values):
        return None
    shown = ", ".join(f"{v:+.3g}" for v in values.tolist())
    return HealthProblem(
        "value_saturated",
        f"|value| >= {policy.value_bound:g} on {count} of {len(values)} evaluation positions "
        f"({shown})",
    )


def check_health(
    state: TrainState,
    previous: TrainState | float | None = None,
    policy: HealthPolicy | None = None,
) -> tuple[HealthProblem, ...]:
    """The problems of a training state, empty when it is healthy.

    Pure: reads ``state`` (and builds the network on the ``meta`` device, its tensors those of
    the state, for the value check), changes nothing. See the module's documentation for the
    checks.

    Args:
        state: the state to check.
        previous: the previous checkpoint's state, or its :func:`parameter_norm`, for the norm
            jump (None: no norm check).
        policy: what counts as unhealthy (default: ``HealthPolicy()``).

    Returns:
        The problems, in the order non-finite, norm jump, value saturation (the value head is
        not evaluated on a state with non-finite values: a NaN network's values say nothing
        more).

    Example:
        >>> import torch
        >>> state = TrainState(spec=None, step=2, model={"w": torch.full((4,), 30.0)})
        >>> [p.check for p in check_health(state, previous=6.0)]
        ['norm_jump']
    """
    policy = policy if policy is not None else HealthPolicy()
    problems = []
    norms = _model_norms(state)
    if policy.finite and (found := _non_finite(state, norms)) is not None:
        problems.append(found)
    if policy.max_norm_ratio is not None and previous is not None:
        before = previous if isinstance(previous, int | float) else parameter_norm(previous)
        jump = _norm_jump(_total(norms), float(before), policy.max_norm_ratio)
        if jump is not None:
            problems.append(jump)
    finite = not problems or problems[0].check != "non_finite"
    if policy.positions and finite and (found := _saturated(state, policy)) is not None:
        problems.append(found)
    return tuple(problems)
