"""The ``export`` section: inference bundles of a model in every dtype (and ONNX) against its
float32 checkpoint — bundle size, load time, positions/s at batch 1 and 256, agreement.

Inference variants, each timed against torch float32 in the same rounds, on one thread each:

- ``torch float32``: the checkpoint's model — and what every bundle computes by default
  (bfloat16/float16 weights upcast, int8 dequantised on load: the same kernels);
- ``torch bfloat16 compute``: the bfloat16 bundle loaded with ``compute_dtype=torch.bfloat16``;
- ``int8, dynamic int8 Linear``: the int8 bundle with torch's one CPU int8 kernel that applies
  (``torch.ao.quantization.quantize_dynamic`` on the Linear layers: int8 activations too, so not
  weight-only; torch has no int8 CPU convolution for a weight-only model);
- ``onnxruntime float32``: the float32 bundle's ``model.onnx`` on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.cases import Row, compared
from benchmarks.timing import run_rounds
from keisei_fn import (
    ModelSpec,
    build_model,
    capture,
    compare_models,
    export_model,
    load_model,
    save_final_model,
)
from keisei_fn.quantize import BUNDLE_DTYPES
from keisei_fn.serve import load_onnx

__all__ = ["export_rows"]


def _int8_dynamic(model: nn.Module) -> nn.Module:
    """The model with its Linear layers run by torch's dynamic int8 kernel (fbgemm)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated for torchao
        quantized: nn.Module = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return quantized


def export_rows(
    scratch: Path, repeat: int, spec: ModelSpec, label: str
) -> tuple[list[Row], list[list[str]]]:
    """Export ``spec``'s network (seed 0) in every dtype and measure it.

    Returns:
        The timing rows, and the size/agreement table's rows (dtype, weights, vs the
        checkpoint's weights, ONNX, the gate's figures on the default suite).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread for torch and onnxruntime alike: a fair pair, and
    try:  # steady on a shared machine (spinning OpenMP threads are not)
        return _export_rows(scratch, repeat, spec, label)
    finally:
        torch.set_num_threads(threads)


def _export_rows(
    scratch: Path, repeat: int, spec: ModelSpec, label: str
) -> tuple[list[Row], list[list[str]]]:
    run_dir = scratch / "export-run"
    source = save_final_model(capture(spec, build_model(spec, seed=0), step=1), run_dir)
    results = {
        dtype: export_model(
            run_dir, scratch / f"bundle-{dtype}", dtype=dtype, onnx=dtype == "float32"
        )
        for dtype in BUNDLE_DTYPES
    }
    group = f"{label} export"
    rows: list[Row] = []

    loads: dict[str, Callable[[], object]] = {"load_model(checkpoint)": lambda: load_model(run_dir)}
    for dtype in BUNDLE_DTYPES:
        loads[f"load_model({dtype} bundle)"] = lambda d=dtype: load_model(scratch / f"bundle-{d}")
    samples = run_rounds(loads, repeat=repeat)
    rows += [
        compared(group, samples, name, "load_model(checkpoint)")
        for name in loads
        if name != "load_model(checkpoint)"
    ]

    reference, _ = load_model(run_dir)
    variants: dict[str, Any] = {
        "torch float32": reference,
        "torch bfloat16 compute": load_model(
            scratch / "bundle-bfloat16", compute_dtype=torch.bfloat16
        )[0],
        "int8, dynamic int8 Linear": _int8_dynamic(load_model(scratch / "bundle-int8")[0]),
        "onnxruntime float32": load_onnx(scratch / "bundle-float32", threads=1),
    }
    for batch, rounds in ((1, repeat * 4), (256, repeat)):
        obs = torch.rand(batch, *spec.obs_shape)

        def call(predictor: Any, obs: torch.Tensor = obs) -> object:
            with torch.inference_mode():
                return predictor(obs)

        samples = run_rounds({n: (lambda p=p: call(p)) for n, p in variants.items()}, repeat=rounds)
        for name in variants:
            per_second = batch / (samples.median_ms(name) / 1e3)
            measure = f"{name}, batch {batch} ({per_second:,.0f} positions/s)"
            if name == "torch float32":
                rows.append(Row(group=group, measure=measure, ours_ms=samples.median_ms(name)))
            else:
                rows.append(compared(group, samples, name, "torch float32", label=measure))

    rows += _int8_kernel_rows(group, reference, repeat)
    table = []
    for dtype, result in results.items():
        bundle = result.bundle
        figures = result.comparison
        onnx = f"{bundle.onnx_size / 1e6:.1f} MB" if bundle.onnx_file else ""
        table.append(
            [dtype, f"{bundle.weights_size / 1e6:.2f} MB",
             f"{bundle.weights_size / source.weights_size:.3f}", onnx,
             f"{figures.top1_agreement:.4g} ({figures.gated_positions}/{figures.positions})",
             f"{figures.top1_agreement_all:.4g}", f"{figures.mean_kl:.3g}",
             f"{figures.value_mae:.3g}", f"{figures.max_logit_diff:.3g}"]
        )  # fmt: skip
    for name in ("torch bfloat16 compute", "int8, dynamic int8 Linear", "onnxruntime float32"):
        figures = compare_models(reference, variants[name])
        table.append(
            [name, "", "", "",
             f"{figures.top1_agreement:.4g} ({figures.gated_positions}/{figures.positions})",
             f"{figures.top1_agreement_all:.4g}", f"{figures.mean_kl:.3g}",
             f"{figures.value_mae:.3g}", f"{figures.max_logit_diff:.3g}"]
        )  # fmt: skip
    return rows, table


def _int8_kernel_rows(group: str, model: nn.Module, repeat: int) -> list[Row]:
    """The policy head's Linear at batch 256: float32 vs torch's weight-only int8 CPU kernel
    (``torch._weight_int8pack_mm``, the kernel an int8 bundle could run) vs dequantise + float32
    (what the loader does once, here on every call)."""
    from keisei_fn.quantize import dequantize_int8, quantize_int8

    linear = model.policy_head[4]
    q, scale = quantize_int8(linear.weight)
    x = torch.rand(256, linear.in_features)
    variants: dict[str, Callable[[], object]] = {
        "policy Linear float32": lambda: torch.nn.functional.linear(x, linear.weight, linear.bias),
        "policy Linear int8 kernel": lambda: torch._weight_int8pack_mm(x, q, scale) + linear.bias,
        "policy Linear dequantise + float32": lambda: torch.nn.functional.linear(
            x, dequantize_int8(q, scale), linear.bias
        ),
    }
    with torch.inference_mode():
        samples = run_rounds(variants, repeat=repeat * 3)
    return [
        compared(f"{group}, batch 256", samples, name, "policy Linear float32")
        for name in variants
        if name != "policy Linear float32"
    ]


#: The size/agreement table's header.
TABLE_HEADER = (
    "| bundle / variant | weights | vs checkpoint weights | ONNX | top-1 (gated/positions) "
    "| top-1 all | mean KL | value MAE | max logit diff |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
)
