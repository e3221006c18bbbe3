"""Verified exports: a checkpoint → an inference bundle that provably still plays like it.

:func:`export_model` loads the source's network, refuses it unless :func:`validate_model` finds
it fit to serve, stores its weights in the asked dtype (``keisei_fn.quantize``), rebuilds the
model exactly as ``load_model`` will from those tensors, and runs the behaviour gate
(:func:`compare_models` against the source on the default suite) — and, with ``onnx=True``,
exports ``model.onnx`` and gates what onnxruntime computes against the torch model. Only then
is anything written: the bundle (``keisei_fn.store.bundle``) through the commit protocol, its
sidecar recording the spec, the source checkpoint (path, name, step, digests), the dtype, the
sizes, the validation report and the gate's figures and thresholds. A failed gate raises
:class:`~keisei_fn.errors.GateError` and writes nothing, unless ``force=True`` (then the
sidecar records ``"forced": true`` and the problems).

Example:
    >>> import tempfile
    >>> import keisei_fn as kf
    >>> spec = kf.ModelSpec(model_type="testmodel")
    >>> state = kf.capture(spec, kf.build_model(spec, seed=0), step=1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = kf.save_final_model(state, tmp + "/run")
    ...     result = export_model(tmp + "/run", tmp + "/bundle", dtype="bfloat16")
    ...     model, meta = kf.load_model(tmp + "/bundle")
    >>> result.passed, meta.extra["bundle"]["dtype"], result.comparison.top1_agreement >= 0.97
    (True, 'bfloat16', True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keisei_fn.errors import GateError, InvalidModelError, SpecError
from keisei_fn.nets import canonical_state_dict
from keisei_fn.paths import PathArg
from keisei_fn.quantize import bundle_dtype, encode_weights
from keisei_fn.serve.compare import (
    DEFAULT_THRESHOLDS,
    ComparisonReport,
    Thresholds,
    compare_models,
)
from keisei_fn.serve.onnx_export import onnx_bytes, onnx_predictor
from keisei_fn.serve.suite import SuitePosition
from keisei_fn.serve.validate import ValidationReport, validate_model
from keisei_fn.store.bundle import (
    BundleMeta,
    bundle_model,
    read_bundle_meta,
    read_bundle_onnx,
    write_bundle,
)
from keisei_fn.store.checkpoints import load_model

__all__ = ["ExportResult", "export_model", "load_onnx"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        bundle: the committed bundle.
        validation: the source model's validation report.
        comparison: the gate's figures: the bundle's model against the source.
        onnx_comparison: onnxruntime against the bundle's torch model (None without ONNX).
        problems: what fell short of the thresholds (empty: passed).
        forced: whether it was written despite ``problems``.
    """

    bundle: BundleMeta
    validation: ValidationReport
    comparison: ComparisonReport
    onnx_comparison: ComparisonReport | None
    problems: tuple[str, ...]
    forced: bool

    @property
    def passed(self) -> bool:
        """Whether every figure met its threshold."""
        return not self.problems


