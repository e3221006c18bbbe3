"""States the crash, kill and race tests save, and bit-exact comparisons of what they load.

A state is a pure function of ``(step, variant)``, so any process (a forked victim, the test
after a kill) can rebuild what a save stored and compare a loaded checkpoint with it bit-exactly.
``extra`` names ``(step, variant)``, so a loaded state says which save wrote it.

Used by ``test_commit_protocol``, ``test_crash``, ``test_kill_loop``, ``test_object_store_kill``
and ``test_protocol_review``; ``raw``/``raw_bytes`` by the tests that compare tensors' bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keisei_fn import CheckpointMeta, GameStats, TrainState
from keisei_fn.testing import assert_states_equal


def make_state(step: int, variant: int, *, seed: int) -> TrainState:
    """A state at ``step`` with ~1 MB of weights drawn from ``seed`` (a tensor tied to another,
    a bfloat16 one, an optimizer state, and ``extra`` naming ``(step, variant)``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 1024, generator=gen)
    return TrainState(
        spec=None,
        step=step,
        episodes=step * 3,
        model={"w": w, "b": torch.randn(16, generator=gen).to(torch.bfloat16), "tied": w},
        optimizer={"state": {0: {"momentum_buffer": torch.randn(16, generator=gen)}},
                   "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]},
        extra={"variant": variant, "history": [float(step), (step, variant)]},
    )  # fmt: skip


def expected_state(step: int, variant: int) -> TrainState:
    """The state saved as ``variant`` at ``step``, with a seed that stays distinct for large
    variants (the kill loops number their replacements)."""
    return make_state(step, variant, seed=step * 1_000_003 + variant)


def final_of(state: TrainState) -> TrainState:
    """What ``save_final_model(state)`` stores: the weights (+ spec, step, episodes, stats)."""
    return state.replace(optimizer=None, scheduler=None, scaler=None, rng=None, extra={})


def stored_state(mode: str, step: int, variant: int) -> TrainState:
    """What loading the save of ``expected_state(step, variant)`` gives back: its weights-only
    form when ``mode`` is ``"final_model"`` (``save_final_model``), else the whole state."""
    state = expected_state(step, variant)
    return final_of(state) if mode == "final_model" else state


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (bit-exact comparisons, NaNs included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes (``raw`` as ``bytes``)."""
    return raw(tensor).numpy().tobytes()


def looks_same(expected: TrainState, actual: TrainState) -> bool:
    """The step, ``extra`` and the big tensor's bits agree: a cheap filter before the full
    comparison (building ``assert_states_equal``'s report of a mismatch is slow), and enough
    to tell which of the states ``expected_state`` builds a loaded one is."""
    a, b = expected.model.get("w"), actual.model.get("w")
    return (
        expected.step == actual.step
        and dict(expected.extra) == dict(actual.extra)
        and isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and (a.dtype, a.shape) == (b.dtype, b.shape)
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def same(expected: TrainState, actual: TrainState) -> bool:
    """Bit-exact equality of the whole state (``assert_states_equal``) as a bool."""
    if not looks_same(expected, actual):
        return False
    try:
        assert_states_equal(expected, actual)
    except AssertionError:
        return False
    return True


def which(actual: TrainState, candidates: dict[str, TrainState | None]) -> str | None:
    """The label of the candidate ``actual`` is bit-exactly equal to, or None."""
    return next((k for k, v in candidates.items() if v is not None and same(v, actual)), None)


def listed_meta(
    step: int,
    *,
    kind: str = "periodic",
    run_dir: str | Path = "/nonexistent-keisei-fn-run",
    **fields: Any,
) -> CheckpointMeta:
    """The meta a listing gives for a checkpoint that is not on disk (for retention's pure
    plans): ``checkpoint_ts{step}`` (``final_model`` for that kind), 100 bytes, format 3;
    ``fields`` override the rest (``created``, ``health``, ``extra``, ...)."""
    name = "final_model" if kind == "final_model" else f"checkpoint_ts{step}"
    defaults: dict[str, Any] = {
        "format_version": 3,
        "episodes": 0,
        "stats": GameStats(),
        "spec": None,
        "weights_size": 100,
        "weights_digest": "blake3:00",
        "digest": "blake3:11",
        "created": "2024-01-01T00:00:00+00:00",
    }
    return CheckpointMeta(
        path=Path(run_dir) / name, name=name, kind=kind, step=step, **(defaults | fields)
    )
