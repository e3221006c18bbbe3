"""``follow``: workers that load each newer checkpoint of a learner that saves and prunes
aggressively (``keep_last=1``), in real processes, locally and on the S3 test server."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from kill_harness import Recorder, read_records, run_workers
from saved_states import expected_state, raw_bytes
from torch import nn

from keisei_fn import Checkpointer, RetentionPolicy, follow, save_state
from keisei_fn.errors import SpecError

FOLLOWERS = 3


class Holder(nn.Module):
    """A module with the keys of ``expected_state``'s model (``tied`` shares ``w``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(256, 1024))
        self.b = nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
        self.tied = self.w


def holds(model: Holder, step: int) -> bool:
    """Whether ``model`` holds exactly the weights the learner committed at ``step``."""
    expected = expected_state(step, 0).model
    return all(raw_bytes(getattr(model, k)) == raw_bytes(expected[k]) for k in ("w", "b"))


def learner(*, run_dir: str, out: str, steps: int, barrier: Any, stop: Any) -> None:
    """Save steps 1 to ``steps`` with retention keep_last=1, then set ``stop``."""
    record = Recorder(out)
    checkpointer = Checkpointer(run_dir=run_dir, interval=1, retention=RetentionPolicy(keep_last=1))
    for step in range(1, steps + 1):
        result = checkpointer.maybe_save(expected_state(step, 0), step=step, last_saved=step - 1)
        if result.status != "saved":
            record("save failed", step, repr(result.error))
    stop.set()


def follower(*, run_dir: str, out: str, poll: float, barrier: Any, stop: Any) -> None:
    """Follow until the learner has stopped and its last checkpoint is loaded; record each step
    loaded, whether the model held that committed state, and every warning."""
    record = Recorder(out)

    class Warnings(logging.Handler):
        def emit(self, entry: logging.LogRecord) -> None:
            record("warning", entry.getMessage())

    logging.getLogger("keisei_fn").addHandler(Warnings(logging.WARNING))
    model = Holder()
    for meta in follow(run_dir, model, poll=poll, stop=stop.is_set):
        record("held", meta.step, holds(model, meta.step))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_followers_hold_only_committed_states_in_increasing_order(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = request.getfixturevalue("s3_url") if where == "s3" else str(tmp_path / "run")
    last, poll = (12, 0.05) if where == "s3" else (60, 0.005)  # S3: listings cost a request
    outs = [tmp_path / f"{who}.jsonl" for who in ("learner", *range(FOLLOWERS))]
    run_workers(
        __name__,
        [
            {"fn": "learner", "run_dir": run_dir, "out": str(outs[0]), "steps": last},
            *({"fn": "follower", "run_dir": run_dir, "out": str(o), "poll": poll}
              for o in outs[1:]),
        ],
        timeout=300,
    )  # fmt: skip
    assert read_records(outs[0]) == []  # every save succeeded
    for out in outs[1:]:
        records = read_records(out)
        assert [r for r in records if r[0] != "held"] == [], records  # no warning at all
        steps = [step for _, step, _ in records]
        assert all(ok for _, _, ok in records), records  # each a committed state, exactly
        assert steps == sorted(set(steps)) and steps, steps  # strictly increasing
        assert steps[-1] == last  # caught up with the learner's last checkpoint


def test_a_corrupt_checkpoint_is_skipped_and_the_last_good_weights_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_state(expected_state(1, 0), tmp_path)
    model = Holder()
    followed = follow(tmp_path, model, poll=0.01, timeout=0.2)
    assert next(followed).step == 1 and holds(model, 1)
    bad = save_state(expected_state(2, 0), tmp_path)
    raw = bytearray(bad.weights_path.read_bytes())
    raw[-1] ^= 0x01  # the last model tensor's last byte
    bad.weights_path.write_bytes(bytes(raw))
    save_state(expected_state(3, 0).replace(model={"other": torch.zeros(1)}), tmp_path)
    with caplog.at_level(logging.WARNING, logger="keisei_fn"):
        assert list(followed) == []  # 3 does not fit the model, 2 is corrupt: both skipped
    assert holds(model, 1)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # once each, not once per poll
    assert "checkpoint_ts3" in warned[0] and "checkpoint_ts2" in warned[1]
    save_state(expected_state(4, 0), tmp_path)
    assert [m.step for m in follow(tmp_path, model, poll=0.01, timeout=0.2)] == [4]
    assert holds(model, 4)


def test_stop_ends_it_once_everything_committed_before_is_loaded(tmp_path: Path) -> None:
    for step in (1, 2):
        save_state(expected_state(step, 0), tmp_path)
    model = Holder()
    assert [m.step for m in follow(tmp_path, model, stop=lambda: True)] == [2]
    assert holds(model, 2)


def test_it_waits_for_a_run_directory_that_does_not_exist_yet(tmp_path: Path) -> None:
    started = time.monotonic()
    assert list(follow(tmp_path / "not-yet", Holder(), poll=0.01, timeout=0.1)) == []
    assert time.monotonic() - started >= 0.1


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for bad in ({"poll": 0}, {"poll": -1.0}, {"timeout": -1.0}, {"poll": float("nan")}):
        with pytest.raises(SpecError):
            next(follow(tmp_path, Holder(), **bad))
