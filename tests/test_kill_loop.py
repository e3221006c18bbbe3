"""Issue #16, item 6 (and the kill half of item 1): SIGKILL at random instants of five kinds of
save never breaks the promise — once a save returns, that checkpoint stays loadable; nothing
listed is broken.

Modes, each in its own run directory:

- ``new_step``: ``save_state`` at consecutive new steps;
- ``overwrite``: ``save_state(..., overwrite=True)`` replacing the step-1 checkpoint with a new
  variant each time (item 1: the old or the new is always there, never neither);
- ``final_model``: ``save_final_model`` replacing the final model (item 1 again);
- ``checkpointer``: a ``Checkpointer`` loop with ``RetentionPolicy(keep_last=2)``;
- ``async``: an ``AsyncSaver`` (one background write in flight while the next state is made).

As in ``tests/test_crash.py``, a "zygote" process (``kill_harness.Zygote``) imports torch and
keisei_fn once and forks one victim per kill; the victim saves until it is SIGKILLed after a
random delay. Before each save it appends ``begin <step> <variant>`` to a log
(``kill_harness.Log``), and after each return ``returned <step> <variant>`` (flushed and
fsynced). After every kill the run directory is checked:

- nothing listed is broken (``scan_run_dir(...).invalid == []``);
- every listed checkpoint loads and is bit-exactly (``assert_states_equal``) the state of a save
  that began there — ``expected_state(step, variant)``, or for the final model its weights-only
  form (whose ``step`` numbers the replacement);
- every save that returned is still listed and loads, unless a later returned save replaced it
  (overwrite, final model: then the last returned one or one begun after it is listed) or
  retention may have pruned it (checkpointer, keep_last=2: once two newer checkpoints are
  listed);
- ``load_state(run_dir)`` loads the newest resume checkpoint (all modes but final_model).

The default run has a smoke variant (4 kills per mode, 20 in all); the slow one
(``KEISEI_FN_SLOW=1`` or ``-m slow``) runs 200 kills per mode, 1,000 in all. Both print a table:
mode, kills, kills that hit a save in flight, saves returned, problems.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kill_harness import Log, Zygote, read_log, sigkilled
from saved_states import expected_state, same, stored_state

from keisei_fn import (
    RetentionPolicy,
    TrainState,
    list_checkpoints,
    load_state,
    prune,
    save_final_model,
    save_state,
)
from keisei_fn.store import AsyncSaver, Checkpointer, scan_run_dir
from keisei_fn.testing import fresh_run_dir

MODES = ("new_step", "overwrite", "final_model", "checkpointer", "async")
#: The step the overwrite mode replaces over and over.
OVERWRITE_STEP = 1

# --- the victim -------------------------------------------------------------------------------


def _next_step(run_dir: str) -> int:
    return max((m.step for m in list_checkpoints(run_dir)), default=0) + 1


def _next_variant(log_path: str) -> int:
    return max((variant for _, _, variant in read_log(Path(log_path))), default=0) + 1


def victim(mode: str, run_dir: str, log_path: str) -> None:
    """Save in ``mode`` until killed, logging each save's begin and return."""
    torch.set_num_threads(1)
    log = Log(log_path)
    if mode == "new_step":
        step = _next_step(run_dir)
        while True:
            log("begin", step, 0)
            save_state(expected_state(step, 0), run_dir)
            log("returned", step, 0)
            step += 1
    elif mode == "overwrite":
        variant = _next_variant(log_path)
        while True:
            state = expected_state(OVERWRITE_STEP, variant)
            log("begin", OVERWRITE_STEP, variant)
            save_state(state, run_dir, overwrite=True)
            log("returned", OVERWRITE_STEP, variant)
            variant += 1
    elif mode == "final_model":  # the final model keeps no ``extra``: its step numbers it
        number = max((step for _, step, _ in read_log(Path(log_path))), default=0) + 1
        while True:
            state = expected_state(number, 0)
            log("begin", number, 0)
            save_final_model(state, run_dir)
            log("returned", number, 0)
            number += 1
    elif mode == "checkpointer":
        checkpointer = Checkpointer(
            run_dir=run_dir, interval=1, retention=RetentionPolicy(keep_last=2)
        )
        step = _next_step(run_dir)
        while True:
            state = expected_state(step, 0)
            log("begin", step, 0)
            result = checkpointer.maybe_save(state, step=step, last_saved=step - 1)
            log("returned" if result.status == "saved" else "failed", step, 0)
            step += 1
    elif mode == "async":
        step, previous = _next_step(run_dir), None
        with AsyncSaver(run_dir) as saver:
            while True:
                state = expected_state(step, 0)
                log("begin", step, 0)
                handle = saver.save(state)  # waits for the previous write (raises its error)
                if previous is not None:
                    log("returned", previous.wait().step, 0)
                previous, step = handle, step + 1
    else:
        raise ValueError(mode)


# --- the checks after a kill ------------------------------------------------------------------


