"""Issue #16 on S3: SIGKILL during a replacement never loses the committed checkpoint.

On an object store there is no rename and no lock: the commit protocol
(``keisei_fn.store.commit``) uploads the new weights under a fresh generation name, then PUTs
the sidecar (the single commit point), then deletes the weights the old sidecar named. Issue #16
found that before it, a SIGKILL during ``save_final_model``'s replacement lost the committed
checkpoint in 9 of 30 kills. This test kills real processes saving to a real S3 server
(SeaweedFS on loopback, the ``s3_url`` fixture) at random instants, in two modes, each in its
own run directory under ``s3_url``:

- ``final_model``: ``save_final_model`` replacing the final model (its ``step`` numbers the
  replacement: the final model keeps no ``extra``);
- ``overwrite``: ``save_state(..., overwrite=True)`` replacing the step-1 checkpoint with a new
  variant each time.

As in ``tests/test_kill_loop.py``, a "zygote" process (``kill_harness.Zygote``) imports torch,
keisei_fn and s3fs once and forks one victim per kill (with the fixture's AWS environment). A
victim first lists its run directory (so its S3 connection is up), then saves in a loop,
appending ``begin <step> <variant>`` to a LOCAL log (``kill_harness.Log``) before each save and
``returned <step> <variant>`` after each return (one ``write`` each; ``returned`` lines
fsynced). The parent waits for the victim's first ``begin``, sleeps a random delay within about
five saves (timed on this server first), and SIGKILLs it. After every kill:

- nothing is broken: ``scan_run_dir(url).invalid == []`` (and nothing is unreadable);
- exactly one checkpoint is listed, under the mode's name, and it loads (digests verified) and
  is bit-exactly (``assert_states_equal``) the state of a save that began;
- it is the last returned save or one begun after it (a killed save may have committed), and
  never older than what was listed at the previous kill: a save that returned stays until a
  later one replaces it.

After the last kill of a mode, every leftover is an uncommitted or replaced payload of the
checkpoint (never a sidecar); a prune keeps the checkpoint, and a prune that takes every payload
as abandoned leaves exactly the committed pair, still loading the same state.

The default run kills 10 times per mode; the slow one (``KEISEI_FN_SLOW=1`` or ``-m slow``) 30
times per mode. Both print a table: mode, kills, kills that hit a save in flight, saves
returned, kills after a commit but before its return, leftovers, problems.
"""

from __future__ import annotations

import os
import random
import select
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kill_harness import Log, Zygote, read_log, sigkilled
from saved_states import expected_state, same, stored_state

import keisei_fn.store.retention as retention
from keisei_fn import (
    RetentionPolicy,
    list_checkpoints,
    load_state,
    prune,
    save_final_model,
    save_state,
)
from keisei_fn.paths import run_path
from keisei_fn.store import _fs, scan_run_dir
from keisei_fn.testing import assert_states_equal

MODES = ("final_model", "overwrite")
#: The checkpoint each mode replaces over and over.
NAMES = {"final_model": "final_model", "overwrite": "checkpoint_ts1"}
#: The step the overwrite mode replaces.
OVERWRITE_STEP = 1
#: Victims are killed within this many save durations after their first ``begin``.
SAVES_PER_WINDOW = 5

# --- the victim -------------------------------------------------------------------------------


def rank(mode: str, step: int, variant: int) -> int:
    """The replacement's number: later saves have larger ranks."""
    return step if mode == "final_model" else variant


def victim(mode: str, run_dir: str, log_path: str) -> None:
    """Replace the mode's checkpoint over and over until killed, logging begins and returns."""
    torch.set_num_threads(1)
    list_checkpoints(run_dir)  # connect to S3 before the first ``begin``
    log = Log(log_path)
    number = max((rank(mode, *e[1:]) for e in read_log(Path(log_path))), default=0) + 1
    while True:
        if mode == "final_model":
            step, variant = number, 0
            log("begin", step, variant)
            save_final_model(expected_state(step, variant), run_dir)
        else:
            step, variant = OVERWRITE_STEP, number
            log("begin", step, variant)
            save_state(expected_state(step, variant), run_dir, overwrite=True)
        log("returned", step, variant)
        number += 1


# --- the checks after a kill ------------------------------------------------------------------


@dataclass
class ModeStats:
    kills: int = 0
    in_flight: int = 0  # kills that hit a save between its begin and its return
    returned: int = 0  # saves that returned, all victims together
    committed_unreturned: int = 0  # kills after a save's commit, before its return
    leftovers: int = 0  # unreferenced payloads after the last kill
    problems: list[str] = field(default_factory=list)
    listed_rank: int = 0  # the rank listed at the previous kill
    last: list[str] = field(default_factory=list)  # the problems found at the previous kill


def _difference(expected, actual) -> str:
    try:
        assert_states_equal(expected, actual)
    except AssertionError as exc:
        return str(exc)[:300]
    return "equal"


