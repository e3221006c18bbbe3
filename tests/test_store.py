"""The checkpoint store through real files: round trips, save semantics, listing, latest, load,
resume, retention, the loop-facing Checkpointer, and Keisei's bugs 1, 2, 3, 4, 5, 8 and 11."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import (
    Checkpointer,
    GameStats,
    ModelSpec,
    RetentionPolicy,
    TrainState,
    build_model,
    capture,
    checkpoint_due,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_state,
    plan_prune,
    prune,
    resume,
    round_interval,
    save_final_model,
    save_state,
    verify_checkpoint,
)
from keisei_fn.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    SpecError,
    UnsupportedFormatError,
)
from keisei_fn.meta import CheckpointMeta
from keisei_fn.store import append_ledger, scan_run_dir
from keisei_fn.store.names import checkpoint_stem, parse_stem
from keisei_fn.store.retention import FUTURE_TOLERANCE
from keisei_fn.testing import (
    assert_roundtrip,
    assert_states_equal,
    checkpoint_metas,
    fresh_run_dir,
    train_states,
)
from tests.saved_states import listed_meta

TINY = ModelSpec(model_type="resnet", tower_depth=1, tower_width=4, se_ratio=0, num_actions=8)


def small_state(step: int, *, seed: int = 0, **changes: object) -> TrainState:
    gen = torch.Generator().manual_seed(seed)
    state = TrainState(
        spec=None,
        step=step,
        episodes=step // 10,
        stats=GameStats(black_wins=seed),
        model={"w": torch.randn(3, 2, generator=gen), "b": torch.zeros(2)},
        extra={"seed": seed},
    )
    return state.replace(**changes)


def files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """name → (inode, mtime_ns) of every file in the directory."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())}


def steps(run_dir: Path) -> list[int]:
    return [m.step for m in list_checkpoints(run_dir)]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with fresh_run_dir() as path:
        yield path


# --- round trip -------------------------------------------------------------------------------


@settings(deadline=None)
@given(train_states())
def test_store_round_trip_is_bit_exact(state: TrainState) -> None:
    with fresh_run_dir() as run_dir:
        loaded = assert_roundtrip(state, run_dir=run_dir)
        assert list(loaded.model) == list(state.model)
        assert verify_checkpoint(run_dir / f"checkpoint_ts{state.step}").step == state.step


def test_tied_parameters_come_back_shared(run_dir: Path) -> None:
    w = torch.randn(4, 3)
    state = TrainState(
        spec=None,
        step=5,
        model={"embed.weight": w, "lm_head.weight": w, "view": w[1:]},
        optimizer={"state": {0: {"exp_avg": w}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    )
    loaded = assert_roundtrip(state, run_dir=run_dir)
    assert loaded.model["embed.weight"] is loaded.model["lm_head.weight"]
    assert loaded.optimizer is not None
    assert loaded.optimizer["state"][0]["exp_avg"] is loaded.model["embed.weight"]
    assert loaded.model["view"].data_ptr() != loaded.model["embed.weight"].data_ptr()


def test_noncontiguous_inputs_are_stored_by_value(run_dir: Path) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    model = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1],
        "expanded": torch.tensor([1.5, -0.0]).expand(3, 2),
        "one_element_stride_2": torch.arange(2, dtype=torch.int16)[::2],
        "empty_view": base[:, :0],
        "scalar": torch.tensor(float("nan"), dtype=torch.bfloat16),
    }
    loaded = assert_roundtrip(TrainState(spec=None, step=1, model=model), run_dir=run_dir)
    assert all(t.is_contiguous() for t in loaded.model.values())


def test_a_keisei_model_round_trips_and_restores(run_dir: Path) -> None:
    model = build_model(TINY, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 46, 9, 9))[0].sum().backward()
    optimizer.step()
    state = capture(TINY, model, optimizer, step=2048, episodes=3)
    loaded = assert_roundtrip(state, run_dir=run_dir)
    net, meta = load_model(run_dir)
    assert meta.step == 2048 and meta.spec == TINY and not net.training
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, loaded.model[key])


# --- save_state semantics ------------------------------------------------------------------


