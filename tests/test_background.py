"""AsyncSaver: background writes that surface errors and never expose partial checkpoints."""

from __future__ import annotations

import time

import pytest
import torch
from kill_harness import Log, Zygote, read_log, sigkilled
from saved_states import raw_bytes

from keisei_fn import ModelSpec, build_model, capture, latest_checkpoint, load_state
from keisei_fn.store.background import AsyncSaver
from keisei_fn.store.checkpoints import verify_checkpoint
from keisei_fn.store.listing import scan_run_dir

SPEC = ModelSpec(model_type="testmodel")


def test_save_in_background_and_training_after_the_call_changes_nothing(tmp_path):
    model = build_model(SPEC, seed=0)
    opt = torch.optim.Adam(model.parameters())
    state = capture(SPEC, model, opt, step=5)
    expected = {k: raw_bytes(v) for k, v in state.model.items()}
    with AsyncSaver(tmp_path) as saver:
        handle = saver.save(state)
        with torch.no_grad():  # the loop goes on and changes every parameter
            for p in model.parameters():
                p.add_(1.0)
        meta = handle.wait()
        assert handle.done()
    assert meta.name == "checkpoint_ts5"
    loaded = load_state(tmp_path)
    assert {k: raw_bytes(v) for k, v in loaded.model.items()} == expected


def test_one_write_in_flight_and_errors_surface(tmp_path):
    model = build_model(SPEC, seed=0)
    saver = AsyncSaver(tmp_path)
    first = saver.save(capture(SPEC, model, step=1))
    second = saver.save(capture(SPEC, model, step=2))
    assert first.done()  # the second save waited for the first (back-pressure)
    assert second.wait().step == 2
    saver.close()

    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    saver = AsyncSaver(blocked / "run")
    failing = saver.save(capture(SPEC, model, step=3))
    with pytest.raises(OSError):
        failing.wait()
    with pytest.raises(OSError):  # ... and again on the next save, never silently
        saver.save(capture(SPEC, model, step=4))
    # the error was reported once: the saver works again afterwards
    saver.run_dir = tmp_path / "ok"
    assert saver.save(capture(SPEC, model, step=4)).wait().step == 4
    saver.close()


def test_wait_and_close_raise_the_pending_error(tmp_path):
    (tmp_path / "f").write_text("x")
    saver = AsyncSaver(tmp_path / "f" / "run")
    saver.save(capture(SPEC, build_model(SPEC, seed=0), step=1))
    with pytest.raises(OSError):
        saver.close()


def background_saver(run_dir: str, log_path: str) -> None:
    """A victim (forked by ``kill_harness.Zygote``): saves in the background, step after step,
    until it is killed, logging each save it submitted."""
    log = Log(log_path)
    spec = ModelSpec(tower_depth=2, tower_width=64)
    model = build_model(spec, seed=0)
    opt = torch.optim.Adam(model.parameters())
    with AsyncSaver(run_dir) as saver:
        for step in range(1, 10_000):
            saver.save(capture(spec, model, opt, step=step))
            log("submitted", step, 0)


def test_killed_during_background_writes_leaves_nothing_partial(tmp_path):
    """SIGKILL while the worker writes: latest_checkpoint is always loadable. The savers are
    real processes forked by one zygote (an interpreter start and a torch import for all)."""
    with (
        open(tmp_path / "stderr", "w") as stderr,
        Zygote("test_background:background_saver", stderr=stderr) as zygote,
    ):
        for delay in (0.3, 0.7, 1.1):
            run_dir, log = tmp_path / f"run{delay}", tmp_path / f"log{delay}"
            pid = zygote.fork(str(run_dir), str(log))
            deadline = time.monotonic() + 60
            while not read_log(log):  # the first save was submitted
                assert time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-4000:]
                time.sleep(0.005)
            time.sleep(delay)
            assert sigkilled(zygote.kill(pid)), (tmp_path / "stderr").read_text()[-4000:]
            latest = latest_checkpoint(run_dir)
            assert latest is not None
            load_state(latest)  # verified: never a partial or corrupt checkpoint
            scan = scan_run_dir(run_dir)
            assert scan.valid and not scan.invalid  # leftovers (temp files) are invisible
            for meta in scan.valid:
                verify_checkpoint(meta.path)
