"""The mixed-precision policy: which autocast dtype, whether a GradScaler is needed, and why.

Policy:

- on CUDA (when CUDA is available): ``True``/``"fp16"`` → fp16 autocast with a GradScaler;
  ``"bf16"`` → bf16 autocast, no scaler (bf16 has fp32's exponent range);
- on the CPU: only an explicit ``"bf16"`` enables autocast. torch also has CPU fp16 autocast,
  but it is slow and gains nothing here, so keeping it off is this library's policy: ``True`` or
  ``"fp16"`` on the CPU falls back to fp32 with a logged warning;
- anywhere else (a CUDA request on a host without CUDA, MPS, ...): off, with a warning and a
  ``reason``.

Example:
    >>> policy = precision_policy("cpu", mixed_precision="bf16")
    >>> policy.enabled, policy.dtype, policy.use_scaler
    (True, torch.bfloat16, False)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from keisei_fn.errors import SpecError

__all__ = ["MixedPrecision", "Precision", "make_scaler", "precision_policy"]

log = logging.getLogger(__name__)

MixedPrecision = bool | Literal["fp16", "bf16"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True, kw_only=True)
class Precision:
    """A resolved mixed-precision decision.

    Args:
        enabled: whether autocast is on.
        dtype: the autocast dtype (None when disabled).
        use_scaler: whether a ``GradScaler`` is needed (fp16 on CUDA only).
        device_type: ``"cuda"``, ``"cpu"``, ...
        reason: why this decision was taken, for logs and model info.
    """

    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool
    device_type: str
    reason: str

    def __post_init__(self) -> None:
        if self.enabled and self.dtype is None:
            raise SpecError("Precision: an enabled policy needs a dtype")
        if self.use_scaler and not (self.enabled and self.dtype == torch.float16):
            raise SpecError("Precision: a GradScaler is only used with fp16 autocast")

    def replace(self, **changes: Any) -> Precision:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A ``torch.autocast`` context for this policy (a no-op context when disabled).

        Example:
            >>> with precision_policy("cpu").autocast():
            ...     pass
        """
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def precision_policy(
    device: str | torch.device,
    *,
    mixed_precision: MixedPrecision = False,
    cuda_available: bool | None = None,
) -> Precision:
    """Decide the mixed-precision policy for a device.

    Args:
        device: the training device (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...).
        mixed_precision: ``False``, ``True`` (= ``"fp16"``), ``"fp16"`` or ``"bf16"``.
        cuda_available: whether CUDA works here; ``None`` asks torch.

    Returns:
        The :class:`Precision` decision. A fallback to fp32 is logged as a warning.

    Raises:
        SpecError: for an unknown ``mixed_precision`` value or device string.

    Example:
        >>> precision_policy("cuda", mixed_precision=True, cuda_available=True).use_scaler
        True
    """
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise SpecError(f"unknown device {device!r}: {exc}") from exc
    if mixed_precision is False:
        return Precision(
            enabled=False,
            dtype=None,
            use_scaler=False,
            device_type=device_type,
            reason="mixed precision not requested",
        )
    if mixed_precision is True:
        mixed_precision = "fp16"
    if mixed_precision not in _DTYPES:
        raise SpecError(
            f"mixed_precision must be False, True, 'fp16' or 'bf16', got {mixed_precision!r}"
        )
    dtype = _DTYPES[mixed_precision]
    if device_type == "cuda":
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if cuda_available:
            return Precision(
                enabled=True,
                dtype=dtype,
                use_scaler=dtype == torch.float16,
                device_type="cuda",
                reason=f"{mixed_precision} autocast on cuda",
            )
        return _fallback(
            device_type, f"{mixed_precision} requested for cuda, but CUDA is unavailable"
        )
    if device_type == "cpu" and dtype == torch.bfloat16:
        return Precision(
            enabled=True,
            dtype=dtype,
            use_scaler=False,
            device_type="cpu",
            reason="bf16 autocast on cpu",
        )
    if device_type == "cpu":
        return _fallback("cpu", "fp16 autocast is kept off on the CPU by policy; use 'bf16'")
    return _fallback(device_type, "mixed precision is only supported on cuda and cpu (bf16)")


def _fallback(device_type: str, reason: str) -> Precision:
    log.warning("mixed precision disabled, training in fp32: %s", reason)
    return Precision(
        enabled=False, dtype=None, use_scaler=False, device_type=device_type, reason=reason
    )


def make_scaler(precision: Precision) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` when the policy needs one, else None.

    Also None for a CUDA fp16 policy on a host without CUDA: a ``GradScaler("cuda")`` there is
    disabled and would save an empty state.

    Example:
        >>> make_scaler(precision_policy("cpu", mixed_precision="bf16")) is None
        True
    """
    if not precision.use_scaler or not torch.cuda.is_available():
        return None
    return torch.amp.GradScaler(precision.device_type)