def check_after_kill(
    mode: str, url: str, log: list[tuple[str, int, int]], stats: ModeStats
) -> list[str]:
    """The invariants of the module docstring; returns the problems found."""
    problems: list[str] = []
    scan = scan_run_dir(url)
    problems += [f"listed but broken: {path.name}: {exc}" for path, exc in scan.invalid]
    problems += [f"unreadable: {path.name}: {exc!r}" for path, exc in scan.unreadable]
    names = [m.name for m in scan.valid]
    if names != [NAMES[mode]]:
        problems.append(f"listed {names}, expected exactly [{NAMES[mode]!r}]")
    returned = [rank(mode, s, v) for word, s, v in log if word == "returned"]
    last_returned = max(returned, default=0)
    begun = {rank(mode, s, v): (s, v) for word, s, v in log if word == "begin"}
    for meta in scan.valid:
        if meta.name != NAMES[mode]:
            continue
        try:
            state = load_state(meta.sidecar_path)
        except Exception as exc:
            problems.append(f"listed {meta.name} does not load: {exc!r}")
            continue
        identity = (
            (state.step, 0) if mode == "final_model" else (state.step, state.extra.get("variant"))
        )
        if not isinstance(identity[1], int) or begun.get(rank(mode, *identity)) != identity:
            problems.append(f"listed {meta.name} holds {identity}, which no save began")
            continue
        if not same(stored_state(mode, *identity), state):
            problems.append(
                f"listed {meta.name} differs from the state saved as {identity}: "
                f"{_difference(stored_state(mode, *identity), state)}"
            )
            continue
        listed = rank(mode, *identity)
        if listed < last_returned:
            problems.append(
                f"{identity} is listed, but the save of {begun[last_returned]} returned: "
                "a returned save was lost"
            )
        if listed < stats.listed_rank:
            problems.append(
                f"{identity} is listed, older than {begun.get(stats.listed_rank)} listed before"
            )
        # a commit seen for the first time that no return followed: killed in between
        stats.committed_unreturned += listed > max(last_returned, stats.listed_rank)
        stats.listed_rank = max(stats.listed_rank, listed)
    return problems


# --- the loop ---------------------------------------------------------------------------------


def _save(mode: str, url: str, number: int) -> None:
    if mode == "final_model":
        save_final_model(expected_state(number, 0), url)
    else:
        save_state(expected_state(OVERWRITE_STEP, number), url, overwrite=True)


def time_saves(url: str) -> dict[str, float]:
    """Seconds per replacement of each mode on this server: the median of five (after one to
    warm up), so that one slow request does not stretch the kill window."""
    seconds = {}
    for mode in MODES:
        _save(mode, f"{url}/timing", 1)
        times = []
        for number in range(2, 7):
            start = time.perf_counter()
            _save(mode, f"{url}/timing", number)
            times.append(time.perf_counter() - start)
        seconds[mode] = statistics.median(times)
    return seconds


def _prepare(mode: str, url: str, log_path: Path) -> None:
    """Commit the first state (number 1) the victims replace."""
    log = Log(str(log_path))
    step, variant = (1, 0) if mode == "final_model" else (OVERWRITE_STEP, 1)
    log("begin", step, variant)
    _save(mode, url, 1)
    log("returned", step, variant)
    os.close(log.fd)


def _one_kill(
    zygote: Zygote,
    mode: str,
    url: str,
    log_path: Path,
    delay: float,
    stats: ModeStats,
    errors: Path,
) -> None:
    assert zygote.process.stdout is not None
    lines_before = len(read_log(log_path))
    pid = zygote.fork(mode, url, str(log_path))
    where = f"{mode} kill {stats.kills + 1}"
    deadline = time.monotonic() + 60
    while len(read_log(log_path)) == lines_before:  # wait for the first ``begin``
        exited = select.select([zygote.process.stdout.fileno()], [], [], 0.002)[0]
        if exited or time.monotonic() > deadline:
            break
    else:
        time.sleep(delay)
    status = zygote.kill(pid)
    stats.kills += 1
    if not sigkilled(status):
        tail = errors.read_text()[-1500:]
        stats.problems.append(f"{where}: the victim died by itself (status {status}): {tail}")
    log = read_log(log_path)
    if len(log) == lines_before:
        stats.problems.append(f"{where}: the victim began no save")
    stats.in_flight += bool(log) and log[-1][0] == "begin"
    stats.returned = sum(1 for word, *_ in log if word == "returned") - 1  # less _prepare's
    problems = check_after_kill(mode, url, log, stats)
    # a problem still there from the previous kill is counted once
    stats.problems += [f"{where}: {p}" for p in problems if p not in stats.last]
    stats.last = problems


