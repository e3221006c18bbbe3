"""A new user's first hour with ``keisei-fn`` (issue #17): options anywhere, typo'd paths are
errors that write nothing, readable publish lines, W&B files beside the run, a run directory
wherever a checkpoint is expected, ``--version``, help on every argument, Keisei's own flag
spellings, ``convert --kind`` and a demo that trains on.

The CLI runs in this process (``main(argv)``), its output captured by pytest.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch

from keisei_fn import (
    ModelSpec,
    __version__,
    build_model,
    capture,
    load_model,
    load_state,
    save_final_model,
    save_state,
)
from keisei_fn.cli import build_parser, main
from keisei_fn.errors import SpecError
from keisei_fn.publish import PublishResult, plan_publication
from keisei_fn.store import append_ledger, list_checkpoints, read_ledger

TINY = ModelSpec(tower_depth=1, tower_width=4, se_ratio=0.5, num_actions=5)
WHITE_SFEN = "lnsgkgsnl/1r5b1/ppppppppp/9/9/2P6/PP1PPPPPP/1B5R1/LNSGKGSNL w - 2"
COMMANDS = ("demo", "ls", "info", "verify", "prune", "convert", "consolidate", "publish")
COMMANDS += ("flush", "analyze", "diff")
COMMANDS += ("average",)
COMMANDS += ("migrate", "grow", "compat")
COMMANDS += ("export", "usi", "match")


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``keisei-fn ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, --version, malformed arguments
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def tree(root: Path) -> list[str]:
    """Every path under ``root``, relative: what a command must leave alone."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def trained_state(spec: ModelSpec, step: int, seed: int = 0):
    """A state of ``spec``'s network and its Adam after one step."""
    model = build_model(spec, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    obs = torch.randn(2, *spec.obs_shape, generator=torch.Generator().manual_seed(seed))
    logits, value = model(obs)
    (logits.logsumexp(-1).mean() + value.square().mean()).backward()
    optimizer.step()
    return capture(spec, model, optimizer, step=step)


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> Path:
    """checkpoint_ts100, checkpoint_ts200 (with Adam state) and final_model (step 200) of a
    tiny ResNet; tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    save_state(trained_state(TINY, 100, seed=1), run_dir)
    last = trained_state(TINY, 200, seed=2)
    save_state(last, run_dir)
    save_final_model(last, run_dir)
    return run_dir


@pytest.fixture
def tiny_run(tiny_template, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_template, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def net_run(tmp_path_factory) -> Path:
    """A final model of Keisei's test network (real Shogi action space): for ``analyze``."""
    run_dir = tmp_path_factory.mktemp("net") / "run"
    spec = ModelSpec(model_type="testmodel")
    save_final_model(capture(spec, build_model(spec, seed=0), step=10), run_dir)
    return run_dir


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty current directory, which no command may write into."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """W&B offline and silent, its data, cache and config under the test's temp dir;
    ``WANDB_DIR`` unset, so the CLI's own rule decides where run files go."""
    home = tmp_path / "wandb-home"
    home.mkdir()
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("KEISEI_FN_PUBLISH", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    return home


def wandb_runs(directory: Path) -> list[str]:
    """The offline W&B runs under ``directory/wandb``."""
    found = directory / "wandb"
    return sorted(p.name for p in found.glob("offline-run-*")) if found.is_dir() else []


# --- item 5: options anywhere ---------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        ("RUN", "--top-k", "3", "SFEN"),  # the README's order, which failed
        ("RUN", "SFEN", "--top-k", "3"),
        ("--top-k", "3", "RUN", "SFEN"),
    ],
)
def test_analyze_takes_options_anywhere_among_a_spaced_sfen(capsys, net_run, order):
    args = [{"RUN": net_run, "SFEN": WHITE_SFEN}.get(a, a) for a in order]
    rc, out, err = cli(capsys, "analyze", *args)
    assert rc == 0, err
    assert "white to move" in out and WHITE_SFEN in out
    assert len([ln for ln in out.splitlines() if ln[:1].isdigit()]) == 3


def test_options_anywhere_in_every_command(capsys, tiny_run):
    rc, out, err = cli(capsys, "ls", "--verify", tiny_run)
    assert rc == 0 and "verified" in out, err
    rc, out, _ = cli(capsys, "prune", "--dry-run", tiny_run, "--keep-last", "1")
    assert rc == 0 and "would delete  checkpoint_ts100" in out


# --- item 7: a path that does not exist is a user error, and nothing is written ---------------


