"""Publishing to W&B, against real wandb in offline mode (records read back from its run file)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from keisei_fn import GameStats, ModelSpec, build_model, capture, save_final_model, save_state
from keisei_fn.meta import CheckpointMeta
from keisei_fn.publish import (
    PublishResult,
    artifact_metadata,
    artifact_name,
    flush_outbox,
    plan_publication,
    publish,
    sanitize_metadata,
)
from keisei_fn.publish.plan import NAME_PATTERN
from keisei_fn.store import RetentionPolicy, pending_publications, prune, read_ledger

wandb = pytest.importorskip("wandb")
import wandb_records  # noqa: E402  (tests/ is on sys.path)
from wandb.errors import CommError, UsageError  # noqa: E402

RUN_NAME = "ppo-test"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Everything wandb writes goes under the test's temp dir; offline, silent, no network."""
    root = tmp_path / "wandb"
    root.mkdir()
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.delenv("KEISEI_FN_PUBLISH", raising=False)
    return root


class OfflineRun:
    """A real offline run; ``finish()`` then ``artifacts()`` reads back what wandb wrote."""

    def __init__(self, root: Path) -> None:
        self.run = wandb.init(project="keisei-fn-test", dir=str(root), mode="offline")
        self.files = Path(self.run.dir).parent

    def finish(self) -> None:
        self.run.finish()

    def artifacts(self) -> list[dict[str, Any]]:
        self.finish()
        return wandb_records.artifacts(wandb_records.run_file(self.files))


@pytest.fixture
def offline(wandb_dir):
    session = OfflineRun(wandb_dir)
    yield session
    session.finish()


