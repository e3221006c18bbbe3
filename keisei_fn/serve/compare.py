"""The behaviour gate: does a model (an export) still play like its reference?

:func:`compare_models` runs both on the same positions (the seeded suite of
``keisei_fn.serve.suite`` by default) and reports, over the *legal* moves of each position:

- ``top1_agreement``: the fraction of positions where both pick the same best move, counted
  only on positions whose reference leads clearly — its best legal logit exceeds the second
  best by more than ``margin`` (:data:`TOP1_MARGIN` nats, i.e. p1/p2 > e^0.1 ≈ 1.105). A
  near-uniform policy flips its argmax under any rounding (a width-8 test net measured 0.978
  top-1 in bf16 from ties alone), so those positions are judged by KL only;
  ``top1_agreement_all`` counts every position and is reported, not gated;
- ``mean_kl`` / ``max_kl``: KL(reference ‖ candidate) of the policies renormalised over the
  legal moves, in nats;
- ``value_mae`` / ``max_value_error``: the value heads' absolute difference;
- ``max_logit_diff``: the largest absolute difference of a legal move's logit.

:data:`DEFAULT_THRESHOLDS` holds the gate of each export dtype, calibrated on the demo's trained
model (``keisei-fn demo``: step 300, legal mass 0.91) and the default-size model (core46, 9
blocks, width 256, seed 0, untrained: its near-uniform policies give no gated position and
figures 10-100x below the demo's), several times above the worst figure measured on either
(in brackets; upcast and reduced-precision compute alike, default suite):

=========  ==============  ==============  ==============  ================
dtype      min top-1       max mean KL     max value MAE   max logit diff
           (gated)         (nats)
=========  ==============  ==============  ==============  ================
float32    1.0 (1.0)       1e-9 (0)        1e-6 (4e-10)    1e-5 (0)
bfloat16   0.97 (1.0)      5e-4 (1.0e-4)   0.02 (0.0026)   0.5 (0.063)
float16    0.99 (1.0)      1e-4 (1.5e-6)   2e-3 (2.9e-4)   0.05 (0.0074)
int8       0.95 (1.0)      5e-3 (6.6e-4)   0.05 (0.0079)   1.0 (0.18)
onnx       1.0 (1.0)       1e-6 (9e-9)     1e-4 (1.4e-7)   1e-3 (4.3e-6)
=========  ==============  ==============  ==============  ================

A float32 bundle stores the source's exact bits; its tolerances only absorb kernels that round
differently for differently aligned memory (4e-10 measured). ``onnx`` is the ONNX tolerance:
onnxruntime (CPU, float32) against the torch model with the same weights. Top-1 over *all*
positions, not gated, measured 0.96-0.99 for bfloat16 and int8 on the demo model: the ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keisei_fn.errors import SpecError
from keisei_fn.paths import PathArg
from keisei_fn.serve.suite import SuitePosition, encode_suite

__all__ = [
    "DEFAULT_THRESHOLDS",
    "TOP1_MARGIN",
    "ComparisonReport",
    "Predictor",
    "Thresholds",
    "compare_models",
    "predict",
]

#: Something that maps observations ``(N, 46, 9, 9)`` float32 to ``(logits (N, A), value
#: (N,))``: an ``nn.Module`` or, e.g., an ONNX session (``keisei_fn.serve.onnx_export``).
Predictor = Callable[[Tensor], tuple[Tensor, Tensor]]

#: Top-1 agreement is gated only on positions whose reference's best legal logit leads the
#: second by more than this (nats).
TOP1_MARGIN = 0.1
#: Positions per forward pass.
BATCH = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """What an export must reach to pass the gate (every bound inclusive).

    Attributes:
        min_top1: top-1 agreement on the positions with a clear best move.
        max_mean_kl: mean KL over legal moves (nats).
        max_value_mae: mean absolute value error.
        max_logit_diff: largest legal logit difference.
    """

    min_top1: float
    max_mean_kl: float
    max_value_mae: float
    max_logit_diff: float

    def to_json(self) -> dict[str, float]:
        """The thresholds as a JSON object."""
        return asdict(self)


#: The gate of each export dtype, and ``"onnx"``: onnxruntime against torch on the same
#: weights (see the module docstring for how they were calibrated).
DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = {
    "float32": Thresholds(min_top1=1.0, max_mean_kl=1e-9, max_value_mae=1e-6, max_logit_diff=1e-5),
    "bfloat16": Thresholds(min_top1=0.97, max_mean_kl=5e-4, max_value_mae=0.02, max_logit_diff=0.5),
    "float16": Thresholds(min_top1=0.99, max_mean_kl=1e-4, max_value_mae=2e-3, max_logit_diff=0.05),
    "int8": Thresholds(min_top1=0.95, max_mean_kl=5e-3, max_value_mae=0.05, max_logit_diff=1.0),
    "onnx": Thresholds(min_top1=1.0, max_mean_kl=1e-6, max_value_mae=1e-4, max_logit_diff=1e-3),
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ComparisonReport:
    """How closely a candidate model follows a reference (see the module docstring).

    Attributes:
        positions: positions compared.
        gated_positions: positions whose reference top-1 margin exceeds ``margin``.
        margin: the top-1 margin used (nats).
        top1_agreement: best-move agreement on the gated positions (1.0 when there are none).
        top1_agreement_all: best-move agreement on every position (not gated).
        mean_kl, max_kl: KL(reference ‖ candidate) over legal moves, nats.
        value_mae, max_value_error: value head differences.
        max_logit_diff: largest legal logit difference.
    """

    positions: int
    gated_positions: int
    margin: float
    top1_agreement: float
    top1_agreement_all: float
    mean_kl: float
    max_kl: float
    value_mae: float
    max_value_error: float
    max_logit_diff: float

    def problems(self, thresholds: Thresholds) -> list[str]:
        """What falls short of ``thresholds`` (a non-finite figure always does); empty: passed.

        Example:
            >>> report = ComparisonReport(positions=2, gated_positions=1, margin=0.1,
            ...     top1_agreement=0.5, top1_agreement_all=0.5, mean_kl=0.01, max_kl=0.02,
            ...     value_mae=0.0, max_value_error=0.0, max_logit_diff=0.1)
            >>> for problem in report.problems(DEFAULT_THRESHOLDS["int8"]):
            ...     print(problem)
            top-1 agreement 0.5 < 0.95 (on 1 positions with a clear best move)
            mean KL 0.01 > 0.005
        """
        checks = [
            (self.top1_agreement >= thresholds.min_top1,
             f"top-1 agreement {self.top1_agreement:.4g} < {thresholds.min_top1:.4g} "
             f"(on {self.gated_positions} positions with a clear best move)"),
            (self.mean_kl <= thresholds.max_mean_kl,
             f"mean KL {self.mean_kl:.4g} > {thresholds.max_mean_kl:.4g}"),
            (self.value_mae <= thresholds.max_value_mae,
             f"value MAE {self.value_mae:.4g} > {thresholds.max_value_mae:.4g}"),
            (self.max_logit_diff <= thresholds.max_logit_diff,
             f"max logit difference {self.max_logit_diff:.4g} > "
             f"{thresholds.max_logit_diff:.4g}"),
        ]  # fmt: skip
        return [message for passed, message in checks if not passed]  # NaN never passes

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object (non-finite figures included: the codec tags them)."""
        return asdict(self)

    def __str__(self) -> str:
        """One line of the figures.

        Example:
            >>> print(ComparisonReport(positions=2, gated_positions=1, margin=0.1,
            ...     top1_agreement=1.0, top1_agreement_all=1.0, mean_kl=0.0, max_kl=0.0,
            ...     value_mae=0.0, max_value_error=0.0, max_logit_diff=0.0))
            top-1 1 (1/2 positions gated; all 1), mean KL 0, value MAE 0, max logit diff 0
        """
        return (
            f"top-1 {self.top1_agreement:.4g} ({self.gated_positions}/{self.positions} "
            f"positions gated; all {self.top1_agreement_all:.4g}), mean KL {self.mean_kl:.3g}, "
            f"value MAE {self.value_mae:.3g}, max logit diff {self.max_logit_diff:.3g}"
        )


