"""ONNX: a model as ``model.onnx`` with a dynamic batch, run under onnxruntime on the CPU.

Needs the ``serve`` extra (``pip install 'keisei-fn[serve]'``: onnx, onnxruntime, onnxscript),
imported only here and only when called. The graph is exported with torch's ``torch.export``
based exporter (``torch.onnx.export(..., dynamo=True)``; the TorchScript one is deprecated),
opset 18, float32 (a reduced-precision bundle's ONNX model holds its weights as float32 values:
the same numbers the torch model computes with), input ``obs`` ``(batch, 46, 9, 9)``, outputs
``policy_logits`` ``(batch, A)`` and ``value`` ``(batch,)``.

Example:
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    >>> session = onnx_predictor(onnx_bytes(model, obs_shape=(46, 9, 9)))  # doctest: +SKIP
    >>> session(torch.zeros(3, 46, 9, 9))[0].shape  # doctest: +SKIP
    torch.Size([3, 13527])
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from keisei_fn.errors import MissingExtraError

__all__ = ["OPSET", "onnx_bytes", "onnx_predictor"]

#: The ONNX opset of exported models.
OPSET = 18
_INPUT = "obs"
_OUTPUTS = ("policy_logits", "value")


def _require(module: str) -> Any:
    """Import an optional dependency of the ``serve`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is not installed; ONNX export needs the serve extra: "
            "pip install 'keisei-fn[serve]'"
        ) from exc


def onnx_bytes(model: nn.Module, *, obs_shape: tuple[int, ...]) -> bytes:
    """Export a float32 policy-value model to ONNX (dynamic batch), as the file's bytes.

    Args:
        model: ``forward(obs) -> (logits, value)``, float32, on the CPU (not changed: it is
            exported in eval mode and put back in the mode it was in).
        obs_shape: one observation's shape, e.g. ``spec.obs_shape``.

    Returns:
        The serialised ONNX model.

    Raises:
        MissingExtraError: onnx or onnxscript is not installed.
    """
    _require("onnx")
    _require("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (torch.zeros(2, *obs_shape),),
                dynamo=True,
                opset_version=OPSET,
                input_names=[_INPUT],
                output_names=list(_OUTPUTS),
                dynamic_shapes={"obs": {0: batch}},
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = program.model_proto.SerializeToString()
    return data


def onnx_predictor(data: bytes, *, threads: int | None = None) -> Callable[[Tensor], Any]:
    """An onnxruntime CPU session of an exported model, as a function ``obs -> (logits,
    value)`` on float32 tensors (a :data:`keisei_fn.serve.compare.Predictor`).

    Args:
        data: the ONNX model's bytes (:func:`onnx_bytes`, or a bundle's file:
            ``keisei_fn.serve.load_onnx``).
        threads: onnxruntime's intra-op threads (default: its own choice, every core).

    Raises:
        MissingExtraError: onnxruntime is not installed.
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

    def run(obs: Tensor) -> tuple[Tensor, Tensor]:
        feed = {_INPUT: obs.detach().to(torch.float32).cpu().contiguous().numpy()}
        logits, value = session.run(list(_OUTPUTS), feed)
        return torch.from_numpy(logits), torch.from_numpy(value)

    return run