def export_model(
    source: PathArg,
    out_dir: PathArg,
    *,
    dtype: str | torch.dtype,
    onnx: bool = False,
    force: bool = False,
    overwrite: bool = False,
    thresholds: Thresholds | None = None,
    positions: Iterable[SuitePosition | str] | None = None,
) -> ExportResult:
    """Export a checkpoint's network as a verified inference bundle (module docstring).

    Args:
        source: a checkpoint, a final model, a run directory (its final model, else its
            latest checkpoint) or another bundle.
        out_dir: the bundle directory to write (created; not a run directory).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"`` (or the torch dtype).
        onnx: also write ``model.onnx`` (needs the ``serve`` extra), gated against the torch
            model with ``DEFAULT_THRESHOLDS["onnx"]``.
        force: write the bundle even when the gate fails (recorded in the sidecar).
        overwrite: replace a bundle already in ``out_dir``.
        thresholds: the gate (default: ``DEFAULT_THRESHOLDS[dtype]``).
        positions: the gate's positions (default: the seeded suite).

    Returns:
        The bundle and the figures.

    Raises:
        UnsupportedDtypeError: an unknown dtype (before anything is read).
        InvalidModelError: the source fails :func:`validate_model` (``force`` does not help).
        GateError: the export falls short of the thresholds and ``force`` is False; nothing
            is written.
        CheckpointExistsError: ``out_dir`` holds a bundle (without ``overwrite``) or is a run
            directory.
        MissingExtraError: ``onnx=True`` without the ``serve`` extra.
        and every error of ``load_model`` for ``source``.
    """
    name = bundle_dtype(dtype)
    gate = thresholds or DEFAULT_THRESHOLDS[name]
    source_model, source_meta = load_model(source)
    validation = validate_model(source_model, positions)
    if not validation.ok:
        raise InvalidModelError(
            f"{source_meta.path} is not fit to export: " + "; ".join(validation.problems)
        )
    spec = source_meta.spec
    if spec is None:  # pragma: no cover - load_model refuses a checkpoint without one
        raise SpecError(f"{source_meta.path} holds no ModelSpec")
    state = canonical_state_dict(source_model.state_dict())
    tensors, quantized = encode_weights(state, name)
    candidate = bundle_model(spec, tensors, quantized)
    comparison = compare_models(source_model, candidate, positions)
    problems = [f"{name}: {p}" for p in comparison.problems(gate)]
    onnx_data = onnx_comparison = None
    if onnx:
        onnx_data = onnx_bytes(candidate, obs_shape=spec.obs_shape)
        onnx_comparison = compare_models(candidate, onnx_predictor(onnx_data), positions)
        problems += [f"onnx: {p}" for p in onnx_comparison.problems(DEFAULT_THRESHOLDS["onnx"])]
    if problems and not force:
        raise GateError(
            f"the {name} export of {source_meta.path} does not behave like it: "
            + "; ".join(problems)
            + " (force=True / --force exports it anyway)"
        )
    record: dict[str, Any] = {
        "source": {
            "path": str(source_meta.path),
            "name": source_meta.name,
            "kind": source_meta.kind,
            "step": source_meta.step,
            "weights_digest": source_meta.weights_digest,
            "sidecar_digest": source_meta.digest,
        },
        "sizes": {
            "source_model_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "stored_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "onnx_bytes": len(onnx_data) if onnx_data is not None else None,
        },
        "validation": validation.to_json(),
        "gate": {"thresholds": gate.to_json(), "figures": comparison.to_json()},
        "onnx_gate": None
        if onnx_comparison is None
        else {
            "thresholds": DEFAULT_THRESHOLDS["onnx"].to_json(),
            "figures": onnx_comparison.to_json(),
        },
        "problems": problems,
        "forced": bool(problems),
        "computes_in": "float32 (weights upcast or dequantised on load; see load_model)",
    }
    bundle = write_bundle(
        out_dir,
        tensors,
        spec=spec,
        dtype=name,
        step=source_meta.step,
        quantized=quantized,
        export=record,
        onnx=onnx_data,
        overwrite=overwrite,
    )
    return ExportResult(
        bundle=bundle,
        validation=validation,
        comparison=comparison,
        onnx_comparison=onnx_comparison,
        problems=tuple(problems),
        forced=bool(problems),
    )


def load_onnx(source: PathArg, *, threads: int | None = None) -> Callable[[Tensor], Any]:
    """A bundle's ONNX model (verified against its digest) as an onnxruntime CPU predictor,
    ``obs -> (logits, value)``.

    Args:
        source: a bundle directory (or its ``bundle.json``).
        threads: onnxruntime's intra-op threads (default: all cores).

    Raises:
        CheckpointNotFoundError: no bundle, or a bundle without ONNX.
        IntegrityError: the ONNX file or the sidecar was changed.
        MissingExtraError: onnxruntime is not installed.
    """
    return onnx_predictor(read_bundle_onnx(read_bundle_meta(source)), threads=threads)