class FlakyRun:
    """The real run, whose ``log_artifact`` raises the given errors first (one per call), and
    every call while ``down`` — a fault injector around the real thing."""

    def __init__(self, run: Any, errors: list[BaseException] = ()) -> None:
        self._run = run
        self.errors = list(errors)
        self.down = False
        self.calls = 0

    def log_artifact(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.down:
            raise CommError("W&B is unreachable")
        if self.errors:
            raise self.errors.pop(0)
        return self._run.log_artifact(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)


def tiny_checkpoint(run_dir: Path, step: int = 2048, **extra: Any) -> CheckpointMeta:
    """A real checkpoint of a tiny arbitrary model (no spec) with an Adam optimizer."""
    torch.manual_seed(step)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    state = capture(None, model, optimizer, step=step, episodes=step // 100, extra=extra)
    return save_state(state, run_dir)


def spec_checkpoint(run_dir: Path, *, final_model: bool = False) -> CheckpointMeta:
    """A checkpoint of Keisei's test network with a non-default feature set."""
    spec = ModelSpec(model_type="testmodel", input_features="testfeats")
    state = capture(
        spec,
        build_model(spec, seed=0),
        step=4096,
        episodes=40,
        stats=GameStats(black_wins=3, white_wins=2, draws=1),
    )
    return save_final_model(state, run_dir) if final_model else save_state(state, run_dir)


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def events(run_dir: Path) -> list[str]:
    return [r["event"] for r in read_ledger(run_dir)]


def staged_bytes(root: Path) -> int:
    staging = root / "artifacts" / "staging"
    return sum(p.stat().st_size for p in staging.iterdir()) if staging.exists() else 0


# --- what wandb records ----------------------------------------------------------------------


def test_publish_logs_both_files_with_aliases_and_metadata(tmp_path, offline, wandb_dir):
    history = {"losses": [0.5, float("nan")], "kl": [float("inf")]}
    meta = tiny_checkpoint(tmp_path / "run", 10240, metrics_history=history, win_rate=0.5)

    result = publish(meta, run_name="my run/..", run=offline.run, backoff=0)

    name = "my-run-checkpoint-ts10240"
    assert result == PublishResult(
        status="published",
        reason=result.reason,
        artifact_name=name,
        aliases=("ts-10240",),
        checkpoint="checkpoint_ts10240",
    )
    staged = staged_bytes(wandb_dir)
    (logged,) = offline.artifacts()
    assert logged["name"] == name and logged["type"] == "model"
    assert logged["aliases"] == {"ts-10240", "latest"}
    md = logged["metadata"]
    assert md["training_timesteps"] == 10240 and md["total_episodes"] == 102
    assert (md["black_wins"], md["white_wins"], md["draws"]) == (0, 0, 0)
    assert md["checkpoint_type"] == "periodic" and "training_completed" not in md
    assert md["weights_digest"] == meta.weights_digest and md["sidecar_digest"] == meta.digest
    assert md["extra"]["metrics_history"] == {"losses": [0.5, "nan"], "kl": ["inf"]}
    assert md["extra"]["win_rate"] == 0.5
    files = {p: meta.run_dir / p for p in (meta.weights_path.name, meta.sidecar_path.name)}
    assert set(logged["files"]) == set(files)
    for path_in_artifact, source in files.items():
        entry = logged["files"][path_in_artifact]
        assert entry["size"] == source.stat().st_size
        assert entry["digest"] == md5_b64(source)
        assert Path(entry["local_path"]).parent == wandb_dir / "artifacts" / "staging"
    # The chosen "mutable" policy: W&B stages one copy of each file until it is uploaded.
    assert staged == meta.weights_size + meta.sidecar_path.stat().st_size
    assert events(meta.run_dir) == ["pending", "published"]


def test_final_checkpoint_and_final_model_names(tmp_path, offline):
    run_dir = tmp_path / "run"
    final = save_state(capture(None, nn.Linear(2, 2), step=100), run_dir, kind="final")
    final_model = spec_checkpoint(run_dir, final_model=True)

    assert publish(final, run_name=RUN_NAME, run=offline.run).status == "published"
    assert publish(run_dir / "final_model.json", run_name=RUN_NAME).status == "published"

    checkpoint, model = offline.artifacts()
    assert checkpoint["name"] == f"{RUN_NAME}-final-checkpoint"
    assert checkpoint["aliases"] == {"latest-checkpoint", "latest"}
    assert checkpoint["metadata"]["checkpoint_type"] == "final"
    assert checkpoint["metadata"]["training_completed"] is True
    assert model["name"] == f"{RUN_NAME}-final-model"
    assert model["aliases"] == {"latest", "final"}
    assert set(model["files"]) == {final_model.weights_file, "final_model.json"}
    assert re.fullmatch(r"final_model\.[0-9a-f]+\.safetensors", final_model.weights_file)


def test_bug9_final_model_metadata_has_real_feature_set(tmp_path, offline):
    meta = spec_checkpoint(tmp_path / "run", final_model=True)
    assert artifact_metadata(meta)["feature_set"] == "testfeats"

    assert publish(meta, run_name=RUN_NAME, run=offline.run).status == "published"

    (logged,) = offline.artifacts()
    md = logged["metadata"]
    assert md["feature_set"] == "testfeats" != "core"
    assert md["model_type"] == "testmodel"
    assert md["spec"]["input_features"] == "testfeats"
    assert md["training_completed"] is True and md["checkpoint_type"] == "final"
    assert (md["black_wins"], md["white_wins"], md["draws"]) == (3, 2, 1)


def test_publishing_twice_logs_one_version(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    first = publish(meta, run_name=RUN_NAME, run=offline.run)
    again = publish(meta.weights_path, run_name=RUN_NAME, run=offline.run)

    assert first.status == again.status == "published"
    assert "already published" in again.reason
    assert len(offline.artifacts()) == 1


def test_more_than_100_metadata_keys_are_accepted(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    extra = {f"k{i:03d}": float(i) for i in range(150)} | {"bad": float("-inf")}

    assert publish(meta, run_name=RUN_NAME, run=offline.run, metadata=extra).status == "published"

    (logged,) = offline.artifacts()
    assert len(logged["metadata"]) == 100
    assert logged["metadata"]["overflow"]["bad"] == "-inf"


# --- failures, retries, the outbox -----------------------------------------------------------


def test_transient_errors_are_retried_with_backoff(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    flaky = FlakyRun(offline.run, [CommError("503"), ConnectionResetError("reset")])
    sleeps: list[float] = []

    result = publish(meta, run_name=RUN_NAME, run=flaky, sleep=sleeps.append)

    assert result.status == "published"
    assert flaky.calls == 3 and sleeps == [1.0, 2.0]
    assert len(offline.artifacts()) == 1
    assert events(meta.run_dir) == ["pending", "published"]


def test_queued_publication_survives_pruning_and_flushes_once(tmp_path, offline, wandb_dir):
    run_dir = tmp_path / "run"
    meta = tiny_checkpoint(run_dir, 1024)
    tiny_checkpoint(run_dir, 2048)
    flaky = FlakyRun(offline.run, [TimeoutError("slow")] * 3)

    result = publish(meta, run_name=RUN_NAME, run=flaky, backoff=0)

    assert result.status == "queued" and flaky.calls == 3
    assert events(run_dir) == ["pending"]
    assert staged_bytes(wandb_dir) == 0  # the failed attempt's staged copies are removed
    assert prune(run_dir, RetentionPolicy(keep_last=0)).delete == ()  # pending: protected
    # Another machine with a copy of the run directory drains the outbox.
    elsewhere = shutil.copytree(run_dir, tmp_path / "elsewhere" / "run")
    (flushed,) = flush_outbox(elsewhere, run=offline.run, backoff=0)
    assert flushed.status == "published" and flushed.artifact_name == result.artifact_name
    assert flush_outbox(elsewhere, run=offline.run) == []
    assert pending_publications(elsewhere) == {}
    assert prune(elsewhere, RetentionPolicy(keep_last=0)).delete == (meta.name,)
    (logged,) = offline.artifacts()
    assert logged["name"] == f"{RUN_NAME}-checkpoint-ts1024"
    assert logged["aliases"] == {"ts-1024", "latest"}


@pytest.mark.parametrize(
    "error",
    [ValueError("bad name"), UsageError("run is finished"), FileNotFoundError(2, "gone")],
    ids=["ValueError", "UsageError", "FileNotFoundError"],
)
def test_permanent_errors_fail_at_once_and_are_not_queued(tmp_path, offline, error):
    meta = tiny_checkpoint(tmp_path / "run")
    flaky = FlakyRun(offline.run, [error])

    result = publish(meta, run_name=RUN_NAME, run=flaky, backoff=0)

    assert result.status == "failed" and type(error).__name__ in result.reason
    assert flaky.calls == 1
    assert events(meta.run_dir) == ["pending", "failed"]
    assert flush_outbox(meta.run_dir, run=offline.run) == []
    assert offline.artifacts() == []


def test_missing_or_replaced_checkpoint_fails(tmp_path, offline):
    run_dir = tmp_path / "run"
    missing = publish(run_dir / "checkpoint_ts5", run_name=RUN_NAME)
    assert missing.status == "failed" and "CheckpointNotFoundError" in missing.reason
    meta = tiny_checkpoint(run_dir, 5)
    state = capture(None, nn.Linear(8, 4), step=5)
    assert save_state(state, run_dir, overwrite=True).weights_digest != meta.weights_digest
    replaced = publish(meta, run_name=RUN_NAME)
    assert replaced.status == "failed" and "replaced" in replaced.reason
    meta = tiny_checkpoint(run_dir, 6)
    meta.weights_path.unlink()
    incomplete = publish(meta, run_name=RUN_NAME)
    assert incomplete.status == "failed" and "IncompleteCheckpointError" in incomplete.reason
    assert offline.artifacts() == []


def test_flush_fails_a_pending_publication_whose_checkpoint_is_gone(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    flaky = FlakyRun(offline.run, [CommError("down")])
    assert publish(meta, run_name=RUN_NAME, run=flaky, retries=1).status == "queued"
    meta.sidecar_path.unlink()
    meta.weights_path.unlink()

    (result,) = flush_outbox(meta.run_dir, run=offline.run)

    assert result.status == "failed"
    assert events(meta.run_dir) == ["pending", "failed"]
    assert flush_outbox(meta.run_dir, run=offline.run) == []


def test_bug10_keyboard_interrupt_during_upload_propagates(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    flaky = FlakyRun(offline.run, [KeyboardInterrupt()])

    with pytest.raises(KeyboardInterrupt):
        publish(meta, run_name=RUN_NAME, run=flaky)

    assert events(meta.run_dir) == ["pending"]  # nothing lost: a later flush publishes it
    assert [r.status for r in flush_outbox(meta.run_dir, run=offline.run)] == ["published"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_bug10_interrupt_during_backoff_sleep_propagates(tmp_path, offline, wandb_dir, stop):
    meta = tiny_checkpoint(tmp_path / "run")
    flaky = FlakyRun(offline.run, [CommError("down")])

    def sleep(seconds: float) -> None:
        raise stop()

    with pytest.raises(stop):
        publish(meta, run_name=RUN_NAME, run=flaky, sleep=sleep)
    assert flaky.calls == 1
    assert staged_bytes(wandb_dir) == 0  # nothing was logged: W&B's staged copies are gone
    assert events(meta.run_dir) == ["pending"]


# --- skipping ------------------------------------------------------------------------------


def test_disabled_run_is_skipped(tmp_path, wandb_dir):
    meta = tiny_checkpoint(tmp_path / "run")
    run = wandb.init(mode="disabled")
    try:
        result = publish(meta, run_name=RUN_NAME)
    finally:
        run.finish()
    assert result.status == "skipped" and "disabled" in result.reason
    assert read_ledger(meta.run_dir) == []


def test_switch_and_missing_run_skip(tmp_path, wandb_dir, monkeypatch):
    meta = tiny_checkpoint(tmp_path / "run")
    assert wandb.run is None
    assert "no active W&B run" in publish(meta, run_name=RUN_NAME).reason
    run = wandb.init(project="keisei-fn-test", dir=str(wandb_dir))
    try:
        skipped = publish(meta, run_name=RUN_NAME, enabled=False)
        assert skipped.status == "skipped" and "switched off" in skipped.reason
        assert read_ledger(meta.run_dir) == []  # a skip records nothing
        flaky = FlakyRun(run, [CommError("down")])
        assert publish(meta, run_name=RUN_NAME, run=flaky, retries=1).status == "queued"
        monkeypatch.setenv("KEISEI_FN_PUBLISH", "0")
        assert publish(meta, run_name=RUN_NAME).status == "skipped"
        assert [r.status for r in flush_outbox(meta.run_dir)] == ["skipped"]
        assert events(meta.run_dir) == ["pending"]  # still waiting
        monkeypatch.setenv("KEISEI_FN_PUBLISH", "1")
        assert [r.status for r in flush_outbox(meta.run_dir)] == ["published"]
    finally:
        run.finish()


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_bug10_save_load_resume_and_publish_without_wandb(tmp_path):
    out = _python(
        f"""
        import sys

        class NoWandb:
            def find_spec(self, name, path=None, target=None):
                if name == "wandb" or name.startswith("wandb."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NoWandb())
        import torch
        import keisei_fn as kf
        from keisei_fn.publish import publish

        spec = kf.ModelSpec(model_type="testmodel")
        model = kf.build_model(spec, seed=0)
        meta = kf.save_state(kf.capture(spec, model, step=8), {str(tmp_path)!r})
        assert kf.load_state({str(tmp_path)!r}).step == 8
        assert kf.resume({str(tmp_path)!r}).state.step == 8
        result = publish(meta, run_name="r")
        print(result.status, "|", result.reason, "|", "wandb" in sys.modules)
        """
    )
    assert out == "skipped | wandb not installed | False"


def test_importing_and_saving_never_import_wandb(tmp_path):
    out = _python(
        f"""
        import sys
        import keisei_fn as kf, keisei_fn.publish
        spec = kf.ModelSpec(model_type="testmodel")
        kf.save_state(kf.capture(spec, kf.build_model(spec, seed=0), step=8), {str(tmp_path)!r})
        kf.load_state({str(tmp_path)!r})
        print("wandb" in sys.modules)
        """
    )
    assert out == "False"


# --- a training loop -------------------------------------------------------------------------


def test_training_loop_keeps_going_while_wandb_is_down(tmp_path, offline):
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    flaky = FlakyRun(offline.run)
    saved, statuses = [], []
    for step in range(1, 13):
        flaky.down = 3 <= step <= 7  # W&B unreachable for a while
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 2 == 0:
            meta = save_state(capture(None, model, optimizer, step=step * 100), run_dir)
            saved.append(meta.name)
            statuses += [r.status for r in flush_outbox(run_dir, run=flaky, backoff=0)]
            statuses.append(publish(meta, run_name=RUN_NAME, run=flaky, backoff=0).status)

    assert step == 12 and len(saved) == 6
    assert "queued" in statuses and statuses.count("published") == 6
    assert pending_publications(run_dir) == {}
    logged = [a["name"] for a in offline.artifacts()]
    expected = [f"{RUN_NAME}-{name.replace('_', '-')}" for name in saved]
    assert sorted(logged) == sorted(expected)  # every checkpoint exactly once


# --- names and metadata (pure) ---------------------------------------------------------------


# Arbitrary text, and text made of the characters that matter (dots, slashes, non-ASCII).
run_names = st.text(max_size=300) | st.text(alphabet="./-_aé\n\\", max_size=300)


@given(run_name=run_names, step=st.integers(min_value=1, max_value=10**30))
@example(run_name="../../etc/passwd\n", step=1)
@example(run_name="a" * 200 + "..", step=10240)
def test_artifact_names_are_safe_and_keep_the_step(run_name, step):
    name = artifact_name(run_name, f"checkpoint-ts{step}")
    assert NAME_PATTERN.fullmatch(name)
    assert name.endswith(f"-checkpoint-ts{step}")
    assert ".." not in name and "/" not in name
    wandb.Artifact(name, type="model")  # W&B accepts it


@given(run_name=run_names, alias=run_names)
def test_planned_names_and_aliases_are_safe(run_name, alias):
    meta = CheckpointMeta(
        path=Path("run/checkpoint_ts7"), name="checkpoint_ts7", format_version=1,
        kind="periodic", step=7, episodes=0, stats=GameStats(), spec=None, weights_size=1,
        weights_digest="blake3:00", digest="blake3:11", created="2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    plan = plan_publication(meta, run_name=run_name, aliases=[alias, "ts-7"])
    for name in (plan.artifact, plan.type, *plan.aliases):
        assert NAME_PATTERN.fullmatch(name) and ".." not in name
    assert plan.artifact.endswith("-checkpoint-ts7") and "ts-7" in plan.aliases


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=150))
def test_sanitized_metadata_is_what_wandb_keeps(metadata):
    safe = sanitize_metadata(metadata)
    assert len(safe) <= 100 and _finite(safe)
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert wandb.Artifact("x", type="model", metadata=safe).metadata == safe


def test_metadata_sanitizer_is_pure():
    metadata = {"h": [float("nan")], "n": 2**70, "t": (1, -0.0), 3: {"x": float("-inf")}}
    assert sanitize_metadata(metadata) == {
        "h": ["nan"], "n": str(2**70), "t": [1, -0.0], "3": {"x": "-inf"}
    }  # fmt: skip
    assert math.isnan(metadata["h"][0]) and metadata["n"] == 2**70 and metadata[3]["x"] < 0


def test_publish_and_flush_from_an_object_store_run_dir(offline, wandb_dir):
    """A run directory on an fsspec URL: the files W&B logs are byte-identical to the objects."""
    import uuid

    from keisei_fn.paths import run_path
    from keisei_fn.store import _fs

    url = f"memory://publish-test/{uuid.uuid4().hex}"
    meta = tiny_checkpoint(url, 1024)
    flaky = FlakyRun(offline.run, [TimeoutError("slow")] * 3)
    assert publish(meta, run_name=RUN_NAME, run=flaky, backoff=0).status == "queued"
    assert prune(url, RetentionPolicy(keep_last=0)).delete == ()  # pending: protected
    (flushed,) = flush_outbox(url, run=offline.run, backoff=0)
    assert flushed.status == "published" and events(url) == ["pending", "published"]
    (logged,) = offline.artifacts()
    for path in (meta.weights_path, meta.sidecar_path):
        data = _fs.read_bounded(run_path(str(path)), limit=1 << 30)
        entry = logged["files"][path.name]
        assert entry["size"] == len(data)
        assert entry["digest"] == base64.b64encode(hashlib.md5(data).digest()).decode()
