"""The commit protocol of issue #16: once a save returns, that checkpoint stays loadable, and
nothing listed is ever broken (design.md, "Checkpoint on disk": the sidecar is the single commit
point).

Covers these items of issue #16 (the kill loop, item 6, is ``tests/test_kill_loop.py``):

1. and 2. **Atomic replacement under I/O faults.** For three modes — a save at a new step,
   ``save_state(..., overwrite=True)`` over a different checkpoint at the same step, and
   ``save_final_model`` over an existing final model — the calls a save makes to the file-system
   wrappers of ``os`` (and to ``open``/``io.open`` in a write mode, and the returned file's
   ``write``/``flush``/``close``) are counted; then every (call, k) is replayed with the k-th call
   failing with ``EIO`` (data writes and fsyncs also with ``ENOSPC``). Afterwards the save has
   raised OSError (or returned, when only cleanup after the commit failed: then the new state is
   the listed one), exactly one of old/new is listed at that step and loads bit-exactly (old =
   nothing for a new step), nothing is invalid, other checkpoints are untouched, and a retry
   without faults succeeds and lists the new state (and a prune after it keeps it). The
   kill-at-random-instants half of item 1 is in the kill loop.
3. **Two writers at one step**, started together step by step (a barrier per step): with
   ``overwrite=False`` exactly one wins each step and the other gets CheckpointExistsError; with
   ``overwrite=True`` both may succeed (no other error). The listed checkpoint is always the
   state of a writer that was told it succeeded, bit-exact, and every listed one verifies.
4. **Prune races a save**: a writer (``save_state`` + ``prune``, or a ``Checkpointer``) against a
   process pruning with ``keep_last=1`` in a tight loop: every checkpoint whose save returned
   loads right after the return (it is the newest, which keep_last=1 keeps).
5. **Readers race a pruning writer** (``Checkpointer`` with ``keep_last=1``): two reader
   processes loop ``latest_checkpoint`` / ``load_state`` / ``resume`` for a few seconds; none
   may see "nothing" or an error.

Concurrent tests use real processes (``kill_harness.run_workers``): a zygote that imported
torch and keisei_fn once forks a coordinator, which forks the workers (``multiprocessing``
"fork" context, before any torch work in that process), so a test costs no interpreter start.
Workers write what they saw as JSON lines; the test checks them. The states saved are
``saved_states.expected_state``. Nothing under test is mocked: the fault injection wraps the
real system calls.

Checkpoints are found through the public API only (``list_checkpoints``/``scan_run_dir`` and a
meta's ``sidecar_path``/``weights_path``), never by weights file names: after the rewrite a
weights file gets a fresh generation name recorded in its sidecar.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kill_harness import Recorder, read_race, read_records, run_workers
from saved_states import expected_state, final_of, looks_same, same, which

from keisei_fn import (
    RetentionPolicy,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune,
    save_final_model,
    save_state,
)
from keisei_fn.errors import CheckpointExistsError
from keisei_fn.store import Checkpointer, resume, scan_run_dir, verify_checkpoint
from keisei_fn.testing import fresh_run_dir


def _problem_report(problems: list[str], what: str, shown: int = 25) -> str:
    head = "\n  ".join(problems[:shown])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} problems in {what}:\n  {head}{more}"


# --- 1, 2: atomic replacement under injected I/O faults ---------------------------------------

#: The ``os`` functions wrapped (those present on this platform).
OS_CALLS = tuple(
    name
    for name in (
        "open", "write", "writev", "pwrite", "fsync", "fdatasync", "replace", "rename", "link",
        "unlink", "close", "posix_fadvise", "posix_fallocate", "ftruncate", "rmdir",
    )
    if hasattr(os, name)
)  # fmt: skip
#: Calls that write data (or make it durable) fail with ENOSPC too, not only EIO.
WRITE_CALLS = frozenset(
    {"os.write", "os.writev", "os.pwrite", "os.fsync", "os.fdatasync", "os.posix_fallocate",
     "os.ftruncate", "file.write", "file.flush", "file.close"}
)  # fmt: skip
_WRITE_MODE_CHARS = frozenset("wxa+")


class FaultInjector:
    """Counts the calls made through the wrapped file-system functions while active, and makes
    the ``k``-th call of one of them fail with ``OSError(err)`` (just once).

    The failing call does nothing, except ``os.close`` and ``file.close``, which release the
    descriptor first (as Linux does when ``close`` reports an error: the descriptor is gone).
    ``open``/``io.open`` count only in a write mode; their file objects count ``file.write``,
    ``file.flush`` and ``file.close``.
    """

    def __init__(self, target: tuple[str, int, int] | None = None) -> None:
        self.target = target
        self.counts: Counter[str] = Counter()
        self.fired: str | None = None

    def hit(self, name: str) -> int | None:
        """Count a call of ``name``; the errno to fail it with, or None to let it run."""
        self.counts[name] += 1
        if self.target is not None and self.fired is None:
            call, k, err = self.target
            if call == name and self.counts[name] == k:
                self.fired = f"{name}#{k} {errno.errorcode[err]}"
                return err
        return None

    def error(self, err: int, name: str) -> OSError:
        return OSError(err, f"injected {errno.errorcode[err]} in {name}")

    def _wrap_os(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        label = f"os.{name}"

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            err = self.hit(label)
            if err is None:
                return real(*args, **kwargs)
            if name == "close":
                real(*args, **kwargs)
            raise self.error(err, label)

        return wrapper

    def _wrap_open(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not _WRITE_MODE_CHARS & set(mode):
                return real(file, mode, *args, **kwargs)
            err = self.hit("open(w)")
            if err is not None:
                raise self.error(err, "open(w)")
            return _CountedFile(real(file, mode, *args, **kwargs), self)

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[FaultInjector]:
        """Patch the wrappers in for the duration of the block (this process, every thread)."""
        saved: list[tuple[Any, str, Any]] = [(os, n, getattr(os, n)) for n in OS_CALLS]
        saved += [(builtins, "open", builtins.open), (io, "open", io.open)]
        try:
            for name in OS_CALLS:
                setattr(os, name, self._wrap_os(name, getattr(os, name)))
            builtins.open = io.open = self._wrap_open(builtins.open)  # type: ignore[assignment]
            yield self
        finally:
            for module, name, real in saved:
                setattr(module, name, real)


class _CountedFile:
    """A file object whose ``write``/``flush``/``close`` go through a FaultInjector."""

    def __init__(self, file: Any, injector: FaultInjector) -> None:
        self._file = file
        self._injector = injector

    def write(self, data: Any) -> Any:
        if (err := self._injector.hit("file.write")) is not None:
            raise self._injector.error(err, "file.write")
        return self._file.write(data)

    def flush(self) -> None:
        if (err := self._injector.hit("file.flush")) is not None:
            raise self._injector.error(err, "file.flush")
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        err = self._injector.hit("file.close")
        self._file.close()
        if err is not None:
            raise self._injector.error(err, "file.close")

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


#: The step the sweep saves at; NEIGHBOUR is another checkpoint that must stay untouched.
STEP, NEIGHBOUR = 5, 4


@dataclass(frozen=True)
class Mode:
    """One kind of save in the sweep: what is there before, and what is saved."""

    name: str
    old: TrainState | None  # what is listed at the target before the save (loaded form)
    new: TrainState  # what the save stores (loaded form)
    setup: Callable[[Path], None]
    save: Callable[[Path], object]
    final: bool = False  # the target is the final model, not the step-STEP checkpoint


def _mode(name: str) -> Mode:
    v0, v1 = expected_state(STEP, 0), expected_state(STEP, 1)
    if name == "new_step":
        return Mode(name, None, v0, lambda d: None, lambda d: save_state(v0, d))
    if name == "overwrite":
        return Mode(
            name, v0, v1, lambda d: save_state(v0, d), lambda d: save_state(v1, d, overwrite=True)
        )
    assert name == "final_model"
    return Mode(
        name,
        final_of(v0),
        final_of(v1),
        lambda d: save_final_model(v0, d),
        lambda d: save_final_model(v1, d),
        final=True,
    )


MODES = ("new_step", "overwrite", "final_model")


def _prepare(mode: Mode, run_dir: Path) -> None:
    save_state(expected_state(NEIGHBOUR, 0), run_dir)
    mode.setup(run_dir)


def _at_target(mode: Mode, run_dir: Path) -> list[Any]:
    """The listed checkpoints where the save writes: the final model, or step STEP."""
    if mode.final:
        return [m for m in list_checkpoints(run_dir) if m.kind == "final_model"]
    return [m for m in list_checkpoints(run_dir) if m.step == STEP and m.kind != "final_model"]


def _check_run_dir(mode: Mode, run_dir: Path, *, require_new: bool) -> list[str]:
    """The invariants after a save (failed or not); returns the problems found."""
    problems = []
    scan = scan_run_dir(run_dir)
    problems += [f"listed but broken: {path.name}: {exc}" for path, exc in scan.invalid]
    problems += [f"unreadable: {path.name}: {exc}" for path, exc in scan.unreadable]
    for meta in scan.valid:
        try:
            verify_checkpoint(meta.sidecar_path)
        except Exception as exc:
            problems.append(f"listed {meta.name} fails verification: {exc!r}")
    neighbour = expected_state(NEIGHBOUR, 0)
    newest = neighbour  # what load_state(run_dir) must give: the highest step resume point
    target = _at_target(mode, run_dir)
    if len(target) > 1:
        problems.append(f"{len(target)} checkpoints listed at the target")
    elif not target:
        if require_new or mode.old is not None:
            problems.append("neither the old nor the new checkpoint is listed")
    else:
        try:
            loaded = load_state(target[0].sidecar_path)
        except Exception as exc:
            problems.append(f"the listed checkpoint does not load: {exc!r}")
        else:
            found = which(loaded, {"old": mode.old, "new": mode.new})
            if found is None:
                problems.append("the listed checkpoint is neither the old nor the new state")
            elif require_new and found != "new":
                problems.append(f"the {found} state is listed, the new one was saved")
            if not mode.final:
                newest = loaded
    others = [m for m in scan.valid if m.step == NEIGHBOUR and m.kind == "periodic"]
    try:  # the other checkpoint is untouched, and the run directory loads its newest
        if not others or not looks_same(neighbour, load_state(others[0].sidecar_path)):
            problems.append(f"checkpoint {NEIGHBOUR} is gone or changed")
        if not looks_same(newest, load_state(run_dir)):
            problems.append(f"load_state(run_dir) is not the step-{newest.step} state")
    except Exception as exc:
        problems.append(f"loading from the run directory failed: {exc!r}")
    return problems


def count_calls(mode: Mode) -> Counter[str]:
    """The calls one save of ``mode`` makes to the wrapped functions (fault-free)."""
    with fresh_run_dir() as run_dir:
        _prepare(mode, run_dir)
        injector = FaultInjector()
        with injector.active():
            mode.save(run_dir)
    return injector.counts


def fault_cases(counts: Counter[str]) -> list[tuple[str, int, int]]:
    """Every (call, k, errno) to inject: EIO for every call, ENOSPC too for data writes."""
    cases = []
    for call in sorted(counts):
        for err in (errno.EIO, errno.ENOSPC) if call in WRITE_CALLS else (errno.EIO,):
            cases += [(call, k, err) for k in range(1, counts[call] + 1)]
    return cases


@dataclass
class SweepResult:
    cases: int = 0
    raised: int = 0
    returned: int = 0
    problems: list[str] = field(default_factory=list)


def run_case(mode: Mode, case: tuple[str, int, int], result: SweepResult) -> None:
    """One faulted save, the checks after it, a fault-free retry and the checks after that."""
    call, k, err = case
    where = f"{mode.name}: {call}#{k} {errno.errorcode[err]}"
    result.cases += 1
    with fresh_run_dir() as run_dir:
        _prepare(mode, run_dir)
        injector = FaultInjector(case)
        returned = False
        try:
            with injector.active():
                mode.save(run_dir)
            returned = True
            result.returned += 1
        except OSError:
            result.raised += 1
        except Exception as exc:
            result.problems.append(f"{where}: raised {exc!r}, not an OSError")
        if injector.fired is None:
            result.problems.append(f"{where}: the fault never fired (the calls differ per run)")
        problems = _check_run_dir(mode, run_dir, require_new=returned)
        result.problems += [f"{where}: after the fault: {p}" for p in problems]
        try:
            mode.save(run_dir)
        except Exception as exc:
            result.problems.append(f"{where}: the retry failed: {exc!r}")
        problems = _check_run_dir(mode, run_dir, require_new=True)
        result.problems += [f"{where}: after the retry: {p}" for p in problems]
        # what the failed save left behind never makes pruning fail or keeps a broken entry
        # (leftovers may stay: a young one could be a concurrent save's payload)
        try:
            prune(run_dir, RetentionPolicy())
        except Exception as exc:
            result.problems.append(f"{where}: prune after the retry raised {exc!r}")
        invalid = [path.name for path, _ in scan_run_dir(run_dir).invalid]
        if invalid or not _at_target(mode, run_dir):
            result.problems.append(f"{where}: after prune: invalid {invalid}, or nothing listed")


@pytest.mark.parametrize("mode_name", MODES)
def test_io_fault_sweep_leaves_old_or_new_and_nothing_broken(mode_name: str) -> None:
    """Items 1 and 2: the k-th call of each file-system function fails, for every k."""
    mode = _mode(mode_name)
    counts = count_calls(mode)
    assert count_calls(mode) == counts, "a save's calls differ between two identical runs"
    # the sweep is only meaningful if the save goes through the wrapped functions
    assert counts["os.fsync"] >= 1, f"no fsync seen: {dict(counts)}"
    assert counts["os.replace"] + counts["os.rename"] + counts["os.link"] >= 1, dict(counts)
    result = SweepResult()
    for case in fault_cases(counts):
        run_case(mode, case, result)
    print(
        f"\n[fault sweep] {mode_name}: {result.cases} cases ({result.raised} raised, "
        f"{result.returned} returned), calls per save {dict(sorted(counts.items()))}, "
        f"{len(result.problems)} problems"
    )
    assert result.raised >= 1, "no injected fault made the save fail"
    assert not result.problems, _problem_report(result.problems, f"the {mode_name} sweep")


# --- processes: forked workers (kill_harness.run_workers) -----------------------------------


def _listed_problems(run_dir: Path) -> list[str]:
    """Nothing listed is broken, and every listed checkpoint verifies."""
    scan = scan_run_dir(run_dir)
    problems = [f"listed but broken: {path.name}: {exc}" for path, exc in scan.invalid]
    for meta in scan.valid:
        try:
            verify_checkpoint(meta.sidecar_path)
        except Exception as exc:
            problems.append(f"listed {meta.name} fails verification: {exc!r}")
    return problems


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --- 3: two writers at one step ---------------------------------------------------------------


def two_writers_worker(
    *, run_dir: str, out: str, who: int, steps: int, overwrite: bool, seed: int, barrier: Any,
    stop: Any
) -> None:  # fmt: skip
    """Save this writer's state at steps 1..steps, meeting the other writer before each save."""
    record, rng = Recorder(out), random.Random(seed)
    for step in range(1, steps + 1):
        state = expected_state(step, who)
        barrier.wait(timeout=60)
        time.sleep(rng.uniform(0, 0.004))  # which writer is ahead, and by how much, varies
        try:
            save_state(state, run_dir, overwrite=overwrite)
            record(step, "ok")
        except CheckpointExistsError:
            record(step, "exists")
        except Exception as exc:
            record(step, "error " + _describe(exc))


