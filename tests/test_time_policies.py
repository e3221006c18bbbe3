"""Time-based policies: saving every N seconds (an injected clock) and retention by time
(restic's ``forget`` rules), pure decisions over a clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keisei_fn import (
    Checkpointer,
    CheckpointMeta,
    RetentionPolicy,
    plan_prune,
    prune,
    save_state,
)
from keisei_fn.errors import SpecError
from keisei_fn.store import list_checkpoints
from tests.saved_states import listed_meta, make_state

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def meta(step: int, created: str) -> CheckpointMeta:
    return listed_meta(step, created=created)


#: A checkpoint every 20 minutes for the 3 days before NOW (step = minutes since the start).
START = NOW - timedelta(days=3)
EVERY_20_MIN = [
    meta(minutes, (START + timedelta(minutes=minutes)).isoformat())
    for minutes in range(20, 3 * 24 * 60 + 1, 20)
]


def kept(policy: RetentionPolicy, metas: list[CheckpointMeta] = EVERY_20_MIN) -> list[int]:
    plan = plan_prune(metas, policy, now=NOW)
    return sorted(m.step for m in metas if m.name in plan.keep)


def minutes_before_now(*ago: int) -> list[int]:
    return sorted(3 * 24 * 60 - m for m in ago)


def test_keep_within_keeps_what_is_younger_than_the_duration() -> None:
    # 12:00 back to 10:00 inclusive: 7 checkpoints
    assert kept(RetentionPolicy(keep_last=0, keep_within=timedelta(hours=2))) == minutes_before_now(
        120, 100, 80, 60, 40, 20, 0
    )


def test_keep_hourly_keeps_the_newest_of_each_of_the_last_hours() -> None:
    # hours 12:xx (12:00 only), 11:xx (11:40), 10:xx (10:40)
    assert kept(RetentionPolicy(keep_last=0, keep_hourly=3)) == minutes_before_now(80, 20, 0)


def test_keep_daily_keeps_the_newest_of_each_of_the_last_days() -> None:
    # Dec 7 (12:00), Dec 6 (23:40), Dec 5 (23:40)
    assert kept(RetentionPolicy(keep_last=0, keep_daily=3)) == minutes_before_now(
        12 * 60 + 24 * 60 + 20, 12 * 60 + 20, 0
    )


def test_periods_without_a_checkpoint_do_not_count_as_restic_does() -> None:
    sparse = [meta(1, "2026-12-01T08:00:00+00:00"), meta(2, "2026-12-07T11:00:00+00:00")]
    assert kept(RetentionPolicy(keep_last=0, keep_daily=2), sparse) == [1, 2]
    assert kept(RetentionPolicy(keep_last=0, keep_hourly=2), sparse) == [1, 2]


def test_rules_combine_and_the_newest_resume_point_is_always_kept() -> None:
    policy = RetentionPolicy(keep_last=1, keep_within=timedelta(minutes=30), keep_daily=2)
    assert kept(policy) == minutes_before_now(12 * 60 + 20, 20, 0)
    old = [meta(1, "2020-01-01T00:00:00+00:00"), meta(2, "2020-01-01T00:20:00+00:00")]
    assert kept(RetentionPolicy(keep_last=0, keep_within=timedelta(hours=1)), old) == [
        2
    ]  # newest only


def test_keep_last_none_keeps_everything_and_warns_beside_other_rules() -> None:
    assert len(kept(RetentionPolicy())) == len(EVERY_20_MIN)
    with pytest.warns(UserWarning, match="keep_last=None keeps every"):
        policy = RetentionPolicy(keep_daily=1)
    assert len(kept(policy)) == len(EVERY_20_MIN)  # as before time rules existed
    assert len(kept(RetentionPolicy(keep_last=0, keep_daily=1))) == 1


def test_times_in_other_zones_naive_future_and_unreadable_times() -> None:
    metas = [
        meta(1, "2026-12-07T20:30:00+09:00"),  # 11:30 UTC
        meta(2, "2026-12-07T11:40:00"),  # no offset: taken as UTC
        meta(3, "yesterday"),  # unreadable: kept by no time rule
        meta(4, "2026-12-08T00:00:00+00:00"),  # 12 h ahead: kept by no time rule
        meta(5, "2026-12-07T12:02:00+00:00"),  # another machine's clock, 2 min ahead
        meta(6, "9999-12-31T23:00:00-05:00"),  # beyond the calendar in UTC: unreadable
        meta(7, "2026-12-07T11:59:00+00:00"),  # the newest resume point
    ]
    policy = RetentionPolicy(keep_last=0, keep_within=timedelta(hours=1))
    within = plan_prune(metas, policy, now=NOW)
    assert set(within.keep) == {f"checkpoint_ts{s}" for s in (1, 2, 5, 7)}
    daily = plan_prune(metas, RetentionPolicy(keep_last=0, keep_daily=1), now=NOW)
    assert set(daily.keep) == {"checkpoint_ts5", "checkpoint_ts7"}  # 4 takes no day's slot


def test_bad_rules_and_a_naive_clock_are_refused() -> None:
    for bad in (
        {"keep_within": timedelta(0)},
        {"keep_within": 3600},
        {"keep_hourly": 0},
        {"keep_daily": -1},
        {"keep_daily": True},
    ):
        with pytest.raises(SpecError):
            RetentionPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="timezone-aware"):
        plan_prune(
            EVERY_20_MIN, RetentionPolicy(keep_last=0, keep_daily=1), now=datetime(2026, 12, 7)
        )


def test_prune_takes_the_clock(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save_state(make_state(step, 0, seed=step), tmp_path)
    policy = RetentionPolicy(keep_last=0, keep_within=timedelta(hours=1))
    assert prune(tmp_path, policy, dry_run=True).delete == ()  # all just created
    later = datetime.now(UTC) + timedelta(hours=2)
    plan = prune(tmp_path, policy, now=later)
    assert plan.delete == ("checkpoint_ts10", "checkpoint_ts20")
    assert [m.step for m in list_checkpoints(tmp_path)] == [30]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def save_at(ckpt: Checkpointer, step: int, last_saved: int) -> str:
    return ckpt.maybe_save(
        lambda: make_state(step, 0, seed=step), step=step, last_saved=last_saved
    ).status


def test_every_seconds_saves_when_the_time_has_passed_since_the_last_save(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = Checkpointer(run_dir=tmp_path, every_seconds=1800, clock=clock)  # the timer starts
    clock.now += 1799
    assert save_at(ckpt, 1, 0) == "skipped"
    clock.now += 1
    assert save_at(ckpt, 2, 0) == "saved"
    clock.now += 1799  # counted from the save, not from the start
    assert save_at(ckpt, 3, 2) == "skipped"
    clock.now += 1
    assert save_at(ckpt, 4, 2) == "saved"
    assert [m.step for m in list_checkpoints(tmp_path)] == [2, 4]


def test_steps_or_time_whichever_comes_first(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = Checkpointer(run_dir=tmp_path, interval=10_000, every_seconds=1800, clock=clock)
    assert save_at(ckpt, 10_000, 0) == "saved"  # by steps
    clock.now += 1000
    assert save_at(ckpt, 12_000, 10_000) == "skipped"
    clock.now += 800
    assert save_at(ckpt, 14_000, 10_000) == "saved"  # by time: 1,800 s since the last save
    assert save_at(ckpt, 20_000, 14_000) == "saved"  # by steps again, soon after
    assert ckpt.due(20_001, last_saved=20_000) is False


def test_a_failed_save_does_not_restart_the_timer(tmp_path: Path) -> None:
    clock = FakeClock()
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    ckpt = Checkpointer(run_dir=blocker / "run", every_seconds=60, clock=clock)
    clock.now += 60
    assert save_at(ckpt, 1, 0) == "failed"
    assert ckpt.due(2, last_saved=0)  # still due: the next step tries again


def test_bad_checkpointer_timing_is_refused(tmp_path: Path) -> None:
    for bad in (
        {},
        {"every_seconds": 0},
        {"every_seconds": -1.0},
        {"every_seconds": float("nan")},
        {"every_seconds": True},
        {"interval": 0, "every_seconds": 60},
    ):
        with pytest.raises(SpecError):
            Checkpointer(run_dir=tmp_path, **bad)  # type: ignore[arg-type]


def test_prune_command_takes_the_time_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from keisei_fn.cli import main

    for step in (10, 20, 30):
        save_state(make_state(step, 0, seed=step), tmp_path)
    assert main(["prune", str(tmp_path), "--keep-last", "0", "--keep-within", "90m"]) == 0
    assert "created within 1:30:00" in capsys.readouterr().out
    assert [m.step for m in list_checkpoints(tmp_path)] == [10, 20, 30]
    assert main(["prune", str(tmp_path), "--keep-last", "0", "--keep-daily", "1"]) == 0
    assert "deleted       checkpoint_ts10" in capsys.readouterr().out
    assert [m.step for m in list_checkpoints(tmp_path)] == [30]
    for bad in (["--keep-within", "6x"], ["--keep-best", "win_rate"], ["--keep-daily", "0"]):
        with pytest.raises(SystemExit) as exited:
            code = main(["prune", str(tmp_path), *bad])
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "error" in err and "Traceback" not in err, err


def test_a_time_without_an_offset_prints_its_age_as_utc() -> None:
    from keisei_fn.display import human_age
    from keisei_fn.store.checkpoint_list import CheckpointList

    naive = meta(1, "2026-12-07T11:00:00")
    assert human_age(naive.created, now=NOW) == "1h"
    assert "checkpoint_ts1" in str(CheckpointList([naive]))