def _final_checks(mode: str, url: str, stats: ModeStats, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leftovers are payloads only; prune keeps the checkpoint and, once they count as
    abandoned, removes every leftover."""
    scan = scan_run_dir(url)
    stats.leftovers = len(scan.leftovers)
    if len(scan.valid) != 1:
        stats.problems.append(f"at the end: listed {[m.name for m in scan.valid]}")
        return
    meta = scan.valid[0]
    stray = [
        p.name
        for p in scan.leftovers
        if not (p.name.startswith(f"{meta.name}.") and p.name.endswith(".safetensors"))
    ]
    if stray:
        stats.problems.append(f"at the end: leftovers that are no payload of {meta.name}: {stray}")
    try:
        expected = load_state(meta.sidecar_path)
    except Exception as exc:
        stats.problems.append(f"at the end: {meta.name} does not load: {exc!r}")
        return
    prune(url, RetentionPolicy())  # leftovers are young: a save in flight may own them
    if [m.name for m in list_checkpoints(url)] != [meta.name]:
        stats.problems.append(f"after a prune: listed {[m.name for m in list_checkpoints(url)]}")
    with monkeypatch.context() as patch:
        patch.setattr(retention, "ABANDONED_AFTER_SECONDS", 0.0)
        patch.setattr(_fs, "ABANDONED_AFTER_SECONDS", 0.0)
        prune(url, RetentionPolicy())
    left = sorted(_fs.list_file_names(run_path(url)))
    if left != sorted([meta.sidecar_path.name, meta.weights_file]):
        stats.problems.append(f"after pruning the abandoned leftovers: objects {left}")
    try:
        assert_states_equal(expected, load_state(url if mode == "overwrite" else meta.sidecar_path))
    except Exception as exc:
        stats.problems.append(f"after pruning: the checkpoint changed or broke: {exc!r}"[:400])


def kill_loop(
    url: str, tmp: Path, kills_per_mode: int, seed: int, windows: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, ModeStats]:  # fmt: skip
    rng = random.Random(seed)
    stats = {mode: ModeStats() for mode in MODES}
    errors = tmp / "zygote.stderr"
    # victims' warnings go to a file, never into a pipe that fills up; the zygote inherits the
    # s3_url fixture's AWS settings, and imports s3fs before any victim connects (after fork)
    with (
        errors.open("w") as stderr,
        Zygote("test_object_store_kill:victim", stderr=stderr, preload=("s3fs",)) as zygote,
    ):
        for mode in MODES:
            mode_url, log_path = f"{url}/{mode}", tmp / f"{mode}.log"
            _prepare(mode, mode_url, log_path)
            stats[mode].listed_rank = 1
            for _ in range(kills_per_mode):
                delay = rng.uniform(0, windows[mode])
                _one_kill(zygote, mode, mode_url, log_path, delay, stats[mode], errors)
            _final_checks(mode, mode_url, stats[mode], monkeypatch)
    return stats


def report(stats: dict[str, ModeStats]) -> str:
    rows = [
        f"{'mode':<13}{'kills':>7}{'in flight':>11}{'returned':>10}"
        f"{'committed, not returned':>25}{'leftovers':>11}{'problems':>10}"
    ]
    for mode, s in stats.items():
        rows.append(
            f"{mode:<13}{s.kills:>7}{s.in_flight:>11}{s.returned:>10}"
            f"{s.committed_unreturned:>25}{s.leftovers:>11}{len(s.problems):>10}"
        )
    return "\n".join(rows)


def _run_and_check(
    url: str, tmp: Path, kills_per_mode: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = random.randrange(2**32)
    per_save = time_saves(url)
    windows = {mode: SAVES_PER_WINDOW * seconds for mode, seconds in per_save.items()}
    started = time.perf_counter()
    stats = kill_loop(url, tmp, kills_per_mode, seed, windows, monkeypatch)
    table = report(stats)
    timing = ", ".join(
        f"{mode} {per_save[mode] * 1000:.0f} ms/save, kills within {windows[mode] * 1000:.0f} ms"
        for mode in MODES
    )
    print(
        f"\n[S3 kill loop, seed {seed}; {timing}; {time.perf_counter() - started:.1f} s]\n{table}"
    )
    problems = [p for s in stats.values() for p in s.problems]
    shown = "\n  ".join(problems[:30])
    assert not problems, f"{len(problems)} problems (seed {seed}):\n{table}\n  {shown}"
    # the kills must hit saves mid-way and the victims must get saves done, or nothing was tested
    for mode, s in stats.items():
        assert s.in_flight >= s.kills / 3, f"{mode}: {s.in_flight} of {s.kills} in flight\n{table}"
        assert s.returned >= s.kills / 3, f"{mode}: {s.returned} saves returned\n{table}"


def test_s3_kills_during_replacement_keep_old_or_new(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 kills per mode (the default run)."""
    _run_and_check(s3_url, tmp_path, 10, monkeypatch)


@pytest.mark.slow
def test_s3_kills_during_replacement_keep_old_or_new_30_per_mode(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 kills per mode (issue #16 found 9 losses in 30 kills before the fix)."""
    _run_and_check(s3_url, tmp_path, 30, monkeypatch)
