"""W&B organisation: evaluation metrics, Registry links, the ``best`` alias and S3 references,
against real wandb in offline mode (records read back from its run file).

What offline mode cannot record: a Registry link. With wandb 0.31, ``Run.link_artifact`` raises
``NotImplementedError`` offline (after logging the artifact a second time) and
``Artifact.link`` raises ``CommError``; so ``publish`` never asks an offline run to link, and the
offline tests check what is recorded: one artifact record, and the result and the ledger saying
the link was not made. The call an online run gets (``run.link_artifact(artifact, target)``
after ``log_artifact``, retried on transient errors) is checked with :class:`OnlineLinks`, the
real offline run wrapped to say it is online and to record link calls instead of making them:
no W&B server runs here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import GameStats
from keisei_fn.errors import SpecError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.publish import BestBy, flush_outbox, publish, registry_target
from keisei_fn.publish.registry import is_new_best
from keisei_fn.store import RetentionPolicy, list_checkpoints, plan_prune, prune, read_ledger

wandb = pytest.importorskip("wandb")
import cli_inprocess  # noqa: E402  (tests/ is on sys.path)
import test_publish  # noqa: E402
import wandb_records  # noqa: E402
from test_publish import (  # noqa: E402
    RUN_NAME,
    FlakyRun,
    events,
    spec_checkpoint,
    staged_bytes,
    tiny_checkpoint,
)
from wandb.errors import CommError  # noqa: E402
from wandb.sdk.artifacts._validators import ArtifactPath  # noqa: E402

# The fixtures of test_publish: everything wandb writes under the test's temp dir, offline.
wandb_dir = test_publish.wandb_dir
offline = test_publish.offline

TARGET = "wandb-registry-model/shogi"
BEST_TARGET = "my-org/wandb-registry-model/shogi-best"
BEST_ARTIFACT = f"{RUN_NAME}-best-checkpoint"


class OnlineLinks(FlakyRun):
    """The real offline run, saying it is online: its ``link_artifact`` raises the given
    errors first (one per call), then records ``(artifact name, target)`` — what W&B's server
    would link (an offline run cannot)."""

    offline = False

    def __init__(self, run: Any, link_errors: list[BaseException] = ()) -> None:
        super().__init__(run)
        self.link_errors = list(link_errors)
        self.links: list[tuple[str, str]] = []

    def link_artifact(self, artifact: Any, target_path: str) -> None:
        if self.link_errors:
            raise self.link_errors.pop(0)
        self.links.append((artifact.name, target_path))


def outcomes(run_dir: Any) -> list[dict[str, Any]]:
    return [r for r in read_ledger(run_dir) if r["event"] != "pending"]


# --- evaluation metrics ---------------------------------------------------------------------


def test_metrics_hold_stats_extra_numbers_and_match_results(tmp_path, offline):
    run_dir = tmp_path / "run"
    extra = {"win_rate": 0.25, "loss": float("nan"), "flag": True, "note": "x", "hist": [1.0]}
    first = tiny_checkpoint(run_dir, 100, **extra)
    second = tiny_checkpoint(run_dir, 200, **extra)
    matches = {"win_rate": 0.5, "elo": 1510}  # e.g. match results computed after the save

    assert publish(first, run_name=RUN_NAME, run=offline.run, metrics=matches).status == (
        "published"
    )
    down = FlakyRun(offline.run, [TimeoutError("slow")])
    assert publish(second, run_name=RUN_NAME, run=down, metrics=matches, retries=1).status == (
        "queued"
    )
    (flushed,) = flush_outbox(run_dir, run=offline.run)  # the metrics travel in the ledger
    assert flushed.status == "published"

    for logged in offline.artifacts():
        md = logged["metadata"]
        assert md["metrics"] == {
            "black_wins": 0, "white_wins": 0, "draws": 0,  # the checkpoint's stats
            "win_rate": 0.5, "loss": "nan", "elo": 1510,  # extra's numbers, then metrics=
        }  # fmt: skip
        assert md["extra"]["win_rate"] == 0.25  # the checkpoint's own extra is unchanged


@pytest.mark.parametrize(
    "kwargs",
    [
        {"link_to": "my-project/models"},
        {"link_to": "wandb-registry-model/shogi:prod"},
        {"link_to": "wandb-registry-model/../x"},
        {"metrics": {"elo": "1500"}},
        {"metrics": {"ok": True}},
        {"metrics": {f"m{i}": 1.0 for i in range(65)}},
        {"best": ("win_rate", "max")},
    ],
    ids=["project", "alias", "dots", "str-metric", "bool-metric", "too-many", "tuple-best"],
)
def test_malformed_arguments_raise_before_anything(tmp_path, offline, kwargs):
    meta = tiny_checkpoint(tmp_path / "run")
    with pytest.raises(SpecError):
        publish(meta, run_name=RUN_NAME, run=offline.run, **kwargs)
    assert read_ledger(meta.run_dir) == []
    assert offline.artifacts() == []


def test_best_by_checks_its_fields():
    for bad in (("", "max"), ("win_rate", "median"), ("win_rate", "max", "proj/coll")):
        with pytest.raises(SpecError):
            BestBy(*bad)


# --- Registry links -------------------------------------------------------------------------

_NAME_PART = r"[A-Za-z0-9_.-]{1,12}"


@given(st.from_regex(rf"({_NAME_PART}/)?wandb-registry-{_NAME_PART}/{_NAME_PART}", fullmatch=True))
def test_accepted_targets_are_what_wandb_calls_registry_paths(target):
    if ".." in target:
        with pytest.raises(SpecError):
            registry_target(target)
        return
    assert registry_target(target) == target
    assert ArtifactPath.from_str(target).is_registry_path()


@given(st.text(max_size=60) | st.text(alphabet="ab/:-wandb-registry", max_size=60))
def test_other_text_is_refused_unless_wandb_calls_it_a_registry_path(text):
    try:
        registry_target(text)
    except SpecError:
        return
    assert ArtifactPath.from_str(text).is_registry_path()


def test_offline_run_logs_the_artifact_once_and_records_the_link_as_not_made(tmp_path, offline):
    meta = spec_checkpoint(tmp_path / "run", final_model=True)

    result = publish(meta, run_name=RUN_NAME, run=offline.run, link_to=TARGET)

    assert result.status == "published" and result.linked == ()
    assert f"not linked to {TARGET}: W&B offline runs cannot link" in result.reason
    # One record: a link attempt offline would have logged the artifact a second time.
    (logged,) = offline.artifacts()
    assert logged["name"] == f"{RUN_NAME}-final-model"
    assert logged["aliases"] == {"latest", "final"}
    pending, published = read_ledger(meta.run_dir)
    assert pending["link_to"] == TARGET
    assert published["event"] == "published" and "linked" not in published
    assert published["unlinked"] == [f"{TARGET}: W&B offline runs cannot link (link after "
                                      "`wandb sync`)"]  # fmt: skip


def test_online_link_follows_the_log_and_retries_transient_errors(tmp_path, offline):
    meta = spec_checkpoint(tmp_path / "run", final_model=True)
    run = OnlineLinks(offline.run, [CommError("503")])
    sleeps: list[float] = []

    result = publish(meta, run_name=RUN_NAME, run=run, link_to=TARGET, sleep=sleeps.append)

    assert result.status == "published" and result.linked == (TARGET,)
    assert result.reason.endswith(f"; linked to {TARGET}")
    assert run.calls == 1 and sleeps == [1.0]  # logged once; only the link was retried
    assert run.links == [(f"{RUN_NAME}-final-model", TARGET)]
    assert outcomes(meta.run_dir)[0]["linked"] == [TARGET]
    assert len(offline.artifacts()) == 1


def test_link_failures_permanent_and_transient(tmp_path, offline):
    run_dir = tmp_path / "run"
    first, second = tiny_checkpoint(run_dir, 100), tiny_checkpoint(run_dir, 200)
    refused = OnlineLinks(offline.run, [PermissionError("not a member of the registry")])
    result = publish(first, run_name=RUN_NAME, run=refused, link_to=TARGET)
    # The artifact is logged: published, the link reported and recorded as not made.
    assert result.status == "published" and result.linked == ()
    assert "not linked to wandb-registry-model/shogi: PermissionError" in result.reason

    down = OnlineLinks(offline.run, [CommError("503")] * 2)
    queued = publish(second, run_name=RUN_NAME, run=down, link_to=TARGET, retries=2, backoff=0)
    assert queued.status == "queued" and events(run_dir)[-1] == "pending"
    (flushed,) = flush_outbox(run_dir, run=down)  # logged again (same contents), then linked
    assert flushed.status == "published" and flushed.linked == (TARGET,)
    assert down.links == [(f"{RUN_NAME}-checkpoint-ts200", TARGET)]
    logged = [a for a in offline.artifacts() if a["name"] == f"{RUN_NAME}-checkpoint-ts200"]
    assert len(logged) == 2 and logged[0]["digest"] == logged[1]["digest"]  # one W&B version


# --- the best alias -------------------------------------------------------------------------


def test_best_alias_moves_to_the_best_published_and_retention_keeps_it(tmp_path, offline):
    run_dir = tmp_path / "run"
    best = BestBy("win_rate", "max", link_to=BEST_TARGET)
    rates = {100: 0.3, 200: 0.5, 300: 0.4, 400: 0.5, 500: float("nan"), 600: 0.1}

    results = {
        step: publish(tiny_checkpoint(run_dir, step, win_rate=rate), run_name=RUN_NAME,
                      run=offline.run, best=best)
        for step, rate in rates.items()
    }  # fmt: skip

    assert all(r.status == "published" for r in results.values())
    assert [s for s, r in results.items() if r.best] == [100, 200, 400]  # a tie: the later
    assert "; best by win_rate (0.5): ppo-test-best-checkpoint (alias best)" in results[400].reason
    assert f"not linked to {BEST_TARGET}" in results[400].reason  # offline
    logged = offline.artifacts()
    versions = [a for a in logged if a["name"] == BEST_ARTIFACT]
    assert [a["aliases"] for a in versions] == [
        {"best", f"ts-{step}", "latest"} for step in (100, 200, 400)
    ]
    assert [a["metadata"]["best_by"] for a in versions] == [
        {"metric": "win_rate", "mode": "max", "value": v} for v in (0.3, 0.5, 0.5)
    ]
    (checkpoint,) = [a for a in logged if a["name"] == f"{RUN_NAME}-checkpoint-ts400"]
    assert versions[-1]["files"].keys() == checkpoint["files"].keys()
    for name, entry in versions[-1]["files"].items():
        assert entry["digest"] == checkpoint["files"][name]["digest"]  # the same bytes
    # keep_best agrees; and the checkpoint W&B's best names is never pruned
    metas = list_checkpoints(run_dir)
    by_keep_best = plan_prune(metas, RetentionPolicy(keep_last=0, keep_best=("win_rate", "max", 1)))
    assert by_keep_best.keep["checkpoint_ts400"] == "best 1 by win_rate (max)"
    plan = prune(run_dir, RetentionPolicy(keep_last=0))
    assert plan.keep == {
        "checkpoint_ts400": f"W&B best of {BEST_ARTIFACT}",
        "checkpoint_ts600": "newest resume point",
    }


def test_best_is_decided_when_delivered_and_by_metrics_too(tmp_path, offline):
    run_dir = tmp_path / "run"
    best = BestBy("win_rate")
    down = FlakyRun(offline.run, [CommError("down")])
    early = tiny_checkpoint(run_dir, 100, win_rate=0.6)
    assert publish(early, run_name=RUN_NAME, run=down, best=best, retries=1).status == "queued"
    assert publish(tiny_checkpoint(run_dir, 200, win_rate=0.7), run_name=RUN_NAME,
                   run=offline.run, best=best).best  # fmt: skip
    (late,) = flush_outbox(run_dir, run=offline.run)  # 0.6 < 0.7: published, not best
    assert late.status == "published" and not late.best
    # a match result given as metrics= ranks, whatever extra says
    matched = tiny_checkpoint(run_dir, 300, win_rate=0.1)
    assert publish(matched, run_name=RUN_NAME, run=offline.run, best=best,
                   metrics={"win_rate": 0.9}).best  # fmt: skip
    versions = [a for a in offline.artifacts() if a["name"] == BEST_ARTIFACT]
    assert [a["metadata"]["training_timesteps"] for a in versions] == [200, 300]


def eval_checkpoint(step: int, win_rate: float) -> CheckpointMeta:
    """A periodic checkpoint's meta (nothing on disk) under a name that is no resume point."""
    name = f"initial_eval_checkpoint_ts{step}"
    return CheckpointMeta(
        path=Path("run") / name, name=name, format_version=1, kind="periodic", step=step,
        episodes=0, stats=GameStats(), spec=None, weights_size=1, weights_digest="blake3:00",
        digest="blake3:11", created="2025-01-01T00:00:00+00:00", extra={"win_rate": win_rate},
    )  # fmt: skip


