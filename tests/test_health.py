"""The health gate: ``check_health``, the mark in the sidecar, and what it keeps a NaN checkpoint
from becoming (the latest, the resume point, a pruning casualty's survivor, a W&B version)."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb_records
from cli_inprocess import run as cli
from golden import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import listed_meta, raw_bytes

import keisei_fn as kf
from keisei_fn.errors import (
    CheckpointNotFoundError,
    IntegrityError,
    InvalidPositionError,
    SpecError,
    UnhealthyCheckpointError,
)
from keisei_fn.health import HealthPolicy, HealthProblem, check_health, parameter_norm
from keisei_fn.meta import CheckpointMeta
from keisei_fn.publish import flush_outbox, plan_publication, publish, publishable
from keisei_fn.store import append_ledger, read_ledger

#: A small Keisei network: one residual block of 8 channels.
SPEC = kf.ModelSpec(model_type="resnet", tower_depth=1, tower_width=8, se_ratio=0.0)
NO_VALUE_CHECK = HealthPolicy(positions=())
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, obs: torch.Tensor) -> None:
    """One real PPO-like update on ``obs``."""
    logits, value = model(obs)
    loss = logits.logsumexp(-1).mean() + value.pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def poisoned(batch: int = 4) -> torch.Tensor:
    """Observations with one infinite plane entry, as a broken feature encoder would give."""
    obs = torch.randn(batch, 46, 9, 9)
    obs[0, 0, 4, 4] = math.inf
    return obs


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real offline W&B run writing under the test's temp dir."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path / "wandb"
    root.mkdir()
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(root))
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.delenv("KEISEI_FN_PUBLISH", raising=False)
    run = wandb.init(project="keisei-fn-test", dir=str(root), mode="offline")
    yield run
    run.finish()


# --- a real NaN from training, end to end -----------------------------------------------------


def test_a_nan_from_training_is_saved_marked_and_never_latest_resumed_or_published(
    tmp_path: Path, offline_wandb: Any, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    model = kf.build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ckpt = kf.Checkpointer(
        run_dir=run_dir, interval=100, health=True, retention=kf.RetentionPolicy(keep_last=1)
    )
    results, states = [], []
    for step in (100, 200, 300, 400):
        train_step(model, optimizer, poisoned() if step == 300 else torch.randn(4, 46, 9, 9))
        states.append(kf.capture(SPEC, model, optimizer, step=step))
        results.append(ckpt.maybe_save(states[-1], step=step, last_saved=step - 100))

    assert [r.status for r in results] == ["saved"] * 4  # data is never dropped
    assert [r.healthy for r in results] == [True, True, False, False]
    nan = results[2]
    assert nan.meta is not None and not nan.meta.healthy
    assert [p.check for p in nan.health] == ["non_finite"]
    assert "model stem.weight has 3312 NaN of 3312 elements" in str(nan.health[0])
    assert "more tensors" in str(nan.health[0])
    (moments,) = check_health(states[2].replace(model={}), policy=NO_VALUE_CHECK)
    assert "optimizer state.0.exp_avg has" in str(moments)  # Adam's moments are NaN too
    assert nan.meta.health == tuple(map(str, nan.health))
    assert "marked unhealthy" in nan.reason
    assert "step 300 is unhealthy" in caplog.text

    # keep_last=1 kept the newest healthy checkpoint beside the newest; both verify.
    listed = kf.list_checkpoints(run_dir)
    assert [(m.step, m.healthy) for m in listed] == [(200, True), (400, False)]
    for meta in listed:
        kf.verify_checkpoint(meta.path)
    healthy, unhealthy = listed
    # latest, resume and load_state(run_dir) pick the newest healthy checkpoint ...
    assert kf.latest_checkpoint(run_dir) == healthy.weights_path
    resumed = kf.resume(run_dir)
    assert resumed is not None and resumed.state.step == 200
    assert kf.load_state(run_dir).step == 200
    assert "skipping" in caplog.text and "UNHEALTHY" in caplog.text
    # ... unless asked; an explicit path loads whatever its mark, bit-exactly.
    assert kf.latest_checkpoint(run_dir, include_unhealthy=True) == unhealthy.weights_path
    assert kf.resume(run_dir, include_unhealthy=True).state.step == 400  # type: ignore[union-attr]
    loaded = kf.load_state(unhealthy.path)
    assert loaded.model.keys() == states[3].model.keys()
    for name, tensor in loaded.model.items():
        assert raw_bytes(tensor) == raw_bytes(states[3].model[name]), name
    assert any(t.is_floating_point() and t.isnan().any() for t in loaded.model.values())

    # Never published: "failed" with the typed error's reason (the loop goes on), nothing in the
    # ledger, nothing logged to W&B.
    for source in (unhealthy, unhealthy.path):
        refused = publish(source, run_name="ppo", run=offline_wandb)
        assert refused.status == "failed", refused
        assert refused.reason.startswith("UnhealthyCheckpointError") and "marked unhealthy" in (
            refused.reason
        )
    with pytest.raises(UnhealthyCheckpointError, match="marked unhealthy"):
        publishable(unhealthy)
    assert read_ledger(run_dir) == []
    # a pending publication of it (in the outbox) fails once, recorded, and is not retried
    append_ledger(run_dir, plan_publication(unhealthy, run_name="ppo").record("pending"))
    (flushed,) = flush_outbox(run_dir, run=offline_wandb)
    assert flushed.status == "failed" and "UnhealthyCheckpointError" in flushed.reason
    assert flush_outbox(run_dir, run=offline_wandb) == []
    published = publish(healthy, run_name="ppo", run=offline_wandb)
    assert published.status == "published"
    offline_wandb.finish()  # what W&B recorded: the healthy version only, so "latest" is it
    logged = wandb_records.artifacts(wandb_records.run_file(Path(offline_wandb.dir).parent))
    assert [a["name"] for a in logged] == ["ppo-checkpoint-ts200"]


def test_nan_weights_trained_on_the_background_saver_are_marked(tmp_path: Path) -> None:
    model = kf.build_model(SPEC, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with kf.AsyncSaver(tmp_path, health=HealthPolicy()) as saver:
        train_step(model, optimizer, torch.randn(2, 46, 9, 9))
        good = saver.save(kf.capture(SPEC, model, optimizer, step=1)).wait()
        train_step(model, optimizer, poisoned(2))
        bad = saver.save(kf.capture(SPEC, model, optimizer, step=2)).wait()
    assert good.healthy and good.health == ()
    assert not bad.healthy and bad.health is not None and bad.health[0].startswith("non_finite")
    assert kf.latest_checkpoint(tmp_path) == good.weights_path


def test_when_every_checkpoint_is_unhealthy_resume_refuses_to_start_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = kf.build_model(SPEC, seed=2)
    optimizer = torch.optim.Adam(model.parameters())
    train_step(model, optimizer, poisoned())
    ckpt = kf.Checkpointer(run_dir=tmp_path, interval=1, health=True)
    assert not ckpt.maybe_save(
        kf.capture(SPEC, model, optimizer, step=5), step=5, last_saved=0
    ).healthy

    assert kf.latest_checkpoint(tmp_path) is None
    assert "no healthy checkpoint_ts* checkpoint" in caplog.text
    with pytest.raises(
        CheckpointNotFoundError, match=r"refusing to start fresh silently.*unhealthy"
    ):
        kf.resume(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"marked unhealthy.*include_unhealthy=True"):
        kf.load_state(tmp_path)
    assert kf.resume(tmp_path, include_unhealthy=True).state.step == 5  # type: ignore[union-attr]
    assert kf.resume(tmp_path, resume="never") is None


# --- check_health ---------------------------------------------------------------------------


@st.composite
def finite_states(draw: st.DrawFn) -> kf.TrainState:
    """A state of 1-4 finite tensors of random shapes and floating dtypes, with an optimizer
    moment per tensor."""
    count = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    model, moments = {}, {}
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        model[f"layer{i}.weight"] = (torch.randn(shape, generator=gen) * 100).to(dtype)
        moments[i] = {"exp_avg": torch.randn(shape, generator=gen).to(dtype)}
    optimizer = {"state": moments, "param_groups": [{"lr": 0.1, "params": list(moments)}]}
    return kf.TrainState(spec=None, step=1, model=model, optimizer=optimizer)


@settings(max_examples=40, deadline=None)
@given(finite_states())
def test_a_finite_state_is_healthy(state: kf.TrainState) -> None:
    assert check_health(state, previous=state) == ()


@settings(max_examples=60, deadline=None)
@given(
    finite_states(),
    st.sampled_from(["model", "optimizer"]),
    st.integers(0, 3),
    st.integers(0, 10**6),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_one_non_finite_element_anywhere_makes_a_state_unhealthy(
    state: kf.TrainState, part: str, which: int, where: int, bad: float
) -> None:
    model = {k: v.clone() for k, v in state.model.items()}
    assert state.optimizer is not None
    moments = {i: {"exp_avg": m["exp_avg"].clone()} for i, m in state.optimizer["state"].items()}
    index = which % len(model)
    target = list(model.values())[index] if part == "model" else moments[index]["exp_avg"]
    target.view(-1)[where % target.numel()] = bad
    broken = state.replace(model=model, optimizer={**state.optimizer, "state": moments})

    (problem,) = check_health(broken, policy=NO_VALUE_CHECK)
    assert problem.check == "non_finite"
    name = f"model layer{index}.weight" if part == "model" else f"optimizer state.{index}.exp_avg"
    kind = "NaN" if math.isnan(bad) else "inf"
    assert f"{name} has 1 {kind} of {target.numel()} elements" in str(problem)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_finite_values_are_not_non_finite(dtype: torch.dtype) -> None:
    huge = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    state = kf.TrainState(
        spec=None, step=1, model={"w": huge}, optimizer={"state": {0: {"m": huge}}}
    )
    assert check_health(state, policy=NO_VALUE_CHECK) == ()
    assert math.isfinite(parameter_norm(state)) or dtype == torch.float64


def test_many_non_finite_tensors_are_named_up_to_five() -> None:
    model = {f"t{i}": torch.full((2,), math.nan) for i in range(8)}
    (problem,) = check_health(kf.TrainState(spec=None, step=1, model=model))
    assert str(problem).count("has 2 NaN") == 5 and "and 3 more tensors" in str(problem)


@pytest.mark.parametrize(
    ("factor", "flagged"), [(1.0, False), (3.9, False), (0.26, False), (4.1, True), (0.24, True)]
)
def test_a_parameter_norm_jump_beyond_the_ratio_is_flagged(factor: float, flagged: bool) -> None:
    before = kf.TrainState(spec=None, step=1, model={"w": torch.full((16,), 0.5)})  # norm 2
    after = before.replace(step=2, model={"w": before.model["w"] * factor})
    for previous in (before, parameter_norm(before)):
        problems = check_health(after, previous=previous, policy=NO_VALUE_CHECK)
        assert [p.check for p in problems] == (["norm_jump"] if flagged else [])
    assert check_health(after, policy=NO_VALUE_CHECK) == ()  # nothing to compare with
    assert check_health(after, previous=before, policy=HealthPolicy(max_norm_ratio=None)) == ()


def test_the_checkpointer_measures_the_jump_from_the_last_healthy_save(tmp_path: Path) -> None:
    ckpt = kf.Checkpointer(run_dir=tmp_path, interval=1, health=NO_VALUE_CHECK)

    def save(step: int, scale: float) -> kf.SaveResult:
        state = kf.TrainState(spec=None, step=step, model={"w": torch.ones(8) * scale})
        return ckpt.maybe_save(state, step=step, last_saved=step - 1)

    assert save(1, 1.0).healthy
    assert [p.check for p in save(2, 100.0).health] == ["norm_jump"]  # diverged
    assert [p.check for p in save(3, 100.0).health] == ["norm_jump"]  # still, vs step 1
    assert save(4, 2.0).healthy  # back near step 1
    assert (
        kf.latest_checkpoint(tmp_path) == tmp_path / kf.list_checkpoints(tmp_path)[-1].weights_file
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_saturated_value_head_is_flagged(dtype: torch.dtype) -> None:
    model = kf.build_model(SPEC, seed=3, dtype=dtype)
    state = kf.capture(SPEC, model, step=1)
    assert check_health(state) == ()
    with torch.no_grad():
        model.value_head[4].bias.fill_(50.0)  # type: ignore[index]
    (problem,) = check_health(kf.capture(SPEC, model, step=1))
    assert problem.check == "value_saturated"
    assert str(problem).startswith("value_saturated: |value| >= 3 on 5 of 5 evaluation positions")
    assert check_health(kf.capture(SPEC, model, step=1), policy=HealthPolicy(value_bound=60)) == ()


def test_the_value_check_is_skipped_without_a_spec_or_a_fitting_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keisei_fn.health")
    huge = {"value_head.4.bias": torch.tensor([1e6])}
    assert check_health(kf.TrainState(spec=None, step=1, model=huge)) == ()
    assert "no value-head check for a state without a spec" in caplog.text
    assert check_health(kf.TrainState(spec=SPEC, step=1, model=huge)) == ()
    assert "no value-head check: " in caplog.text


def test_health_problems_and_policies_read_well_and_refuse_nonsense() -> None:
    problem = HealthProblem("norm_jump", "parameter norm 8 is 4.1x")
    assert str(problem) == "norm_jump: parameter norm 8 is 4.1x"
    for bad in (
        {"max_norm_ratio": 1.0},
        {"max_norm_ratio": math.inf},
        {"value_bound": 0},
        {"saturated_fraction": 1.5},
        {"saturated_fraction": True},
        {"positions": "startpos"},
    ):
        with pytest.raises(SpecError):
            HealthPolicy(**bad)
    with pytest.raises(InvalidPositionError):
        HealthPolicy(positions=("9/9/9 b - 1",))
    with pytest.raises(SpecError, match="health must be"):
        kf.Checkpointer(run_dir="run", interval=1, health="yes")  # type: ignore[arg-type]
    assert kf.Checkpointer(run_dir="run", interval=1, health=True).health == HealthPolicy()


def test_followers_never_load_an_unhealthy_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = kf.ModelSpec(model_type="testmodel")
    model = kf.build_model(spec, seed=0)
    kf.save_state(kf.capture(spec, model, step=1), tmp_path, health=())
    nan = model.state_dict()
    nan["stem.weight"].fill_(math.nan)
    broken = kf.TrainState(spec=spec, step=2, model=nan)
    kf.save_state(broken, tmp_path, health=check_health(broken))
    worker = kf.build_model(spec, seed=1)
    followed = [m.step for m in kf.follow(tmp_path, worker, poll=0.01, timeout=0.05)]
    assert followed == [1]
    assert "skipping" in caplog.text and "UNHEALTHY: non_finite" in caplog.text
    assert not worker.stem.weight.isnan().any()  # type: ignore[union-attr]


def test_averaging_the_last_checkpoints_leaves_unhealthy_ones_out(tmp_path: Path) -> None:
    state = kf.TrainState(spec=None, step=1, model={"w": torch.ones(2)})
    kf.save_state(state, tmp_path, health=())
    kf.save_state(state.replace(step=2), tmp_path)  # not checked: healthy
    bad = check_health(state.replace(model={"w": torch.full((2,), math.inf)}))
    kf.save_state(state.replace(step=3), tmp_path, health=bad)
    assert [Path(p).name for p in kf.last_checkpoints(tmp_path, 2)] == [
        "checkpoint_ts1",
        "checkpoint_ts2",
    ]
    with pytest.raises(SpecError, match="2 usable"):
        kf.last_checkpoints(tmp_path, 3)


# --- the mark on disk ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["format_v1", "format_v2", "format_v3"])
def test_old_sidecars_without_a_mark_read_as_healthy(tmp_path: Path, version: str) -> None:
    run_dir = shutil.copytree(GOLDEN / version, tmp_path / version)
    (meta,) = kf.list_checkpoints(run_dir)
    assert meta.health is None and meta.healthy
    assert kf.latest_checkpoint(run_dir) == meta.weights_path
    assert kf.resume(run_dir) is not None


def test_a_mark_is_part_of_the_sidecar_and_its_digest(tmp_path: Path) -> None:
    state = kf.TrainState(spec=None, step=7, model={"w": torch.ones(3)})
    plain = kf.save_state(state, tmp_path)
    assert plain.health is None
    problems = check_health(state.replace(model={"w": torch.full((3,), math.nan)}))
    # the identical state re-saved with a mark: only the sidecar is rewritten
    marked = kf.save_state(state, tmp_path, health=problems)
    assert marked.weights_file == plain.weights_file and marked.health == tuple(map(str, problems))
    assert not kf.verify_checkpoint(tmp_path / "checkpoint_ts7").healthy
    assert kf.save_state(state, tmp_path).health == marked.health  # an unchecked save keeps it

    sidecar = tmp_path / "checkpoint_ts7.json"
    raw = sidecar.read_bytes()
    assert b'"health":["non_finite: ' in raw
    sidecar.write_bytes(
        raw.replace(raw[raw.index(b'"health":[') : raw.index(b'],"kind"') + 1], b'"health":[]')
    )
    with pytest.raises(IntegrityError, match="modified"):
        kf.verify_checkpoint(tmp_path / "checkpoint_ts7")
    assert kf.latest_checkpoint(tmp_path, include_unhealthy=True) is None  # corrupt: not listed


def test_a_malformed_mark_is_an_integrity_error() -> None:
    from keisei_fn.meta import build_sidecar, check_sidecar, dumps

    with pytest.raises(SpecError):
        build_sidecar({}, name="c_ts1", kind="periodic", tensors={}, aliases={},
                      weights_file="c_ts1.00aa00aa.safetensors", weights_size=0,
                      weights_digest="blake3:00", tensor_digests={}, health="nan")  # fmt: skip
    sidecar = build_sidecar(
        {"step": 1}, name="c_ts1", kind="periodic", tensors={}, aliases={},
        weights_file="c_ts1.00aa00aa.safetensors", weights_size=0, weights_digest="blake3:00",
        tensor_digests={}, health=[],
    )  # fmt: skip
    assert check_sidecar(dumps(sidecar))["health"] == []
    from keisei_fn.meta import seal

    with pytest.raises(IntegrityError, match="health mark"):
        check_sidecar(dumps(seal({**sidecar, "health": [1]})))


def test_retention_never_prunes_the_newest_healthy_checkpoint() -> None:
    def meta(step: int, health: tuple[str, ...] | None) -> CheckpointMeta:
        return listed_meta(step, run_dir="run", weights_size=10, created="?", health=health)

    bad = ("non_finite: model w has 1 NaN of 2 elements",)
    metas = [meta(1, ()), meta(2, None), meta(3, bad), meta(4, bad), meta(5, bad)]
    plan = kf.plan_prune(metas, kf.RetentionPolicy(keep_last=2, max_bytes=1))
    assert plan.keep == {
        "checkpoint_ts2": "newest healthy resume point",  # unchecked reads healthy
        "checkpoint_ts5": "newest checkpoint (unhealthy: kept, never resumed)",
    }
    assert plan.delete == ("checkpoint_ts1", "checkpoint_ts3", "checkpoint_ts4")


def test_ls_and_info_show_the_mark(tmp_path: Path) -> None:
    state = kf.TrainState(spec=None, step=1, model={"w": torch.ones(2)})
    kf.save_state(state, tmp_path)
    before = cli("ls", tmp_path)
    assert before.returncode == 0 and "health" not in before.stdout  # nothing was checked
    kf.save_state(state.replace(step=2), tmp_path, health=())
    bad = check_health(state.replace(step=3, model={"w": torch.tensor([1.0, math.nan])}))
    kf.save_state(state.replace(step=3), tmp_path, health=bad)

    listed = cli("ls", tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[-1] == "health"
    assert [row.split()[0] + " " + row.split("  ")[-1].strip() for row in rows] == [
        "checkpoint_ts1 -",
        "checkpoint_ts2 ok",
        "checkpoint_ts3 UNHEALTHY: non_finite",
    ]
    table = str(kf.list_checkpoints(tmp_path)).splitlines()  # a notebook's view: the same
    assert table[0].split()[-1] == "health" and table[-1].endswith("UNHEALTHY: non_finite")
    info = cli("info", tmp_path / "checkpoint_ts3")
    assert "health         UNHEALTHY: non_finite: model w has 1 NaN of 2 elements" in info.stdout
    assert cli("info", "--json", tmp_path / "checkpoint_ts3").stdout.count("non_finite") == 1
    # a run directory stands for its newest healthy checkpoint
    assert "checkpoint_ts2" in cli("info", tmp_path).stdout
    refused = cli("publish", tmp_path / "checkpoint_ts3", "--run-name", "ppo")
    assert refused.returncode == 2 and "marked unhealthy" in refused.stderr
