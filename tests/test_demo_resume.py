"""The demo interrupted and resumed: it ends where, and as, a run never interrupted ends.

A kill (``kill -9``) right after a save is simulated by an exception out of the demo's ``say``
as it reports the save: the run directory is then exactly what the kill leaves. Ctrl-C is a real
SIGINT, sent to this process in the middle of a training step (from inside the loss). Every run
is ``run_demo`` in this process, on a small pool and batch, so that a run takes seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import keisei_fn.demo as demo
from keisei_fn import list_checkpoints, load_model, load_state
from keisei_fn.demo import DemoConfig, DemoResult, legal_mass, run_demo

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


class Killed(BaseException):
    """What ``kill -9`` does to the demo: it stops, nothing runs after."""


def demo_run(run_dir: Path, **changes: object) -> tuple[DemoResult, list[str]]:
    lines: list[str] = []
    config = replace(BASE, run_dir=run_dir, **changes)
    return run_demo(config, say=lines.append, progress=False), lines


def killed_after_saving(run_dir: Path, name: str, **changes: object) -> list[str]:
    """The demo killed the instant it reports having saved ``name``."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith(f"saved {name} "):
            raise Killed

    with pytest.raises(Killed):
        run_demo(replace(BASE, run_dir=run_dir, **changes), say=say, progress=False)
    return lines


def ctrl_c_in_step(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, nth: int, **changes: object
) -> list[str]:
    """The demo with Ctrl-C (SIGINT to this process) pressed during the ``nth`` training step of
    this call, after it drew its batch and before the optimizer stepped."""
    lines: list[str] = []
    calls = 0
    loss: Callable[..., torch.Tensor] = demo.legality_loss

    def pressing(*args: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*args)

    with monkeypatch.context() as patch:
        patch.setattr(demo, "legality_loss", pressing)
        with pytest.raises(KeyboardInterrupt):
            run_demo(replace(BASE, run_dir=run_dir, **changes), say=lines.append, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    return lines


def weight_bytes(run_dir: Path) -> dict[str, bytes]:
    """The final model's tensors, as raw bytes."""
    (final_model,) = [m for m in list_checkpoints(run_dir) if m.name == "final_model"]
    return {
        key: tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for key, tensor in load_file(final_model.weights_path).items()
    }


def final_extra(run_dir: Path) -> dict[str, object]:
    return dict(load_state(run_dir / f"checkpoint_ts{load_state(run_dir).step}").extra)


@pytest.fixture(autouse=True)
def terminal_sigint() -> object:
    """Python's own Ctrl-C handler, as in a terminal (pytest-xdist's workers ignore SIGINT),
    put back as it was after the test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


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


# --- 2: a resumed run stops where an uninterrupted one does, bit for bit -----------------------


def test_killed_between_two_measurements_resumes_to_the_same_step_and_weights(straight, tmp_path):
    run_dir = tmp_path / "run"
    killed_after_saving(run_dir, "checkpoint_ts14")
    assert not (run_dir / "final_model.json").exists()
    state = load_state(run_dir)
    assert state.step == 14
    # the target is already reached at step 14: only the check at 15 may see it
    model, _ = load_model(run_dir / "checkpoint_ts14")
    assert legal_mass(model, *demo._pool(BASE.pool_size, BASE.seed)) >= BASE.target_legal_mass

    result, lines = demo_run(run_dir)
    assert f"resumed from {run_dir}/checkpoint_ts14" in lines[0]
    assert result.step == STOP and result.reached_target, lines
    assert weight_bytes(run_dir) == weight_bytes(straight[0])
    assert final_extra(run_dir) == final_extra(straight[0])


def test_ctrl_c_mid_step_saves_that_whole_step_and_resumes_exactly(straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    lines = ctrl_c_in_step(monkeypatch, run_dir, 13)
    assert lines[-1] == (
        "\ninterrupted: saved checkpoint_ts13; run the same command again to resume"
    )
    assert load_state(run_dir).step == 13  # the step Ctrl-C came in, finished

    result, lines = demo_run(run_dir)
    assert f"resumed from {run_dir}/checkpoint_ts13" in lines[0]
    assert result.step == STOP and result.reached_target, lines
    assert weight_bytes(run_dir) == weight_bytes(straight[0])
    assert final_extra(run_dir) == final_extra(straight[0])


# --- 1: a run trained on past its target goes on past it after an interruption ---------------


@pytest.mark.parametrize("how", ["kill", "ctrl-c", "ctrl-c, then rerun without --steps"])
def test_an_interrupted_train_on_trains_on_to_its_step(
    straight, trained_on, tmp_path, monkeypatch, how
):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    if how == "kill":
        killed_after_saving(run_dir, "checkpoint_ts21", steps=25)
        resumed_at = 21
    else:  # Ctrl-C in the 4th step of the train-on: step 19
        ctrl_c_in_step(monkeypatch, run_dir, 4, steps=25)
        resumed_at = 19
    assert (
        load_state(run_dir).step == resumed_at and not (run_dir / "checkpoint_ts25.json").exists()
    )

    result, lines = demo_run(run_dir, steps=None if "without" in how else 25)
    assert f"at step {resumed_at}" in lines[0]
    assert (
        f"training on from step {resumed_at} to step 25 (target legal mass 0.05 already reached: "
        "it does not stop this run)"
    ) in lines
    assert (result.step, result.target_step, result.trained) == (25, 25, True), lines
    assert final_extra(run_dir)["stopped"] == "step limit 25 reached"
    assert weight_bytes(run_dir) == weight_bytes(trained_on[0])


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


# --- a second Ctrl-C: nothing half-done is saved ----------------------------------------------


def test_a_second_ctrl_c_interrupts_at_once_and_saves_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    presses = 0
    loss = demo.legality_loss

    def pressing(*args: torch.Tensor) -> torch.Tensor:
        nonlocal presses
        if (run_dir / "checkpoint_ts7.json").exists():  # in step 8
            presses += 1
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 10  # until the demo's handler has seen it
            while signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                assert time.monotonic() < deadline
            presses += 1
            os.kill(os.getpid(), signal.SIGINT)  # the second: KeyboardInterrupt, here
        return loss(*args)

    lines: list[str] = []
    monkeypatch.setattr(demo, "legality_loss", pressing)
    with pytest.raises(KeyboardInterrupt):
        run_demo(replace(BASE, run_dir=run_dir), say=lines.append, progress=False)
    assert presses == 2
    assert lines[-1] == (
        "\ninterrupted mid-step: not saved; run the same command again to resume from "
        "checkpoint_ts7"
    )
    assert [m.step for m in list_checkpoints(run_dir)] == [7]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
