"""Crash safety with real processes: SIGKILL at random moments of saving, replacing, marking
final and pruning never leaves a "latest" that fails to load, and never blocks a later save at
the same step (Keisei bug 1). A full disk (``RLIMIT_FSIZE``: writes fail with EFBIG) makes
``save_state`` raise OSError and leaves no trace.

Killing a freshly started Python per kill would cost an interpreter and a torch import each
time; instead a "zygote" process (``kill_harness.Zygote``) imports everything once and forks one
saver per kill. The savers are real processes doing real saves, and the kill is a real SIGKILL.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kill_harness import Zygote, sigkilled
from saved_states import make_state

from keisei_fn import (
    RetentionPolicy,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune,
    save_state,
)
from keisei_fn.store import scan_run_dir, verify_checkpoint
from keisei_fn.testing import assert_states_equal, fresh_run_dir


def expected_state(step: int, variant: int) -> TrainState:
    """The state saved at ``step``: a pure function of (step, variant), ~1 MB of weights."""
    return make_state(step, variant, seed=2 * step + variant)


def save_forever(run_dir: str, seed: int) -> None:
    """A saver process: saves consecutive steps, sometimes replaces the newest checkpoint with
    another state, marks it final (a sidecar-only rewrite) or prunes — until it is killed."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    steps = [m.step for m in list_checkpoints(run_dir)]
    step = max(steps, default=0) + 1
    on_disk: dict[int, int] = {}  # step -> variant this process saved there
    while True:
        last, choice = step - 1, rng.random()
        if choice < 0.15 and last in on_disk:
            on_disk[last] ^= 1
            save_state(expected_state(last, on_disk[last]), run_dir, overwrite=True)
        elif choice < 0.3 and last in on_disk:
            save_state(expected_state(last, on_disk[last]), run_dir, kind="final")
        elif choice < 0.4:
            prune(run_dir, RetentionPolicy(keep_last=3))
        else:
            save_state(expected_state(step, 0), run_dir)
            on_disk[step] = 0
            step += 1


def _check_after_kill(run_dir: Path) -> int:
    """The invariants after a kill; returns the newest valid step (0 for none)."""
    latest = latest_checkpoint(run_dir)
    newest = 0
    if latest is not None:
        state = load_state(latest)  # verified: a "latest" that fails to load is the bug
        assert_states_equal(expected_state(state.step, state.extra["variant"]), state)
        newest = state.step
    for meta in list_checkpoints(run_dir):  # nothing listed is incomplete or corrupt
        verify_checkpoint(meta.path)
    # Keisei bug 1: the step the saver was in the middle of can be saved now
    fresh = expected_state(newest + 1, 0)
    meta = save_state(fresh, run_dir)
    assert_states_equal(fresh, load_state(meta.weights_path))
    return newest + 1


def _kill_savers(run_dir: Path, kills: int, seed: int) -> int:
    """Fork ``kills`` savers and SIGKILL each after a random delay; returns how many kills
    left incomplete files behind (a save, replace or prune interrupted mid-way)."""
    rng = random.Random(seed)
    interrupted = 0
    with Zygote("test_crash:save_forever", stderr=subprocess.PIPE) as zygote:
        for kill in range(kills):
            pid = zygote.fork(str(run_dir), rng.getrandbits(32))
            time.sleep(rng.uniform(0.0, 0.05))
            status = zygote.kill(pid)
            assert sigkilled(status), (
                f"kill {kill} (seed {seed}): the saver died by itself:\n{_stderr(zygote.process)}"
            )
            scan = scan_run_dir(run_dir)
            interrupted += bool(scan.leftovers or scan.invalid)
            _check_after_kill(run_dir)
    prune(run_dir, RetentionPolicy(keep_last=3))
    scan = scan_run_dir(run_dir)
    assert not scan.leftovers and not scan.invalid and not scan.unreadable
    return interrupted


def _stderr(process: subprocess.Popen[str]) -> str:
    process.kill()
    assert process.stderr is not None
    return process.stderr.read()


def test_sigkill_at_random_moments_never_breaks_latest_or_later_saves() -> None:
    seed = random.randrange(2**32)
    with fresh_run_dir() as run_dir:
        interrupted = _kill_savers(run_dir, kills=50, seed=seed)
    assert interrupted >= 5, f"only {interrupted} of 50 kills hit a save mid-way (seed {seed})"


@pytest.mark.slow
def test_sigkill_many_times() -> None:
    seed = random.randrange(2**32)
    with fresh_run_dir() as run_dir:
        assert _kill_savers(run_dir, kills=600, seed=seed) >= 60, seed


# --- a full disk ------------------------------------------------------------------------------

_FULL_DISK = r"""
import os, resource, signal, sys
import torch
from keisei_fn import TrainState, save_state

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
small = TrainState(spec=None, step=1, model={"w": torch.arange(4.0)}, extra={"n": 1})
cases = {
    # 4 MB of weights, a small sidecar
    "weights_too_big": TrainState(spec=None, step=2, model={"w": torch.ones(1 << 20)}),
    # tiny weights and a large sidecar: the weights are committed before the sidecar fails
    "sidecar_too_big": TrainState(
        spec=None, step=2, model={"w": torch.ones(2)}, extra={"h": [0.5] * 50000}
    ),
    # replacing the existing step-1 checkpoint with a bigger state
    "replace_too_big": TrainState(spec=None, step=1, model={"w": torch.ones(1 << 20)}),
}
for case in cases:
    save_state(small, os.path.join(sys.argv[1], case))
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
for case, state in cases.items():
    try:
        save_state(state, os.path.join(sys.argv[1], case), overwrite=True)
    except OSError as exc:
        print(case, type(exc).__name__, exc.errno)
    else:
        print(case, "saved", None)
"""


def test_a_full_disk_raises_oserror_and_leaves_no_trace() -> None:
    with fresh_run_dir() as base:
        out = subprocess.run(
            [sys.executable, "-c", _FULL_DISK, str(base)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        results = [line.split() for line in out.stdout.splitlines()]
        assert len(results) == 3, out.stdout
        previous = TrainState(spec=None, step=1, model={"w": torch.arange(4.0)}, extra={"n": 1})
        for case, error, code in results:
            assert error != "saved" and code == str(errno.EFBIG), (case, error, code)
            run_dir = base / case
            (listed,) = list_checkpoints(run_dir)
            assert listed.step == 1, case
            assert_states_equal(previous, load_state(run_dir))
            assert sorted(os.listdir(run_dir)) == sorted(
                ["checkpoint_ts1.json", listed.weights_file]
            ), case