def test_identical_resave_writes_nothing_and_returns_the_same_meta(run_dir: Path) -> None:
    state = small_state(100)
    first = save_state(state, run_dir)
    before = files(run_dir)
    again = save_state(small_state(100), run_dir)  # equal, not the same object
    assert again == first
    assert files(run_dir) == before


def test_final_over_identical_periodic_rewrites_only_the_sidecar(run_dir: Path) -> None:
    state = small_state(100)
    periodic = save_state(state, run_dir)
    before = files(run_dir)
    final = save_state(state, run_dir, kind="final")
    after = files(run_dir)
    assert final.kind == "final" and periodic.kind == "periodic"
    assert final.weights_digest == periodic.weights_digest
    assert final.weights_file == periodic.weights_file
    assert after[periodic.weights_file] == before[periodic.weights_file]
    assert after["checkpoint_ts100.json"] != before["checkpoint_ts100.json"]
    assert set(after) == set(before)
    # and a later periodic save of the same state keeps it final, writing nothing
    assert save_state(state, run_dir) == final
    assert files(run_dir) == after


@pytest.mark.parametrize(
    "changes",
    [
        {"model": {"w": torch.ones(3, 2), "b": torch.zeros(2)}},
        {"extra": {"seed": True}},  # 0 == False, 1 == True: equal in Python, not the same
        {"extra": {"seed": 0.0}},
        {"episodes": 11},
        {"stats": GameStats(draws=1)},
    ],
)
def test_a_different_state_at_the_same_step_is_refused(run_dir: Path, changes: dict) -> None:
    original = small_state(100)
    save_state(original, run_dir)
    before = files(run_dir)
    different = original.replace(**changes)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        save_state(different, run_dir)
    assert files(run_dir) == before
    assert_states_equal(original, load_state(run_dir))
    replaced = save_state(different, run_dir, overwrite=True)
    assert_states_equal(different, load_state(run_dir))
    assert sorted(os.listdir(run_dir)) == sorted(["checkpoint_ts100.json", replaced.weights_file])


def test_sign_of_zero_in_a_tensor_is_a_different_state(run_dir: Path) -> None:
    save_state(small_state(1, model={"z": torch.tensor([0.0])}), run_dir)
    with pytest.raises(CheckpointExistsError):
        save_state(small_state(1, model={"z": torch.tensor([-0.0])}), run_dir)


def test_step_zero_is_refused(run_dir: Path) -> None:
    with pytest.raises(SpecError, match="step > 0"):
        save_state(small_state(0), run_dir)
    with pytest.raises(SpecError, match="kind"):
        save_state(small_state(1), run_dir, kind="final_model")
    assert list(run_dir.iterdir()) == []


def test_save_creates_the_run_directory(run_dir: Path) -> None:
    nested = run_dir / "a" / "b"
    meta = save_state(small_state(7), nested)
    assert meta.weights_path == nested / meta.weights_file
    assert re.fullmatch(r"checkpoint_ts7\.[0-9a-f]+\.safetensors", meta.weights_file)
    assert meta.weights_path.is_file()
    assert meta.sidecar_path.is_file() and meta.run_dir == nested


# --- load by file, stem or directory -------------------------------------------------------


@pytest.mark.parametrize("name", ["run", "run.v1.2", "exp.final.pth"])
@pytest.mark.parametrize("form", ["weights", "sidecar", "stem", "stem-str", "run_dir"])
def test_load_by_file_stem_or_run_dir(name: str, form: str) -> None:
    with fresh_run_dir(name=name) as run_dir:
        state = small_state(300, seed=3)
        save_state(small_state(100), run_dir)
        meta = save_state(state, run_dir)
        source = {
            "weights": meta.weights_path,
            "sidecar": meta.sidecar_path,
            "stem": meta.path,
            "stem-str": str(meta.path),
            "run_dir": run_dir,
        }[form]
        assert_states_equal(state, load_state(source))