steps_and_values = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from([0.0, 0.5]) | st.floats() | st.just(math.nan)),
    max_size=12,
    unique_by=lambda sv: sv[0],
)


@settings(max_examples=200)
@given(steps_and_values, st.sampled_from(["max", "min"]))
def test_best_alias_in_any_publication_order_is_keep_bests_first(published, mode):
    best = BestBy("win_rate", mode)
    current = None
    for step, value in published:  # in publication order, not step order
        if is_new_best(value, step, current, best):
            current = {"best_metric": "win_rate", "best_mode": mode, "best_value": value,
                       "best_step": step}  # fmt: skip
    metas = [eval_checkpoint(step, value) for step, value in published]
    plan = plan_prune(metas, RetentionPolicy(keep_last=0, keep_best=("win_rate", mode, 1)))
    kept = [m.step for m in metas if m.name in plan.keep]
    assert kept == ([] if current is None else [current["best_step"]])


# --- references for s3:// run directories -----------------------------------------------------


def test_s3_checkpoints_are_published_as_references(s3_url, offline, wandb_dir):
    import fsspec

    fs = fsspec.filesystem("s3")
    referenced = tiny_checkpoint(s3_url, 100, win_rate=0.5)
    copied = tiny_checkpoint(s3_url, 200)

    result = publish(referenced, run_name=RUN_NAME, run=offline.run, best=BestBy("win_rate"))
    assert result.status == "published" and result.best
    assert staged_bytes(wandb_dir) == 0  # nothing downloaded, copied or staged
    assert publish(copied, run_name=RUN_NAME, run=offline.run, reference=False).status == (
        "published"
    )

    by_name = {a["name"]: a for a in offline.artifacts()}
    for name in (f"{RUN_NAME}-checkpoint-ts100", BEST_ARTIFACT):
        logged = by_name[name]
        assert logged["metadata"]["weights_digest"] == referenced.weights_digest  # ours, blake3
        assert logged["metadata"]["sidecar_digest"] == referenced.digest
        for path in (referenced.weights_path, referenced.sidecar_path):
            entry, info = logged["files"][path.name], fs.info(str(path))
            assert entry["ref"] == str(path) and entry["local_path"] == ""
            assert entry["digest"] == info["ETag"].strip('"') == entry["extra"]["etag"]
            assert entry["size"] == info["size"]
    for path in (copied.weights_path, copied.sidecar_path):
        entry = by_name[f"{RUN_NAME}-checkpoint-ts200"]["files"][path.name]
        assert entry["ref"] == "" and entry["local_path"]  # reference=False: a copy
        assert entry["size"] == fs.info(str(path))["size"]


