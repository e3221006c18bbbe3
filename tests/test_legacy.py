"""import_legacy: original Keisei ``.pth`` checkpoints, written here with ``torch.save``."""

from __future__ import annotations

import io
import logging
import os
import shlex
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from saved_states import raw
from torch import nn

from keisei_fn import GameStats, ModelSpec, build_model, load_model, load_state, restore_
from keisei_fn.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    SpecError,
    StateMismatchError,
    UnsupportedFormatError,
)
from keisei_fn.state import thaw
from keisei_fn.store.legacy import import_legacy

#: What the weights of Keisei's "testmodel" (depth 1, width 16, no SE) are inferred to be.
INFERRED_TEST = ModelSpec(
    model_type="resnet", tower_depth=1, tower_width=16, se_ratio=0.0, num_actions=13527
)
#: A tiny tower with SE (hidden 2) for the tests that need many or small files.
TINY = ModelSpec(tower_depth=1, tower_width=4, se_ratio=0.5, num_actions=5)

# Keisei's elo_state and metrics_history, with the NumPy scalars old runs left in them ...
ELO = {
    "black_rating": np.float64(1512.5),
    "white_rating": np.float32(1487.25),
    "initial_rating": 1500.0,
    "k_factor": 32.0,
    "rating_history": [{"black_rating": np.float64(1500.0), "white_rating": 1500.0}],
}
METRICS = {
    "policy_losses": [np.float64(0.5), np.float32(0.1), 0.25],
    "value_losses": [np.float16(2.0)],
    "entropies": [np.float64(9.5)],
    "kl_divergences": [np.float64(1e-3)],
    "clip_fractions": [np.float32(0.125)],
    "learning_rates": [3e-4],
    "episode_lengths": [np.int64(120), np.int32(87)],
    "episode_rewards": [np.float64(-1.0), 1.0],
    "win_rates_history": [{"win_rate_black": np.float64(0.5), "is_draw": np.bool_(False)}],
}
# ... and the plain Python values they must become.
ELO_PLAIN = {
    "black_rating": 1512.5,
    "white_rating": 1487.25,
    "initial_rating": 1500.0,
    "k_factor": 32.0,
    "rating_history": [{"black_rating": 1500.0, "white_rating": 1500.0}],
}
METRICS_PLAIN = {
    "policy_losses": [0.5, 0.10000000149011612, 0.25],  # float32(0.1), widened exactly
    "value_losses": [2.0],
    "entropies": [9.5],
    "kl_divergences": [1e-3],
    "clip_fractions": [0.125],
    "learning_rates": [3e-4],
    "episode_lengths": [120, 87],
    "episode_rewards": [-1.0, 1.0],
    "win_rates_history": [{"win_rate_black": 0.5, "is_draw": False}],
}


def assert_same(a: object, b: object, where: str = "") -> None:
    """Bit-exact for tensors (dtype, shape, bytes); equal values *and types* for the rest."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(raw(a), raw(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def linear_schedule(epoch: int) -> float:  # Keisei's "linear" LambdaLR schedule
    return 1.0 - epoch / 100


def trained(spec: ModelSpec, *, wrap=None, seed: int = 0):
    """A model, its Adam and LambdaLR after one real training step (as Keisei trains)."""
    model = build_model(spec, seed=seed)
    live = wrap(model) if wrap is not None else model
    optimizer = torch.optim.Adam(live.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule)
    obs = torch.randn(4, 46, 9, 9, generator=torch.Generator().manual_seed(seed))
    logits, value = model(obs)
    (logits.logsumexp(-1).mean() + value.square().mean()).backward()
    optimizer.step()
    scheduler.step()
    return model, live, optimizer, scheduler


def keisei_checkpoint(live: nn.Module, optimizer, scheduler, **overrides) -> dict:
    """What Keisei's PPOAgent.save_model wrote."""
    checkpoint = {
        "model_state_dict": live.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "global_timestep": 2048,
        "total_episodes_completed": 17,
        "black_wins": np.int64(7),  # counters may be NumPy integers
        "white_wins": 6,
        "draws": 4,
        "elo_state": ELO,
        "metrics_history": METRICS,
        "scheduler_state_dict": scheduler.state_dict(),
        "lr_schedule_type": "linear",
        "lr_schedule_step_on": "epoch",
    }
    checkpoint.update(overrides)
    return checkpoint


