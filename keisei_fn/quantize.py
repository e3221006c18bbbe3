"""How an export bundle stores a model's weights: in float32, bfloat16, float16, or int8.

Pure tensor functions, no file system (``keisei_fn.store.bundle`` writes and reads what they
make; ``keisei_fn.serve`` decides what to export).

- ``float32``, ``bfloat16``, ``float16``: every floating tensor of the state dict (parameters
  and BatchNorm statistics) cast to that dtype (round to nearest even); integer buffers
  (``num_batches_tracked``) stay as they are.
- ``int8``: *weight-only* symmetric quantisation of every weight with two or more dimensions
  (the convolutions and the heads' linear layers: 99.9% of the parameters), one float32 scale
  per output channel (dimension 0), stored beside it under ``<name>.scale``:
  ``scale = max|w| / 127`` over the channel, ``q = round(w / scale)`` in ``[-127, 127]``
  (a channel of zeros gets scale 1 and stays zero; a subnormal channel, whose ``max|w| / 127``
  underflows, gets ``max|w|``; a NaN or infinity is refused). Dequantised, every element is within
  ``scale / 2`` of the original. Biases and BatchNorm tensors stay float32.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    >>> q, scale = quantize_int8(w)
    >>> q.tolist(), scale.tolist()
    ([[64, -127], [0, 0]], [0.007874015718698502, 1.0])
    >>> dequantize_int8(q, scale).tolist()[1]
    [0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from keisei_fn.errors import IntegrityError, InvalidModelError, UnsupportedDtypeError

__all__ = [
    "BUNDLE_DTYPES",
    "SCALE_SUFFIX",
    "bundle_dtype",
    "decode_weights",
    "dequantize_int8",
    "encode_weights",
    "quantize_int8",
]

#: The dtypes a bundle stores its weights in, by name.
BUNDLE_DTYPES = ("float32", "bfloat16", "float16", "int8")
#: A quantised weight's scales are stored under its name plus this suffix.
SCALE_SUFFIX = ".scale"
_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int8: "int8",
}
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundle_dtype(dtype: str | torch.dtype) -> str:
    """The name of a bundle dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``.

    Args:
        dtype: one of those names (``"bf16"``, ``"fp16"``, ``"fp32"`` and ``"float"``,
            ``"half"`` too), or the torch dtype.

    Returns:
        The canonical name.

    Raises:
        UnsupportedDtypeError: any other value.

    Example:
        >>> bundle_dtype(torch.bfloat16), bundle_dtype("fp16")
        ('bfloat16', 'float16')
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _TORCH_DTYPES:
            return _TORCH_DTYPES[dtype]
    elif isinstance(dtype, str):
        name = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                "half": "float16"}.get(dtype, dtype)  # fmt: skip
        if name in BUNDLE_DTYPES:
            return name
    raise UnsupportedDtypeError(
        f"an export dtype must be one of {', '.join(BUNDLE_DTYPES)} (or the torch dtype), "
        f"got {dtype!r}"
    )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantisation of a floating weight (dimension 0).

    Args:
        weight: a finite floating tensor with at least two dimensions.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``weight``'s shape in ``[-127, 127]``, ``scale`` float32
        of shape ``(weight.shape[0],)``; ``|dequantize_int8(q, scale) - weight| <= scale / 2``
        per channel (up to float32 rounding).

    Raises:
        UnsupportedDtypeError: for a tensor that is not floating or has fewer than two
            dimensions.
        InvalidModelError: for a weight with a NaN or an infinity.
    """
    if not weight.is_floating_point() or weight.dim() < 2:
        raise UnsupportedDtypeError(
            f"int8 quantisation takes a floating weight with >= 2 dimensions, got "
            f"{weight.dtype} of shape {tuple(weight.shape)}"
        )
    flat = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    if not bool(torch.isfinite(flat).all()):
        shape = tuple(weight.shape)
        raise InvalidModelError(f"cannot quantise a non-finite weight (shape {shape})")
    amax = flat.abs().amax(dim=1)
    scale = amax / 127.0
    # A subnormal channel's step underflows to 0: its largest value is then the step.
    scale = torch.where(scale > 0, scale, torch.where(amax > 0, amax, torch.ones_like(amax)))
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape).contiguous(), scale.contiguous()


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale`` per output channel, as ``dtype`` (computed in float32).

    Example:
        >>> dequantize_int8(torch.tensor([[2, -4]], dtype=torch.int8), torch.tensor([0.5]))
        tensor([[ 1., -2.]])
    """
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.to(torch.float32) * scale.to(torch.float32).reshape(shape)).to(dtype)


def encode_weights(
    state_dict: Mapping[str, torch.Tensor], dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model's state dict as a bundle stores it in ``dtype`` (see the module docstring).

    Args:
        state_dict: canonical keys → tensors (CPU or not; they are not changed).
        dtype: a name from :data:`BUNDLE_DTYPES`.

    Returns:
        ``(tensors, quantized)``: the CPU tensors to store, contiguous, and for ``int8`` each
        quantised weight's name → its scales' name (empty otherwise).

    Raises:
        UnsupportedDtypeError: for an unknown ``dtype``.

    Example:
        >>> state = {"w": torch.ones(2, 3), "b": torch.ones(2)}
        >>> tensors, quantized = encode_weights(state, "int8")
        >>> {k: str(v.dtype) for k, v in sorted(tensors.items())}
        {'b': 'torch.float32', 'w': 'torch.int8', 'w.scale': 'torch.float32'}
        >>> quantized
        {'w': 'w.scale'}
    """
    name = bundle_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, str] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point():
            tensors[key] = tensor.contiguous()
        elif name != "int8":
            tensors[key] = tensor.to(_FLOAT_DTYPES[name]).contiguous()
        elif tensor.dim() >= 2:
            tensors[key], tensors[key + SCALE_SUFFIX] = quantize_int8(tensor)
            quantized[key] = key + SCALE_SUFFIX
        else:
            tensors[key] = tensor.to(torch.float32).contiguous()
    clash = sorted(set(quantized.values()) & set(state_dict))
    if clash:  # a model with a tensor named like a scale: the two could not be told apart
        raise UnsupportedDtypeError(f"cannot quantise: {clash[0]!r} is already a tensor's name")
    return tensors, quantized


def decode_weights(
    tensors: Mapping[str, torch.Tensor],
    quantized: Mapping[str, str],
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The state dict a bundle's stored tensors stand for, its floating tensors as ``dtype``
    (int8 weights dequantised; other integer tensors unchanged).

    Args:
        tensors: the stored tensors.
        quantized: quantised weight's name → its scales' name (as :func:`encode_weights`).
        dtype: the floating dtype to compute in.

    Returns:
        Canonical keys → tensors.

    Raises:
        IntegrityError: a quantised weight or its scales missing, or of the wrong dtype.
    """
    scales = set(quantized.values())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in scales:
            continue
        if key in quantized:
            scale = tensors.get(quantized[key])
            if tensor.dtype != torch.int8 or scale is None or scale.shape != tensor.shape[:1]:
                raise IntegrityError(f"quantised weight {key!r} or its scales are malformed")
            out[key] = dequantize_int8(tensor, scale, dtype=dtype)
        elif tensor.is_floating_point():
            out[key] = tensor.to(dtype)
        else:
            out[key] = tensor
    missing = sorted(set(quantized) - set(out))
    if missing:
        raise IntegrityError(f"quantised weight {missing[0]!r} is missing")
    return out
