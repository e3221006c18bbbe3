"""Model info: a JSON-serialisable summary of a spec and (optionally) a live model.

Example:
    >>> from keisei_fn import ModelSpec, model_info
    >>> model_info(ModelSpec())["trainable_parameters"]
    13241300
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from keisei_fn.nets import build_model, unwrap_model
from keisei_fn.precision import Precision
from keisei_fn.spec import ModelSpec

__all__ = ["model_info"]


def model_info(
    spec: ModelSpec,
    *,
    model: nn.Module | None = None,
    precision: Precision | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Summarise a spec (and a model built from it) as a JSON-serialisable dict.

    Args:
        spec: the architecture.
        model: a live model; when None, one is built on the ``meta`` device (no memory, no
            weights) just to count.
        precision: the mixed-precision policy in use, if any.
        device: the training device; defaults to the model's parameters' device.

    Returns:
        Every spec field, ``obs_shape``, the feature set, parameter/buffer counts, the
        ``state_dict`` key count, mixed precision and device.

    Example:
        >>> model_info(ModelSpec(model_type="testmodel"))["state_dict_keys"]
        39
    """
    net = unwrap_model(model) if model is not None else build_model(spec, device="meta")
    params = list(net.parameters())
    if device is None:
        device = params[0].device if model is not None and params else "cpu"
    features = spec.feature_spec
    return {
        "spec": spec.to_json(),
        "obs_shape": list(spec.obs_shape),
        "feature_set": {
            "name": features.name,
            "num_planes": features.num_planes,
            "plane_names": list(features.plane_names),
        },
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "buffers": sum(b.numel() for b in net.buffers()),
        "state_dict_keys": len(net.state_dict()),
        "mixed_precision": {
            "enabled": precision.enabled if precision else False,
            "dtype": str(precision.dtype).removeprefix("torch.")
            if precision and precision.dtype
            else None,
            "use_scaler": precision.use_scaler if precision else False,
            "reason": precision.reason if precision else "not configured",
        },
        "device": str(device),
    }