@pytest.mark.parametrize("overwrite", [False, True], ids=["overwrite=False", "overwrite=True"])
def test_two_writers_at_the_same_steps_leave_one_consistent_checkpoint(overwrite: bool) -> None:
    """Item 3: two processes save different states at steps 1..N at the same moments."""
    steps, seed = 40, random.randrange(2**32)
    with fresh_run_dir() as run_dir:
        outs = [run_dir.parent / f"writer{who}.jsonl" for who in (0, 1)]
        run_workers(
            __name__,
            [
                {"fn": "two_writers_worker", "run_dir": str(run_dir), "out": str(out),
                 "who": who, "steps": steps, "overwrite": overwrite, "seed": seed + who}
                for who, out in enumerate(outs)
            ],
            timeout=300,
        )  # fmt: skip
        results = [dict(read_records(out)) for out in outs]
        listed = {m.step: m for m in list_checkpoints(run_dir)}
        problems, outcomes = [], Counter[str]()
        for step in range(1, steps + 1):
            said = (results[0].get(step, "missing"), results[1].get(step, "missing"))
            outcomes[" / ".join(sorted(said))] += 1
            winners = [who for who in (0, 1) if said[who] == "ok"]
            if overwrite and (not winners or not set(said) <= {"ok", "exists"}):
                problems.append(f"step {step}: writers said {said}; one or both should succeed")
            if not overwrite and sorted(said) != ["exists", "ok"]:
                problems.append(f"step {step}: writers said {said}; exactly one should win")
            if step not in listed:
                problems.append(f"step {step}: nothing listed (writers said {said})")
                continue
            try:
                loaded = load_state(listed[step].sidecar_path)
            except Exception as exc:
                problems.append(f"step {step}: the listed checkpoint does not load: {exc!r}")
                continue
            found = which(loaded, {str(w): expected_state(step, w) for w in (0, 1)})
            if found is None:
                problems.append(f"step {step}: the listed checkpoint is neither writer's state")
            elif int(found) not in winners:
                problems.append(f"step {step}: writer {found}'s state is listed, it said {said}")
        problems += _listed_problems(run_dir)
    print(f"\n[two writers, overwrite={overwrite}] {steps} steps, outcomes {dict(outcomes)}")
    assert not problems, _problem_report(problems, f"two writers (seed {seed})")


