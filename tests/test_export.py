"""Verified export bundles: every dtype exports, passes its gate and loads bit-exactly through
``load_model``; ONNX matches torch under onnxruntime; tampered, killed and failed exports never
load; validation and the gate refuse what they should; quantisation error bounds hold."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import orjson
import pytest
import torch
from hypothesis import given
from torch import nn

import keisei_fn as kf
from keisei_fn.errors import (
    CheckpointExistsError,
    GateError,
    IncompleteCheckpointError,
    IntegrityError,
    InvalidModelError,
    UnsupportedDtypeError,
)
from keisei_fn.quantize import (
    BUNDLE_DTYPES,
    decode_weights,
    dequantize_int8,
    encode_weights,
    quantize_int8,
)
from keisei_fn.serve import DEFAULT_THRESHOLDS, Thresholds, compare_models, load_onnx
from keisei_fn.serve.export import ExportResult
from keisei_fn.serve.suite import HAND_PICKED, default_suite, suite_positions
from keisei_fn.sfen import board_from_sfen
from keisei_fn.store.bundle import read_bundle, read_bundle_meta
from keisei_fn.store.listing import is_run_dir
from keisei_fn.store.locate import resolve_checkpoint
from tests.cli_inprocess import run
from tests.saved_states import raw_bytes

SPEC = kf.ModelSpec(model_type="testmodel")
#: Positions for the tests' gates: a few of each phase (the default suite in the exports'
#: recorded figures is checked by one test).
FEW = suite_positions(per_phase=4)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: dtype, shape and raw bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def source(workdir: Path) -> Path:
    """A run directory whose final model is a seeded test network."""
    run_dir = workdir / "run"
    kf.save_final_model(kf.capture(SPEC, kf.build_model(SPEC, seed=0), step=7), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def exports(workdir: Path, source: Path) -> dict[str, ExportResult]:
    """One bundle per dtype (int8 with ONNX; float16 gated on the default suite, the others on
    a few positions), exported once for the module."""
    return {
        dtype: kf.export_model(
            source,
            workdir / dtype,
            dtype=dtype,
            onnx=dtype == "int8",
            positions=None if dtype == "float16" else FEW,
        )
        for dtype in BUNDLE_DTYPES
    }


@pytest.mark.parametrize("dtype", BUNDLE_DTYPES)
def test_every_dtype_exports_passes_its_gate_and_loads_bit_exactly(
    dtype: str, exports: dict[str, ExportResult], source: Path, workdir: Path
) -> None:
    result = exports[dtype]
    assert result.passed and not result.forced and result.validation.ok
    assert not result.comparison.problems(DEFAULT_THRESHOLDS[dtype])
    source_model, source_meta = kf.load_model(source)
    state = kf.canonical_state_dict(source_model.state_dict())
    expected, quantized = encode_weights(state, dtype)

    stored, meta = read_bundle(workdir / dtype)
    assert meta.dtype == dtype and dict(meta.quantized) == quantized and meta.spec == SPEC
    assert set(stored) == set(expected)
    assert all(same(stored[k], expected[k]) for k in expected)

    model, loaded_meta = kf.load_model(workdir / dtype)
    decoded = decode_weights(stored, quantized)
    assert all(same(t, decoded[k]) for k, t in model.state_dict().items())
    assert not model.training and loaded_meta.step == 7 and loaded_meta.name == "bundle"

    record = loaded_meta.extra["bundle"]
    assert record["dtype"] == dtype
    assert record["source"]["weights_digest"] == source_meta.weights_digest
    assert record["source"]["sidecar_digest"] == source_meta.digest
    assert record["gate"]["figures"] == result.comparison.to_json()
    assert record["gate"]["thresholds"] == DEFAULT_THRESHOLDS[dtype].to_json()
    assert record["sizes"]["source_model_bytes"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    # what load_model gives behaves as the gate measured
    again = compare_models(source_model, model, FEW)
    assert not again.problems(DEFAULT_THRESHOLDS[dtype])


@pytest.mark.parametrize("dtype", BUNDLE_DTYPES)
def test_every_bundle_plays_through_usi(dtype: str, exports: dict[str, ExportResult]) -> None:
    import io

    from keisei_fn.usi import run_engine

    out = io.StringIO()
    commands = "isready\nposition startpos moves 7g7f\ngo\nquit\n"
    assert run_engine(exports[dtype].bundle.directory, io.StringIO(commands), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "readyok" and lines[-2].startswith("info depth 1 ")
    board = board_from_sfen("lnsgkgsnl/1r5b1/ppppppppp/9/9/2P6/PP1PPPPPP/1B5R1/LNSGKGSNL w - 2")
    assert lines[-1].split()[1] in {_usi(m) for m in board.legal_moves}


def test_a_match_takes_bundles(exports: dict[str, ExportResult], tmp_path: Path) -> None:
    result = kf.play_match(
        exports["int8"].bundle.directory,
        exports["bfloat16"].bundle.directory,
        games=2,
        seed=0,
        move_cap=16,
        out=tmp_path / "match",
    )
    assert len(result.games) == 2 and (tmp_path / "match" / "summary.json").is_file()


def test_reduced_dtypes_shrink_the_weights(exports: dict[str, ExportResult]) -> None:
    sizes = {dtype: exports[dtype].bundle.weights_size for dtype in BUNDLE_DTYPES}
    assert sizes["bfloat16"] < 0.51 * sizes["float32"]
    assert sizes["float16"] < 0.51 * sizes["float32"]
    assert sizes["int8"] < 0.27 * sizes["float32"]


def test_compute_dtype_computes_in_reduced_precision(
    exports: dict[str, ExportResult], workdir: Path
) -> None:
    model, _ = kf.load_model(workdir / "bfloat16", compute_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stored, _ = read_bundle(workdir / "bfloat16")
    assert all(same(p, stored[k]) for k, p in model.named_parameters())  # exact round trip
    logits, value = model(torch.zeros(2, *SPEC.obs_shape))
    assert logits.dtype == value.dtype == torch.float32


def test_onnx_matches_torch_under_onnxruntime(
    exports: dict[str, ExportResult], workdir: Path
) -> None:
    result = exports["int8"]
    assert result.onnx_comparison is not None
    assert not result.onnx_comparison.problems(DEFAULT_THRESHOLDS["onnx"])
    session = load_onnx(workdir / "int8")
    model, _ = kf.load_model(workdir / "int8")
    for batch in (1, 5):  # a dynamic batch
        obs = torch.rand(batch, *SPEC.obs_shape)
        logits, value = session(obs)
        assert logits.shape == (batch, SPEC.num_actions) and value.shape == (batch,)
    report = compare_models(model, session, FEW)
    assert not report.problems(DEFAULT_THRESHOLDS["onnx"])
    assert report.max_logit_diff <= DEFAULT_THRESHOLDS["onnx"].max_logit_diff


def test_the_default_gate_runs_on_the_default_suite(exports: dict[str, ExportResult]) -> None:
    comparison = exports["float16"].comparison  # the fixture's one export on the default suite
    assert comparison.positions == len(default_suite()) == 78
    assert comparison.gated_positions > 0


def test_a_bundle_directory_is_not_a_run_directory(
    exports: dict[str, ExportResult], workdir: Path
) -> None:
    bundle = workdir / "float32"
    assert not is_run_dir(bundle)
    assert resolve_checkpoint(bundle) == bundle / "bundle"
    assert resolve_checkpoint(bundle / "bundle.json") == bundle / "bundle"
    meta = kf.load_model(bundle / "bundle")[1]
    assert meta.path == bundle / "bundle"


def test_an_existing_bundle_or_run_directory_is_not_overwritten(
    source: Path, workdir: Path
) -> None:
    target = workdir / "replaced"
    first = kf.export_model(source, target, dtype="float16", positions=FEW).bundle
    with pytest.raises(CheckpointExistsError, match="already holds a bundle"):
        kf.export_model(source, target, dtype="float32", positions=FEW)
    second = kf.export_model(source, target, dtype="float32", positions=FEW, overwrite=True)
    assert read_bundle_meta(target).dtype == "float32"
    assert not first.weights_path.exists() and second.bundle.weights_path.exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["bundle.json", second.bundle.weights_file]
    )
    with pytest.raises(CheckpointExistsError, match="is a run directory"):
        kf.export_model(source, source, dtype="float32", positions=FEW)


@pytest.mark.parametrize("which", ["weights", "sidecar", "onnx"])
def test_a_tampered_bundle_is_refused(
    which: str, exports: dict[str, ExportResult], workdir: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(workdir / "int8", bundle)  # the exports fixture's, with ONNX
    meta = read_bundle_meta(bundle)
    path = {
        "weights": meta.weights_path,
        "sidecar": bundle / "bundle.json",
        "onnx": meta.onnx_path,
    }[which]
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle: inside the tensors or the JSON
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        if which == "onnx":
            load_onnx(bundle)
        else:
            kf.load_model(bundle)
    with pytest.raises(IntegrityError):
        kf.verify_checkpoint(bundle)  # and `keisei-fn verify`


def test_a_failed_gate_writes_nothing_unless_forced(source: Path, tmp_path: Path) -> None:
    impossible = Thresholds(min_top1=1.0, max_mean_kl=-1.0, max_value_mae=0.0, max_logit_diff=0.0)
    with pytest.raises(GateError, match="mean KL"):
        kf.export_model(source, tmp_path / "b", dtype="int8", thresholds=impossible, positions=FEW)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    forced = kf.export_model(
        source, tmp_path / "b", dtype="int8", thresholds=impossible, positions=FEW, force=True
    )
    assert forced.forced and forced.problems
    record = kf.load_model(tmp_path / "b")[1].extra["bundle"]
    assert record["forced"] is True and list(record["problems"]) == list(forced.problems)


KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    import keisei_fn as kf
    from keisei_fn.store import bundle

    real = bundle.write_bytes_durably

    def dies_at_the_commit(path, data):
        if path.name == "bundle.json":
            os.kill(os.getpid(), signal.SIGKILL)  # the weights are durable, the sidecar not
        real(path, data)

    bundle.write_bytes_durably = dies_at_the_commit
    kf.export_model(sys.argv[1], sys.argv[2], dtype="bfloat16", onnx=False,
                    positions=["lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1"])
    """
)