@dataclass
class ModeStats:
    kills: int = 0
    in_flight: int = 0  # kills that hit a save between its begin and its return
    returned: int = 0  # saves that returned, all victims together
    problems: list[str] = field(default_factory=list)
    excused: set[int] = field(default_factory=set)  # steps the parent itself pruned
    known: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    last: list[str] = field(default_factory=list)  # the problems found at the previous kill


def _loaded_identity(mode: str, state: TrainState) -> tuple[int, int] | None:
    """(step, variant) a loaded state claims to be."""
    if mode == "final_model":
        return state.step, 0
    variant = state.extra.get("variant")
    return (state.step, variant) if isinstance(variant, int) else None


def check_after_kill(
    mode: str,
    run_dir: Path,
    log: list[tuple[str, int, int]],
    *,
    excused: set[int],
    known: dict[tuple[str, str], tuple[int, int]],
) -> list[str]:
    """The invariants of the module docstring; returns the problems found.

    Args:
        excused: steps that returned but were pruned since (by the parent, between kills).
        known: (name, sidecar digest) -> (step, variant) of checkpoints compared bit-exactly
            at an earlier kill. The same sidecar with weights that verify (``load_state``
            checks the digest) is the same state, so only the comparison is skipped.
    """
    problems: list[str] = []
    scan = scan_run_dir(run_dir)
    problems += [f"listed but broken: {path.name}: {exc}" for path, exc in scan.invalid]
    begun = {(step, variant) for word, step, variant in log if word == "begin"}
    problems += [f"a save failed: step {step}" for word, step, _ in log if word == "failed"]
    listed: dict[int, tuple[int, int]] = {}  # step (final model: 0) -> identity loaded
    for meta in scan.valid:
        try:
            state = load_state(meta.sidecar_path)
        except Exception as exc:
            problems.append(f"listed {meta.name} does not load: {exc!r}")
            continue
        identity = _loaded_identity(mode, state)
        if identity is None or identity not in begun:
            problems.append(f"listed {meta.name} holds {identity}, which no save began")
        elif known.get((meta.name, meta.digest)) != identity and not same(
            stored_state(mode, *identity), state
        ):
            problems.append(f"listed {meta.name} differs from the state saved as {identity}")
        else:
            known[meta.name, meta.digest] = identity
            listed[0 if mode == "final_model" else meta.step] = identity
    returned = [(step, variant) for word, step, variant in log if word == "returned"]
    if mode in ("overwrite", "final_model") and returned:
        # the last returned save or one begun after it: a later one may have committed
        last = max(i for i, (word, *_) in enumerate(log) if word == "returned")
        allowed = {(s, v) for word, s, v in log[last:] if word in ("returned", "begin")}
        key = 0 if mode == "final_model" else OVERWRITE_STEP
        if key not in listed:
            problems.append(f"nothing valid listed; the last returned save was {log[last][1:]}")
        elif listed[key] not in allowed:
            problems.append(f"{listed[key]} is listed; the last returned save was {log[last][1:]}")
    if mode in ("new_step", "async", "checkpointer"):
        for step, variant in returned:
            if listed.get(step) == (step, variant) or step in excused:
                continue
            # keep_last=2 prunes a checkpoint once two newer ones committed (returned or not)
            if mode == "checkpointer" and sum(s > step for s in listed) >= 2:
                continue
            problems.append(f"step {step} returned but is not listed (or does not load)")
    if mode != "final_model" and listed:
        try:
            latest = load_state(run_dir)
            if latest.step != max(listed):
                problems.append(f"load_state(run_dir) gave step {latest.step}, not {max(listed)}")
        except Exception as exc:
            problems.append(f"load_state(run_dir) raised {exc!r}")
    return problems


def _trim(run_dir: Path, stats: ModeStats) -> None:
    """Keep the directory small between kills (every check loads every listed checkpoint);
    the steps pruned here are no longer required to be listed."""
    before = {m.step for m in list_checkpoints(run_dir)}
    prune(run_dir, RetentionPolicy(keep_last=3))
    stats.excused |= before - {m.step for m in list_checkpoints(run_dir)}


# --- the loop ---------------------------------------------------------------------------------


def _prepare(mode: str, run_dir: Path, log_path: Path) -> None:
    log = Log(str(log_path))
    if mode == "overwrite":
        log("begin", OVERWRITE_STEP, 0)
        save_state(expected_state(OVERWRITE_STEP, 0), run_dir)
        log("returned", OVERWRITE_STEP, 0)
    elif mode == "final_model":
        log("begin", 1, 0)
        save_final_model(expected_state(1, 0), run_dir)
        log("returned", 1, 0)
    os.close(log.fd)


def kill_window() -> float:
    """Victims are killed after a delay drawn from [0, window): the window covers a victim's
    start (fork, first calls: ~10-30 ms) and about six saves, timed here because fsync times
    differ a lot between disks (4-20 ms per save of the ~1 MB state seen on one machine)."""
    with fresh_run_dir() as run_dir:
        start = time.perf_counter()
        for step in (1, 2, 3):
            save_state(expected_state(step, 0), run_dir)
        per_save = (time.perf_counter() - start) / 3
    return 0.03 + 6 * per_save