# --- 4: prune races a save --------------------------------------------------------------------


def saving_writer(
    *, run_dir: str, out: str, steps: int, use_checkpointer: bool, barrier: Any, stop: Any
) -> None:
    """Save steps 1..steps with keep_last=2 retention; load each right after its save."""
    record = Recorder(out)
    checkpointer = Checkpointer(run_dir=run_dir, interval=1, retention=RetentionPolicy(keep_last=2))
    try:
        for step in range(1, steps + 1):
            state = expected_state(step, 0)
            if use_checkpointer:
                result = checkpointer.maybe_save(state, step=step, last_saved=step - 1)
                if result.status != "saved":
                    record(step, f"save failed {_describe(result.error or Exception())}")
                    continue
                meta = result.meta
            else:
                try:
                    meta = save_state(state, run_dir)
                except Exception as exc:
                    record(step, f"save raised {_describe(exc)}")
                    continue
            try:  # the pruner keeps the newest, which this just-saved checkpoint is
                if not same(state, load_state(meta.sidecar_path)):
                    record(step, "the saved checkpoint loads as another state")
                elif not same(state, load_state(run_dir)):
                    record(step, "load_state(run_dir) is not the just-saved checkpoint")
                else:
                    record(step, "ok")
            except Exception as exc:
                record(step, f"load after save raised {_describe(exc)}")
            if not use_checkpointer:
                try:
                    prune(run_dir, RetentionPolicy(keep_last=2))
                except Exception as exc:
                    record(step, f"the writer's prune raised {_describe(exc)}")
    finally:
        stop.set()