def predict(model: Predictor, obs: Tensor, *, batch: int = BATCH) -> tuple[Tensor, Tensor]:
    """A predictor's float32 logits and values on ``obs``, in batches, without gradients
    (an ``nn.Module`` is run in eval mode and put back in the mode it was in).

    Raises:
        SpecError: the outputs do not have the shapes ``(N, A)`` and ``(N,)``.
    """
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
        device = next(iter(module.parameters()), torch.empty(0)).device
    else:
        device = torch.device("cpu")
    logits, values = [], []
    try:
        with torch.inference_mode():
            for start in range(0, obs.shape[0], batch):
                out_logits, out_value = model(obs[start : start + batch].to(device))
                logits.append(out_logits.float().cpu())
                values.append(out_value.float().cpu().reshape(-1))
    finally:
        if module is not None:
            module.train(was_training)
    all_logits, all_values = torch.cat(logits), torch.cat(values)
    if all_logits.dim() != 2 or all_logits.shape[0] != obs.shape[0]:
        raise SpecError(f"a predictor gave logits of shape {tuple(all_logits.shape)}")
    if all_values.shape != (obs.shape[0],):
        raise SpecError(f"a predictor gave values of shape {tuple(all_values.shape)}")
    return all_logits, all_values


def _as_predictor(model: Predictor | PathArg) -> Predictor:
    if callable(model):
        return model
    from keisei_fn.store.checkpoints import load_model

    return load_model(model)[0]


