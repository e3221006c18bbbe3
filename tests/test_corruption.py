"""Corrupt files: every change to either file of a checkpoint gives a typed error naming the
file — a sidecar change already at listing, a weights change at the latest on load/verify —
never a crash and never a silent load; absurd sizes are refused with bounded memory."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keisei_fn import (
    GameStats,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    save_state,
)
from keisei_fn.codec import dumps, encode_state, loads
from keisei_fn.errors import (
    IncompleteCheckpointError,
    IntegrityError,
    KeiseiFnError,
    UnsupportedFormatError,
)
from keisei_fn.meta import build_sidecar, digest_bytes
from keisei_fn.store import resume, scan_run_dir, verify_checkpoint
from keisei_fn.store.listing import MAX_SIDECAR_BYTES
from keisei_fn.testing import assert_states_equal, fresh_run_dir

OLDER = TrainState(
    spec=None,
    step=10,
    model={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
    extra={"elo": 1500.0},
)
NEWER = TrainState(
    spec=None,
    step=20,
    episodes=3,
    stats=GameStats(black_wins=1),
    model={
        "w": torch.linspace(-1, 1, 24).reshape(4, 6),
        "b": torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16),
        "n": torch.tensor(7),
    },
    optimizer={"state": {0: {"exp_avg": torch.ones(4, 6)}}, "param_groups": [{"lr": 0.1}]},
    extra={"elo": 1516.0, "history": [0.5, (1, 2)]},
)
SIDECAR = "checkpoint_ts20.json"
EXPECTED = (IntegrityError, UnsupportedFormatError, IncompleteCheckpointError)


@pytest.fixture(scope="module")
def pristine() -> Iterator[Path]:
    """A run directory with a valid older and newer checkpoint, to copy per example."""
    with fresh_run_dir() as run_dir:
        save_state(OLDER, run_dir)
        save_state(NEWER, run_dir)
        yield run_dir


def _weights(pristine: Path, step: int) -> str:
    """The name of the weights file that the pristine checkpoint at ``step`` names (a fresh
    generation name per save; copies keep the names)."""
    (meta,) = [m for m in list_checkpoints(pristine) if m.step == step]
    return meta.weights_file


def _copy(pristine: Path, run_dir: Path) -> None:
    for path in pristine.iterdir():
        shutil.copyfile(path, run_dir / path.name)


@st.composite
def _mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """One random corruption of ``raw``: bit flips, truncation, appended, inserted, deleted or
    overwritten bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete", "overwrite"]))
    at = draw(st.integers(0, len(raw) - 1))
    data = bytearray(raw)
    if kind == "flip":
        for position in {at, *draw(st.lists(st.integers(0, len(raw) - 1), max_size=3))}:
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return raw[:at]
    if kind == "append":
        return raw + draw(
            st.binary(min_size=1, max_size=16) | st.sampled_from([b"\n", b" ", b"\0"])
        )
    if kind == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 8)) :]
    chunk = draw(st.binary(min_size=1, max_size=8))
    return raw[:at] + chunk + raw[at + len(chunk) :]


def _named(error: BaseException, file_name: str) -> None:
    assert isinstance(error, KeiseiFnError), repr(error)
    assert file_name in str(error), str(error)


@settings(deadline=None, max_examples=60)
@given(data=st.data(), which=st.sampled_from(["weights", "sidecar"]))
def test_any_corruption_of_either_file_is_caught_typed_and_named(
    pristine: Path, data: st.DataObject, which: str
) -> None:
    target = _weights(pristine, 20) if which == "weights" else SIDECAR
    raw = (pristine / target).read_bytes()
    mutated = data.draw(_mutations(raw), label="mutated")
    assume(mutated != raw)
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        (run_dir / target).write_bytes(mutated)
        stem = run_dir / "checkpoint_ts20"
        caught_at_listing = target == SIDECAR or len(mutated) != len(raw)

        scan = scan_run_dir(run_dir)
        rejected = dict(scan.invalid + scan.unreadable)
        if caught_at_listing:
            assert [m.step for m in scan.valid] == [10]
            _named(rejected[stem], target)
            assert [m.step for m in list_checkpoints(run_dir)] == [10]
            assert latest_checkpoint(run_dir) == run_dir / _weights(pristine, 10)
        else:  # same size: only the digest on load can tell
            assert [m.step for m in scan.valid] == [10, 20] and not rejected

        for load in (load_state, verify_checkpoint):
            with pytest.raises(EXPECTED) as info:
                load(stem)
            _named(info.value, target)
        assert_states_equal(OLDER, load_state(run_dir))  # falls back to the older checkpoint
        resumed = resume(run_dir)
        assert resumed is not None and resumed.state.step == 10