def pruner(*, run_dir: str, out: str, seconds: float, barrier: Any, stop: Any) -> None:
    """``prune(keep_last=1)`` in a tight loop until the writer is done."""
    record, rounds, deadline = Recorder(out), 0, time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            prune(run_dir, RetentionPolicy(keep_last=1))
        except Exception as exc:
            record("prune raised " + _describe(exc))
        rounds += 1
    record("rounds", rounds)


@pytest.mark.parametrize("writer", ["save_state+prune", "Checkpointer"])
def test_prune_racing_a_save_never_breaks_the_just_saved_checkpoint(writer: str) -> None:
    """Item 4: every save that returned left a checkpoint that loads right after the return."""
    steps = 60
    with fresh_run_dir() as run_dir:
        outs = {name: run_dir.parent / f"{name}.jsonl" for name in ("writer", "pruner")}
        run_workers(
            __name__,
            [
                {"fn": "saving_writer", "run_dir": str(run_dir), "out": str(outs["writer"]),
                 "steps": steps, "use_checkpointer": writer == "Checkpointer"},
                {"fn": "pruner", "run_dir": str(run_dir), "out": str(outs["pruner"]),
                 "seconds": 120.0},
            ],
            timeout=300,
        )  # fmt: skip
        records = read_records(outs["writer"])
        pruned = read_records(outs["pruner"])
        problems = [f"step {step}: {what}" for step, what in records if what != "ok"]
        saved = sum(1 for _, what in records if what == "ok")
        if saved + len(problems) < steps:
            problems.append(f"only {saved + len(problems)} of {steps} steps reported")
        problems += [f"pruner: {r[0]}" for r in pruned if r[0] != "rounds"]
        rounds = next(r[1] for r in pruned if r[0] == "rounds")
        problems += _listed_problems(run_dir)
        not_found = [p for p in problems if "FileNotFoundError" in p]
    print(
        f"\n[prune race, {writer}] {steps} saves, {rounds} prune rounds, {len(problems)} problems"
    )
    assert rounds >= 10, f"the pruner ran only {rounds} rounds: the race did not happen"
    assert not problems, _problem_report(
        problems, f"the prune race ({len(not_found)} FileNotFoundError)"
    )


