"""Preemption: real signals to real training processes give a checkpoint, the documented exit
code, and a resumed run bit-identical to one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from saved_states import raw_bytes

import keisei_fn as kf
from keisei_fn.errors import SpecError

LOOP = str(Path(__file__).with_name("preempted_loop.py"))
TOTAL = 9


def start(run_dir: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, LOOP, str(run_dir), str(TOTAL), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=240)
    return process.returncode, out, err


def final_weights(run_dir: Path) -> dict[str, bytes]:
    state = kf.load_state(run_dir / "final_model")
    return {k: raw_bytes(v) for k, v in state.model.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, out, err = finish(start(run_dir, "checkpointer"))
    assert code == 0 and out.endswith("done\n"), err
    return final_weights(run_dir)


def read_until(process: subprocess.Popen[str], line: str) -> str:
    """The loop's output up to and including ``line``."""
    assert process.stdout is not None and process.stderr is not None
    seen = ""
    for got in process.stdout:
        seen += got
        if got.strip() == line:
            return seen
    raise AssertionError(f"the loop ended before {line!r}: {process.stderr.read()}")


@pytest.mark.parametrize("mode", ["checkpointer", "async"])
def test_a_signal_gives_a_checkpoint_an_exit_code_and_an_exact_resume(
    mode: str, tmp_path: Path, uninterrupted: dict[str, bytes]
) -> None:
    process = start(tmp_path, mode)
    seen = read_until(process, "writing 3" if mode == "async" else "step 4")
    process.send_signal(signal.SIGTERM)  # async: while the write of step 3 is in flight
    time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)  # a second signal, likely during the preemption save
    code, out, err = finish(process)
    out = seen + out
    assert code == 143, (code, out, err)  # 128 + SIGTERM, the first signal
    assert "preempted by SIGTERM" in err and "done" not in out
    saved = kf.list_checkpoints(tmp_path)
    for meta in saved:
        kf.verify_checkpoint(meta.path)  # everything listed is intact
    steps = [m.step for m in saved]
    last_step = int(out.split("step ")[-1].split()[0])  # the step the loop was at
    assert steps[-1] == last_step  # the preemption checkpoint is the step it ended at
    if mode == "async":
        assert 3 in steps  # the write in flight at the signal was finished first
    code, out, err = finish(start(tmp_path, mode))
    assert code == 0 and f"resumed {last_step}" in out, err
    assert final_weights(tmp_path) == uninterrupted


TEARDOWN_SIGNAL = """
import os, signal, keisei_fn as kf

class SignalAtTeardown:  # a module global: deleted when the interpreter tears down __main__
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)

sentinel = SignalAtTeardown()
with kf.Preemption(signals=(signal.SIGTERM, signal.SIGUSR1)) as preemption:
    os.kill(os.getpid(), signal.SIGTERM)
    preemption.exit("saved nothing")
"""


def test_a_second_signal_during_interpreter_teardown_keeps_the_exit_code() -> None:
    # Python resets its handlers to the default (which kills) before it tears down modules; a
    # second signal then (CI saw one 0.1 s after the first) must not turn 143 into "killed".
    done = subprocess.run([sys.executable, "-c", TEARDOWN_SIGNAL], capture_output=True, text=True)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert "preempted by SIGTERM: saved nothing; exiting with 143" in done.stderr


def test_preemption_restores_the_previous_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with kf.Preemption(signals=(signal.SIGUSR2,)) as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption.requested and preemption.received == signal.SIGUSR2
        assert preemption.exit_code == 128 + signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before


def test_the_next_maybe_save_saves_and_exits_even_when_not_due(tmp_path: Path) -> None:
    state = kf.TrainState(spec=None, step=7, model={"w": torch.ones(3)})
    with kf.Preemption(signals=(signal.SIGUSR2,), exit_code=75) as preemption:
        ckpt = kf.Checkpointer(run_dir=tmp_path, interval=1000, preemption=preemption)
        assert ckpt.maybe_save(state, step=7, last_saved=0).status == "skipped"
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(SystemExit) as exited:
            ckpt.maybe_save(state, step=7, last_saved=0)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # until the process is gone
    assert exited.value.code == 75
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # this test's process goes on
    assert [m.step for m in kf.list_checkpoints(tmp_path)] == [7]


def test_bad_preemptions_are_refused() -> None:
    for signals, code in (((), None), ((signal.SIGKILL,), None), ((signal.SIGTERM,), 256),
                          ((signal.SIGTERM,), True), ((99999,), None)):  # fmt: skip
        with pytest.raises(SpecError):
            kf.Preemption(signals=signals, exit_code=code)
    preemption = kf.Preemption(signals=(signal.SIGUSR2,))
    with preemption, pytest.raises(SpecError, match="already entered"), preemption:
        pass


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("mode", ["signal", "time"])
def test_ranks_decide_together(mode: str, tmp_path: Path) -> None:
    """A signal that reaches the ranks at different steps, or clocks that disagree, still
    make every rank save the same checkpoint at the same step (a rank deciding alone would
    leave the others waiting in a collective)."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    script = Path(__file__).with_name("ddp_preemption.py")
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), run_dir, out, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    detail = result.stdout[-2000:] + result.stderr[-2000:]
    if mode == "signal":
        assert ranks[0]["exit"] == ranks[1]["exit"] == [3, 143], (ranks, detail)
        assert [m.step for m in kf.list_checkpoints(run_dir)] == [3]
    else:
        assert result.returncode == 0, detail
        assert ranks[0]["saved"] == ranks[1]["saved"] == [4, 8], ranks  # rank 0's clock
    for meta in kf.list_checkpoints(run_dir):
        kf.verify_checkpoint(meta.path)


def test_a_second_signal_after_the_exit_cannot_cut_the_teardown_short(tmp_path: Path) -> None:
    script = f"""
import atexit, os, signal, time
import torch
import keisei_fn as kf
atexit.register(lambda: (time.sleep(0.3), print("teardown finished", flush=True)))
state = kf.TrainState(spec=None, step=1, model={{"w": torch.zeros(2)}})
with kf.Preemption() as preemption:
    ckpt = kf.Checkpointer(run_dir={str(tmp_path)!r}, interval=1000, preemption=preemption)
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        ckpt.maybe_save(state, step=1, last_saved=0)
    finally:
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # runs first
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 143, done.stderr
    assert "teardown finished" in done.stdout
    assert [m.step for m in kf.list_checkpoints(tmp_path)] == [1]


def test_a_loop_on_another_thread_still_exits_the_process(tmp_path: Path) -> None:
    script = f"""
import os, signal, threading, time
import torch
import keisei_fn as kf
state = kf.TrainState(spec=None, step=1, model={{"w": torch.zeros(2)}})
with kf.Preemption() as preemption:
    ckpt = kf.Checkpointer(run_dir={str(tmp_path)!r}, interval=1000, preemption=preemption)
    def loop():
        while True:
            ckpt.maybe_save(state, step=1, last_saved=0)
            time.sleep(0.01)
    threading.Thread(target=loop, daemon=True).start()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("the main thread went on")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 143 and "went on" not in done.stdout, done.stderr
    assert [m.step for m in kf.list_checkpoints(tmp_path)] == [1]