def test_every_single_byte_change_of_the_sidecar_is_caught_at_listing(pristine: Path) -> None:
    """Exhaustive: each byte of the sidecar replaced by a neighbour value (case flips of
    ``e``/``E`` and hex digits, whitespace, digits) makes the checkpoint unlisted."""
    raw = (pristine / SIDECAR).read_bytes()
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        for position in range(len(raw)):
            for replacement in {raw[position] ^ 0x20, raw[position] ^ 0x01}:
                mutated = raw[:position] + bytes([replacement]) + raw[position + 1 :]
                (run_dir / SIDECAR).write_bytes(mutated)
                assert latest_checkpoint(run_dir) == run_dir / _weights(pristine, 10), (
                    position,
                    mutated[max(0, position - 20) : position + 20],
                )


def test_whitespace_around_the_sidecar_is_a_change_too(pristine: Path) -> None:
    raw = (pristine / SIDECAR).read_bytes()
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        for mutated in (raw + b"\n", b" " + raw, raw.replace(b",", b", ", 1)):
            (run_dir / SIDECAR).write_bytes(mutated)
            with pytest.raises(IntegrityError, match="canonical"):
                load_state(run_dir / SIDECAR)


@pytest.mark.parametrize(
    "damage",
    [
        "weights_missing",
        "sidecar_missing",
        "weights_is_a_directory",
        "sidecar_is_a_directory",
        "sidecar_of_another_checkpoint",
        "weights_of_another_checkpoint",
        "sidecar_is_not_json_object",
        "sidecar_of_another_format",
        "empty_files",
    ],
)
def test_structural_damage_is_typed_and_never_loaded(pristine: Path, damage: str) -> None:
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        weights, sidecar = run_dir / _weights(pristine, 20), run_dir / SIDECAR
        older_weights = run_dir / _weights(pristine, 10)
        if damage == "weights_missing":
            weights.unlink()
        elif damage == "sidecar_missing":
            sidecar.unlink()
        elif damage == "weights_is_a_directory":
            weights.unlink()
            weights.mkdir()
        elif damage == "sidecar_is_a_directory":
            sidecar.unlink()
            sidecar.mkdir()
        elif damage == "sidecar_of_another_checkpoint":
            shutil.copyfile(run_dir / "checkpoint_ts10.json", sidecar)
        elif damage == "weights_of_another_checkpoint":
            shutil.copyfile(older_weights, weights)
        elif damage == "sidecar_is_not_json_object":
            sidecar.write_bytes(b"[1, 2, 3]")
        elif damage == "sidecar_of_another_format":
            sidecar.write_bytes(b'{"format": "something.else", "version": 1}')
        else:
            weights.write_bytes(b"")
            sidecar.write_bytes(b"")
        assert latest_checkpoint(run_dir) == older_weights
        assert [m.step for m in list_checkpoints(run_dir)] == [10]
        with pytest.raises((*EXPECTED, FileNotFoundError)) as info:
            load_state(run_dir / "checkpoint_ts20")
        assert isinstance(info.value, KeiseiFnError)
        assert "checkpoint_ts20" in str(info.value)
        # A run directory's load skips what it cannot use, foreign or newer formats included
        # (with a warning), as latest_checkpoint does: the two never disagree (issue #16).
        assert load_state(run_dir).step == 10


def _commit_raw_pair(run_dir: Path, weights: bytes, *, step: int = 30) -> Path:
    """Write a weights file with a *matching* sidecar (size and digest agree), so only the
    weights parser can object."""
    name = f"checkpoint_ts{step}"
    header = loads(dumps(encode_state(TrainState(spec=None, step=step, model={})).header))
    sidecar = build_sidecar(
        header,
        name=name,
        kind="periodic",
        tensors={},
        aliases={},
        weights_file=_raw_weights(step),
        weights_size=len(weights),
        weights_digest=digest_bytes(weights),
        tensor_digests={},
    )
    (run_dir / _raw_weights(step)).write_bytes(weights)
    (run_dir / f"{name}.json").write_bytes(dumps(sidecar))
    return run_dir / name


def _raw_weights(step: int) -> str:
    """The weights file name :func:`_commit_raw_pair` writes (a fixed generation token)."""
    return f"checkpoint_ts{step}.0123456789abcdef.safetensors"


