"""README.md's code runs as written: every ```python block belongs to a section tested here."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import keisei_fn as kf

README = Path(__file__).resolve().parent.parent / "README.md"

#: Every README section holding ```python blocks, and the test that runs them.
TESTED_SECTIONS = {
    "Quick start: a training loop": "test_training_loop_runs_and_resumes_everything_it_saves",
    "Quick start: a notebook": "test_notebook_example",
    "Prove your own loop resumes exactly": "test_prove_your_own_loop_example",
    "Shared clusters: preemption, time-based saves, workers that follow": (
        "test_cluster_example_saves_by_steps_and_time_and_a_worker_follows"
    ),
    "W&B: registry links, the best alias, evaluation metrics": "test_wandb_registry_example",
    "Model soups, EMA and ensembles": "test_soup_ema_and_ensemble_example",
    "Growing a network, compatibility and migrations": (
        "test_grow_compatibility_and_migration_example"
    ),
    "CUDA: pinned snapshots, loads to the GPU, exact AMP resume": (
        "test_cuda_example_saves_through_the_saver_buffers"
    ),
    "Health gate: a NaN checkpoint never becomes the resume point": "test_health_gate_example",
    "Playing: a USI engine and matches with Elo": "test_match_example",
}
TESTED_SECTIONS["Export bundles: bfloat16, float16, int8, ONNX"] = "test_export_example"


def section_body(section: str) -> str:
    """The text of the README section headed ``## <section>``, up to the next heading."""
    return README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of a README section."""
    blocks = re.findall(r"```python\n(.*?)```", section_body(section), re.S)
    assert blocks, f"no python block under {section!r}"
    return blocks


def run_blocks(section: str) -> dict[str, object]:
    """Run a section's blocks in order in one fresh namespace, as a reader pasting them would."""
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for block in python_blocks(section):
        exec(compile(block, f"README.md ({section})", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _global_rngs_restored() -> Iterator[None]:
    """README code seeds and draws from the global RNGs (its resume restores them): every test
    leaves them as it found them."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def test_every_python_block_of_the_readme_is_tested() -> None:
    sections = re.findall(r"^## (.+)$", README.read_text(), re.M)
    with_code = {s for s in sections if "```python" in section_body(s)}
    assert with_code == set(TESTED_SECTIONS)
    for name in TESTED_SECTIONS.values():
        assert name in globals()


def test_training_loop_runs_and_resumes_everything_it_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    first = run_blocks("Quick start: a training loop")
    assert "resumed" not in capsys.readouterr().out  # a fresh start
    assert first["step"] == 12 * 2048 and first["elo"] == {"rating": 1500.0, "games": 12}
    # checkpoints every 10,240 timesteps (keep_last=5), and the final model
    listed = [(m.kind, m.step) for m in kf.list_checkpoints("models/my_run")]
    periodic = [("periodic", step) for step in (10240, 20480, 24576)]  # the end too
    assert listed == [*periodic, ("final_model", 24576)]

    kf.prune("models/my_run", kf.RetentionPolicy(keep_last=2))  # as if killed after 20480
    for name in ("checkpoint_ts24576", "final_model"):
        (Path("models/my_run") / f"{name}.json").unlink()
    second = run_blocks("Quick start: a training loop")  # a rerun resumes
    assert "resumed at step 20480" in capsys.readouterr().out
    resumed = second["resumed"]
    assert isinstance(resumed, kf.Resumed) and resumed.copied_from is None
    assert resumed.state.extra["elo_state"]["games"] == 10  # what was saved at 20480
    assert second["elo"] == {"rating": 1500.0, "games": 12}  # ... restored and counted on
    assert second["step"] == 12 * 2048
    third = run_blocks("Quick start: a training loop")  # a finished run: nothing to do
    assert "resumed at step 24576" in capsys.readouterr().out
    assert third["elo"] == {"rating": 1500.0, "games": 12}


def test_notebook_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a run like the demo's: checkpoints recording the demo's metrics, a final model."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    spec = kf.ModelSpec(model_type="testmodel")
    model = kf.build_model(spec, seed=0)
    for step in (100, 200, 300):
        metrics = {"train_legal_mass": step / 400, "heldout_legal_mass": step / 500}
        kf.save_state(kf.capture(spec, model, step=step, extra=metrics), "runs/demo")
    kf.save_final_model(kf.capture(spec, model, step=300), "runs/demo")
    namespace = run_blocks("Quick start: a notebook")
    out = capsys.readouterr().out
    assert "train_legal_mass" in out and "checkpoint_ts200" in out and "final_model" in out
    assert "black to move" in out
    assert len([row for row in out.splitlines() if row[:1].isdigit()]) == 5  # top-5 moves
    assert namespace["meta"].kind == "final_model"  # type: ignore[attr-defined]


def test_prove_your_own_loop_example(tmp_path: Path) -> None:
    (code,) = python_blocks("Prove your own loop resumes exactly")
    (tmp_path / "test_my_loop.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_loop.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_command_line_block_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every line of the CLI quick start, in a directory holding what it names: a demo run,
    Keisei ``.pth`` files and a sharded checkpoint."""
    from test_legacy import keisei_checkpoint, trained

    from keisei_fn.cli import main
    from keisei_fn.store import sharded

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = kf.ModelSpec(model_type="testmodel")  # runs/demo: the demo's network, 3 saves
    demo = kf.build_model(spec, seed=0)
    for step in (100, 200, 300):
        kf.save_state(
            kf.capture(spec, demo, step=step, extra={"legal_mass": step / 1000}), "runs/demo"
        )
    kf.save_final_model(kf.capture(spec, demo, step=300), "runs/demo")
    Path("old").mkdir()
    _, live, optimizer, scheduler = trained(kf.ModelSpec())  # Keisei's default network
    for name, step in (("final_model.pth", 4096), ("checkpoint_ts10240.pth", 10240)):
        content = keisei_checkpoint(live, optimizer, scheduler, global_timestep=step)
        torch.save(content, Path("old") / name)
    small = kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=0)
    sharded.save_sharded(
        small, None, "runs/fsdp", step=5, spec=kf.ModelSpec(model_type="testmodel")
    )
    capsys.readouterr()

    block = re.search(r"```bash\n(.*?)```", section_body("Quick start: the command line"), re.S)
    assert block is not None
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[0] == "keisei-fn"
        try:
            code = main(argv[1:])
        except SystemExit as exited:  # --version, like --help, exits from argparse
            code = exited.code
        out, err = capsys.readouterr()
        assert code == (1 if argv[1] == "diff" else 0), f"{line}\n{out}\n{err}"
        if argv[1] == "analyze":
            assert "white to move" in out
            assert len([row for row in out.splitlines() if row[:1].isdigit()]) == 3
    assert [m.step for m in kf.list_checkpoints("models/run")] == [4096, 10240]
    assert kf.latest_checkpoint("runs/single") is not None
    assert Path("runs/demo/wandb").is_dir() and not Path("wandb").exists()  # W&B's files


def test_cluster_example_saves_by_steps_and_time_and_a_worker_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a signal the learner trains to the end; the worker loads the last checkpoint
    and stops because the learner finished. (Real signals: test_preemption.)"""
    monkeypatch.chdir(tmp_path)
    run_blocks("Shared clusters: preemption, time-based saves, workers that follow")
    assert [m.step for m in kf.list_checkpoints("models/cluster_run")] == [10240, 20480, 20480]
    assert capsys.readouterr().out == "now playing with step 20480\n"


def test_wandb_registry_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb_records

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's files under runs/ppo-1/wandb
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_blocks("W&B: registry links, the best alias, evaluation metrics")
    lines = capsys.readouterr().out.splitlines()
    assert [("best by win_rate" in line) for line in lines] == [True, True, False, False]
    assert "not linked to wandb-registry-model/shogi: W&B offline runs cannot link" in lines[-1]
    (run_file,) = Path("runs/ppo-1/wandb").rglob("run-*.wandb")
    logged = wandb_records.artifacts(run_file)
    best = [a for a in logged if a["name"] == "ppo-1-best-checkpoint"]
    assert [a["metadata"]["training_timesteps"] for a in best] == [10240, 20480]
    assert all(a["metadata"]["metrics"]["elo"] == 1500.0 for a in logged[:-1])


def test_soup_ema_and_ensemble_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks("Model soups, EMA and ensembles")
    assert "black to move" in capsys.readouterr().out
    ema, soup = namespace["ema"], namespace["soup"]
    assert isinstance(ema, kf.EMA) and ema.updates == 3
    assert isinstance(soup, kf.TrainState) and soup.step == 3
    assert [i["step"] for i in soup.extra["average"]["inputs"]] == [1, 2, 3]
    assert kf.list_checkpoints("runs/soup_avg")[0].extra["average"]["bn"] == "averaged"


def test_grow_compatibility_and_migration_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    before = kf.build_model(kf.ModelSpec(tower_depth=2, tower_width=32), seed=0).eval()
    namespace = run_blocks("Growing a network, compatibility and migrations")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "spec differs: tower_depth 4 vs 2, tower_width 48 vs 32"
    assert out[1].startswith("36 tensors in the checkpoint are not in the model")
    x = torch.randn(2, 46, 9, 9)
    grown = namespace["model"]
    assert isinstance(grown, torch.nn.Module)
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x), before(x), rtol=1e-4, atol=1e-5)


def test_cuda_example_saves_through_the_saver_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the same code runs (CPU tensors are cloned; the buffers stay unused)."""
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks("CUDA: pinned snapshots, loads to the GPU, exact AMP resume")
    assert [m.step for m in kf.list_checkpoints("models/gpu_run")] == [5, 10]
    state = namespace["state"]
    assert isinstance(state, kf.TrainState) and state.step == 10


def test_health_gate_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run_blocks("Health gate: a NaN checkpoint never becomes the resume point")
    saved, unhealthy, resumed, check = capsys.readouterr().out.splitlines()
    assert saved == "saved checkpoint_ts1"
    assert unhealthy.startswith("saved checkpoint_ts2, marked unhealthy: non_finite: model ")
    assert (resumed, check) == ("1", "non_finite")
    assert [m.healthy for m in kf.list_checkpoints("models/gated")] == [True, False]


def test_export_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks("Export bundles: bfloat16, float16, int8, ONNX")
    result = namespace["result"]
    assert isinstance(result, kf.serve.ExportResult) and result.passed
    assert namespace["meta"].extra["bundle"]["dtype"] == "int8"  # type: ignore[attr-defined]


def test_match_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = kf.ModelSpec(model_type="testmodel")
    for seed, step in ((0, 100), (1, 300)):
        state = kf.capture(spec, kf.build_model(spec, seed=seed), step=step)
        kf.save_state(state, "runs/demo")
    kf.save_final_model(state, "runs/demo")
    run_blocks("Playing: a USI engine and matches with Elo")
    out = capsys.readouterr().out
    assert "4 games" in out and "Elo of B - A: " in out and out.rstrip().endswith(("B", "A"))
    assert (tmp_path / "m" / "summary.json").exists()
