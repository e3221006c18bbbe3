"""Hostile files in a run directory (issue #16): reproducers for what the store must survive.

Covered items of issue #16:

- **A. Listing is total.** Next to a valid ``checkpoint_ts5``, a bad ``checkpoint_ts9`` (a
  300-deep nested sidecar, re-signed sidecars whose ``state.extra`` is a string, whose stats hold
  a negative count, or whose format version is newer than supported; junk bytes; an empty file;
  a directory or a FIFO named ``checkpoint_ts9.json``) never makes ``list_checkpoints``,
  ``latest_checkpoint``, ``scan_run_dir``, ``resume``, ``prune`` or ``keisei-fn ls`` raise or
  block; the latest is ``checkpoint_ts5``; each call logs exactly one warning naming the bad
  file and why (logger ``keisei_fn.store``). A newer-format checkpoint is never pruned and loads
  only to an ``UnsupportedFormatError`` that says to upgrade.
- **B. No silent fresh start.** A run directory with checkpoint files but no usable checkpoint
  (one flipped bit in the only sidecar or weights file; only a Keisei ``.pth``) makes ``resume``
  raise, never return None; an empty or missing run directory is a fresh start.
- **C. Typed errors, no hangs.** Absurd shapes of empty tensors in a safetensors header, FIFOs
  where files should be, an unknown sidecar kind and malformed ledger records all raise a
  ``KeiseiFnError`` (quickly), never a ``TypeError``/``RuntimeError`` or a blocked ``open``.
- **D. Bounded cost.** The caps ``keisei_fn.meta.MAX_SIDECAR_BYTES``,
  ``keisei_fn.store.weights.MAX_HEADER_BYTES``/``MAX_TENSORS`` and
  ``keisei_fn.store.ledger.MAX_LEDGER_BYTES`` are public and enforced, and the peak memory of
  handling a file just under a cap stays within twice that cap plus 64 MiB (measured in a fresh
  subprocess).

Everything here uses real files in private temporary directories and real processes. Hostile
sidecars with a *valid* self-digest are made by editing a sidecar from a real save and
re-signing it (``digest = "blake3:" + BLAKE3(canonical bytes without "digest")``), and hostile
weights files are written by hand (8-byte little-endian header length, JSON header, data) with
the sidecar's size and digest recomputed; ``test_crafting_helpers_are_sound`` checks that this
crafting, applied without a hostile edit, gives checkpoints the library accepts, so a failure
elsewhere is the library's behaviour, not the test's crafting. Nothing here hard-codes a weights
file name (the save's returned meta says it) or calls a store internal.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import inspect
import io
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import keisei_fn.meta
import keisei_fn.store.ledger
import keisei_fn.store.weights
from keisei_fn import (
    GameStats,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    save_state,
)
from keisei_fn.cli import main as cli_main
from keisei_fn.codec import dumps, loads
from keisei_fn.errors import IntegrityError, KeiseiFnError, UnsupportedFormatError
from keisei_fn.meta import check_sidecar
from keisei_fn.store import (
    RetentionPolicy,
    append_ledger,
    prune,
    read_ledger,
    resume,
    scan_run_dir,
    verify_checkpoint,
)
from keisei_fn.testing import fresh_run_dir

# -- the caps (issue #16 D): looked up lazily, so collection works before they exist ------------


def _cap(module: Any, name: str) -> int:
    """The public cap ``module.name``; the test fails (not errors) while it does not exist."""
    value = getattr(module, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        pytest.fail(f"{module.__name__}.{name} is not defined as a positive int (issue #16 D)")
    return value


def max_sidecar_bytes() -> int:
    return _cap(keisei_fn.meta, "MAX_SIDECAR_BYTES")


def max_header_bytes() -> int:
    return _cap(keisei_fn.store.weights, "MAX_HEADER_BYTES")


def max_tensors() -> int:
    return _cap(keisei_fn.store.weights, "MAX_TENSORS")


def max_ledger_bytes() -> int:
    return _cap(keisei_fn.store.ledger, "MAX_LEDGER_BYTES")


LEDGER_NAME = getattr(keisei_fn.store.ledger, "LEDGER_NAME", "publications.jsonl")
STORE_LOGGER = "keisei_fn.store"
MiB = 1 << 20
#: How long a call may take before it counts as blocked (on a FIFO, say).
BLOCKED_AFTER_S = 20.0

# -- templates: small real saves to copy and to edit -------------------------------------------


def _state(step: int) -> TrainState:
    """A small full state: model, optimizer, stats, extra."""
    return TrainState(
        spec=None,
        step=step,
        episodes=step,
        stats=GameStats(black_wins=2, white_wins=1, draws=1),
        model={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * step},
        optimizer={"state": {0: {"exp_avg": torch.ones(2, 3)}}, "param_groups": [{"lr": 0.1}]},
        extra={"elo": 1500.0 + step},
    )


class Saved:
    """A real save in the template directory: its meta, its files' names and its sidecar.

    (Plain classes with short reprs: Hypothesis prints a failing example's fixtures.)"""

    def __init__(self, meta: Any, sidecar: dict[str, Any]) -> None:
        self.meta = meta  # the CheckpointMeta save_state returned
        self.sidecar_name: str = meta.sidecar_path.name
        self.weights_name: str = meta.weights_path.name
        self.sidecar = sidecar

    def __repr__(self) -> str:
        return f"Saved({self.meta.name})"

    def copy_into(self, template: Path, run_dir: Path) -> None:
        for name in (self.sidecar_name, self.weights_name):
            shutil.copyfile(template / name, run_dir / name)


class Templates:
    """Small real saves in one directory, to copy and to edit."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        #: the valid checkpoint every test of A keeps
        self.ts5 = _saved(directory, _state(5))
        #: the checkpoint whose sidecar A makes hostile
        self.ts9 = _saved(directory, _state(9))
        #: step 30: model {"a", "b"}, both empty float32 tensors
        self.empties = _saved(
            directory,
            TrainState(spec=None, step=30, model={"a": torch.zeros(0), "b": torch.zeros(0)}),
        )
        #: step 40: model {"t0"}, an empty uint8 tensor
        self.one_empty_u8 = _saved(
            directory,
            TrainState(spec=None, step=40, model={"t0": torch.zeros(0, dtype=torch.uint8)}),
        )

    def __repr__(self) -> str:
        return f"Templates({self.dir})"


def _saved(run_dir: Path, state: TrainState) -> Saved:
    meta = save_state(state, run_dir)
    assert meta.weights_path.parent == run_dir and meta.sidecar_path.parent == run_dir
    return Saved(meta, loads(meta.sidecar_path.read_bytes()))


@pytest.fixture(scope="module")
def templates() -> Iterator[Templates]:
    with fresh_run_dir(name="templates") as run_dir:
        yield Templates(run_dir)


# -- crafting --------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


def resigned(sidecar: dict[str, Any]) -> bytes:
    """The canonical bytes of ``sidecar`` with its self-digest recomputed (design.md: BLAKE3 of
    the canonical bytes without the ``digest`` field)."""
    body = {k: v for k, v in sidecar.items() if k != "digest"}
    return dumps({**body, "digest": _digest(dumps(body))})


def safetensors_bytes(entries: bytes, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    """A safetensors file by hand: ``entries`` is the JSON text of the tensor entries (without
    braces); the header is padded with spaces to a multiple of 8 (or to ``header_len``)."""
    header = b'{"__metadata__":{"format":"keisei_fn"}' + (b"," + entries if entries else b"") + b"}"
    target = header_len if header_len is not None else len(header) + (-len(header) % 8)
    assert target >= len(header), (target, len(header))
    header += b" " * (target - len(header))
    return struct.pack("<Q", len(header)) + header + data


def entry(name: str, dtype: str, shape: list[int], begin: int = 0, end: int = 0) -> bytes:
    """One tensor's header entry, as JSON text."""
    dims = ",".join(map(str, shape))
    text = f'"{name}":{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{begin},{end}]}}'
    return text.encode()


def commit_crafted(
    run_dir: Path,
    saved: Saved,
    weights: bytes,
    *,
    shapes: dict[str, list[int]] | None = None,
    model_names: list[str] | None = None,
) -> Path:
    """Write ``weights`` under ``saved``'s weights file name with ``saved``'s sidecar edited to
    match it (size, digest; ``shapes``: stored name → shape; ``model_names``: the model keys,
    each recorded like the template's first tensor) and re-signed. Returns the stem."""
    sidecar = copy.deepcopy(saved.sidecar)
    sidecar["weights"]["size"] = len(weights)
    sidecar["weights"]["digest"] = _digest(weights)
    if model_names is not None:
        (template_entry,) = sidecar["tensors"].values()
        sidecar["state"]["model"] = model_names
        sidecar["tensors"] = {f"model/{n}": dict(template_entry) for n in model_names}
    for name, shape in (shapes or {}).items():
        sidecar["tensors"][name]["shape"] = shape
    (run_dir / saved.weights_name).write_bytes(weights)
    (run_dir / saved.sidecar_name).write_bytes(resigned(sidecar))
    return run_dir / str(saved.meta.name)


def many_empty_tensors(count: int) -> tuple[list[str], bytes]:
    """``count`` model keys and the header entries of as many empty uint8 tensors."""
    names = [f"t{i:x}" for i in range(count)]
    return names, b",".join(entry(f"model/{n}", "U8", [0]) for n in names)


def commit_many_empty(
    run_dir: Path, saved: Saved, count: int, *, header_len: int | None = None
) -> Path:
    """A checkpoint (``saved``'s names) whose weights file holds ``count`` empty uint8 tensors.

    Its sidecar lists them all when a sidecar that large is accepted (so that only a count cap
    can refuse the weights file); otherwise it lists the template's one tensor."""
    names, entries = many_empty_tensors(count)
    weights = safetensors_bytes(entries, header_len=header_len)
    stem = commit_crafted(run_dir, saved, weights)
    if count <= 200_000:
        commit_crafted(run_dir, saved, weights, model_names=names)
        try:
            check_sidecar((run_dir / saved.sidecar_name).read_bytes(), name=saved.meta.name)
        except KeiseiFnError:  # too large a sidecar: list the template's tensor only
            commit_crafted(run_dir, saved, weights)
    return stem


# -- running calls: bounded in time, with their store warnings ---------------------------------


def _release_fifo_readers(fifos: Sequence[Path], thread: threading.Thread) -> None:
    """Unblock a thread stuck opening a FIFO for reading: open the FIFO's write end (never its
    read end) and close it, so the reader sees end of file."""
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
        time.sleep(0.01)


class Blocked(AssertionError):
    """A call that did not finish in time (a test failure, not an error)."""


def finishes(
    call: Callable[[], Any],
    *,
    what: str,
    fifos: Sequence[Path] = (),
    within: float = BLOCKED_AFTER_S,
) -> Any:
    """``call()`` run in a thread: its value, or its exception re-raised here; the test fails if
    it is still running after ``within`` seconds (any FIFO reader it blocks on is released)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"hostile: {what}", daemon=True)
    thread.start()
    thread.join(within)
    if thread.is_alive():
        _release_fifo_readers(fifos, thread)
        raise Blocked(f"{what} was still running after {within} s (blocked on a FIFO?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class StoreWarnings(logging.Handler):
    """Collects the WARNING-or-worse records that reach the ``keisei_fn.store`` logger (like
    ``caplog``, but usable inside ``@given`` and across threads)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.records.append(record)

    def about(self, needle: str) -> list[str]:
        return [m for r in self.records if needle in (m := r.getMessage())]


@contextlib.contextmanager
def store_warnings() -> Iterator[StoreWarnings]:
    handler = StoreWarnings()
    logger = logging.getLogger(STORE_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def cli(*args: str) -> tuple[int, str, str]:
    """``keisei-fn ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


# -- the crafting is sound ----------------------------------------------------------------------


def test_crafting_helpers_are_sound(templates: Templates) -> None:
    """Re-signing an unedited sidecar gives its exact bytes back (and check_sidecar accepts
    them), and a weights file written by hand with a recomputed sidecar loads; so the hostile
    variants below differ from a valid checkpoint only by their hostile edit."""
    for saved in (templates.ts5, templates.ts9, templates.empties, templates.one_empty_u8):
        raw = (templates.dir / saved.sidecar_name).read_bytes()
        assert resigned(loads(raw)) == raw
        assert check_sidecar(raw, name=saved.meta.name)["digest"] == saved.sidecar["digest"]
        edited = copy.deepcopy(saved.sidecar)
        edited["state"]["extra"] = {"note": "re-signed"}
        check_sidecar(resigned(edited), name=saved.meta.name)  # a re-signed edit checks too
    with fresh_run_dir() as run_dir:
        entries = entry("model/a", "F32", [0]) + b"," + entry("model/b", "F32", [0])
        stem = commit_crafted(run_dir, templates.empties, safetensors_bytes(entries))
        assert load_state(stem).model["a"].shape == (0,)
        assert verify_checkpoint(stem).name == "checkpoint_ts30"
        stem = commit_many_empty(run_dir, templates.one_empty_u8, 3)
        assert sorted(load_state(stem).model) == ["t0", "t1", "t2"]
        stem = commit_many_empty(run_dir, templates.one_empty_u8, 3, header_len=4096)
        assert sorted(load_state(stem, verify=True).model) == ["t0", "t1", "t2"]


# -- A: listing is total ------------------------------------------------------------------------

NEWER_FORMAT = "newer_format"


def _edited(templates: Templates, edit: Callable[[dict[str, Any]], None]) -> bytes:
    sidecar = copy.deepcopy(templates.ts9.sidecar)
    edit(sidecar)
    return resigned(sidecar)


def _set_extra(sidecar: dict[str, Any]) -> None:
    sidecar["state"]["extra"] = "x"


def _negative_wins(sidecar: dict[str, Any]) -> None:
    sidecar["state"]["stats"]["black_wins"] = -1


def _newer_format(sidecar: dict[str, Any]) -> None:
    sidecar["format_version"] = 99


#: case → (what to put at checkpoint_ts9.json, a pattern the warning must match: its "why").
BAD_SIDECARS: dict[str, tuple[Callable[[Templates, Path], object], str]] = {
    "nested_300_deep": (
        lambda t, p: p.write_bytes(b"[" * 300 + b"]" * 300),
        r"json|nest|deep|depth|recurs|pars|not a keisei_fn",
    ),
    "extra_is_a_string": (
        lambda t, p: p.write_bytes(_edited(t, _set_extra)),
        r"extra",
    ),
    "negative_win_count": (
        lambda t, p: p.write_bytes(_edited(t, _negative_wins)),
        r"stats|wins|negative|>= ?0",
    ),
    NEWER_FORMAT: (
        lambda t, p: p.write_bytes(_edited(t, _newer_format)),
        r"newer|upgrade|version",
    ),
    "junk_bytes": (
        lambda t, p: p.write_bytes(b'\x89PNG\r\n\x1a\n\x00\xff\xfe junk \xc3\x28 {"a":'),
        r"json|pars|decod|utf|invalid|corrupt",
    ),
    "empty_file": (
        lambda t, p: p.write_bytes(b""),
        r"empty|json|pars|0 bytes|short|truncat",
    ),
    "directory": (
        lambda t, p: p.mkdir(),
        r"director|not a (regular )?file",
    ),
    "fifo": (
        lambda t, p: os.mkfifo(p),
        r"fifo|pipe|regular|special|not a file",
    ),
}


def _run_dir_with_bad_ts9(templates: Templates, run_dir: Path) -> Path:
    """A valid checkpoint_ts5 and checkpoint_ts9 copied in; returns ts9's sidecar path (the
    caller replaces it)."""
    templates.ts5.copy_into(templates.dir, run_dir)
    templates.ts9.copy_into(templates.dir, run_dir)
    return run_dir / templates.ts9.sidecar_name


def assert_listing_is_total(
    templates: Templates, run_dir: Path, *, why: str | None, newer_format: bool = False
) -> None:
    """Every reader of ``run_dir`` (ts5 valid, ts9 hostile) finishes without raising, picks
    ts5, and logs exactly one warning about ts9 per call (matching ``why`` when given).

    Every call is made even after an earlier one misbehaved; the test then fails once, listing
    every problem (so a reproducer shows all that is wrong, not only the first thing)."""
    bad = "checkpoint_ts9"
    ts5_weights = run_dir / templates.ts5.weights_name
    fifos = [p for p in run_dir.iterdir() if p.is_fifo()]
    problems: list[str] = []

    def expect(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    def once(what: str, call: Callable[[], Any], *, warns: bool = True) -> Any:
        """``call()``'s value, or None (and a problem noted) when it raised or blocked."""
        value = None
        with store_warnings() as caught:
            try:
                value = finishes(call, what=what, fifos=fifos)
            except Exception as exc:
                problems.append(f"{what} raised {type(exc).__name__}: {exc}")
        if warns:
            about = caught.about(bad)
            expect(len(about) == 1, f"{what}: expected 1 warning naming {bad}, got {about}")
            if about and why is not None:
                expect(
                    any(re.search(why, m, re.IGNORECASE) for m in about),
                    f"{what}: the warning does not say why (/{why}/): {about}",
                )
        return value

    listed = once("list_checkpoints", lambda: list_checkpoints(run_dir))
    if listed is not None:
        names = [m.name for m in listed]
        expect(names == ["checkpoint_ts5"], f"list_checkpoints gave {names}")
    latest = once("latest_checkpoint", lambda: latest_checkpoint(run_dir))
    expect(latest == ts5_weights, f"latest_checkpoint gave {latest}, not {ts5_weights}")
    scan = once("scan_run_dir", lambda: scan_run_dir(run_dir))
    if scan is not None:
        names = [m.name for m in scan.valid]
        expect(names == ["checkpoint_ts5"], f"scan_run_dir: valid {names}")
        reported = [stem.name for stem, _ in (*scan.invalid, *scan.unreadable)]
        orphans = [p.name for p in scan.leftovers if p.name.startswith(bad + ".")]
        expect(
            reported == [bad] or (not reported and bool(orphans)),
            f"scan_run_dir reports neither {bad} nor its files: invalid + unreadable "
            f"{reported}, leftovers {[p.name for p in scan.leftovers]}",
        )
        if newer_format:
            unreadable = [stem.name for stem, _ in scan.unreadable]
            expect(unreadable == [bad], f"scan_run_dir: unreadable {unreadable}")
    resumed = once("resume", lambda: resume(run_dir))
    expect(
        resumed is not None and resumed.state.step == 5 and resumed.path == ts5_weights,
        f"resume gave {resumed and (resumed.state.step, resumed.path)}, not step 5",
    )
    listing = once("keisei-fn ls", lambda: cli("ls", str(run_dir)), warns=False)
    if listing is not None:
        code, out, err = listing
        expect(code == 0, f"keisei-fn ls exited {code}: {err.strip()}")
        expect("checkpoint_ts5" in out and bad in out, f"keisei-fn ls printed:\n{out}")

    once("prune", lambda: prune(run_dir, RetentionPolicy(keep_last=1)))
    expect(
        (run_dir / templates.ts5.sidecar_name).is_file() and ts5_weights.is_file(),
        "prune deleted checkpoint_ts5",
    )
    if newer_format:  # unreadable here, not broken: a newer keisei_fn reads it
        expect(
            (run_dir / templates.ts9.sidecar_name).is_file()
            and (run_dir / templates.ts9.weights_name).is_file(),
            "prune deleted the newer-format checkpoint_ts9",
        )
    if not problems:
        latest = once(
            "latest_checkpoint after prune", lambda: latest_checkpoint(run_dir), warns=False
        )
        expect(latest == ts5_weights, f"after prune, latest_checkpoint gave {latest}")
    assert not problems, "\n".join(["", *problems])


@pytest.mark.parametrize("case", list(BAD_SIDECARS))
def test_one_bad_sidecar_never_breaks_listing_resume_or_prune(
    templates: Templates, case: str
) -> None:
    make, why = BAD_SIDECARS[case]
    with fresh_run_dir() as run_dir:
        sidecar = _run_dir_with_bad_ts9(templates, run_dir)
        sidecar.unlink()
        make(templates, sidecar)
        assert_listing_is_total(templates, run_dir, why=why, newer_format=case == NEWER_FORMAT)


def test_a_newer_format_loads_only_to_an_upgrade_error(templates: Templates) -> None:
    with fresh_run_dir() as run_dir:
        sidecar = _run_dir_with_bad_ts9(templates, run_dir)
        sidecar.write_bytes(_edited(templates, _newer_format))
        with pytest.raises(UnsupportedFormatError, match=r"(?i)upgrade"):
            load_state(sidecar)


@settings(deadline=None)
@given(raw=st.binary(max_size=512) | st.builds(lambda s: s.encode(), st.text(max_size=256)))
def test_any_sidecar_bytes_never_break_listing(templates: Templates, raw: bytes) -> None:
    """Arbitrary bytes as checkpoint_ts9.json (none can carry a valid self-digest)."""
    with fresh_run_dir() as run_dir:
        _run_dir_with_bad_ts9(templates, run_dir).write_bytes(raw)
        assert_listing_is_total(templates, run_dir, why=None)


#: JSON integers a sidecar can hold (orjson writes 64-bit integers only).
_INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
#: What no game count can be: negative, not an int, a bool.
_COUNTS = (
    st.integers(min_value=-(2**63), max_value=-1)
    | st.text(max_size=5)
    | st.floats()
    | st.just(True)
)


@st.composite
def _hostile_state_edits(draw: st.DrawFn) -> Callable[[dict[str, Any]], None]:
    """An edit of a sidecar's state that no valid checkpoint can have; the sidecar is then
    re-signed, so only the state's meaning is wrong."""
    field = draw(st.sampled_from(["extra", "stats", "stats_key", "spec"]))
    if field == "extra":  # a truthy non-mapping
        value: Any = draw(
            st.text(min_size=1, max_size=8)
            | _INTS.filter(bool)
            | st.lists(_INTS, min_size=1, max_size=3)
        )
    elif field == "stats":
        value = (draw(st.sampled_from(["black_wins", "white_wins", "draws"])), draw(_COUNTS))
    elif field == "stats_key":
        value = draw(
            st.text(min_size=1, max_size=8).filter(
                lambda k: k not in ("black_wins", "white_wins", "draws")
            )
        )
    else:  # spec: not a spec mapping at all
        value = draw(st.text(max_size=8) | _INTS | st.lists(_INTS, max_size=2))

    def edit(sidecar: dict[str, Any]) -> None:
        state = sidecar["state"]
        if field == "stats":
            state["stats"][value[0]] = value[1]
        elif field == "stats_key":
            state["stats"][value] = 1
        else:
            state[field] = value

    edit.__name__ = f"set {field} to {value!r}"
    return edit


@settings(deadline=None)
@given(edit=_hostile_state_edits())
def test_any_resigned_hostile_state_never_breaks_listing(
    templates: Templates, edit: Callable[[dict[str, Any]], None]
) -> None:
    with fresh_run_dir() as run_dir:
        _run_dir_with_bad_ts9(templates, run_dir).write_bytes(_edited(templates, edit))
        assert_listing_is_total(templates, run_dir, why=None)


# -- B: no silent fresh start -------------------------------------------------------------------


def _flip(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def _assert_resume_refuses_a_flipped_bit(templates: Templates, name: str, bit: int) -> None:
    """With checkpoint_ts5 alone in a run directory and ``bit`` of its file ``name`` flipped,
    ``resume`` raises a KeiseiFnError (never a silent fresh start)."""
    with fresh_run_dir() as run_dir:
        templates.ts5.copy_into(templates.dir, run_dir)
        _flip(run_dir / name, bit)
        with pytest.raises(KeiseiFnError):
            resume(run_dir)


@settings(deadline=None)
@given(bit=st.integers(min_value=0, max_value=2**20))
def test_resume_refuses_when_the_only_sidecar_has_a_flipped_bit(
    templates: Templates, bit: int
) -> None:
    _assert_resume_refuses_a_flipped_bit(templates, templates.ts5.sidecar_name, bit)


@settings(deadline=None)
@given(bit=st.integers(min_value=0, max_value=2**20))
def test_resume_refuses_when_the_only_weights_file_has_a_flipped_bit(
    templates: Templates, bit: int
) -> None:
    _assert_resume_refuses_a_flipped_bit(templates, templates.ts5.weights_name, bit)


@settings(deadline=None)
@given(content=st.binary(max_size=64))
def test_resume_refuses_a_run_dir_holding_only_a_keisei_pth(content: bytes) -> None:
    with fresh_run_dir() as run_dir:
        (run_dir / "checkpoint_ts100.pth").write_bytes(content)
        with pytest.raises(KeiseiFnError, match="keisei-fn convert"):
            resume(run_dir)


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_of_an_empty_or_missing_run_dir_is_a_fresh_start(where: str) -> None:
    with fresh_run_dir() as run_dir:
        target = run_dir if where == "empty" else run_dir / "not-yet"
        assert resume(target) is None


# -- C: typed errors and no hangs ---------------------------------------------------------------

ABSURD_EMPTY_SHAPES = {
    "2**64-1 x 0": {"model/a": [2**64 - 1, 0], "model/b": [0]},
    "2**62 x 2**62 x 0": {"model/a": [0], "model/b": [2**62, 2**62, 0]},
    "both": {"model/a": [2**64 - 1, 0], "model/b": [2**62, 2**62, 0]},
}


@pytest.mark.parametrize("case", list(ABSURD_EMPTY_SHAPES))
def test_absurd_shapes_of_empty_tensors_are_integrity_errors(
    templates: Templates, case: str
) -> None:
    """Zero elements, zero bytes, data_offsets [0, 0]: the byte count fits, the shape does not
    (torch raises TypeError/RuntimeError when asked for it). The sidecar records the same
    shapes, so nothing but the shape can be objected to."""
    shapes = ABSURD_EMPTY_SHAPES[case]
    weights = safetensors_bytes(b",".join(entry(n, "F32", s) for n, s in shapes.items()))
    with fresh_run_dir() as run_dir:
        stem = commit_crafted(run_dir, templates.empties, weights, shapes=shapes)
        for verify in (True, False):
            with pytest.raises(IntegrityError):
                load_state(stem, verify=verify)
        with pytest.raises(IntegrityError):
            verify_checkpoint(stem)


FIFO_PATHS = [
    "weights_is_a_fifo/weights",
    "weights_is_a_fifo/stem",
    "sidecar_is_a_fifo/sidecar",
    "sidecar_is_a_fifo/stem",
    "lone_fifo/checkpoint_ts7.safetensors",
    "lone_fifo/checkpoint_ts7.json",
]


@pytest.mark.parametrize("case", FIFO_PATHS)
def test_a_fifo_is_refused_quickly_and_typed(templates: Templates, case: str) -> None:
    """A FIFO where a checkpoint file should be: load_state and verify_checkpoint raise a
    KeiseiFnError within seconds instead of blocking on open() (this test never opens a FIFO
    for reading; a blocked call is released by opening its write end)."""
    layout, target = case.split("/")
    with fresh_run_dir() as run_dir:
        templates.ts5.copy_into(templates.dir, run_dir)
        stem = run_dir / templates.ts5.meta.name
        if layout == "weights_is_a_fifo":
            fifo = run_dir / templates.ts5.weights_name
        elif layout == "sidecar_is_a_fifo":
            fifo = run_dir / templates.ts5.sidecar_name
        else:
            fifo = run_dir / target
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        path = stem if target == "stem" else fifo
        for load in (load_state, verify_checkpoint):
            with pytest.raises(KeiseiFnError):
                finishes(
                    functools.partial(load, path),
                    what=f"{load.__name__}({path.name})",
                    fifos=[fifo],
                    within=10,
                )


def test_build_sidecar_refuses_an_unknown_kind_typed() -> None:
    """Every keyword build_sidecar asks for is given a plausible value; only kind is bad."""
    plausible: dict[str, Any] = {
        "header": {"step": 1},
        "name": "checkpoint_ts1",
        "kind": "bogus",
        "tensors": {},
        "aliases": {},
        "weights_file": "checkpoint_ts1.0123abcd.safetensors",
        "weights_size": 8,
        "weights_digest": "blake3:" + "0" * 64,
        "tensor_digests": {},
    }
    parameters = inspect.signature(keisei_fn.meta.build_sidecar).parameters
    unknown = [
        n
        for n, p in parameters.items()
        if p.default is inspect.Parameter.empty and n not in plausible
    ]
    assert not unknown, f"build_sidecar asks for {unknown}; teach this test a plausible value"
    args = {n: v for n, v in plausible.items() if n in parameters}
    header = args.pop("header")
    with pytest.raises(KeiseiFnError, match="bogus"):
        keisei_fn.meta.build_sidecar(header, **args)


@pytest.mark.parametrize(
    "record",
    [
        {"event": "nope", "artifact": "run-checkpoint_ts5", "digest": "blake3:00"},
        {"event": "pending", "digest": "blake3:00", "checkpoint": "checkpoint_ts5"},
        {"event": "pending", "artifact": "run-checkpoint_ts5", "checkpoint": "checkpoint_ts5"},
        {"event": "pending"},
    ],
    ids=["unknown_event", "no_artifact", "no_digest", "neither"],
)
def test_a_malformed_ledger_record_is_refused_typed_and_not_written(
    record: dict[str, Any],
) -> None:
    with fresh_run_dir() as run_dir:
        with pytest.raises(KeiseiFnError):
            append_ledger(run_dir, record)
        assert not (run_dir / LEDGER_NAME).exists()
        assert read_ledger(run_dir) == []


# -- D: caps bound what a hostile file can cost -------------------------------------------------

_CAP_WORDS = r"(?i)limit|cap\b|more than|too many|exceed|max"


def test_the_caps_are_public() -> None:
    for cap in (max_sidecar_bytes, max_header_bytes, max_tensors, max_ledger_bytes):
        assert cap() > 0


def test_more_than_max_tensors_empty_tensors_are_refused(templates: Templates) -> None:
    """MAX_TENSORS + 1 empty tensors (a few dozen bytes each, far below the header byte cap) are
    refused for their count, naming the weights file (test_crafting_helpers_are_sound loads a
    small checkpoint built the same way)."""
    count = max_tensors() + 1
    _, entries = many_empty_tensors(count)
    assert len(safetensors_bytes(entries)) < max_header_bytes(), "does not fit the header cap"
    with fresh_run_dir() as run_dir:
        stem = commit_many_empty(run_dir, templates.one_empty_u8, count)
        for verify in (True, False):
            with pytest.raises(IntegrityError, match=_CAP_WORDS) as info:
                load_state(stem, verify=verify)
            assert templates.one_empty_u8.weights_name in str(info.value), str(info.value)


def test_a_sidecar_over_the_cap_is_refused_unread_and_skipped(templates: Templates) -> None:
    with fresh_run_dir() as run_dir:
        sidecar = _run_dir_with_bad_ts9(templates, run_dir)
        with open(sidecar, "r+b") as f:  # sparse: costs no disk
            f.truncate(max_sidecar_bytes() + 1)
        with pytest.raises(IntegrityError, match=_CAP_WORDS):
            load_state(sidecar)
        scan = scan_run_dir(run_dir)
        assert [m.name for m in scan.valid] == ["checkpoint_ts5"]
        assert "checkpoint_ts9" in {stem.name for stem, _ in scan.invalid}
        assert [m.name for m in list_checkpoints(run_dir)] == ["checkpoint_ts5"]
        assert latest_checkpoint(run_dir) == run_dir / templates.ts5.weights_name


def test_a_ledger_over_the_cap_is_refused_and_prune_deletes_nothing(
    templates: Templates,
) -> None:
    """Whether a checkpoint is pending publication is unknown: prune raises or keeps all."""
    with fresh_run_dir() as run_dir:
        metas = [save_state(_state(step), run_dir) for step in (1, 2, 3, 4)]
        with open(run_dir / LEDGER_NAME, "wb") as f:
            f.truncate(max_ledger_bytes() + 1)
        with pytest.raises(KeiseiFnError):
            read_ledger(run_dir)
        try:
            plan = prune(run_dir, RetentionPolicy(keep_last=1))
        except KeiseiFnError:
            pass
        else:
            assert not set(plan.delete) & {m.name for m in metas}, plan
        for meta in metas:
            assert meta.sidecar_path.is_file() and meta.weights_path.is_file(), meta.name


_PEAK = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from keisei_fn import latest_checkpoint, list_checkpoints, load_state
    from keisei_fn.errors import KeiseiFnError
    from keisei_fn.store import RetentionPolicy, prune, read_ledger, scan_run_dir
    from keisei_fn.store import verify_checkpoint

    mode, run_dir, target, warm_stem = sys.argv[1:5]
    warm = warm_stem.rsplit("/", 1)[0]

    def status(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    def resident():
        return status("VmRSS")

    def peak():
        # VmHWM, which clear_refs resets; a child's ru_maxrss starts at its parent's size.
        return status("VmHWM")

    # Warm up every code path on a valid run directory (imports, first allocations).
    scan_run_dir(warm); latest_checkpoint(warm); load_state(warm); verify_checkpoint(warm_stem)
    read_ledger(warm); prune(warm, RetentionPolicy(keep_last=1))
    # The baseline: reset the high-water mark to what is resident now (Linux >= 4.0), so that
    # the import's transient peak does not hide the growth; else the peak so far (which can
    # only under-report the growth).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, how = resident(), "VmHWM after a reset of the high-water mark"
    except OSError:
        base, how = peak(), "VmHWM (no reset: may under-report)"
    print(f"measured as {how}", file=sys.stderr)

    def attempt(call, *args):
        try:
            call(*args)
            outcome = "ok"
        except KeiseiFnError as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"{call.__name__}: {outcome}", file=sys.stderr, flush=True)

    if mode == "ledger":
        attempt(prune, run_dir, RetentionPolicy(keep_last=1))
    else:
        for call in (scan_run_dir, list_checkpoints, latest_checkpoint):
            attempt(call, run_dir)
        attempt(load_state, target)
        attempt(verify_checkpoint, target)
    print(peak() - base)
    """
)


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # gone
        pass
    return 0


def run_watched(args: list[str], *, kill_above: int, timeout: float) -> tuple[int, str, str]:
    """Run ``args``; kill it when its resident memory passes ``kill_above`` bytes (a guard for
    the machine, polled from outside: a runaway parse holds the child's GIL) or after
    ``timeout`` seconds. Returns (exit code, stdout, stderr); the test fails when killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: output.__setitem__(k, f.read()), daemon=True)
        for k, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    deadline, seen, why = time.monotonic() + timeout, 0, None
    while proc.poll() is None:
        seen = max(seen, _resident_bytes(proc.pid))
        if seen > kill_above:
            why = f"resident {seen / MiB:.0f} MiB passed the guard of {kill_above / MiB:.0f} MiB"
        elif time.monotonic() > deadline:
            why = f"still running after {timeout} s"
        if why:
            proc.kill()
        time.sleep(0.005)
    for reader in readers:
        reader.join()
    err = output.get("err", "")
    if why:
        pytest.fail(f"the measuring subprocess was killed: {why}\n{err[-4000:]}")
    return proc.returncode, output.get("out", ""), err


def _write_repeated(path: Path, head: bytes, unit: bytes, tail: bytes, size: int) -> None:
    """``head + unit * n + spaces + tail`` of exactly ``size`` bytes, written in chunks."""
    count = (size - len(head) - len(tail)) // len(unit)
    padding = size - len(head) - len(tail) - count * len(unit)
    per_chunk = 4 * MiB // len(unit)
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(count // per_chunk):
            f.write(unit * per_chunk)
        f.write(unit * (count % per_chunk))
        f.write(b" " * padding + tail)
    assert path.stat().st_size == size


def _hostile_near_cap(mode: str, templates: Templates, run_dir: Path) -> tuple[Path, int]:
    """Fill ``run_dir`` with the hostile file of ``mode``; returns (what to load, the cap)."""
    templates.ts5.copy_into(templates.dir, run_dir)
    if mode == "sidecar":  # [{},{},...]: three bytes that parse into a 64-byte dict
        cap = max_sidecar_bytes()
        sidecar = run_dir / templates.ts9.sidecar_name
        _write_repeated(sidecar, b"[{}", b",{}", b"]", cap - 1)
        return sidecar, cap
    if mode == "header":  # MAX_TENSORS empty tensors, the header padded to its byte cap
        cap = max_header_bytes()
        stem = commit_many_empty(
            run_dir, templates.one_empty_u8, max_tensors(), header_len=cap - cap % 8
        )
        return stem, cap
    cap = max_ledger_bytes()  # ledger: {} lines, each a (useless) record
    templates.ts9.copy_into(templates.dir, run_dir)
    _write_repeated(run_dir / LEDGER_NAME, b"", b"{}\n", b"\n", cap - 1)
    return run_dir, cap


@pytest.mark.parametrize(
    "mode",
    # header: ~15 s where MAX_TENSORS (65,536) tensors are loaded in full, twice
    ["sidecar", pytest.param("header", marks=pytest.mark.slow), "ledger"],
)
def test_a_file_just_under_its_cap_costs_at_most_twice_the_cap(
    templates: Templates, mode: str
) -> None:
    """Peak resident memory (VmHWM, in a fresh subprocess) of listing, loading and
    verifying next to a sidecar of MAX_SIDECAR_BYTES - 1 bytes of ``[{},{},...]``, of a
    checkpoint whose header holds MAX_TENSORS empty tensors padded to MAX_HEADER_BYTES, or of
    pruning with a ledger of MAX_LEDGER_BYTES - 1 bytes of ``{}`` lines: at most twice the cap
    plus 64 MiB. (A few seconds each with caps of 64 MiB; the time grows with the caps.)"""
    with fresh_run_dir() as warm, fresh_run_dir() as run_dir:
        templates.ts5.copy_into(templates.dir, warm)
        target, cap = _hostile_near_cap(mode, templates, run_dir)
        bound = 2 * cap + 64 * MiB
        started = time.monotonic()
        code, out, err = run_watched(
            [
                *(sys.executable, "-c", _PEAK, mode, str(run_dir), str(target)),
                str(warm / templates.ts5.meta.name),
            ],
            kill_above=bound + 1536 * MiB,  # the child's own baseline (torch) is ~0.5 GiB
            timeout=300,
        )
        print(
            f"{mode}: cap {cap / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB, "
            f"{time.monotonic() - started:.1f} s\n{err[-4000:]}"
        )
        assert code == 0, f"the measuring subprocess failed:\n{err[-4000:]}"
        growth = int(out.split()[-1])
        print(f"{mode}: peak growth {growth / MiB:.1f} MiB")
        assert growth <= bound, f"{mode}: {growth / MiB:.1f} MiB > {bound / MiB:.0f} MiB"


# -- D'. A save never commits what the caps would refuse to read back ---------------------------


def test_a_save_over_a_cap_is_refused_and_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    """ "Once a save returns, its checkpoint stays loadable" includes the caps: a state with more
    tensors than MAX_TENSORS, or whose JSON part would make a sidecar over MAX_SIDECAR_BYTES,
    is refused with UnsupportedValueError (nothing committed, no payload left), and an
    overwrite that is refused leaves the old checkpoint as it was."""
    from keisei_fn.errors import UnsupportedValueError
    from keisei_fn.testing import assert_states_equal

    old = TrainState(spec=None, step=3, model={"w": torch.arange(4.0)})
    save_state(old, tmp_path)
    many = {f"t{i}": torch.zeros(1) for i in range(keisei_fn.store.weights.MAX_TENSORS + 1)}
    with pytest.raises(UnsupportedValueError, match="tensors"):
        save_state(old.replace(step=4, model=many), tmp_path)
    huge = "x" * keisei_fn.meta.MAX_SIDECAR_BYTES
    with pytest.raises(UnsupportedValueError, match="limit"):
        save_state(old.replace(extra={"notes": huge}), tmp_path, overwrite=True)
    with pytest.raises(UnsupportedValueError, match="limit"):
        save_state(old.replace(step=5, extra={"notes": huge}), tmp_path)
    scan = scan_run_dir(tmp_path)
    assert [m.name for m in scan.valid] == ["checkpoint_ts3"]
    assert not scan.invalid and not scan.leftovers
    assert_states_equal(load_state(tmp_path), old)