def compare_models(
    reference: Predictor | PathArg,
    candidate: Predictor | PathArg,
    positions: Iterable[SuitePosition | str] | None = None,
    *,
    margin: float = TOP1_MARGIN,
) -> ComparisonReport:
    """Compare two policy-value models on the same positions (see the module docstring).

    Args:
        reference: an ``nn.Module``, another :data:`Predictor`, or a path ``load_model``
            takes (a checkpoint, a run directory, an export bundle).
        candidate: the same kinds.
        positions: suite positions or SFENs; None: ``keisei_fn.serve.suite.default_suite()``.
        margin: the reference's top-1 logit lead (nats) above which top-1 agreement counts.

    Returns:
        The report.

    Raises:
        InvalidPositionError: a malformed SFEN.
        SpecError: no positions, a position without legal moves, or outputs of the wrong
            shape.
        and every error of ``load_model`` for a path.

    Example:
        >>> from keisei_fn import ModelSpec, build_model
        >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
        >>> report = compare_models(model, model)
        >>> report.mean_kl, report.top1_agreement, report.max_logit_diff
        (0.0, 1.0, 0.0)
    """
    _, obs, masks = encode_suite(positions)
    ref_logits, ref_value = predict(_as_predictor(reference), obs)
    cand_logits, cand_value = predict(_as_predictor(candidate), obs)
    if ref_logits.shape != cand_logits.shape or ref_logits.shape[1] != masks.shape[1]:
        raise SpecError(
            f"the models give logits of shapes {tuple(ref_logits.shape)} and "
            f"{tuple(cand_logits.shape)}; {masks.shape[1]} actions expected"
        )
    ref_log_p = torch.log_softmax(ref_logits.masked_fill(~masks, -math.inf), dim=-1)
    cand_log_p = torch.log_softmax(cand_logits.masked_fill(~masks, -math.inf), dim=-1)
    terms = (ref_log_p.exp() * (ref_log_p - cand_log_p)).masked_fill(~masks, 0.0)
    kl = terms.sum(dim=-1).clamp_min(0.0)  # >= 0; rounding makes near-equal policies dip below
    ref_best = ref_log_p.argmax(dim=-1)
    agree = ref_best == cand_log_p.argmax(dim=-1)
    two = ref_log_p.topk(min(2, ref_log_p.shape[1]), dim=-1).values
    gated = two[:, 0] - two[:, 1] > margin  # +inf with one legal move: gated
    value_error = (ref_value - cand_value).abs()
    logit_diff = (ref_logits - cand_logits).abs().masked_fill(~masks, 0.0)
    gated_count = int(gated.sum())
    return ComparisonReport(
        positions=int(obs.shape[0]),
        gated_positions=gated_count,
        margin=float(margin),
        top1_agreement=float(agree[gated].float().mean()) if gated_count else 1.0,
        top1_agreement_all=float(agree.float().mean()),
        mean_kl=_finite_or_nan(kl.mean()),
        max_kl=_finite_or_nan(kl.max()),
        value_mae=_finite_or_nan(value_error.mean()),
        max_value_error=_finite_or_nan(value_error.max()),
        max_logit_diff=_finite_or_nan(logit_diff.max()),
    )


def _finite_or_nan(value: Tensor) -> float:
    """A figure as a float: NaN when it is not finite (a broken candidate)."""
    number = float(value)
    return number if math.isfinite(number) else math.nan