def test_a_killed_export_leaves_nothing_that_loads(source: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(source), str(bundle)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert any(p.suffix == ".safetensors" for p in bundle.iterdir())  # the payload was written
    assert not (bundle / "bundle.json").exists()
    with pytest.raises((IncompleteCheckpointError, kf.errors.CheckpointNotFoundError)):
        kf.load_model(bundle)
    result = kf.export_model(source, bundle, dtype="bfloat16", positions=FEW)  # starts afresh
    assert kf.load_model(bundle)[1].weights_digest == result.bundle.weights_digest
    left = sorted(p.name for p in bundle.iterdir())
    assert left == sorted(["bundle.json", result.bundle.weights_file])  # the killed one's: gone


def test_validate_model_catches_a_nan_parameter_and_export_refuses_it(tmp_path: Path) -> None:
    model = kf.build_model(SPEC, seed=0)
    assert kf.validate_model(model, FEW).ok
    with torch.no_grad():
        model.res_blocks[0].conv1.weight[0, 0, 0, 0] = math.nan
    report = kf.validate_model(model, FEW)
    assert not report.ok
    assert any("res_blocks.0.conv1.weight has 1 non-finite" in p for p in report.problems)
    assert any("not finite" in p for p in report.problems[1:])  # the outputs too
    kf.save_final_model(kf.capture(SPEC, model, step=1), tmp_path / "run")
    assert not kf.validate_model(tmp_path / "run", FEW).ok  # a path loads through load_model
    with pytest.raises(InvalidModelError, match="non-finite"):
        kf.export_model(tmp_path / "run", tmp_path / "b", dtype="float32", force=True)
    assert not (tmp_path / "b").exists()


def test_validate_model_flags_an_absurd_value_head() -> None:
    model = kf.build_model(SPEC, seed=0)
    with torch.no_grad():
        model.value_head[4].bias.fill_(1e6)
    report = kf.validate_model(model, FEW)
    assert not report.ok and "beyond" in report.problems[0]


class _NotAPolicyValueNet(nn.Module):
    """Answers a dict: unpacking it gives two strings, and ``str.float`` does not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": obs.flatten(1), "value": obs.sum((1, 2, 3))}


def test_validate_model_reports_a_forward_pass_of_the_wrong_kind() -> None:
    """A broken model is reported, not raised (an AttributeError escaped before)."""
    report = kf.validate_model(_NotAPolicyValueNet(), FEW)
    assert not report.ok and "the forward pass failed" in report.problems[0]


@pytest.mark.parametrize("dtype", ["int4", "float64", torch.float64, 8, None])
def test_a_bad_dtype_is_a_typed_error_before_anything_is_read(
    dtype: object, tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedDtypeError, match="export dtype must be one of"):
        kf.export_model(tmp_path / "missing", tmp_path / "b", dtype=dtype)  # type: ignore[arg-type]


def test_dtype_names_and_torch_dtypes_agree(source: Path, tmp_path: Path) -> None:
    result = kf.export_model(source, tmp_path / "b", dtype=torch.bfloat16, positions=FEW)
    assert result.bundle.dtype == "bfloat16"


def test_export_cli(source: Path, tmp_path: Path) -> None:
    done = run("export", source, tmp_path / "b", "--dtype", "int8")
    assert done.returncode == 0, done.stderr
    assert "(int8): weights" in done.stdout and "gate: top-1" in done.stdout
    assert kf.load_model(tmp_path / "b")[1].extra["bundle"]["dtype"] == "int8"
    again = run("export", source, tmp_path / "b", "--dtype", "int8")
    assert again.returncode == 2 and "already holds a bundle" in again.stderr
    as_json = run("export", source, tmp_path / "b", "--dtype", "float16", "--overwrite", "--json")
    assert as_json.returncode == 0 and '"dtype": "float16"' in as_json.stdout
    verified = run("verify", tmp_path / "b")
    assert verified.returncode == 0 and verified.stdout.startswith("ok  bundle (step 7,")
    analyzed = run("analyze", tmp_path / "b", "--top-k", "2")
    assert analyzed.returncode == 0 and analyzed.stdout.startswith("bundle (step 7)")
    bad = run("export", source, tmp_path / "c", "--dtype", "int4")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_info_and_ls_on_a_bundle(exports: dict[str, ExportResult]) -> None:
    bundle = exports["int8"].bundle  # exported with ONNX
    info = run("info", bundle.directory)
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert lines[0] == f"bundle         {bundle.directory}  (int8, step 7)"
    assert any(line.startswith("gate           top-1 ") for line in lines)
    assert any(line.startswith("onnx gate      top-1 ") for line in lines)
    assert "; model.onnx " in info.stdout and "model          testmodel" in info.stdout
    as_json = orjson.loads(run("info", bundle.directory / "bundle.json", "--json").stdout)
    assert as_json["dtype"] == "int8" and as_json["export"]["gate"]["figures"]["positions"] > 0
    listed = run("ls", bundle.directory)
    assert listed.returncode == 0 and "is an export bundle" in listed.stdout


def test_the_suite_is_seeded_and_its_hand_picked_positions_are_valid() -> None:
    assert suite_positions(per_phase=3) == suite_positions(per_phase=3)
    assert suite_positions(per_phase=3, seed=1) != suite_positions(per_phase=3)
    for _, sfen, _ in HAND_PICKED:
        board = board_from_sfen(sfen)
        usis = [kf_usi for kf_usi in map(_usi, board.legal_moves)]
        assert any("*" in u for u in usis) or any(u.endswith("+") for u in usis)


def _usi(move: int) -> str:
    import cshogi

    return str(cshogi.move_to_usi(move))


# -- quantisation ----------------------------------------------------------------------------


@given(
    channels=st.integers(1, 8),
    inner=st.integers(1, 40),
    magnitude=st.floats(1e-6, 1e4),
    seed=st.integers(0, 2**16),
    zero_channel=st.booleans(),
)
def test_int8_error_is_at_most_half_a_step_per_channel(
    channels: int, inner: int, magnitude: float, seed: int, zero_channel: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, inner, generator=generator) * magnitude
    if zero_channel:
        weight[0] = 0.0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (channels,)
    assert int(q.abs().max()) <= 127
    error = (dequantize_int8(q, scale) - weight).abs()
    bound = scale[:, None] * (0.5 + 1e-5)
    assert bool((error <= bound).all())
    nonzero = weight.abs().amax(dim=1) > 0
    assert bool((q.abs().amax(dim=1)[nonzero] == 127).all())  # the full range is used
    if zero_channel:
        assert bool((q[0] == 0).all()) and float(scale[0]) == 1.0


@given(dtype=st.sampled_from(["float32", "bfloat16", "float16"]), seed=st.integers(0, 2**16))
def test_float_bundles_round_trip_every_value_their_dtype_holds(dtype: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(3, 4, generator=generator), "n": torch.tensor(5)}
    tensors, quantized = encode_weights(state, dtype)
    assert not quantized and same(tensors["n"], state["n"])
    decoded = decode_weights(tensors, quantized)
    assert same(decoded["w"].to(tensors["w"].dtype), tensors["w"])  # upcast is exact


def test_int8_keeps_a_tiny_channel_nonzero() -> None:
    """``max|w| / 127`` underflows to 0 for a subnormal channel: a zero scale dequantised the
    channel to zeros (and ``0 / 0`` was cast to int8)."""
    weight = torch.tensor([[1e-44, 0.0, -5e-45], [1.0, -0.5, 0.25]])
    q, scale = quantize_int8(weight)
    assert bool((scale > 0).all())
    error = (dequantize_int8(q, scale) - weight).abs()
    assert bool((error <= scale[:, None] / 2).all())
    assert float(dequantize_int8(q, scale)[0, 0]) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_int8_refuses_a_non_finite_weight(bad: float) -> None:
    """NaN was quantised to a finite 0 (hiding it); inf gave an infinite scale (all NaN)."""
    weight = torch.tensor([[bad, 1.0], [0.5, 0.25]])
    with pytest.raises(InvalidModelError, match="non-finite"):
        quantize_int8(weight)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int8])
def test_a_bad_compute_dtype_is_a_typed_error(
    dtype: object, exports: dict[str, ExportResult], workdir: Path
) -> None:
    """A dtype's name instead of the torch dtype raised AttributeError."""
    with pytest.raises(kf.errors.SpecError, match="compute dtype must be a floating"):
        kf.load_model(workdir / "bfloat16", compute_dtype=dtype)  # type: ignore[arg-type]