def test_load_state_errors(run_dir: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_state(run_dir / "missing")
    with pytest.raises(CheckpointNotFoundError, match="no valid checkpoint_ts"):
        load_state(run_dir)  # exists, empty
    with pytest.raises(CheckpointNotFoundError):
        load_state(run_dir / "checkpoint_ts5.safetensors")
    with pytest.raises(CheckpointNotFoundError):
        load_state(run_dir / "checkpoint_ts5.pth")
    legacy = run_dir / "checkpoint_ts5.pth"
    legacy.write_bytes(b"\x80\x02pickled")
    with pytest.raises(UnsupportedFormatError, match="import_legacy"):
        load_state(legacy)
    assert isinstance(UnsupportedFormatError(), ValueError)


def test_load_state_on_a_missing_run_dir_raises(run_dir: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_state(run_dir / "never-created")


# --- listing and latest ---------------------------------------------------------------------


def test_bug2_latest_is_the_highest_valid_step_not_mtime_name_or_pth(run_dir: Path) -> None:
    metas = {step: save_state(small_state(step), run_dir) for step in (30, 100, 20, 9)}
    # mtimes say step 9 is newest; name order says checkpoint_ts9 > checkpoint_ts30 > ...100
    for i, step in enumerate((100, 30, 20, 9)):
        for path in (metas[step].weights_path, metas[step].sidecar_path):
            os.utime(path, ns=(i * 10**9, i * 10**9))
    # not resume points: other prefixes, the final model, stray pickles, a bare temp file
    initial_eval = save_state(small_state(500), run_dir, prefix="initial_eval_checkpoint_ts")
    save_final_model(small_state(600), run_dir)
    (run_dir / "checkpoint_ts900.pth").write_bytes(b"junk")
    (run_dir / "checkpoint_ts901.pt").write_bytes(b"junk")
    (run_dir / "final_model.pth").write_bytes(b"junk")
    (run_dir / ".checkpoint_ts950.json.1234.tmp").write_bytes(b"{")
    assert latest_checkpoint(run_dir) == metas[100].weights_path
    assert latest_checkpoint(run_dir, prefix="initial_eval_checkpoint_ts") == (
        initial_eval.weights_path
    )
    assert load_state(run_dir).step == 100


def test_latest_skips_an_invalid_newest_and_ignores_incomplete(run_dir: Path) -> None:
    save_state(small_state(10), run_dir)
    newest_valid = save_state(small_state(20), run_dir)
    (run_dir / "checkpoint_ts30.safetensors").write_bytes(b"orphan weights, no sidecar")
    (run_dir / "checkpoint_ts40.0123456789abcdef.safetensors").write_bytes(b"orphan weights")
    bad = save_state(small_state(25), run_dir)
    bad.sidecar_path.write_bytes(bad.sidecar_path.read_bytes()[:-1])
    assert latest_checkpoint(run_dir) == newest_valid.weights_path
    assert steps(run_dir) == [10, 20]


def test_latest_of_a_missing_or_empty_run_dir_is_none(run_dir: Path) -> None:
    assert latest_checkpoint(run_dir) is None
    assert latest_checkpoint(run_dir / "missing") is None
    assert list_checkpoints(run_dir / "missing") == []


def test_list_checkpoints_is_sorted_by_step_with_every_kind(run_dir: Path) -> None:
    for step in (512, 64, 4096, 8):
        save_state(small_state(step), run_dir)
    save_state(small_state(1000), run_dir, prefix="initial_eval_checkpoint_ts")
    save_state(small_state(5000), run_dir, kind="final")
    save_final_model(small_state(5000), run_dir)
    metas = list_checkpoints(run_dir)
    assert [(m.step, m.kind) for m in metas] == [
        (8, "periodic"),
        (64, "periodic"),
        (512, "periodic"),
        (1000, "periodic"),
        (4096, "periodic"),
        (5000, "final"),
        (5000, "final_model"),
    ]
    scan = scan_run_dir(run_dir)
    assert scan.invalid == [] and scan.leftovers == [] and scan.unreadable == []


# --- resume ----------------------------------------------------------------------------------


def test_resume_latest_never_and_fresh(run_dir: Path) -> None:
    assert resume(run_dir) is None  # nothing anywhere: a fresh start
    save_state(small_state(10), run_dir)
    newest = small_state(20, seed=2)
    newest_meta = save_state(newest, run_dir)
    for how in ("latest", None, True):
        resumed = resume(run_dir, resume=how)
        assert resumed is not None and resumed.path == newest_meta.weights_path
        assert_states_equal(newest, resumed.state)
    assert resume(run_dir, resume="never") is None
    assert resume(run_dir, resume=False) is None


def test_resume_an_explicit_path_loads_exactly_that(run_dir: Path) -> None:
    older = small_state(10, seed=5)
    meta = save_state(older, run_dir)
    save_state(small_state(20), run_dir)
    resumed = resume(run_dir, resume=meta.weights_path)
    assert resumed is not None and resumed.path == meta.weights_path
    assert_states_equal(older, resumed.state)


def test_bug4_a_mistyped_resume_path_raises(run_dir: Path) -> None:
    save_state(small_state(10), run_dir)
    for typo in ("checkpoint_ts1O.safetensors", "lastest", "checkpoint_ts10.pth"):
        with pytest.raises(CheckpointNotFoundError):
            resume(run_dir, resume=run_dir / typo)
    with pytest.raises(CheckpointNotFoundError):
        resume(run_dir, resume="lastest")


def test_resume_searches_the_parent_and_copies_the_pair(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent_state = small_state(2048, seed=9)
    save_state(small_state(1024), run_dir.parent)
    parent_meta = save_state(parent_state, run_dir.parent)
    with caplog.at_level(logging.WARNING, logger="keisei_fn.store"):
        resumed = resume(run_dir)
    assert resumed is not None
    assert resumed.path == run_dir / parent_meta.weights_file
    assert resumed.copied_from == parent_meta.weights_path  # where it came from, visibly
    assert_states_equal(parent_state, resumed.state)
    assert "parent" in caplog.text and str(parent_meta.weights_path) in caplog.text
    assert sorted(os.listdir(run_dir)) == sorted(
        ["checkpoint_ts2048.json", parent_meta.weights_file]
    )
    assert resume(run_dir / "other", search_parent=False) is None
    again = resume(run_dir)  # the copy is now the run directory's own checkpoint
    assert again is not None and again.copied_from is None


def test_resume_falls_back_past_a_corrupt_newest(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = small_state(10, seed=1)
    good_meta = save_state(good, run_dir)
    bad = save_state(small_state(20, seed=2), run_dir)
    _flip_last_byte(bad.weights_path)
    assert latest_checkpoint(run_dir) == bad.weights_path  # listed-valid: same size
    with caplog.at_level(logging.WARNING, logger="keisei_fn.store"):
        resumed = resume(run_dir)
    assert resumed is not None and resumed.path == good_meta.weights_path
    assert_states_equal(good, resumed.state)
    assert "checkpoint_ts20" in caplog.text and "digest" in caplog.text


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def _flip_first_byte_of(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"][0]
    raw[8 + header_len + begin] ^= 0x01
    path.write_bytes(bytes(raw))


def test_bug3_a_failed_load_raises_never_a_silent_fresh_start(run_dir: Path) -> None:
    meta = save_state(capture(TINY, build_model(TINY, seed=0), step=64), run_dir)
    _flip_last_byte(meta.weights_path)
    with pytest.raises(IntegrityError, match=re.escape(meta.weights_file)):
        load_state(meta.weights_path)
    with pytest.raises(IntegrityError):
        verify_checkpoint(meta.path)
    with pytest.raises(CheckpointNotFoundError, match="refusing to start fresh"):
        resume(run_dir)
    with pytest.raises(IntegrityError):
        resume(run_dir, resume=meta.weights_path)
    # load_model reads and verifies only the model's tensors: the flipped byte (the RNG
    # state's, last in the file) is not among them; a flipped model byte is refused
    loaded, _ = load_model(run_dir)
    original = build_model(TINY, seed=0)
    assert_states_equal(
        capture(TINY, loaded, step=0, rng=False), capture(TINY, original, step=0, rng=False)
    )
    _flip_first_byte_of(meta.weights_path, "model/stem.weight")
    with pytest.raises(CheckpointNotFoundError):
        load_model(run_dir)
    with pytest.raises(IntegrityError, match=re.escape("model/stem.weight")):
        load_model(meta.path)


def test_bug11_elo_and_metrics_survive_resume(run_dir: Path) -> None:
    extra = {
        "elo_state": {
            "black_rating": 1523.5,
            "white_rating": 1476.5,
            "initial_rating": 1500.0,
            "k_factor": 32.0,
            "rating_history": [{"black": 1516.0, "white": 1484.0}, {"black": 1523.5}],
        },
        "metrics_history": {
            "policy_losses": [0.5, float("nan"), 0.25],
            "learning_rates": [3e-4, 3e-4],
            "win_rates": [{"black": 0.5, "white": 0.25, "draw": 0.25}],
            "episode_lengths": [],
        },
    }
    model = build_model(TINY, seed=0)
    state = capture(TINY, model, torch.optim.Adam(model.parameters()), step=10240, extra=extra)
    save_state(state, run_dir)
    resumed = resume(run_dir)
    assert resumed is not None
    assert_states_equal(state, resumed.state)
    assert resumed.state.extra["elo_state"]["rating_history"][1] == {"black": 1523.5}
    assert list_checkpoints(run_dir)[0].extra["elo_state"]["k_factor"] == 32.0


# --- load_model ------------------------------------------------------------------------------


def test_load_model_on_a_run_dir_prefers_the_final_model(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    periodic = capture(TINY, build_model(TINY, seed=1), step=4096)
    final = capture(TINY, build_model(TINY, seed=2), step=2048)
    save_state(periodic, run_dir)
    meta = save_final_model(final, run_dir)
    net, loaded_meta = load_model(run_dir)
    assert loaded_meta.kind == "final_model" and loaded_meta.name == "final_model"
    assert torch.equal(net.state_dict()["stem.weight"], final.model["stem.weight"])
    _flip_last_byte(meta.weights_path)
    with caplog.at_level(logging.WARNING, logger="keisei_fn.store"):
        net, loaded_meta = load_model(run_dir)
    assert loaded_meta.name == "checkpoint_ts4096" and "final model" in caplog.text
    assert torch.equal(net.state_dict()["stem.weight"], periodic.model["stem.weight"])


def test_load_model_refuses_a_state_without_spec(run_dir: Path) -> None:
    save_state(small_state(1), run_dir)
    with pytest.raises(SpecError, match="load_state"):
        load_model(run_dir)


# --- retention -------------------------------------------------------------------------------

NOWHERE = Path("/nonexistent-keisei-fn-run")
PREFIXES = ("checkpoint_ts", "checkpoint_tsx", "initial_eval_checkpoint_ts")
policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(0, 4),
    keep_every=st.none() | st.sampled_from([2, 3, 100]),
    keep_best=st.none()
    | st.tuples(st.just("win_rate"), st.sampled_from(["max", "min"]), st.integers(1, 3)),
    keep_within=st.none() | st.timedeltas(timedelta(seconds=1), timedelta(days=400 * 365)),
    keep_hourly=st.none() | st.integers(1, 4),
    keep_daily=st.none() | st.integers(1, 4),
    max_bytes=st.none() | st.integers(1, 4 * 10**9),
)
meta_lists = st.lists(
    checkpoint_metas(run_dir=NOWHERE, prefixes=PREFIXES, steps=st.integers(1, 30)),
    max_size=12,
    unique_by=lambda m: m.name,
)


def _newest_resume_point(metas: list[CheckpointMeta]) -> str | None:
    resumable = [
        m
        for m in metas
        if m.kind != "final_model" and (p := parse_stem(m.name)) and p.prefix == "checkpoint_ts"
    ]
    return max(resumable, key=lambda m: m.step).name if resumable else None


@pytest.mark.filterwarnings("ignore:RetentionPolicy. keep_last=None")
@settings(deadline=None, max_examples=200)
@given(meta_lists, policies, st.data())
def test_plan_prune_properties(
    metas: list[CheckpointMeta], policy: RetentionPolicy, data: st.DataObject
) -> None:
    names = [m.name for m in metas]
    protected = set(data.draw(st.lists(st.sampled_from(names)))) if names else set()
    now = data.draw(st.datetimes(timezones=st.just(UTC)))
    plan = plan_prune(metas, policy, protected=protected, now=now)
    assert [m.name for m in metas] == names  # pure
    keep, delete = set(plan.keep), set(plan.delete)
    assert keep | delete == set(names) and not keep & delete
    assert len(plan.delete) == len(delete)
    always = set(protected)
    always |= {m.name for m in metas if m.kind in ("final", "final_model")}
    if (newest := _newest_resume_point(metas)) is not None:
        always.add(newest)
    assert always <= keep, plan
    # ties (one step, several prefixes) by name, as plan_prune orders them
    periodic = sorted((m for m in metas if m.kind == "periodic"), key=lambda m: (m.step, m.name))
    wanted = set()
    if policy.keep_last is None:
        wanted |= {m.name for m in periodic}
    elif policy.keep_last:
        wanted |= {m.name for m in periodic[-policy.keep_last :]}
    if policy.keep_every:
        wanted |= {m.name for m in periodic if m.step % policy.keep_every == 0}
    if policy.keep_best:
        metric, mode, k = policy.keep_best
        scored = [m for m in periodic if not math.isnan(m.extra.get(metric, math.nan))]
        sign = 1 if mode == "max" else -1
        scored.sort(key=lambda m: (sign * m.extra[metric], m.step), reverse=True)  # ties: newer
        wanted |= {m.name for m in scored[:k]}
    created = {m.name: datetime.fromisoformat(m.created) for m in periodic}
    created = {n: t for n, t in created.items() if t - now <= FUTURE_TOLERANCE}  # clock skew
    if policy.keep_within:
        wanted |= {n for n, t in created.items() if now - t <= policy.keep_within}
    for count, fields in ((policy.keep_hourly, 4), (policy.keep_daily, 3)):
        if count:
            newest: dict[tuple[int, ...], CheckpointMeta] = {}
            for m in (m for m in periodic if m.name in created):  # step order; newest time
                t = created[m.name]  # wins, ties by step, then the first
                key = (t.year, t.month, t.day, t.hour)[:fields]
                if key not in newest or (created[m.name], m.step) > (
                    created[newest[key].name],
                    newest[key].step,
                ):
                    newest[key] = m
            wanted |= {newest[key].name for key in sorted(newest)[-count:]}
    by_size = {m.name: m.total_bytes for m in metas}
    if policy.max_bytes is None:
        assert wanted <= keep
        assert keep == wanted | always
    else:
        total = sum(by_size[n] for n in keep)
        assert total <= policy.max_bytes or keep <= always
        assert keep <= wanted | always
        # what max_bytes dropped is older than everything it kept of the same rules
        dropped = (wanted - always) - keep
        kept_by_rule = (wanted - always) & keep
        step = {m.name: (m.step, m.name) for m in metas}
        if dropped and kept_by_rule:
            assert max(step[n] for n in dropped) < min(step[n] for n in kept_by_rule)


def test_total_bytes_is_what_a_checkpoint_takes_on_disk(run_dir: Path) -> None:
    saved = save_state(small_state(10), run_dir)
    on_disk = sum(p.stat().st_size for p in run_dir.glob("checkpoint_ts10.*"))
    assert saved.total_bytes == on_disk == list_checkpoints(run_dir)[0].total_bytes
    kept = plan_prune(list_checkpoints(run_dir), RetentionPolicy(max_bytes=on_disk)).keep
    assert "checkpoint_ts10" in kept


def test_plan_prune_rules_by_example() -> None:
    def meta(step: int, kind: str = "periodic", **extra: float) -> CheckpointMeta:
        return listed_meta(step, kind=kind, run_dir=NOWHERE, format_version=1, extra=extra)

    metas = [meta(s, win_rate=s / 100 if s != 30 else 0.99) for s in (10, 20, 30, 40, 50, 60)]
    metas.append(meta(70, "final_model"))
    plan = plan_prune(metas, RetentionPolicy(keep_last=2, keep_every=20))
    assert sorted(plan.delete) == ["checkpoint_ts10", "checkpoint_ts30"]
    plan = plan_prune(metas, RetentionPolicy(keep_last=0, keep_best=("win_rate", "max", 1)))
    assert set(plan.keep) == {"checkpoint_ts30", "checkpoint_ts60", "final_model"}
    plan = plan_prune(metas, RetentionPolicy(max_bytes=300))
    assert set(plan.keep) == {"checkpoint_ts50", "checkpoint_ts60", "final_model"}
    plan = plan_prune(metas, RetentionPolicy(keep_last=0), protected={"checkpoint_ts20"})
    assert plan.keep["checkpoint_ts20"] == "pending publication"
    assert plan.keep["checkpoint_ts60"] == "newest resume point"


def test_prune_removes_leftovers_and_respects_pending_publications(run_dir: Path) -> None:
    metas = {step: save_state(small_state(step, seed=step), run_dir) for step in range(1, 7)}
    append_ledger(
        run_dir,
        {"event": "pending", "artifact": "run-ckpt2", "digest": metas[2].weights_digest,
         "checkpoint": "checkpoint_ts2"},
    )  # fmt: skip
    for event in ("pending", "published"):
        append_ledger(
            run_dir,
            {"event": event, "artifact": "run-ckpt3", "digest": metas[3].weights_digest,
             "checkpoint": "checkpoint_ts3"},
        )  # fmt: skip
    leftovers = [
        run_dir / ".checkpoint_ts7.safetensors.0a1b2c3d4e5f.tmp",
        run_dir / ".checkpoint_ts7.json.ffeeddccbbaa.tmp",
        run_dir / "checkpoint_ts8.safetensors",  # weights whose sidecar never came
        run_dir / "checkpoint_ts8.0123456789abcdef.safetensors",  # the same, format 3
        run_dir / "checkpoint_ts2.fedcba9876543210.safetensors",  # not named by ts2's sidecar
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    broken = save_state(small_state(9), run_dir)
    broken.sidecar_path.write_bytes(broken.sidecar_path.read_bytes()[:100])  # torn sidecar
    strays = [run_dir / "notes.txt", run_dir / "checkpoint_ts3.pth", run_dir / "publications.jsonl"]
    strays[0].write_text("mine")
    strays[1].write_bytes(b"legacy")

    dry = prune(run_dir, RetentionPolicy(keep_last=1), dry_run=True)
    assert all(p.exists() for p in leftovers)
    plan = prune(run_dir, RetentionPolicy(keep_last=1))
    assert plan.delete == dry.delete
    assert steps(run_dir) == [2, 6]
    assert not any(p.exists() for p in leftovers)
    assert not broken.sidecar_path.exists() and not broken.weights_path.exists()
    assert all(p.exists() for p in strays)
    assert sorted(os.listdir(run_dir)) == sorted(
        [p.name for p in strays]
        + [f"checkpoint_ts{s}.json" for s in (2, 6)]
        + [metas[s].weights_file for s in (2, 6)]
    )


# --- the training loop: checkpoint_due, round_interval, Checkpointer -------------------------


def test_checkpoint_due_and_round_interval() -> None:
    assert round_interval(10000, 2048) == 10240
    assert round_interval(2048, 2048) == 2048
    assert round_interval(1, 2048) == 2048
    assert checkpoint_due(10240, interval=10240, last_saved=0)
    assert not checkpoint_due(10239, interval=10240, last_saved=0)
    assert checkpoint_due(12288, interval=10240, last_saved=8192)
    assert not checkpoint_due(20479, interval=10240, last_saved=10240)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SpecError):
            checkpoint_due(1, interval=bad, last_saved=0)  # type: ignore[arg-type]
        with pytest.raises(SpecError):
            round_interval(bad, 2048)  # type: ignore[arg-type]


@given(st.integers(1, 5000), st.lists(st.integers(1, 3000), min_size=1, max_size=30))
def test_checkpoint_due_fires_once_per_crossed_multiple(interval: int, chunks: list[int]) -> None:
    visited = list(itertools.accumulate(chunks))
    last_saved, saves = 0, []
    for step in visited:
        if checkpoint_due(step, interval=interval, last_saved=last_saved):
            saves.append(step)
            last_saved = step
    assert saves == [
        s for p, s in zip([0, *visited], visited, strict=False) if s // interval > p // interval
    ]
    for k in range(1, visited[-1] // interval + 1):  # every multiple reached is saved promptly
        assert any(k * interval <= s < k * interval + max(chunks) for s in saves)


def test_bug5_periodic_saves_fire_in_a_real_training_loop(run_dir: Path) -> None:
    steps_per_epoch = 2048
    interval = round_interval(10000, steps_per_epoch)
    assert interval == 10240
    torch.manual_seed(0)
    model = build_model(TINY, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    checkpointer = Checkpointer(run_dir=run_dir, interval=interval)
    keisei_trigger_fired = False
    last_saved, global_step, statuses = 0, 0, []
    snapshots: dict[int, TrainState] = {}

    def snapshot() -> TrainState:
        snapshots[global_step] = capture(TINY, model, optimizer, step=global_step)
        return snapshots[global_step]

    for _epoch in range(12):
        logits, value = model(torch.randn(4, 46, 9, 9))
        loss = -torch.log_softmax(logits, dim=-1)[:, 0].mean() + value.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_step += steps_per_epoch
        keisei_trigger_fired |= (global_step + 1) % interval == 0  # the original's off-by-one
        result = checkpointer.maybe_save(snapshot, step=global_step, last_saved=last_saved)
        assert result.ok
        last_saved = result.last_saved
        statuses.append(result.status)
    assert not keisei_trigger_fired
    assert [i for i, s in enumerate(statuses) if s == "saved"] == [4, 9]  # at 10240 and 20480
    assert sorted(snapshots) == steps(run_dir) == [10240, 20480]
    resumed = resume(run_dir)
    assert resumed is not None
    assert_states_equal(snapshots[20480], resumed.state)


def test_checkpointer_skips_without_calling_the_snapshot(run_dir: Path) -> None:
    def snapshot() -> TrainState:
        raise AssertionError("not due: must not be called")

    result = Checkpointer(run_dir=run_dir, interval=100).maybe_save(snapshot, step=99, last_saved=0)
    assert result.status == "skipped" and result.last_saved == 0 and result.ok


@pytest.mark.parametrize("where", ["run_dir_is_a_file", "under_a_file"])
def test_checkpointer_returns_failed_when_the_run_dir_is_unwritable(
    run_dir: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = run_dir / "blocker"
    blocker.write_text("a regular file")
    target = blocker if where == "run_dir_is_a_file" else blocker / "run"
    checkpointer = Checkpointer(run_dir=target, interval=10)
    with caplog.at_level(logging.ERROR, logger="keisei_fn.store"):
        result = checkpointer.maybe_save(small_state(10), step=10, last_saved=0)
    assert result.status == "failed" and not result.ok
    assert result.last_saved == 0 and isinstance(result.error, OSError)
    assert "step 10 failed" in caplog.text
    assert blocker.read_text() == "a regular file"


def test_checkpointer_reports_a_mismatched_step_as_failed(run_dir: Path) -> None:
    result = Checkpointer(run_dir=run_dir, interval=10).maybe_save(
        small_state(20), step=10, last_saved=0
    )
    assert result.status == "failed" and isinstance(result.error, SpecError)
    assert list(run_dir.iterdir()) == []


def test_checkpointer_lets_keyboard_interrupt_through(run_dir: Path) -> None:
    def snapshot() -> TrainState:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Checkpointer(run_dir=run_dir, interval=10).maybe_save(snapshot, step=10, last_saved=0)
    assert list(run_dir.iterdir()) == []


def test_checkpointer_applies_retention(run_dir: Path) -> None:
    checkpointer = Checkpointer(run_dir=run_dir, interval=1, retention=RetentionPolicy(keep_last=2))
    last = 0
    for step in range(1, 6):
        last = checkpointer.maybe_save(small_state(step), step=step, last_saved=last).last_saved
    assert steps(run_dir) == [4, 5]


# --- names (bug 8) and bug 1 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["../x", "a/b", "/abs", "..", "x/../../y", "ts-", "", "run.1", "a\\b", "run\x00"]
)
def test_bug8_path_traversal_in_names_is_refused(run_dir: Path, prefix: str) -> None:
    with pytest.raises(SpecError, match="prefix"):
        checkpoint_stem(prefix, 10)
    with pytest.raises(SpecError):
        save_state(small_state(10), run_dir / "inner", prefix=prefix)
    assert list(run_dir.iterdir()) == []


def test_bug1_a_truncated_checkpoint_does_not_block_a_later_save(run_dir: Path) -> None:
    meta = save_state(small_state(10240), run_dir)
    for path in (meta.weights_path, meta.sidecar_path):  # a crashed non-atomic writer's leftovers
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert latest_checkpoint(run_dir) is None
    fresh = small_state(10240, seed=4)
    save_state(fresh, run_dir)  # replaces the broken pair; no CheckpointExistsError
    assert_states_equal(fresh, load_state(run_dir))