ABSURD_WEIGHTS = [
    struct.pack("<Q", 2**62) + b"{}" + b" " * 6,
    struct.pack("<Q", 2**64 - 1) + b"{}",
    struct.pack("<Q", 100) + b"{}",  # longer than the file
    struct.pack("<Q", 8) + b'{"a":1} ',  # a header entry that is not a tensor
    struct.pack("<Q", 2) + b"[]",
    struct.pack("<Q", 64) + b'{"t":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4]}}',
    struct.pack("<Q", 64)
    + b'{"t":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}'
    + b"\0" * 16,
    struct.pack("<Q", 56) + b'{"t":{"dtype":"C128","shape":[1],"data_offsets":[0,16]}}',
    b"\x01\x02",
]


@pytest.mark.parametrize("weights", ABSURD_WEIGHTS)
def test_absurd_safetensors_headers_are_integrity_errors(weights: bytes) -> None:
    with fresh_run_dir() as run_dir:
        stem = _commit_raw_pair(run_dir, weights)
        assert latest_checkpoint(run_dir) == run_dir / _raw_weights(30)
        for verify in (True, False):
            with pytest.raises(IntegrityError, match=re.escape(_raw_weights(30))):
                load_state(stem, verify=verify)
        with pytest.raises(IntegrityError):
            verify_checkpoint(stem)


def test_a_huge_sidecar_is_refused_unread(pristine: Path) -> None:
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        with open(run_dir / SIDECAR, "r+b") as f:  # sparse: costs no disk
            f.truncate(MAX_SIDECAR_BYTES + 1)
        scan = scan_run_dir(run_dir)
        _named(dict(scan.invalid)[run_dir / "checkpoint_ts20"], SIDECAR)
        assert latest_checkpoint(run_dir) == run_dir / _weights(pristine, 10)
        with pytest.raises(IntegrityError, match="limit"):
            load_state(run_dir / SIDECAR)


_MEASURE = """
import sys
from keisei_fn import load_state
from keisei_fn.errors import IntegrityError
from keisei_fn.store import scan_run_dir, verify_checkpoint

def status(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def peak():  # VmHWM: a child's ru_maxrss starts at its parent's size, hiding growth
    return status("VmHWM")

load_state(sys.argv[1])  # warm up: a valid load
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to what is resident now
base = status("VmRSS")
for stem in sys.argv[2:]:
    scan_run_dir(stem.rsplit("/", 1)[0])
    for check in (load_state, verify_checkpoint):
        try:
            check(stem)
        except IntegrityError:
            pass
        else:
            sys.exit(f"{stem} loaded")
print(peak() - base)
"""


def test_absurd_files_are_refused_with_bounded_memory(pristine: Path) -> None:
    """Peak resident memory while refusing an absurd header length (2**62), absurd shapes and
    a (sparse) sidecar over MAX_SIDECAR_BYTES stays small: nothing is allocated from what a
    file claims."""
    with fresh_run_dir() as run_dir:
        stems = [
            str(_commit_raw_pair(run_dir, weights, step=30 + i))
            for i, weights in enumerate(ABSURD_WEIGHTS)
        ]
        _copy(pristine, run_dir)
        with open(run_dir / SIDECAR, "r+b") as f:
            f.truncate(MAX_SIDECAR_BYTES + 1)
        stems.append(str(run_dir / "checkpoint_ts20"))
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(run_dir / "checkpoint_ts10"), *stems],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) < 32 * 2**20


def test_a_deeply_nested_sidecar_is_an_integrity_error(pristine: Path) -> None:
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        (run_dir / SIDECAR).write_bytes(b"[" * 100_000 + b"]" * 100_000)
        with pytest.raises(IntegrityError, match=r"checkpoint_ts20\.json"):
            load_state(run_dir / SIDECAR)
        assert latest_checkpoint(run_dir) == run_dir / _weights(pristine, 10)


def test_a_newer_format_version_is_unreadable_not_broken(pristine: Path) -> None:
    """A sidecar from a future keisei_fn is reported, never loaded, and never pruned."""
    raw = loads((pristine / SIDECAR).read_bytes())
    raw["format_version"] = 99
    raw.pop("digest")
    raw["digest"] = digest_bytes(dumps(raw))
    with fresh_run_dir() as run_dir:
        _copy(pristine, run_dir)
        (run_dir / SIDECAR).write_bytes(dumps(raw))
        scan = scan_run_dir(run_dir)
        assert [p.name for p, _ in scan.unreadable] == ["checkpoint_ts20"]
        with pytest.raises(UnsupportedFormatError, match="upgrade"):
            load_state(run_dir / SIDECAR)
        assert os.path.exists(run_dir / _weights(pristine, 20))