MISSING_CASES = {
    "ls": ["ls", "{missing}"],
    "info": ["info", "{missing}"],
    "info-run-dir-without-checkpoints": ["info", "{empty}"],
    "verify": ["verify", "{missing}"],
    "prune": ["prune", "{missing}", "--keep-last", "1"],
    "prune-dry-run": ["prune", "{missing}", "--keep-last", "1", "--dry-run"],
    "flush": ["flush", "{missing}"],
    "publish": ["publish", "{missing}/checkpoint_ts100", "--run-name", "r"],
    "publish-run-dir-without-checkpoints": ["publish", "{empty}", "--run-name", "r"],
    "analyze": ["analyze", "{missing}"],
    "analyze-run-dir-without-checkpoints": ["analyze", "{empty}"],
    "convert": ["convert", "{missing}/checkpoint_ts10.pth", "{out}"],
    "consolidate": ["consolidate", "{missing}", "{out}"],
    "migrate": ["migrate", "{missing}"],
    "grow": ["grow", "{missing}", "{out}", "--tower-depth", "2"],
    "compat": ["compat", "{missing}"],
}


@pytest.mark.parametrize("case", sorted(MISSING_CASES))
def test_missing_path_is_one_line_user_error_that_writes_nothing(
    capsys, tmp_path, cwd, wandb_home, case
):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    names = {"missing": tmp_path / "no-such-run", "empty": empty, "out": tmp_path / "out"}
    before = tree(tmp_path)
    rc, out, err = cli(capsys, *(a.format(**names) for a in MISSING_CASES[case]))
    assert rc == 2, (out, err)
    assert err.startswith("keisei-fn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    assert tree(tmp_path) == before  # no run directory, W&B run or file was created
    assert list(cwd.iterdir()) == []


def test_verify_on_a_directory_without_checkpoints_is_a_user_error(capsys, tmp_path, cwd):
    """A directory with nothing to verify is most likely a wrong path: exit 2, one line
    (exit 0 would let a typo pass a CI check; exit 1 means "a bad checkpoint was found")."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    rc, out, err = cli(capsys, "verify", empty)
    assert rc == 2 and out == ""
    assert err == f"keisei-fn: error: no checkpoints in {empty}: nothing to verify\n"


def test_flush_with_nothing_pending_starts_no_wandb_run(capsys, tiny_run, cwd, wandb_home):
    rc, out, err = cli(capsys, "flush", tiny_run)
    assert rc == 0, err
    assert out == f"{tiny_run}: outbox empty, nothing to publish\n"
    assert not (tiny_run / "wandb").exists() and list(cwd.iterdir()) == []


# --- item 8: one readable line per publication; W&B files beside the run ----------------------


def test_publish_result_reads_as_one_line():
    published = PublishResult(
        status="published",
        reason="logged to W&B run abc",
        artifact_name="demo-checkpoint-ts100",
        aliases=("ts-100",),
        checkpoint="checkpoint_ts100",
    )
    assert str(published) == (
        "published checkpoint_ts100 as demo-checkpoint-ts100 (aliases ts-100): "
        "logged to W&B run abc"
    )
    failed = PublishResult(
        status="failed",
        reason="IntegrityError: weights digest differs",
        artifact_name="demo-checkpoint-ts200",
        checkpoint="checkpoint_ts200",
    )
    assert str(failed) == (
        "failed checkpoint_ts200 as demo-checkpoint-ts200: IntegrityError: weights digest differs"
    )
    skipped = PublishResult(
        status="skipped", reason="wandb not installed", checkpoint="final_model"
    )
    assert str(skipped) == "skipped final_model: wandb not installed"


def test_publish_prints_one_line_and_keeps_wandb_files_in_the_run_dir(
    capsys, tiny_run, cwd, wandb_home
):
    rc, out, err = cli(capsys, "publish", tiny_run / "checkpoint_ts100", "--run-name", "demo")
    assert rc == 0, err
    assert re.fullmatch(
        r"published checkpoint_ts100 as demo-checkpoint-ts100 \(aliases [^)]*ts-100[^)]*\): "
        r"logged to W&B run \w+\n",
        out,
    ), out
    # a run directory stands for its final model, as for analyze and load_model
    rc, out, err = cli(capsys, "publish", tiny_run, "--run-name", "demo")
    assert rc == 0, err
    assert out.startswith("published final_model as demo-final-model (aliases ") and out[-1] == "\n"
    rc, out, err = cli(capsys, "publish", "--run-name", "demo", tiny_run / "checkpoint_ts100")
    assert rc == 0, err
    assert out.startswith("published checkpoint_ts100 as demo-checkpoint-ts100 (aliases ")
    assert out.endswith(": already published (publication ledger)\n")
    assert len(wandb_runs(tiny_run)) == 3  # under <run_dir>/wandb, as the demo does
    assert list(cwd.iterdir()) == []


def test_flush_prints_one_line_per_outcome(capsys, tiny_run, cwd, wandb_home):
    metas = {m.name: m for m in list_checkpoints(tiny_run)}
    for name in ("checkpoint_ts100", "checkpoint_ts200"):
        plan = plan_publication(metas[name], run_name="demo")
        append_ledger(tiny_run, plan.record("pending"))
    save_state(trained_state(TINY, 200, seed=3), tiny_run, overwrite=True)  # replaced since

    rc, out, err = cli(capsys, "flush", tiny_run)

    assert rc == 1, err
    published, failed = out.splitlines()
    assert published.startswith("published checkpoint_ts100 as demo-checkpoint-ts100 (aliases ")
    assert failed.startswith("failed checkpoint_ts200 as demo-checkpoint-ts200: IntegrityError: ")
    assert "replaced since" in failed and "keisei_fn.errors" not in failed
    assert [r["event"] for r in read_ledger(tiny_run)][-2:] == ["published", "failed"]
    assert len(wandb_runs(tiny_run)) == 1 and list(cwd.iterdir()) == []


def test_wandb_dir_wins_over_the_run_directory(
    capsys, tmp_path, tiny_run, cwd, wandb_home, monkeypatch
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    rc, _, err = cli(capsys, "publish", tiny_run, "--run-name", "demo")
    assert rc == 0, err
    assert len(wandb_runs(elsewhere)) == 1
    assert not (tiny_run / "wandb").exists() and list(cwd.iterdir()) == []


def test_help_documents_the_wandb_directory_rule(capsys):
    for command in ("publish", "flush", "demo"):
        rc, out, _ = cli(capsys, command, "--help")
        assert rc == 0
        assert "RUN_DIR/wandb unless WANDB_DIR" in " ".join(out.split()), command


# --- item 10: a run directory wherever a checkpoint is expected -----------------------------


def test_info_takes_a_run_directory_like_analyze_and_load_model(capsys, tiny_run):
    rc, out, err = cli(capsys, "info", tiny_run)
    assert rc == 0, err
    assert out.startswith(f"checkpoint     {tiny_run / 'final_model'}  (final_model, step 200")
    for stem in tiny_run.glob("final_model*"):
        stem.unlink()  # no final model: the latest checkpoint
    rc, out, err = cli(capsys, "info", tiny_run, "--json")
    assert rc == 0, err
    assert '"name": "checkpoint_ts200"' in out
    assert load_model(tiny_run)[1].name == "checkpoint_ts200"  # the same rule


def test_analyze_and_info_pick_the_same_checkpoint(capsys, net_run):
    rc, info_out, err = cli(capsys, "info", net_run, "--json")
    assert rc == 0, err
    rc, analyze_out, err = cli(capsys, "analyze", net_run)
    assert rc == 0, err
    assert '"name": "final_model"' in info_out and analyze_out.startswith("final_model (step 10)")


# --- item 11: --version, a bare keisei-fn, help on every argument -----------------------------


def test_version(capsys):
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and out == f"keisei-fn {__version__}\n"


def test_bare_keisei_fn_lists_the_commands_and_exits_2(capsys):
    """No command is a usage error (exit 2, as argparse's errors), but a friendly one: the
    usage and every command with its one-line help."""
    rc, out, err = cli(capsys)
    assert rc == 2 and out == ""
    assert err.startswith("usage: keisei-fn")
    listed = {ln.split()[0] for ln in err.splitlines() if re.match(r"    \w", ln)}
    assert listed == set(COMMANDS)
    assert "publish a checkpoint to W&B" in err and "--version" in err


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == set(COMMANDS)
    missing = [a.dest for a in parser._actions if not a.help]
    missing += [f"{c.dest} (command)" for c in commands._choices_actions if not c.help]
    for name, sub in commands.choices.items():
        missing += [f"{name} {a.dest}" for a in sub._actions if not a.help]
    assert missing == []


# --- item 12: Keisei's flag spellings; convert --kind -----------------------------------------


def test_spec_options_take_keisei_underscore_spellings(capsys):
    dashed = ["--tower-depth", "2", "--tower-width", "16", "--se-ratio", "0"]
    underscored = ["--tower_depth", "2", "--tower_width", "16", "--se_ratio", "0"]
    outputs = []
    for spelled, features in ((dashed, "--input-features"), (underscored, "--input_features")):
        rc, out, err = cli(
            capsys, "info", "--model", "resnet", features, "core46", *spelled, "--json"
        )
        assert rc == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] and '"tower_width": 16' in outputs[0]
    parsed = build_parser().parse_args(["convert", "a.pth", "run", "--tower_depth", "3"])
    assert parsed.tower_depth == 3


def keisei_final_model_pth(directory: Path) -> Path:
    """What Keisei wrote as final_model.pth: weights, Adam and scheduler state."""
    model = build_model(TINY, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    model(torch.randn(2, *TINY.obs_shape))[0].sum().backward()
    optimizer.step()
    scheduler.step()
    path = directory / "final_model.pth"
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "global_timestep": 500,
            "total_episodes_completed": 9,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("kind", "name", "stored_kind", "resumable"),
    [
        (None, "final_model", "final_model", False),  # by the file name, as before
        ("final-model", "final_model", "final_model", False),
        ("checkpoint", "checkpoint_ts500", "periodic", True),
        ("final", "checkpoint_ts500", "final", True),
    ],
)
def test_convert_kind(capsys, tmp_path, kind, name, stored_kind, resumable):
    pth = keisei_final_model_pth(tmp_path)
    run_dir = tmp_path / "run"
    rc, out, err = cli(capsys, "convert", pth, run_dir, *(["--kind", kind] if kind else []))
    assert rc == 0, err
    assert f"(step 500, {stored_kind})" in out
    (meta,) = list_checkpoints(run_dir)
    assert (meta.name, meta.kind) == (name, stored_kind)
    state = load_state(meta.path)
    assert (state.optimizer is not None) == resumable
    assert (state.scheduler is not None) == resumable
    if resumable:  # a resume point: the run directory's latest checkpoint
        assert load_state(run_dir).step == 500


# --- item 13: the demo trains on ------------------------------------------------------------

FAST = ["--pool-size", "64", "--checkpoint-every", "10", "--wandb", "disabled"]


def test_demo_trains_on_from_a_run_that_stopped_at_its_step_limit(capsys, tmp_path):
    run_dir = tmp_path / "demo"
    args = ["demo", "--run-dir", run_dir, *FAST, "--target-legal-mass", "0.99"]
    rc, out, err = cli(capsys, *args, "--steps", "30")
    assert rc == 1, err  # the target is out of reach in 30 steps
    assert "training to step 30, or until the legal mass reaches 0.99" in out
    # target step and ETA: to step 30, which the target may cut short, so at most
    assert re.search(r"^step +25/30 .* ETA <= \d+s$", out, re.M), out
    assert "finished at step 30" in out

    rc, out, _ = cli(capsys, *args)  # `make demo` again: nothing to train, and says so
    assert "already complete at step 30 (step limit 30 reached): pass --steps N > 30" in out
    assert max(m.step for m in list_checkpoints(run_dir)) == 30

    rc, out, err = cli(capsys, *args, "--steps", "55")
    assert f"resumed from {run_dir}/checkpoint_ts30" in out, err
    assert "training on from step 30 to step 55, or until the legal mass reaches 0.99 (" in out
    assert re.search(r"^step +50/55 ", out, re.M) and "finished at step 55" in out
    final = {m.name: m for m in list_checkpoints(run_dir)}
    assert final["final_model"].step == 55 and final["checkpoint_ts55"].kind == "final"
    assert "checkpoint_ts40" in final and "checkpoint_ts50" in final


def test_demo_trains_on_past_a_reached_target(capsys, tmp_path):
    run_dir = tmp_path / "demo"
    args = ["demo", "--run-dir", run_dir, *FAST, "--target-legal-mass", "0.05"]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    step = load_model(run_dir)[1].step
    assert step < 3000  # stopped by the target

    rc, out, _ = cli(capsys, *args, "--steps", str(step))
    assert rc == 0
    assert (
        f"already complete at step {step} (target legal mass reached): "
        f"pass --steps N > {step} to train on"
    ) in out

    rc, out, err = cli(capsys, *args, "--steps", str(step + 15))
    assert rc == 0, err
    assert (
        f"training on from step {step} to step {step + 15} (target legal mass 0.05 already " in out
    )
    assert f"finished at step {step + 15}" in out
    assert load_model(run_dir)[1].step == step + 15


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["average", "run", "--last", "2", "out"],
        ["grow", "run", "out", "--tower-width", "32"],
        ["match", "a", "b"],
    ],
)
@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "seven"])
def test_a_seed_out_of_range_is_a_usage_error(capsys, argv, seed):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--seed", seed])
    assert exited.value.code == 2
    assert "argument --seed: " in capsys.readouterr().err


def test_build_model_refuses_a_seed_no_rng_takes():
    spec = ModelSpec(model_type="testmodel")
    for seed in (2**63, -1, True, 1.5):
        with pytest.raises(SpecError, match="seed must be an int"):
            build_model(spec, seed=seed)  # type: ignore[arg-type]
