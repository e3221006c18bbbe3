"""The demo interrupted and resumed: it ends where, and as, a run never interrupted ends.

Every run is ``run_demo`` in this process, on a small pool and batch, so that a run takes
seconds.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from keisei_fn import load_state
from keisei_fn.demo import DemoConfig, DemoResult, run_demo

# Seed 0 on this pool: legal mass 0.02 at step 10, 0.11 at step 15 (measured every 5 steps), so
# the target 0.05 stops the run at step 15, though it is reached at step 13 already.
BASE = DemoConfig(
    run_dir=Path("unused"),
    steps=60,
    target_legal_mass=0.05,
    pool_size=32,
    heldout_size=8,
    batch_size=8,
    lr=1e-2,
    eval_every=5,
    checkpoint_every=7,
    keep_last=1,
    wandb="disabled",
)
STOP = 15  # where the run above stops: the first measurement at or over the target


def demo_run(run_dir: Path, **changes: object) -> tuple[DemoResult, list[str]]:
    lines: list[str] = []
    config = replace(BASE, run_dir=run_dir, **changes)
    return run_demo(config, say=lines.append, progress=False), lines


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run never interrupted: it stops at the target, at step ``STOP``."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result, lines = demo_run(run_dir)
    assert (result.step, result.reached_target, result.trained) == (STOP, True, True), lines
    return run_dir, lines


@pytest.fixture(scope="module")
def trained_on(straight: tuple[Path, list[str]]) -> tuple[Path, list[str]]:
    """The straight run, complete at the target, trained on to step 25 uninterrupted."""
    run_dir = straight[0].parent / "trained_on"
    shutil.copytree(straight[0], run_dir)
    result, lines = demo_run(run_dir, steps=25)
    assert (result.step, result.trained) == (25, True), lines
    return run_dir, lines


# --- 3: a run resumes from its own directory only ---------------------------------------------


def test_a_run_in_a_subdirectory_of_a_complete_run_starts_fresh(straight, tmp_path):
    parent = tmp_path / "demo"
    shutil.copytree(straight[0], parent)
    before = sorted(p.name for p in parent.iterdir())
    child = parent / "seed1"

    result, lines = demo_run(child, seed=1, steps=5)
    assert lines[0] == f"fresh start in {child} (no checkpoint to resume)"
    assert (result.resumed_from, result.trained, result.step) == (None, True, 5)
    assert load_state(child).step == 5
    assert sorted(p.name for p in parent.iterdir()) == [*before, "seed1"]


# --- 4: an ETA the target may cut short says it is an upper bound ------------------------------


def test_the_eta_is_an_upper_bound_when_the_target_may_stop_the_run(straight, trained_on):
    lines = straight[1]
    assert (
        "training to step 60, or until the legal mass reaches 0.05 (checked every 5 steps; ETAs "
        "are to step 60: an upper bound)"
    ) in lines
    progress = [line for line in lines if line.startswith("step ")]
    assert progress and all(re.search(r"/60  .* ETA <= \d+s$", line) for line in progress)
    # training on past the target: nothing stops it before its step, the ETA is one
    progress = [line for line in trained_on[1] if line.startswith("step ")]
    assert progress and all(re.search(r"/25  .* ETA \d+s$", line) for line in progress)