# --- 5: readers race a pruning writer ---------------------------------------------------------


def pruning_writer(*, run_dir: str, out: str, seconds: float, barrier: Any, stop: Any) -> None:
    """Save consecutive steps through a Checkpointer with keep_last=1 for ``seconds``."""
    record = Recorder(out)
    checkpointer = Checkpointer(run_dir=run_dir, interval=1, retention=RetentionPolicy(keep_last=1))
    step, deadline = 2, time.monotonic() + seconds  # step 1 was saved before the start
    try:
        while time.monotonic() < deadline:
            result = checkpointer.maybe_save(
                expected_state(step, 0), step=step, last_saved=step - 1
            )
            if result.status != "saved":
                record("save failed", step, _describe(result.error or Exception()))
            step += 1
    finally:
        stop.set()
        record("saves", step - 2)


def reader(*, run_dir: str, out: str, barrier: Any, stop: Any) -> None:
    """Loop latest_checkpoint / load_state / resume until the writer stops; record failures as
    ``(what went wrong, details)``."""
    record, reads = Recorder(out), Counter[str]()

    def check(what: str, state: TrainState) -> None:
        reads[what] += 1
        if not same(expected_state(state.step, 0), state):
            record(f"{what} gave a state that was never saved", f"step {state.step}")

    while not stop.is_set():
        try:
            if latest_checkpoint(run_dir) is None:
                record("latest_checkpoint returned None", "")
            reads["latest_checkpoint"] += 1
        except Exception as exc:
            record(f"latest_checkpoint raised {type(exc).__name__}", str(exc))
        try:
            check("load_state", load_state(run_dir))
        except Exception as exc:
            record(f"load_state raised {type(exc).__name__}", str(exc))
        try:
            resumed = resume(run_dir)
            if resumed is None:
                record("resume returned None", "")
            else:
                check("resume", resumed.state)
        except Exception as exc:
            record(f"resume raised {type(exc).__name__}", str(exc))
    record("reads", dict(reads))