def tiny_file(directory: Path, name: str = "checkpoint_ts10.pth", **overrides) -> Path:
    """A small Keisei checkpoint of TINY (zip format unless told otherwise)."""
    zip_format = overrides.pop("zip_format", True)
    _, live, optimizer, scheduler = trained(TINY)
    content = keisei_checkpoint(live, optimizer, scheduler, **{"global_timestep": 10, **overrides})
    path = directory / name
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    return path


def nothing_written(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def test_realistic_keisei_checkpoint_converts_bit_exact(tmp_path):
    model, _, optimizer, scheduler = trained(ModelSpec(model_type="testmodel"))
    pth = tmp_path / "checkpoint_ts2048.pth"
    torch.save(keisei_checkpoint(model, optimizer, scheduler), pth)

    meta = import_legacy(pth, tmp_path / "run")

    assert (meta.name, meta.kind, meta.step, meta.episodes) == (
        "checkpoint_ts2048",
        "periodic",
        2048,
        17,
    )
    assert meta.stats == GameStats(black_wins=7, white_wins=6, draws=4)
    assert meta.spec == INFERRED_TEST
    state = load_state(tmp_path / "run")
    assert (state.rng, state.scaler) == (None, None)  # the original never saved them
    expected_extra = {
        "elo_state": ELO_PLAIN,
        "metrics_history": METRICS_PLAIN,
        "lr_schedule_type": "linear",
        "lr_schedule_step_on": "epoch",
    }
    assert_same(thaw(state.extra), expected_extra)
    assert_same(thaw(meta.extra), expected_extra)

    fresh = build_model(state.spec)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=3e-4)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, linear_schedule)
    restore_(state, fresh, fresh_opt, scheduler=fresh_sched)
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_opt.state_dict(), optimizer.state_dict())
    assert_same(fresh_sched.state_dict(), scheduler.state_dict())

    # and training goes on identically: the Adam moments and step count came across
    obs = torch.randn(2, 46, 9, 9, generator=torch.Generator().manual_seed(5))
    for net, opt in ((model, optimizer), (fresh, fresh_opt)):
        opt.zero_grad()
        net(obs)[0].logsumexp(-1).mean().backward()
        opt.step()
    assert_same(fresh.state_dict(), model.state_dict())


def test_given_spec_is_checked_and_kept(tmp_path):
    model, _, optimizer, scheduler = trained(ModelSpec(model_type="testmodel"))
    pth = tmp_path / "checkpoint_ts2048.pth"
    torch.save(keisei_checkpoint(model, optimizer, scheduler), pth)
    meta = import_legacy(pth, tmp_path / "run", spec=ModelSpec(model_type="testmodel"))
    assert meta.spec == ModelSpec(model_type="testmodel")


