"""The ``keisei-fn`` command line on real run directories.

Most commands run inside the test process (``cli_inprocess.run``: same exit code, stdout and
stderr, no interpreter start); the installed ``keisei-fn`` script and ``python -m keisei_fn`` are
started as real processes in ``test_help_on_every_command``, and the demo that is killed
mid-run is a real ``keisei-fn`` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_inprocess import run

CLI = [str(Path(sys.executable).parent / "keisei-fn")]
SHORT_DEMO = [
    "--steps",
    "60",
    "--target-legal-mass",
    "0.3",
    "--checkpoint-every",
    "20",
    "--wandb",
    "disabled",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = run("demo", "--run-dir", str(run_dir), *SHORT_DEMO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fresh start" in result.stdout
    assert "checkpoint_ts20" in result.stdout and "final_model" in result.stdout
    return run_dir


def test_help_on_every_command():
    for command in (
        "demo",
        "ls",
        "info",
        "verify",
        "prune",
        "convert",
        "publish",
        "flush",
        "analyze",
    ):
        result = run(command, "--help")
        assert result.returncode == 0 and "usage: keisei-fn" in result.stdout, command
        assert result.stderr == "", command
    assert run("--help").returncode == 0
    # the real entry points, each in a fresh interpreter: the installed script and the module
    script = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and "usage: keisei-fn" in script.stdout
    assert "analyze" in script.stdout and script.stderr == ""
    module = subprocess.run(
        [sys.executable, "-m", "keisei_fn", "--help"], capture_output=True, text=True, timeout=300
    )
    assert module.returncode == 0 and "analyze" in module.stdout


def test_rerun_resumes_and_says_so(demo_dir):
    # without --steps, as `make demo` reruns (a larger --steps trains on: test_cli_usability)
    assert SHORT_DEMO[:2] == ["--steps", "60"]
    result = run("demo", "--run-dir", str(demo_dir), *SHORT_DEMO[2:])
    assert result.returncode == 0, result.stderr
    assert f"resumed from {demo_dir}" in result.stdout
    assert "already complete" in result.stdout


def test_ls_table(demo_dir):
    result = run("ls", str(demo_dir))
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "step", "kind", "size", "age", "integrity", "publish"]
    names = [line.split()[0] for line in lines[1:]]
    assert "final_model" in names and any(n.startswith("checkpoint_ts") for n in names)


def test_info_json_and_text(demo_dir):
    result = run("info", str(demo_dir / "final_model.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "final_model" and info["spec"]["model_type"] == "testmodel"
    assert info["model_info"]["parameters"] == 2_216_516
    assert all(k.startswith("model/") for k in info["tensors"])
    text = run("info", str(demo_dir / "final_model"))
    assert text.returncode == 0 and "parameters     2,216,516" in text.stdout


def test_analyze(demo_dir):
    result = run("analyze", str(demo_dir), "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert "black to move" in result.stdout and "legal mass" in result.stdout
    assert len([ln for ln in result.stdout.splitlines() if ln[:1].isdigit()]) == 3
    white = run(
        "analyze",
        str(demo_dir),
        "lnsgkgsnl/1r5b1/ppppppppp/9/9/2P6/PP1PPPPPP/1B5R1/LNSGKGSNL w - 2",
    )
    assert white.returncode == 0 and "white to move" in white.stdout


def test_bad_input_gives_one_line_and_exit_2(tmp_path, demo_dir):
    cases = [
        ("ls", str(tmp_path / "missing")),
        ("info", str(tmp_path / "missing.safetensors")),
        ("verify", str(tmp_path / "nope")),
        ("analyze", str(demo_dir), "not a sfen"),
        ("analyze", str(tmp_path / "missing")),
    ]
    pth = tmp_path / "old.pth"
    torch.save({"model_state_dict": {}}, pth)
    cases.append(("info", str(pth)))
    for case in cases:
        result = run(*case)
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert result.stderr.startswith("keisei-fn: error:"), (case, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert "import_legacy" in run("info", str(pth)).stderr


def test_verify_and_prune(tmp_path, demo_dir):
    run_dir = tmp_path / "copy"
    shutil.copytree(demo_dir, run_dir)
    assert run("verify", str(run_dir)).returncode == 0
    from keisei_fn import list_checkpoints

    metas = sorted(
        (m for m in list_checkpoints(run_dir) if m.name.startswith("checkpoint_ts")),
        key=lambda m: m.name,
    )
    name, weights = metas[0].name, metas[0].weights_path
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor
    weights.write_bytes(bytes(data))
    result = run("verify", str(run_dir))
    assert result.returncode == 1 and f"CORRUPT  {name}:" in result.stdout
    single = run("verify", str(weights))
    assert single.returncode == 2 and "digest" in single.stderr
    (run_dir / ".checkpoint_ts9.safetensors.abc123.tmp").write_bytes(b"partial")
    dry = run("prune", str(run_dir), "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stdout
    assert (run_dir / ".checkpoint_ts9.safetensors.abc123.tmp").exists()
    assert run("prune", str(run_dir), "--keep-last", "1").returncode == 0
    assert not (run_dir / ".checkpoint_ts9.safetensors.abc123.tmp").exists()
    assert run("verify", str(run_dir)).returncode == 0


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from keisei_fn import list_checkpoints

    (final_model,) = [m for m in list_checkpoints(run_dir) if m.name == "final_model"]
    return load_file(final_model.weights_path)


def test_demo_killed_mid_run_resumes_exactly(tmp_path):
    """SIGKILL mid-run, rerun: resumes from the latest valid checkpoint, reaches the target, and
    ends bit-identical to an uninterrupted run (every RNG the loop uses is in the checkpoint)."""
    args = [
        "--steps",
        "150",
        "--target-legal-mass",
        "0.7",
        "--checkpoint-every",
        "25",
        "--wandb",
        "disabled",
    ]
    # one intra-op thread in every run: bit-exact across processes (the in-process runs get it
    # from torch.set_num_threads, the killed process from OMP_NUM_THREADS)
    env = {"OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    assert run("demo", "--run-dir", straight, *args, threads=1).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, "demo", "--run-dir", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint_ts50.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "demo ended before step 50"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_model.json").exists()

    result = run("demo", "--run-dir", killed, *args, threads=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {killed}/checkpoint_ts" in result.stdout
    final_line = next(ln for ln in result.stdout.splitlines() if ln.startswith("finished"))
    assert float(final_line.split("legal mass ")[1].split()[0]) >= 0.7
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        assert (
            a[key].reshape(-1).view(torch.uint8).numpy().tobytes()
            == b[key].reshape(-1).view(torch.uint8).numpy().tobytes()
        ), key


def test_verify_reports_leftovers_of_a_crash_without_failing_unless_strict(tmp_path, demo_dir):
    run_dir = tmp_path / "copy"
    shutil.copytree(demo_dir, run_dir)
    (run_dir / ".checkpoint_ts9.json.abc123.tmp").write_bytes(b"partial")  # a killed save's
    (run_dir / "checkpoint_ts9.0123456789abcdef.safetensors").write_bytes(b"orphan")
    lenient = run("verify", str(run_dir))
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert lenient.stdout.count("LEFTOVER") == 2 and "CORRUPT" not in lenient.stdout
    strict = run("verify", "--strict", str(run_dir))
    assert strict.returncode == 1 and strict.stdout.count("LEFTOVER") == 2