def test_readers_racing_a_pruning_writer_always_find_a_checkpoint() -> None:
    """Item 5: with keep_last=1 there is always one checkpoint; readers always find and load
    it (a reader that lists the one being pruned must move on to the new one)."""
    seconds = 5.0
    with fresh_run_dir() as run_dir:
        save_state(expected_state(1, 0), run_dir)
        outs = [run_dir.parent / f"{name}.jsonl" for name in ("writer", "reader0", "reader1")]
        run_workers(
            __name__,
            [
                {"fn": "pruning_writer", "run_dir": str(run_dir), "out": str(outs[0]),
                 "seconds": seconds},
                *({"fn": "reader", "run_dir": str(run_dir), "out": str(out)} for out in outs[1:]),
            ],
            timeout=300,
        )  # fmt: skip
        race = read_race(outs[0], outs[1:])
        problems, saves, reads, failures = race.problems, race.saves, race.reads, race.failures
        problems += _listed_problems(run_dir)
    print(
        f"\n[readers vs pruning writer] {seconds:.0f} s: {saves} saves, reads {dict(reads)}, "
        f"failures {sum(failures.values())}"
    )
    assert saves >= 20 and min(reads.values(), default=0) >= 20, (saves, dict(reads))
    assert not problems, _problem_report(problems, "the readers' race")