class Compiled(nn.Module):
    """What torch.compile's OptimizedModule is to state_dict: the model under ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


WRAPPERS = {
    "_orig_mod.": Compiled,
    "module.": nn.DataParallel,
    "module._orig_mod.": lambda m: nn.DataParallel(Compiled(m)),
}


@pytest.mark.parametrize("prefix", list(WRAPPERS))
def test_bug6_orig_mod_and_module_prefixes_load(tmp_path, prefix):
    model, live, optimizer, scheduler = trained(TINY, wrap=WRAPPERS[prefix])
    content = keisei_checkpoint(live, optimizer, scheduler, global_timestep=10)
    assert all(k.startswith(prefix) for k in content["model_state_dict"])
    torch.save(content, tmp_path / "checkpoint_ts10.pth")

    meta = import_legacy(tmp_path / "checkpoint_ts10.pth", tmp_path / "run")

    assert meta.spec == TINY
    loaded, _ = load_model(tmp_path / "run")
    assert_same(loaded.state_dict(), model.state_dict())
    fresh = build_model(TINY)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=3e-4)
    restore_(load_state(tmp_path / "run"), fresh, fresh_opt)
    assert_same(fresh_opt.state_dict(), optimizer.state_dict())


@pytest.mark.slow
def test_bug6_real_torch_compile_prefix_loads(tmp_path):
    model, live, optimizer, scheduler = trained(TINY, wrap=torch.compile)
    torch.save(
        keisei_checkpoint(live, optimizer, scheduler, global_timestep=10), tmp_path / "a.pth"
    )
    import_legacy(tmp_path / "a.pth", tmp_path / "run")
    assert_same(load_model(tmp_path / "run")[0].state_dict(), model.state_dict())


def test_spec_mismatch_summarises_each_kind_of_difference(tmp_path):
    pth = tiny_file(tmp_path)
    wrong = ModelSpec(tower_depth=2, tower_width=4, se_ratio=0, num_actions=7)

    with pytest.raises(StateMismatchError) as info:
        import_legacy(pth, tmp_path / "run", spec=wrong)

    message = str(info.value)
    for difference in (
        "\n  - 14 tensors in the model are not in the checkpoint: 'res_blocks.1.conv1.weight', "
        "'res_blocks.1.conv1.bias', 'res_blocks.1.bn1.weight' and 11 more\n",
        "\n  - 4 tensors in the checkpoint are not in the model: 'res_blocks.0.se.fc1.weight', "
        "'res_blocks.0.se.fc1.bias', 'res_blocks.0.se.fc2.weight' and 1 more\n",
        "\n  - 2 tensors have other shapes: 'policy_head.4.weight' (the checkpoint has "
        "float32[5, 162], the model float32[7, 162]), 'policy_head.4.bias' (the checkpoint has "
        "float32[5], the model float32[7])\n",
        "\n  - optimizer param group 0: state has 28 params, optimizer has 32",
    ):
        assert difference in message
    assert str(pth) in message
    assert nothing_written(tmp_path / "run")


def test_weights_that_are_not_the_inferred_tower_are_refused(tmp_path):
    model = build_model(TINY, seed=0)
    weights = {**model.state_dict(), "aux_head.weight": torch.zeros(3)}
    torch.save({"model_state_dict": weights, "global_timestep": 1}, tmp_path / "a.pth")
    only = r"\n  - 1 tensor in the checkpoint is not in the model: 'aux_head\.weight'$"
    with pytest.raises(StateMismatchError, match=only):
        import_legacy(tmp_path / "a.pth", tmp_path / "run")
    assert nothing_written(tmp_path / "run")


def test_optimizer_that_does_not_fit_the_model_is_refused(tmp_path):
    model = build_model(TINY, seed=0)
    _, _, other_optimizer, _ = trained(TINY.replace(num_actions=6))  # same parameter count
    content = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": other_optimizer.state_dict(),
        "global_timestep": 1,
    }
    torch.save(content, tmp_path / "a.pth")
    with pytest.raises(StateMismatchError, match=r"\['exp_avg'\]: state has float32\[6, 162\]"):
        import_legacy(tmp_path / "a.pth", tmp_path / "run")
    assert nothing_written(tmp_path / "run")


class OpenMarker:
    """Unpickling this creates a file (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class ShellMarker:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


OS_SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


@pytest.mark.parametrize(
    ("payload", "zip_format", "names"),
    [
        ("open", True, ["io.open"]),
        ("shell", True, [OS_SYSTEM]),
        ("shell", False, [OS_SYSTEM]),  # torch's legacy (pre-1.6, non-zip) format
        ("both", True, ["io.open", OS_SYSTEM]),  # every disallowed global is named
    ],
)
def test_bug7_pickle_payload_never_runs(tmp_path, monkeypatch, payload, zip_format, names):
    # This variable makes torch.load unpickle freely when a caller omits weights_only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    markers = [tmp_path / "opened", tmp_path / "shelled"]
    evil = {
        "open": [OpenMarker(markers[0])],
        "shell": [ShellMarker(markers[1])],
        "both": [OpenMarker(markers[0]), ShellMarker(markers[1])],
    }[payload]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pth = tiny_file(run_dir, metrics_history={"policy_losses": [0.5, *evil]}, zip_format=zip_format)

    with pytest.raises(UnsupportedFormatError) as info:
        import_legacy(pth, tmp_path / "imported")
    for name in names:
        assert name in str(info.value)
    with pytest.raises(UnsupportedFormatError, match="import_legacy"):
        load_state(pth)
    with pytest.raises(CheckpointNotFoundError):
        load_state(run_dir)  # a .pth in a run directory is never a candidate

    assert not any(m.exists() for m in markers)
    assert nothing_written(tmp_path / "imported")


def test_bug7_payload_is_live_when_loaded_unsafely(tmp_path):
    """The payload of the test above really runs under an unrestricted unpickler."""
    marker = tmp_path / "opened"
    torch.save({"x": OpenMarker(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_numpy_arrays_and_complex_scalars_are_refused_by_name(tmp_path):
    pth = tiny_file(tmp_path, metrics_history={"losses": np.array([0.5, 0.25])})
    with pytest.raises(UnsupportedFormatError, match=r"numpy\._?core\.multiarray\._reconstruct"):
        import_legacy(pth, tmp_path / "run")
    pth = tiny_file(tmp_path, metrics_history={"z": np.complex128(1j)})
    with pytest.raises(UnsupportedFormatError, match=r"Complex128DType|complex128"):
        import_legacy(pth, tmp_path / "run")
    assert nothing_written(tmp_path / "run")


def rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes in a zip-format torch file's pickle (all other members kept)."""
    with zipfile.ZipFile(path) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
        for name, data in members:
            if name.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            target.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def test_numpy1_pickles_load(tmp_path):
    """NumPy 1 named its scalar reconstructor numpy.core.multiarray.scalar."""
    pth = tiny_file(tmp_path)
    rewrite_pickle(pth, b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    meta = import_legacy(pth, tmp_path / "run")
    assert_same(thaw(meta.extra)["metrics_history"], METRICS_PLAIN)
    assert meta.stats.black_wins == 7


def test_empty_truncated_and_missing_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        import_legacy(tmp_path / "empty.pth", tmp_path / "run")
    for zip_format in (True, False):
        data = tiny_file(tmp_path, "whole.pth", zip_format=zip_format).read_bytes()
        for cut in (1, 4, 10, 100, len(data) // 2, len(data) - 22, len(data) - 1):
            (tmp_path / "cut.pth").write_bytes(data[:cut])
            with pytest.raises(IntegrityError):
                import_legacy(tmp_path / "cut.pth", tmp_path / "run")
    (tmp_path / "notes.pth").write_text("not a checkpoint at all\n")
    with pytest.raises(IntegrityError):
        import_legacy(tmp_path / "notes.pth", tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError):
        import_legacy(tmp_path / "missing.pth", tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match="directory"):
        import_legacy(tmp_path, tmp_path / "run")
    assert nothing_written(tmp_path / "run")


@settings(deadline=None, max_examples=15)
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_never_imports_different_weights(position, bit):
    """torch.load ignores zip CRCs; import_legacy checks them: a flip is caught or harmless."""
    with tempfile.TemporaryDirectory() as tmp:
        pth = tiny_file(Path(tmp))
        reference = load_state(import_legacy(pth, Path(tmp) / "reference").path)
        data = bytearray(pth.read_bytes())
        data[int(position * len(data))] ^= 1 << bit
        pth.write_bytes(data)
        try:
            meta = import_legacy(pth, Path(tmp) / "flipped")
        except (IntegrityError, UnsupportedFormatError):
            return
        state = load_state(meta.path)
        assert_same(thaw(state.model), thaw(reference.model))
        assert_same(thaw(state.optimizer), thaw(reference.optimizer))
        assert_same(thaw(state.extra), thaw(reference.extra))


def test_final_model_pth_converts_to_final_model(tmp_path):
    model, _, optimizer, _ = trained(TINY)
    # the original's final model had no game results
    content = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "global_timestep": 500,
        "total_episodes_completed": 9,
    }
    torch.save(content, tmp_path / "final_model.pth")

    meta = import_legacy(tmp_path / "final_model.pth", tmp_path / "run")

    assert (meta.name, meta.kind, meta.step, meta.episodes) == (
        "final_model",
        "final_model",
        500,
        9,
    )
    assert meta.stats == GameStats()
    loaded, loaded_meta = load_model(tmp_path / "run")
    assert loaded_meta.kind == "final_model"
    assert_same(loaded.state_dict(), model.state_dict())
    assert load_state(meta.path).optimizer is None
    # re-importing the same file keeps it; a different final model is never replaced
    assert import_legacy(tmp_path / "final_model.pth", tmp_path / "run").digest == meta.digest
    other = tmp_path / "other" / "final_model.pth"
    other.parent.mkdir()
    content["model_state_dict"] = trained(TINY, seed=1)[0].state_dict()
    torch.save(content, other)
    with pytest.raises(CheckpointExistsError):
        import_legacy(other, tmp_path / "run")
    assert_same(load_model(tmp_path / "run")[0].state_dict(), model.state_dict())


def test_naming_rules(tmp_path, caplog):
    run = tmp_path / "run"
    meta = import_legacy(
        tiny_file(tmp_path, "initial_eval_checkpoint_ts7.pth", global_timestep=7), run
    )
    assert meta.name == "initial_eval_checkpoint_ts7"
    with pytest.raises(CheckpointNotFoundError):
        load_state(run)  # not a resume point

    meta = import_legacy(tiny_file(tmp_path, "keisei model-v2.pth", global_timestep=30), run)
    assert meta.name == "checkpoint_ts30"
    assert load_state(run).step == 30

    with caplog.at_level(logging.WARNING, logger="keisei_fn.store"):
        meta = import_legacy(tiny_file(tmp_path, "checkpoint_ts100.pth", global_timestep=40), run)
    assert meta.name == "checkpoint_ts40"  # the content wins over the name ...
    assert "name says step 100" in caplog.text  # ... with a warning

    no_step = tmp_path / "checkpoint_ts50.pth"
    torch.save({"model_state_dict": build_model(TINY).state_dict()}, no_step)
    assert import_legacy(no_step, run).step == 50  # the name, when the content has no step

    assert (
        import_legacy(
            tiny_file(tmp_path, "checkpoint_ts60.pth", global_timestep=60), run, kind="final"
        ).kind
        == "final"
    )
    forced = import_legacy(
        tiny_file(tmp_path, "checkpoint_ts70.pth", global_timestep=70), run, kind="final_model"
    )
    assert (forced.name, forced.kind) == ("final_model", "final_model")


def test_step_zero_needs_kind_final_model(tmp_path):
    pth = tiny_file(tmp_path, "initial_eval_checkpoint_ts0.pth", global_timestep=0)
    with pytest.raises(SpecError, match="kind='final_model'"):
        import_legacy(pth, tmp_path / "run")
    assert nothing_written(tmp_path / "run")
    assert import_legacy(pth, tmp_path / "run", kind="final_model").step == 0


def test_reimport_is_a_no_op_and_bad_kind_is_refused(tmp_path):
    pth = tiny_file(tmp_path)
    first = import_legacy(pth, tmp_path / "run")
    assert import_legacy(pth, tmp_path / "run").digest == first.digest
    with pytest.raises(SpecError, match="kind"):
        import_legacy(pth, tmp_path / "run", kind="latest")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2, 3], "not a Keisei checkpoint"),
        (build_model(TINY).state_dict(), "model_state_dict"),  # a bare state_dict
        ({"model_state_dict": {"w": 1.0}}, "offending keys: 'w'"),
        ({"model_state_dict": {}, "optimizer_state_dict": {"state": []}}, "not an optimizer"),
        ({"model_state_dict": {}, "global_timestep": 1.5}, "'global_timestep' must be an int"),
        ({"model_state_dict": {}, "draws": -1}, "'draws' must be an int"),
    ],
)
def test_content_that_is_not_a_keisei_checkpoint(tmp_path, content, match):
    torch.save(content, tmp_path / "a.pth")
    with pytest.raises(UnsupportedFormatError, match=match):
        import_legacy(tmp_path / "a.pth", tmp_path / "run")


@settings(deadline=None, max_examples=20)
@given(
    width=st.integers(1, 24),
    depth=st.integers(1, 2),
    se_ratio=st.sampled_from([0.0, 0.25]) | st.floats(0.01, 1.5),
    actions=st.integers(1, 9),
)
@example(width=22, depth=1, se_ratio=0.7, actions=3)  # SE hidden 15, but 15 / 22 * 22 < 15
def test_inferred_spec_builds_the_same_network(width, depth, se_ratio, actions):
    spec = ModelSpec(tower_depth=depth, tower_width=width, se_ratio=se_ratio, num_actions=actions)
    model = build_model(spec, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model_state_dict": model.state_dict(), "global_timestep": 1}, f"{tmp}/a.pth")
        inferred = import_legacy(f"{tmp}/a.pth", f"{tmp}/run").spec
    assert inferred is not None
    assert inferred == spec.replace(se_ratio=inferred.se_ratio)
    shapes = {k: v.shape for k, v in build_model(inferred, device="meta").state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
