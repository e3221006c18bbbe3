"""Exact resume: train N steps straight (saving at step k on the way) vs. load the step-k
checkpoint in a fresh process and train the remaining N - k steps: bit-identical parameters,
buffers, optimizer, scheduler, scaler and RNG states.

The loops (``resume_loops``) use Adam or SGD with momentum, an LR scheduler, a CPU GradScaler
that skips steps now and then, bf16 autocast, dropout and draws from torch's, NumPy's and
Python's global RNGs inside the step. Every process runs torch single-threaded: CPU reductions
are not bit-stable across processes with several threads.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import resume_loops as loops
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import GameStats, TrainState, capture, load_state, save_state
from keisei_fn.testing import assert_states_equal

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def straight_run(
    loop_name: str,
    run_dir: str,
    *,
    save_at: int,
    steps: int,
    episodes: int = 0,
    stats: GameStats | None = None,
    extra: Mapping[str, Any] | None = None,
) -> TrainState:
    """Train ``steps`` steps from seed 0, saving a checkpoint after ``save_at`` on the way, as a
    real run does; return the final state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model, optimizer, scheduler, scaler = loop = loops.SETUPS[loop_name]()

    def snapshot(step: int) -> TrainState:
        return capture(
            loops.SPEC,
            model,
            optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            episodes=episodes,
            stats=stats,
            extra=extra,
        )

    for step in range(steps):
        if step == save_at:
            save_state(snapshot(step), run_dir)
        loops.train_step(*loop, step)
    return snapshot(steps)


def resumed_run(loop_name: str, run_dir: str, *, save_at: int, steps: int) -> TrainState:
    """Resume from the step-``save_at`` checkpoint in a fresh process; return its final state."""
    checkpoint = Path(run_dir) / f"checkpoint_ts{save_at}"
    done = subprocess.run(
        [sys.executable, loops.__file__, loop_name, str(checkpoint), str(steps), run_dir],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return load_state(run_dir, prefix=loops.RESUMED_PREFIX)


def check_exact_resume(loop_name: str, save_at: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        straight = straight_run(loop_name, run_dir, save_at=save_at, steps=steps)
        resumed = resumed_run(loop_name, run_dir, save_at=save_at, steps=steps)
    assert_states_equal(straight, resumed)


@pytest.mark.parametrize("loop_name", ["adam", "sgd"])
@settings(max_examples=2, deadline=None)
@given(save_at=st.integers(1, STEPS - 1))
def test_exact_resume_in_a_fresh_process(loop_name: str, save_at: int) -> None:
    check_exact_resume(loop_name, save_at, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("loop_name", ["adam", "sgd", "plain"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_exact_resume_in_a_fresh_process_slow(loop_name: str, data: st.DataObject) -> None:
    steps = data.draw(st.integers(2, 16), label="steps")
    check_exact_resume(loop_name, data.draw(st.integers(1, steps - 1), label="save_at"), steps)


def test_the_loops_make_the_scaler_skip_steps() -> None:
    # Exactness is only tested if the scaler's state matters: some steps must be skipped.
    with tempfile.TemporaryDirectory() as run_dir:
        final = straight_run("adam", run_dir, save_at=1, steps=STEPS)
    assert final.optimizer is not None
    adam_steps = final.optimizer["state"][0]["step"]
    assert 0 < int(adam_steps) < STEPS


def test_bug11_elo_and_metrics_survive_resume() -> None:
    # Keisei lost its Elo state and metric history on resume until they were checkpointed.
    elo_state = {
        "black_rating": 1523.4000000000001,
        "white_rating": 1476.6,
        "initial_rating": 1500.0,
        "k_factor": 32.0,
        "rating_history": [{"black": 1500.0, "white": 1500.0}, {"black": 1516.0, "white": 1484.0}],
    }
    metrics_history = {
        "policy_losses": [0.1 + 0.2, 1e-310, -0.0],
        "kl_divergences": [math.nan, 0.003],
        "clip_fractions": [math.inf, 0.25],
        "episode_lengths": [112, 87],
        "win_rates": [(0.5, 0.3, 0.2)],
    }
    extra = {"elo_state": elo_state, "metrics_history": metrics_history}
    stats = GameStats(black_wins=5, white_wins=3, draws=1)
    with tempfile.TemporaryDirectory() as run_dir:
        straight = straight_run(
            "adam", run_dir, save_at=2, steps=4, episodes=12, stats=stats, extra=extra
        )
        resumed = resumed_run("adam", run_dir, save_at=2, steps=4)
    assert_states_equal(straight, resumed)
    assert resumed.stats == stats and resumed.episodes == 12
    assert resumed.extra["elo_state"]["rating_history"][1]["white"] == 1484.0
    assert math.isnan(resumed.extra["metrics_history"]["kl_divergences"][0])
