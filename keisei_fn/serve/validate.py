"""Validation after loading: is a model fit to be served at all?

:func:`validate_model` checks that every parameter and buffer is finite, that the forward pass
on the suite's positions (``keisei_fn.serve.suite``) gives finite logits and values of the
right shapes, that every position's policy keeps some probability on its legal moves (a legal
mass of exactly 0 means the legal logits underflowed: the policy cannot pick a move) and that
the value head stays within :data:`MAX_ABS_VALUE` (Keisei's value head predicts a game result
in [-1, 1] without a tanh; far beyond it the head is broken). ``export_model`` refuses a model
whose report is not ok, and so do the USI engine and matches.

Example:
    >>> from keisei_fn import ModelSpec, build_model
    >>> report = validate_model(build_model(ModelSpec(model_type="testmodel"), seed=0))
    >>> report.ok, report.problems
    (True, ())
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from keisei_fn.paths import PathArg
from keisei_fn.serve.compare import predict
from keisei_fn.serve.suite import SuitePosition, encode_suite

__all__ = ["MAX_ABS_VALUE", "ValidationReport", "validate_model"]

#: A value head output beyond this (in absolute value) is not sane.
MAX_ABS_VALUE = 100.0
#: How many non-finite tensors a report names one by one (the rest are counted).
_NAMED = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidationReport:
    """What :func:`validate_model` found.

    Attributes:
        problems: what is wrong, one sentence each; empty when the model is fit to serve.
        positions: positions the forward pass ran on.
        min_legal_mass, mean_legal_mass: probability the policy puts on legal moves.
        min_value, max_value: the value head's range on the positions.
    """

    problems: tuple[str, ...]
    positions: int
    min_legal_mass: float
    mean_legal_mass: float
    min_value: float
    max_value: float

    @property
    def ok(self) -> bool:
        """True when there is no problem."""
        return not self.problems

    def to_json(self) -> dict[str, object]:
        """The report as a JSON object."""
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "positions": self.positions,
            "min_legal_mass": self.min_legal_mass,
            "mean_legal_mass": self.mean_legal_mass,
            "min_value": self.min_value,
            "max_value": self.max_value,
        }


def validate_model(
    model_or_source: nn.Module | PathArg,
    positions: Iterable[SuitePosition | str] | None = None,
) -> ValidationReport:
    """Check that a model is fit to serve (see the module docstring).

    Args:
        model_or_source: an ``nn.Module`` (``forward(obs) -> (logits, value)``), or a path
            ``load_model`` takes (a checkpoint, a run directory, an export bundle).
        positions: suite positions or SFENs; None: the default suite.

    Returns:
        The report (``report.ok``, ``report.problems``); a broken model is reported, not
        raised.

    Raises:
        every error of ``load_model`` for a path (a corrupt file is not a model to judge).
    """
    if isinstance(model_or_source, nn.Module):
        model = model_or_source
    else:
        from keisei_fn.store.checkpoints import load_model

        model = load_model(model_or_source)[0]
    broken = [
        f"{name} has {int((~torch.isfinite(t)).sum())} non-finite values of {t.numel()}"
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    problems = broken[:_NAMED]
    if len(broken) > _NAMED:
        problems.append(f"and {len(broken) - _NAMED} more tensors are not finite")
    _, obs, masks = encode_suite(positions)
    try:
        logits, values = predict(model, obs)
    except Exception as exc:  # any failure of the model's own code is a finding, not a crash
        return ValidationReport(
            problems=(*problems, f"the forward pass failed: {type(exc).__name__}: {exc}"),
            positions=int(obs.shape[0]),
            min_legal_mass=math.nan,
            mean_legal_mass=math.nan,
            min_value=math.nan,
            max_value=math.nan,
        )
    if logits.shape[1] != masks.shape[1]:
        problems.append(f"the policy has {logits.shape[1]} actions, {masks.shape[1]} expected")
        legal_mass = torch.full((obs.shape[0],), math.nan)
    else:
        legal_mass = (torch.softmax(logits, dim=-1) * masks).sum(dim=-1)
    bad_logits = int((~torch.isfinite(logits)).any(dim=-1).sum())
    if bad_logits:
        problems.append(f"the policy logits are not finite on {bad_logits} positions")
    if not bool(torch.isfinite(values).all()):
        problems.append(f"the value is not finite on {int((~torch.isfinite(values)).sum())} "
                        "positions")  # fmt: skip
    elif float(values.abs().max()) > MAX_ABS_VALUE:
        problems.append(
            f"the value reaches {float(values.abs().max()):.4g}, beyond ±{MAX_ABS_VALUE:g}"
        )
    if not bad_logits and bool((legal_mass <= 0).any()):
        problems.append(
            f"the policy puts no probability on the legal moves of "
            f"{int((legal_mass <= 0).sum())} positions"
        )
    return ValidationReport(
        problems=tuple(problems),
        positions=int(obs.shape[0]),
        min_legal_mass=float(legal_mass.min()),
        mean_legal_mass=float(legal_mass.mean()),
        min_value=float(values.min()),
        max_value=float(values.max()),
    )