def kill_loop(kills_per_mode: int, seed: int, window: float) -> dict[str, ModeStats]:
    """Run ``kills_per_mode`` kills of each mode; returns what was found per mode."""
    rng = random.Random(seed)
    stats = {mode: ModeStats() for mode in MODES}
    with fresh_run_dir() as base:
        errors = (base.parent / "zygote.stderr").open("w")
        # victims' warnings go to a file, never into a pipe that fills up
        zygote = Zygote("test_kill_loop:victim", stderr=errors)
        try:
            for mode in MODES:
                run_dir, log_path = base / mode, base / f"{mode}.log"
                run_dir.mkdir()
                _prepare(mode, run_dir, log_path)
                for _ in range(kills_per_mode):
                    _one_kill(
                        zygote,
                        mode,
                        run_dir,
                        log_path,
                        rng.uniform(0, window),
                        stats[mode],
                        errors.name,
                    )
                prune(run_dir, RetentionPolicy())
                scan = scan_run_dir(run_dir)
                if scan.invalid or scan.unreadable:
                    stats[mode].problems.append(
                        f"after a final prune: invalid {[p.name for p, _ in scan.invalid]}, "
                        f"unreadable {[p.name for p, _ in scan.unreadable]}"
                    )
        finally:
            zygote.close()
            errors.close()
    return stats


def _one_kill(
    zygote: Zygote,
    mode: str,
    run_dir: Path,
    log_path: Path,
    delay: float,
    stats: ModeStats,
    errors: str,
) -> None:
    pid = zygote.fork(mode, str(run_dir), str(log_path))
    time.sleep(delay)
    status = zygote.kill(pid)
    stats.kills += 1
    where = f"{mode} kill {stats.kills}"
    if not sigkilled(status):
        tail = Path(errors).read_text()[-1500:]
        stats.problems.append(f"{where}: the victim died by itself (status {status}): {tail}")
    log = read_log(log_path)
    stats.in_flight += bool(log) and log[-1][0] == "begin"
    stats.returned = sum(1 for word, *_ in log if word == "returned")
    problems = check_after_kill(mode, run_dir, log, excused=stats.excused, known=stats.known)
    # a problem still there from the previous kill (e.g. the checkpoint that a returned save
    # left is still missing) is counted once
    stats.problems += [f"{where}: {p}" for p in problems if p not in stats.last]
    stats.last = problems
    if problems:  # repair what can be: broken checkpoints and leftovers
        prune(run_dir, RetentionPolicy())
    if mode in ("new_step", "async"):
        _trim(run_dir, stats)


def report(stats: dict[str, ModeStats]) -> str:
    """The table: mode, kills, kills that hit a save in flight, saves returned, problems."""
    rows = [f"{'mode':<14}{'kills':>7}{'in flight':>11}{'returned':>10}{'problems':>10}"]
    for mode, s in stats.items():
        rows.append(f"{mode:<14}{s.kills:>7}{s.in_flight:>11}{s.returned:>10}{len(s.problems):>10}")
    total = {
        name: sum(getattr(s, name) for s in stats.values())
        for name in ("kills", "in_flight", "returned")
    }
    problems = sum(len(s.problems) for s in stats.values())
    rows.append(
        f"{'total':<14}{total['kills']:>7}{total['in_flight']:>11}{total['returned']:>10}"
        f"{problems:>10}"
    )
    return "\n".join(rows)


def _run_and_check(kills_per_mode: int, *, per_mode: bool) -> None:
    seed, window = random.randrange(2**32), kill_window()
    stats = kill_loop(kills_per_mode, seed, window)
    table = report(stats)
    print(f"\n[kill loop, seed {seed}, kills within {window * 1000:.0f} ms]\n{table}")
    problems = [p for s in stats.values() for p in s.problems]
    kinds = Counter(re.sub(r"\d+", "N", p.split(": ", 1)[-1])[:80] for p in problems)
    shown = "\n  ".join(problems[:30])
    assert not problems, (
        f"{len(problems)} problems (seed {seed}):\n{table}\nmost common: "
        f"{kinds.most_common(8)}\n  {shown}"
    )
    # the kills must hit saves mid-way and the victims must get saves done, or nothing was tested
    groups = list(stats.items()) if per_mode else [("all modes", _total(stats))]
    for mode, s in groups:
        assert s.in_flight >= s.kills / 3, f"{mode}: {s.in_flight} of {s.kills} in flight\n{table}"
        assert s.returned >= s.kills / 3, f"{mode}: {s.returned} saves returned\n{table}"


def _total(stats: dict[str, ModeStats]) -> ModeStats:
    return ModeStats(
        kills=sum(s.kills for s in stats.values()),
        in_flight=sum(s.in_flight for s in stats.values()),
        returned=sum(s.returned for s in stats.values()),
    )


def test_kill_loop_smoke() -> None:
    """20 kills, 4 per mode (the default run)."""
    _run_and_check(4, per_mode=False)


@pytest.mark.slow
def test_kill_loop_1000_kills() -> None:
    """1,000 kills, 200 per mode."""
    _run_and_check(200, per_mode=True)