# --- the ledger -----------------------------------------------------------------------------


def test_a_record_the_ledger_could_not_read_back_is_refused(tmp_path, offline):
    meta = tiny_checkpoint(tmp_path / "run")
    nested: dict[str, Any] = {"leaf": 1}
    for level in range(7):
        nested = {f"level{level}": nested}

    result = publish(meta, run_name=RUN_NAME, run=offline.run, metadata=nested)

    # Read back, the line would be skipped as corrupt: a queued publication would be lost.
    assert result.status == "failed" and "too big" in result.reason
    assert read_ledger(meta.run_dir) == [] and offline.artifacts() == []


# --- the command line -----------------------------------------------------------------------


def test_cli_publish_with_metrics_best_and_links(tmp_path, wandb_dir):
    meta = tiny_checkpoint(tmp_path / "run", 100, win_rate=0.5)
    args = ["publish", meta.path, "--run-name", RUN_NAME, "--metric", "elo=1510.5"]
    best = ["--best", "win_rate:max", "--best-link-to", BEST_TARGET]

    done = cli_inprocess.run(*args, "--link-to", TARGET, *best)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("published checkpoint_ts100 as ppo-test-checkpoint-ts100 ")
    assert "; best by win_rate (0.5): ppo-test-best-checkpoint (alias best)" in done.stdout
    assert f"not linked to {TARGET}" in done.stdout  # the CLI's run is offline
    (run_file,) = wandb_dir.rglob("run-*.wandb")
    logged = {a["name"]: a for a in wandb_records.artifacts(run_file)}
    assert logged[BEST_ARTIFACT]["metadata"]["metrics"]["elo"] == 1510.5
    for bad in (["--link-to", "proj/coll"], ["--best", "win_rate:median"], ["--metric", "elo"],
                ["--best-link-to", BEST_TARGET]):  # fmt: skip
        refused = cli_inprocess.run(*args, *bad)
        assert refused.returncode == 2 and "error" in refused.stderr, bad

    other = tiny_checkpoint(tmp_path / "run", 200)  # no win_rate: says so, rather than nothing
    unranked = cli_inprocess.run("publish", other.path, "--run-name", RUN_NAME, *best[:2])
    assert unranked.returncode == 0, unranked.stderr
    assert "; not ranked for best: win_rate missing" in unranked.stdout
