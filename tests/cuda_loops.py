"""CUDA training loops for the exact-resume tests of test_cuda.py (module level, so that the
fresh process of ``assert_resume_equivalent`` can import them).

Each step draws from every generator a checkpoint holds (the CUDA generator: the batch; torch's
CPU generator: a mask; NumPy's global: the value targets; Python's ``random``: a loss weight),
runs the SE network under autocast (fp16 with a GradScaler tuned to overflow every few steps, so
its scale and growth tracker decide which steps are skipped; or bf16) and steps AdamW and an LR
scheduler, with deterministic algorithms on.

``prove(name, run_dir)`` runs one check in this process; test_cuda.py starts it in a new
process whose environment sets ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it when CUDA starts).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from keisei_fn import ModelSpec, build_model
from keisei_fn.testing import assert_resume_equivalent

#: A small tower with the SE blocks (``se_ratio`` 0.25): their pooling must train
#: deterministically on CUDA too.
SPEC = ModelSpec(tower_depth=2, tower_width=32)
BATCH = 16
INIT_SCALE = 2.0**24  # fp16 gradients overflow at this scale within a few steps

Scaler = torch.amp.GradScaler | None
Loop = tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Scaler]


def deterministic() -> None:
    """What an exactly resumable CUDA run sets (with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the
    environment before CUDA starts)."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _setup(scaled: bool) -> Loop:
    deterministic()
    model = build_model(SPEC, seed=0, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    scaler = (
        torch.amp.GradScaler("cuda", init_scale=INIT_SCALE, growth_interval=1) if scaled else None
    )
    return model, optimizer, scheduler, scaler


def setup_fp16() -> Loop:
    """SE tower, AdamW, StepLR and a GradScaler, on CUDA."""
    return _setup(scaled=True)


def setup_bf16() -> Loop:
    """SE tower, AdamW and StepLR, on CUDA (bf16 needs no scaler)."""
    return _setup(scaled=False)


def _step(loop: Loop, dtype: torch.dtype) -> None:
    model, optimizer, scheduler, scaler = loop
    obs = torch.randn(BATCH, *SPEC.obs_shape, device="cuda")
    mask = (torch.rand(BATCH) < 0.9).float().cuda()
    target = torch.from_numpy(np.random.rand(BATCH).astype(np.float32)).cuda()
    weight = random.random()
    with torch.autocast("cuda", dtype=dtype):
        logits, value = model(obs)
    policy = logits.float().logsumexp(-1)
    loss = (weight * policy + (value.float() - target).square()).mul(mask).mean()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()


def step_fp16(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Scaler,
    step: int,
) -> None:
    """One fp16 autocast step with the GradScaler."""
    _step((model, optimizer, scheduler, scaler), torch.float16)


def step_bf16(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Scaler,
    step: int,
) -> None:
    """One bf16 autocast step."""
    _step((model, optimizer, scheduler, scaler), torch.bfloat16)


def _scaler_skips() -> int:
    """Steps the fp16 loop's scaler skipped in 8 steps (its scale went down)."""
    loop = setup_fp16()
    scaler = loop[3]
    assert scaler is not None
    skipped = 0
    for step in range(8):
        before = scaler.get_scale()
        step_fp16(*loop, step)
        skipped += scaler.get_scale() < before
    return skipped


def _default_network_backward() -> None:
    """Keisei's default network trains under deterministic algorithms on CUDA (the SE blocks'
    ``adaptive_avg_pool2d(x, 1)`` is a mean, never the CUDA pooling kernel, whose backward has
    no deterministic version)."""
    deterministic()
    model = build_model(ModelSpec(), seed=0, device="cuda")
    logits, value = model(torch.randn(4, *ModelSpec().obs_shape, device="cuda"))
    (logits.float().logsumexp(-1).mean() + value.float().square().mean()).backward()
    torch.cuda.synchronize()


def prove(name: str, run_dir: str) -> None:
    """Run one check: ``fp16`` or ``bf16`` (exact resume in a fresh process) or
    ``default-network`` (trains under deterministic algorithms)."""
    if name == "default-network":
        _default_network_backward()
    elif name == "fp16":
        assert _scaler_skips() >= 1, "the GradScaler never skipped: its state would not matter"
        assert_resume_equivalent(
            setup_fp16, step_fp16, total_steps=8, resume_at=3, run_dir=run_dir, fresh_process=True
        )
    elif name == "bf16":
        assert_resume_equivalent(
            setup_bf16, step_bf16, total_steps=8, resume_at=3, run_dir=run_dir, fresh_process=True
        )
    else:
        raise ValueError(f"unknown check {name!r}")
    print(f"{name}: ok")
