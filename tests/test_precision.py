import logging

import pytest
import torch

from keisei_fn import Precision, make_scaler, precision_policy
from keisei_fn.errors import SpecError


@pytest.mark.parametrize(
    ("device", "mixed", "cuda", "enabled", "dtype", "scaler"),
    [
        ("cuda", True, True, True, torch.float16, True),
        ("cuda:1", "fp16", True, True, torch.float16, True),
        ("cuda", "bf16", True, True, torch.bfloat16, False),
        ("cuda", True, False, False, None, False),
        ("cuda", "bf16", False, False, None, False),
        ("cpu", True, True, False, None, False),
        ("cpu", "fp16", False, False, None, False),
        ("cpu", "bf16", False, True, torch.bfloat16, False),
        ("cpu", False, True, False, None, False),
        ("meta", "bf16", False, False, None, False),
    ],
)
def test_policy_decisions(device, mixed, cuda, enabled, dtype, scaler):
    p = precision_policy(device, mixed_precision=mixed, cuda_available=cuda)
    assert (p.enabled, p.dtype, p.use_scaler) == (enabled, dtype, scaler)
    assert p.reason
    assert p.device_type == torch.device(device).type


def test_fallback_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="keisei_fn.precision"):
        p = precision_policy("cuda", mixed_precision=True, cuda_available=False)
    assert not p.enabled and "CUDA is unavailable" in p.reason
    assert "mixed precision disabled" in caplog.text


def test_default_asks_torch_for_cuda():
    p = precision_policy("cuda", mixed_precision=True)
    assert p.enabled == torch.cuda.is_available()


@pytest.mark.parametrize("bad", ["fp8", 1, "bf16 ", None])
def test_bad_value(bad):
    with pytest.raises(SpecError, match="mixed_precision"):
        precision_policy("cpu", mixed_precision=bad)


def test_bad_device():
    with pytest.raises(SpecError, match="unknown device"):
        precision_policy("gpu0", mixed_precision=True)


def test_make_scaler():
    cuda_policy = precision_policy("cuda", mixed_precision=True, cuda_available=True)
    scaler = make_scaler(cuda_policy)
    if torch.cuda.is_available():
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    else:  # a GradScaler("cuda") here would be disabled and save an empty state
        assert scaler is None
    assert make_scaler(precision_policy("cpu", mixed_precision="bf16")) is None


def test_invariants():
    with pytest.raises(SpecError):
        Precision(enabled=True, dtype=None, use_scaler=False, device_type="cpu", reason="x")
    with pytest.raises(SpecError):
        Precision(
            enabled=True, dtype=torch.bfloat16, use_scaler=True, device_type="cuda", reason="x"
        )


def test_cpu_bf16_autocast_context():
    p = precision_policy("cpu", mixed_precision="bf16")
    with p.autocast():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
    with precision_policy("cpu").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
