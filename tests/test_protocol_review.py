"""Regression tests for the review findings of issue #16 on the commit protocol.

A hostile review of the commit protocol (``keisei_fn.store.commit``) found these holes, fixed
in 22eeae9; each test here fails on its parent (49a90f0):

1. **A re-signed sidecar can name any file.** A sidecar with a valid self-digest, format
   version 1 and ``weights.file`` set to ``../victim.txt``, to an absolute path, or to another
   checkpoint's ``.json`` (with the victim's size recorded) was listed valid, so ``prune`` and
   ``save_state(..., overwrite=True)`` deleted the victim as "its weights".
2. **Readers racing a replacement.** While one process replaces the checkpoint at one step
   (``overwrite=True``) or the final model, readers must always find and load the old or the
   new checkpoint: never None, an empty listing or an error.
3. **The lock.** (a) A child forked while a thread holds the run directory's lock must not
   keep it after the thread releases it. (b) Where ``flock`` fails with ``ENOLCK`` (some network
   file systems), ``locked()`` says it does not hold the lock, warns once, saves still work, and
   ``prune`` leaves a young unreferenced payload alone (it may be a save in flight) until it is
   older than ``ABANDONED_AFTER_SECONDS``.
4. **A symbolic link loop** named ``checkpoint_ts9.json`` never makes a reader or ``prune`` raise.
5. **The ledger.** One 30 MiB line of ``[{},{},...]`` is skipped with a warning (unparsed, so
   memory stays bounded); a directory named ``publications.jsonl`` is a ``KeiseiFnError`` (and
   ``prune`` keeps everything); appending to a FIFO is refused, not blocked.
6. **Resume after a save killed before its first commit** (only an unreferenced payload and a
   temp file) is a fresh start; a corrupt sidecar still refuses; a regular file is not a run
   directory.
7. **Prune of a missing run directory** plans nothing and creates nothing; of a file, raises.
8. ``keisei_fn.store.commit.names_payload`` tells a committed weights file from a fresh name.

Helpers come from ``saved_states`` (states, bit-exact comparison), ``kill_harness`` (the
reader and writer processes, their records) and ``test_hostile_files`` (re-signing, bounded
calls, warnings, memory guard). Nothing under test is mocked; the only injected fault is the
``flock`` failure of 3(b).
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kill_harness import Recorder, read_race, run_workers
from saved_states import expected_state, same, stored_state
from test_hostile_files import (
    MiB,
    _state,
    finishes,
    resigned,
    run_watched,
    store_warnings,
)

import keisei_fn.store.commit
import keisei_fn.store.retention
from keisei_fn import (
    latest_checkpoint,
    list_checkpoints,
    load_state,
    save_final_model,
    save_state,
)
from keisei_fn.codec import loads
from keisei_fn.errors import KeiseiFnError
from keisei_fn.store import RetentionPolicy, append_ledger, prune, read_ledger, resume
from keisei_fn.store.commit import locked
from keisei_fn.store.ledger import LEDGER_NAME
from keisei_fn.testing import fresh_run_dir

#: A generation name no save made: an unreferenced payload, as a killed save leaves one.
ORPHAN = "checkpoint_ts{step}.0123456789abcdef.safetensors"


def _problems_report(problems: list[str]) -> str:
    return "\n".join(["", *problems])


# --- 1: a re-signed sidecar never points outside its checkpoint --------------------------------

VICTIMS = ["parent_dir", "absolute_path", "other_sidecar"]


def _plant_hostile_ts3(run_dir: Path, victim_kind: str) -> Path:
    """Save checkpoint_ts5 and checkpoint_ts3, then re-sign ts3's sidecar as format version 1
    naming a victim file as its weights (with the victim's size). Returns the victim."""
    ts5 = save_state(_state(5), run_dir)
    ts3 = save_state(_state(3), run_dir)
    sidecar = copy.deepcopy(loads(ts3.sidecar_path.read_bytes()))
    if victim_kind == "other_sidecar":
        victim, named = ts5.sidecar_path, ts5.sidecar_path.name
    else:
        where = run_dir.parent if victim_kind == "parent_dir" else run_dir.parent / "elsewhere"
        where.mkdir(exist_ok=True)
        victim = where / "victim.txt"
        victim.write_bytes(b"v" * ts3.weights_size)  # the size the sidecar records
        named = "../victim.txt" if victim_kind == "parent_dir" else str(victim)
    sidecar["format_version"] = 1
    sidecar["weights"]["file"] = named
    sidecar["weights"]["size"] = victim.stat().st_size
    ts3.sidecar_path.write_bytes(resigned(sidecar))
    return victim


@pytest.mark.parametrize("action", ["prune", "overwrite"])
@pytest.mark.parametrize("victim_kind", VICTIMS)
def test_a_resigned_sidecar_naming_a_foreign_file_never_gets_it_deleted(
    victim_kind: str, action: str
) -> None:
    """Finding 1: the hostile checkpoint_ts3 is never listed valid; pruning it (keep_last=1
    deletes ts3) or saving over it (overwrite=True) leaves the victim untouched."""
    with fresh_run_dir() as run_dir:
        victim = _plant_hostile_ts3(run_dir, victim_kind)
        content = victim.read_bytes()
        problems = []
        listed = [m.name for m in list_checkpoints(run_dir)]
        if listed != ["checkpoint_ts5"]:
            problems.append(f"list_checkpoints gave {listed}: the hostile ts3 is listed")
        if action == "prune":
            prune(run_dir, RetentionPolicy(keep_last=1))
        else:
            meta = save_state(_state(3), run_dir, overwrite=True)
            if not same(_state(3), load_state(meta.sidecar_path)):
                problems.append("the overwriting save does not load as its state")
        if not victim.is_file() or victim.read_bytes() != content:
            problems.append(f"{action} deleted or changed the victim {victim}")
        try:
            if load_state(run_dir).step != 5:
                problems.append("checkpoint_ts5 is no longer the latest")
        except KeiseiFnError as exc:
            problems.append(f"load_state(run_dir) raised {type(exc).__name__}: {exc}")
        assert not problems, _problems_report(problems)


# --- 2: readers racing a replacement ------------------------------------------------------------

STEP = 5
#: How many different states the writer cycles through (each save replaces a different one).
VARIANTS = 3
RACE_SECONDS = 3.0


def _save_variant(mode: str, run_dir: str | Path, variant: int) -> None:
    state = expected_state(STEP, variant)
    if mode == "final_model":
        save_final_model(state, run_dir)
    else:
        save_state(state, run_dir, overwrite=True)


def replacing_writer(
    *, run_dir: str, out: str, mode: str, seconds: float, barrier: Any, stop: Any
) -> None:
    """Replace the checkpoint at STEP (or the final model) with the next variant, for
    ``seconds``."""
    record, saves, deadline = Recorder(out), 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                _save_variant(mode, run_dir, (saves + 1) % VARIANTS)  # variant 0 is there
            except Exception as exc:
                record("save raised", f"{type(exc).__name__}: {exc}")
            saves += 1
    finally:
        stop.set()
        record("saves", saves)


def replacement_reader(*, run_dir: str, out: str, mode: str, barrier: Any, stop: Any) -> None:
    """Read while the writer replaces; record ``(what went wrong, details)`` and the counts."""
    record, reads = Recorder(out), Counter[str]()
    candidates = [stored_state(mode, STEP, v) for v in range(VARIANTS)]

    def attempt(what: str, call: Callable[[], str | None]) -> None:
        try:
            problem = call()
        except Exception as exc:
            record(f"{what} raised {type(exc).__name__}", str(exc))
            return
        reads[what] += 1
        if problem:
            record(f"{what}: {problem}", "")

    def listed() -> str | None:
        names = [m.name for m in list_checkpoints(run_dir)]
        wanted = "final_model" if mode == "final_model" else f"checkpoint_ts{STEP}"
        return None if wanted in names else f"{wanted} is not listed ({names})"

    def loaded(source: str | Path) -> Callable[[], str | None]:
        def call() -> str | None:
            state = load_state(source)
            if any(same(c, state) for c in candidates):
                return None
            return f"loaded a state never written (step {state.step})"

        return call

    while not stop.is_set():
        attempt("list_checkpoints", listed)
        if mode == "final_model":
            attempt("load_state(final_model)", loaded(Path(run_dir) / "final_model"))
        else:
            attempt(
                "latest_checkpoint",
                lambda: "returned None" if latest_checkpoint(run_dir) is None else None,
            )
            attempt("load_state(run_dir)", loaded(run_dir))
    record("reads", dict(reads))


@pytest.mark.parametrize("mode", ["overwrite", "final_model"])
def test_readers_racing_a_replacement_always_find_old_or_new(mode: str) -> None:
    """Finding 2: two reader processes loop for RACE_SECONDS while a writer process replaces
    the checkpoint at one step (``save_state(..., overwrite=True)``) or the final model. No
    read may fail, find nothing, or load anything but a variant that was written."""
    with fresh_run_dir() as run_dir:
        _save_variant(mode, run_dir, 0)
        outs = [run_dir.parent / f"{name}.jsonl" for name in ("writer", "reader0", "reader1")]
        run_workers(
            __name__,
            [
                {"fn": "replacing_writer", "run_dir": str(run_dir), "out": str(outs[0]),
                 "mode": mode, "seconds": RACE_SECONDS},
                *({"fn": "replacement_reader", "run_dir": str(run_dir), "out": str(out),
                   "mode": mode} for out in outs[1:]),
            ],
            timeout=120,
        )  # fmt: skip
        race = read_race(outs[0], outs[1:])
        problems, saves, reads, failures = race.problems, race.saves, race.reads, race.failures
    print(
        f"\n[readers vs replacement, {mode}] {RACE_SECONDS:.0f} s: {saves} saves, "
        f"reads {dict(reads)}, failures {sum(failures.values())}"
    )
    assert saves >= 20 and min(reads.values(), default=0) >= 20, (saves, dict(reads))
    assert not problems, _problems_report(problems)


# --- 3: the lock --------------------------------------------------------------------------------


def test_a_child_forked_under_the_lock_does_not_keep_it() -> None:
    """Finding 3(a): a thread holds the lock, the process forks a child that sleeps 5 s, the
    thread releases the lock: another holder gets it at once, not when the child exits."""
    with fresh_run_dir() as run_dir:
        holding, release, acquired = threading.Event(), threading.Event(), threading.Event()

        def hold() -> None:
            with locked(run_dir):
                holding.set()
                release.wait(30)

        def take() -> None:
            with locked(run_dir):
                acquired.set()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert holding.wait(10), "the holder never got the lock"
        child = os.fork()
        if child == 0:  # the child: only sleep, never return into pytest
            try:
                time.sleep(5)
            finally:
                os._exit(0)
        taker = threading.Thread(target=take, daemon=True)
        try:
            release.set()
            holder.join(10)
            started = time.monotonic()
            taker.start()
            got = acquired.wait(1.5)
            waited = time.monotonic() - started
        finally:
            os.kill(child, signal.SIGKILL)  # releases whatever the child holds
            os.waitpid(child, 0)
        taker.join(10)
    assert got, f"no lock after {waited:.1f} s: the forked child kept the released lock"


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without ``flock``: every call fails with ENOLCK."""

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(keisei_fn.store.commit.fcntl, "flock", flock)


def test_without_flock_saves_work_and_prune_spares_young_orphans(
    no_flock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3(b): locked() yields False and warns once per directory; a save works; a young
    unreferenced payload (perhaps a save in flight elsewhere) survives prune until it counts as
    abandoned (ABANDONED_AFTER_SECONDS patched to 0)."""
    with fresh_run_dir() as run_dir, store_warnings() as caught:
        held = []
        for _ in range(2):
            with locked(run_dir) as lock:
                held.append(lock)
        assert held == [False, False], f"locked() yielded {held} without flock"
        state = _state(5)
        meta = save_state(state, run_dir)
        assert same(state, load_state(meta.sidecar_path))
        orphan = run_dir / ORPHAN.format(step=7)
        orphan.write_bytes(b"\0" * 64)
        prune(run_dir, RetentionPolicy(keep_last=1))
        assert orphan.exists(), "prune without the lock removed a young unreferenced payload"
        warned = caught.about("flock")
        assert len(warned) == 1, f"expected one warning about flock, got {warned}"
        monkeypatch.setattr(keisei_fn.store.retention, "ABANDONED_AFTER_SECONDS", 0)
        prune(run_dir, RetentionPolicy(keep_last=1))
        assert not orphan.exists(), "prune kept an abandoned unreferenced payload"
        assert same(state, load_state(run_dir))


# --- 4: a symbolic link loop --------------------------------------------------------------------


def test_a_symlink_loop_sidecar_never_breaks_readers_or_prune() -> None:
    """Finding 4: ``checkpoint_ts9.json`` is a link to itself next to a valid checkpoint_ts5."""
    with fresh_run_dir() as run_dir:
        ts5 = save_state(_state(5), run_dir)
        loop = run_dir / "checkpoint_ts9.json"
        os.symlink(loop.name, loop)
        problems: list[str] = []
        calls: dict[str, tuple[Callable[[], Any], Callable[[Any], bool]]] = {
            "latest_checkpoint": (lambda: latest_checkpoint(run_dir),
                                  lambda v: v == ts5.weights_path),
            "load_state": (lambda: load_state(run_dir), lambda v: v.step == 5),
            "resume": (lambda: resume(run_dir), lambda v: v is not None and v.state.step == 5),
            "list_checkpoints": (lambda: list_checkpoints(run_dir),
                                 lambda v: [m.name for m in v] == ["checkpoint_ts5"]),
            "prune": (lambda: prune(run_dir, RetentionPolicy(keep_last=1)), lambda v: True),
        }  # fmt: skip
        for what, (call, expected) in calls.items():
            try:
                value = finishes(call, what=what, within=10)
            except Exception as exc:
                problems.append(f"{what} raised {type(exc).__name__}: {exc}")
            else:
                if not expected(value):
                    problems.append(f"{what} gave {value!r}")
        if not (ts5.sidecar_path.is_file() and ts5.weights_path.is_file()):
            problems.append("prune deleted checkpoint_ts5")
        assert not problems, _problems_report(problems)


# --- 5: the ledger ------------------------------------------------------------------------------

HUGE_LINE_BYTES = 30 * MiB


def _write_huge_line(path: Path, size: int = HUGE_LINE_BYTES) -> None:
    """One line of ``[{},{},...]`` (``size`` bytes with the newline): ~10 M empty objects."""
    units = (size - len(b"[{}]\n")) // 3
    chunk = b",{}" * (MiB // 3)
    with open(path, "wb") as f:
        f.write(b"[{}")
        for _ in range(units // (MiB // 3)):
            f.write(chunk)
        f.write(b",{}" * (units % (MiB // 3)))
        f.write(b"]\n")


def test_one_huge_ledger_line_is_skipped_with_a_warning_and_prune_works() -> None:
    """Finding 5: a 30 MiB line of ``[{},...]`` is skipped (with a warning), not parsed."""
    with fresh_run_dir() as run_dir:
        metas = [save_state(_state(step), run_dir) for step in (1, 2, 3)]
        _write_huge_line(run_dir / LEDGER_NAME)
        with store_warnings() as caught:
            records = read_ledger(run_dir)
        assert records == []
        assert len(caught.about(LEDGER_NAME)) == 1, [r.getMessage() for r in caught.records]
        plan = prune(run_dir, RetentionPolicy(keep_last=1))
        assert set(plan.delete) == {"checkpoint_ts1", "checkpoint_ts2"}, plan
        assert load_state(run_dir).step == 3 and metas[-1].weights_path.is_file()


_LEDGER_PEAK = textwrap.dedent(
    """
    import sys
    from keisei_fn.store import read_ledger

    def status(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    read_ledger(sys.argv[2])  # warm up on an empty run directory
    try:  # reset the high-water mark to what is resident now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
    except OSError:
        base = status("VmHWM")
    records = read_ledger(sys.argv[1])
    print(len(records), status("VmHWM") - base)
    """
)


def test_one_huge_ledger_line_costs_bounded_memory() -> None:
    """Finding 5: reading that ledger grows the peak resident memory (VmHWM, in a fresh
    subprocess) by at most twice the line plus 64 MiB (it was ~29x the line)."""
    bound = 2 * HUGE_LINE_BYTES + 64 * MiB
    with fresh_run_dir() as run_dir, fresh_run_dir() as empty:
        _write_huge_line(run_dir / LEDGER_NAME)
        code, out, err = run_watched(
            [sys.executable, "-c", _LEDGER_PEAK, str(run_dir), str(empty)],
            kill_above=bound + 1024 * MiB,  # the child's own baseline (torch) is ~0.5 GiB
            timeout=60,
        )
    assert code == 0, err[-4000:]
    count, growth = map(int, out.split()[-2:])
    print(f"\n[huge ledger line] {count} records, peak growth {growth / MiB:.1f} MiB")
    assert growth <= bound, f"{growth / MiB:.1f} MiB > {bound / MiB:.0f} MiB"


def test_a_directory_ledger_is_an_error_and_prune_keeps_everything() -> None:
    """Finding 5: which checkpoints are pending is unknown, so none is deleted."""
    with fresh_run_dir() as run_dir:
        metas = [save_state(_state(step), run_dir) for step in (1, 2, 3)]
        (run_dir / LEDGER_NAME).mkdir()
        with pytest.raises(KeiseiFnError):
            read_ledger(run_dir)
        plan = prune(run_dir, RetentionPolicy(keep_last=1))
        assert plan.delete == (), plan
        for meta in metas:
            assert meta.sidecar_path.is_file() and meta.weights_path.is_file(), meta.name


def _release_fifo_writer(fifo: Path, thread: threading.Thread) -> None:
    """Unblock a thread stuck opening ``fifo`` for writing: hold its read end open (never
    reading) until the thread is done."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        thread.join(10)
    finally:
        os.close(fd)


@pytest.mark.parametrize("reader", ["no_reader", "a_reader"])
def test_appending_to_a_fifo_ledger_is_refused_not_blocked(reader: str) -> None:
    """Finding 5: ``append_ledger`` raises a KeiseiFnError within 5 s, whether or not another
    process has the FIFO open for reading (the test never blocks: a stuck append is released by
    opening the FIFO's read end)."""
    record = {"event": "pending", "artifact": "a", "digest": "d"}
    with fresh_run_dir() as run_dir:
        fifo = run_dir / LEDGER_NAME
        os.mkfifo(fifo)
        held = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader == "a_reader" else None
        outcome: dict[str, Any] = {}

        def append() -> None:
            try:
                outcome["value"] = append_ledger(run_dir, record)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=append, name="append to a FIFO", daemon=True)
        try:
            thread.start()
            thread.join(5)
            blocked = thread.is_alive()
            if blocked:
                _release_fifo_writer(fifo, thread)
        finally:
            if held is not None:
                os.close(held)
    assert not blocked, "append_ledger blocked on a FIFO for 5 s"
    assert isinstance(outcome.get("error"), KeiseiFnError), f"append_ledger gave {outcome}"


# --- 6: resume after a save killed before its first commit --------------------------------------


@pytest.mark.parametrize("left", ["payload", "payload+temp"])
def test_resume_after_a_save_killed_before_its_first_commit_starts_fresh(left: str) -> None:
    """Finding 6: an unreferenced payload (and a temp file) is nothing to resume from; a corrupt
    sidecar next to it still refuses a silent fresh start."""
    with fresh_run_dir() as run_dir:
        (run_dir / ORPHAN.format(step=3)).write_bytes(b"\0" * 64)
        if left == "payload+temp":
            (run_dir / ".checkpoint_ts3.x.tmp").write_bytes(b"\0" * 16)
        assert resume(run_dir) is None
        (run_dir / "checkpoint_ts3.json").write_bytes(b'{"format": "keisei_fn", junk')
        with pytest.raises(KeiseiFnError):
            resume(run_dir)


def test_resume_of_a_regular_file_is_an_error() -> None:
    """Finding 6: a file is not a run directory (it was a silent fresh start)."""
    with fresh_run_dir() as run_dir:
        log_file = run_dir / "train.log"
        log_file.write_text("step 1\n")
        with pytest.raises(KeiseiFnError):
            resume(log_file)


# --- 7: prune of a missing run directory, or of a file ------------------------------------------


def test_prune_of_a_missing_run_dir_plans_nothing_and_creates_nothing() -> None:
    with fresh_run_dir() as run_dir:
        missing = run_dir / "not-yet"
        plan = prune(missing, RetentionPolicy(keep_last=1))
        assert (dict(plan.keep), plan.delete) == ({}, ())
        assert not missing.exists(), "prune created the run directory"


def test_prune_of_a_file_is_an_error() -> None:
    with fresh_run_dir() as run_dir:
        a_file = run_dir / "train.log"
        a_file.write_text("step 1\n")
        with pytest.raises(KeiseiFnError):
            prune(a_file, RetentionPolicy(keep_last=1))
        assert a_file.read_text() == "step 1\n"


# --- 8: names_payload ---------------------------------------------------------------------------


def test_names_payload_tells_the_committed_weights_from_a_fresh_name() -> None:
    from keisei_fn.store.commit import fresh_payload, names_payload

    with fresh_run_dir() as run_dir:
        meta = save_state(_state(5), run_dir)
        stem = run_dir / meta.name
        assert names_payload(stem, meta.weights_path)
        assert not names_payload(stem, fresh_payload(stem, ".safetensors"))
