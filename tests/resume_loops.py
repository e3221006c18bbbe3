"""Module-level training loops for the resume tests (a fresh process must be able to import them).

Every step draws from every global RNG (torch: the batch and dropout; NumPy's legacy global:
the value targets; Python's ``random``: a loss weight), runs the forward pass under bf16 autocast
and, where the loop has one, steps a CPU GradScaler tuned to overflow now and then (so its scale,
and which steps it skips, matter) and an LR scheduler.

Run as a script, it is the resumed half of a run: ``python resume_loops.py LOOP CHECKPOINT STOP
OUT_DIR`` loads the checkpoint in this fresh process, restores it into a fresh ``LOOP`` setup,
trains up to step ``STOP`` and saves the final state (RNG states and ``extra`` included) to
``OUT_DIR`` with the prefix ``resumed_ts``.
"""

from __future__ import annotations

import random
import sys
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keisei_fn import ModelSpec, build_model, capture, load_state, restore_, save_state
from keisei_fn.state import thaw

SPEC = ModelSpec(model_type="testmodel", num_actions=32)
BATCH = 4
RESUMED_PREFIX = "resumed_ts"

Loop = tuple[nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler | None]


def _scaler() -> torch.amp.GradScaler:
    # fp32 gradients of ~1 overflow near 2**128: growing from 2**124 after every good step makes
    # the scaler skip a step every few steps, so its state changes what training does.
    return torch.amp.GradScaler("cpu", init_scale=2.0**124, growth_interval=1)


def _warmup(epoch: int) -> float:
    return min(1.0, (epoch + 1) / 4)


def setup_adam() -> Loop:
    """Adam + StepLR + GradScaler."""
    model = build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
    return model, optimizer, scheduler, _scaler()


def setup_sgd() -> Loop:
    """SGD with Nesterov momentum and weight decay + a warm-up LambdaLR + GradScaler."""
    model = build_model(SPEC, seed=0)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
    return model, optimizer, scheduler, _scaler()


def setup_plain() -> Loop:
    """Adam alone: no scheduler, no scaler."""
    model = build_model(SPEC, seed=0)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), None, None


SETUPS: dict[str, Callable[[], Loop]] = {
    "adam": setup_adam,
    "sgd": setup_sgd,
    "plain": setup_plain,
}


def _loss(model: nn.Module, noise: np.ndarray | None = None) -> torch.Tensor:
    obs = torch.randn(BATCH, *SPEC.obs_shape)
    actions = torch.randint(SPEC.num_actions, (BATCH,))
    values = np.random.standard_normal(BATCH).astype(np.float32)
    if noise is not None:
        values = values + noise.astype(np.float32)
    entropy_weight = random.random() * 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, value = model(obs)
    logits = F.dropout(logits.float(), p=0.2, training=True)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    return (
        F.cross_entropy(logits, actions)
        + F.mse_loss(value.float(), torch.from_numpy(values))
        - entropy_weight * entropy
    )


def _update(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    step: int,
) -> None:
    """One correct training step."""
    _update(_loss(model), optimizer, scheduler, scaler)


# --- buggy loops, each a mistake assert_resume_equivalent must catch ------------------------

_LAZY_SCHEDULERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = (
    weakref.WeakKeyDictionary()
)


def lazy_scheduler_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    step: int,
) -> None:
    """Bug: builds its scheduler on first use instead of returning it from setup, so the
    checkpoint never holds it and a resumed run warms up again."""
    if optimizer not in _LAZY_SCHEDULERS:
        _LAZY_SCHEDULERS[optimizer] = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
    train_step(model, optimizer, _LAZY_SCHEDULERS[optimizer], scaler, step)


_NOISE = np.random.default_rng(1234)


def module_rng_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    step: int,
) -> None:
    """Bug: draws target noise from a module-level generator that no checkpoint captures."""
    _update(_loss(model, noise=_NOISE.standard_normal(BATCH)), optimizer, scheduler, scaler)


class VisitCounts(nn.Module):
    """A visit-count table whose load adopts the given tensor instead of copying it (zero-copy,
    like ``load_state_dict(assign=True)``): after a restore it *is* the snapshot's tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(SPEC.num_actions))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        self.counts = state_dict[prefix + "counts"]


class CountingNet(nn.Module):
    """The test network plus a :class:`VisitCounts` table updated in place every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model(SPEC, seed=0)
        self.visits = VisitCounts()

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, value = self.net(obs)
        self.visits.counts.add_(torch.bincount(logits.argmax(-1), minlength=SPEC.num_actions))
        return logits, value


def setup_counting() -> Loop:
    """Adam over a :class:`CountingNet`; the step writes into the restored snapshot."""
    model = CountingNet()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), None, None


def setup_under_pytest_only() -> Loop:
    """Bug: works only where pytest is imported, so the resumed half fails in a fresh process."""
    if "pytest" not in sys.modules:
        raise RuntimeError("this setup needs pytest")
    return setup_plain()


# --- the resumed half of a run, in a fresh process ------------------------------------------


def resume_main(loop: str, checkpoint: str, stop: int, out_dir: str) -> None:
    """Load ``checkpoint``, restore it into a fresh ``loop`` setup, train to ``stop``, save."""
    torch.set_num_threads(1)
    state = load_state(checkpoint)
    model, optimizer, scheduler, scaler = SETUPS[loop]()
    restore_(state, model, optimizer, scheduler=scheduler, scaler=scaler)
    for step in range(state.step, stop):
        train_step(model, optimizer, scheduler, scaler, step)
    final = capture(
        state.spec,
        model,
        optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step=stop,
        episodes=state.episodes,
        stats=state.stats,
        extra=thaw(state.extra),
    )
    save_state(final, out_dir, prefix=RESUMED_PREFIX)


if __name__ == "__main__":
    resume_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
