"""``check_compatible``: empty exactly when ``restore_`` accepts the checkpoint's model (random
spec pairs, specs and live models), read from the sidecar alone (of every format version),
summarised when many keys differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_inprocess import run
from golden import GOLDEN_V1, GOLDEN_V2, GOLDEN_V3, golden_sharded_model
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import (
    CheckpointMeta,
    ModelSpec,
    build_model,
    capture,
    check_compatible,
    load_state,
    restore_,
    save_state,
)
from keisei_fn.errors import CheckpointNotFoundError, StateMismatchError

SPECS = [
    ModelSpec(model_type="testmodel", num_actions=3),
    ModelSpec(tower_depth=1, tower_width=16, se_ratio=0, num_actions=3),  # testmodel's tensors
    ModelSpec(tower_depth=1, tower_width=2, se_ratio=0, num_actions=3),
    ModelSpec(tower_depth=1, tower_width=2, se_ratio=0.5, num_actions=3),
    ModelSpec(tower_depth=2, tower_width=2, se_ratio=0.5, num_actions=3),
    ModelSpec(tower_depth=2, tower_width=3, se_ratio=0.5, num_actions=3),
    ModelSpec(tower_depth=2, tower_width=3, se_ratio=0.5, num_actions=4),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> list[CheckpointMeta]:
    """Each of SPECS saved once (the examples reuse them)."""
    runs = tmp_path_factory.mktemp("compat")
    return [
        save_state(capture(spec, build_model(spec, seed=i), step=1), runs / str(i))
        for i, spec in enumerate(SPECS)
    ]


def restores(meta: CheckpointMeta, model: torch.nn.Module) -> bool:
    try:
        restore_(load_state(meta.path), model, rng=False)
    except StateMismatchError:
        return False
    return True


@settings(max_examples=30, deadline=None)
@given(
    saved_index=st.integers(0, len(SPECS) - 1),
    wanted_index=st.integers(0, len(SPECS) - 1),
    as_model=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_no_problems_exactly_when_restore_succeeds(
    saved: list[CheckpointMeta],
    saved_index: int,
    wanted_index: int,
    as_model: bool,
    dtype: torch.dtype,
) -> None:
    meta = saved[saved_index]
    spec = SPECS[wanted_index]
    model = build_model(spec, dtype=dtype)
    target = model if as_model or dtype != torch.float32 else spec
    problems = check_compatible(meta, target)
    assert (problems == ()) == restores(meta, model), problems
    assert all(isinstance(p, str) and p for p in problems)


def test_a_whole_tower_of_other_shapes_is_one_line_with_the_spec_difference(
    tmp_path: Path,
) -> None:
    spec = ModelSpec(tower_depth=6, tower_width=4, num_actions=3)
    save_state(capture(spec, build_model(spec, seed=0), step=1), tmp_path)
    problems = check_compatible(tmp_path, spec.replace(tower_width=8))
    assert problems == (
        "spec differs: tower_width 4 vs 8",
        "104 tensors have other shapes: 'stem.weight' (the checkpoint has float32[4, 46, 3, 3], "
        "the model float32[8, 46, 3, 3]), 'stem.bias' (the checkpoint has float32[4], the "
        "model float32[8]), 'bn_stem.weight' (the checkpoint has float32[4], the model "
        "float32[8]) and 101 more",
    )
    deeper = check_compatible(tmp_path, spec.replace(tower_depth=9, se_ratio=0))
    assert deeper[0] == "spec differs: tower_depth 6 vs 9, se_ratio 0.25 vs 0.0"
    assert deeper[1].startswith("42 tensors in the model are not in the checkpoint: ")
    assert deeper[1].endswith(" and 39 more")
    assert deeper[2].startswith("24 tensors in the checkpoint are not in the model: ")


def test_only_the_sidecar_is_read(tmp_path: Path) -> None:
    """The weights file's bytes are zeroed (same size): every answer is unchanged."""
    spec = ModelSpec(tower_depth=1, tower_width=2, num_actions=3)
    meta = save_state(capture(spec, build_model(spec, seed=0), step=1), tmp_path)
    other = spec.replace(tower_width=3)
    before = (check_compatible(meta, spec), check_compatible(meta, other))
    meta.weights_path.write_bytes(bytes(meta.weights_size))
    after = (check_compatible(meta.sidecar_path, spec), check_compatible(tmp_path, other))
    assert before == after and before[0] == () and before[1]


def test_aliased_model_tensors_are_checked_by_their_stored_entry(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    meta = save_state(capture(None, model, step=1), tmp_path)
    assert check_compatible(meta, Tied()) == ()
    wide = torch.nn.Module()
    wide.a = torch.nn.Linear(2, 3, bias=False)
    wide.b = torch.nn.Linear(2, 3, bias=False)
    assert check_compatible(meta, wide) == (
        "2 tensors have other shapes: 'a.weight' (the checkpoint has float32[2, 2], the model "
        "float32[3, 2]), 'b.weight' (the checkpoint has float32[2, 2], the model float32[3, 2])",
    )


def test_a_missing_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        check_compatible(tmp_path / "checkpoint_ts5", ModelSpec())


def test_every_format_version_is_read(tmp_path: Path) -> None:
    """Format 1 and 3 (single file) and format 2 (sharded) sidecars answer alike."""
    linear = torch.nn.Linear(4, 3)
    assert check_compatible(GOLDEN_V2, golden_sharded_model()) == ()
    assert check_compatible(GOLDEN_V2, torch.nn.Linear(4, 4)) == (
        "2 tensors have other shapes: 'weight' (the checkpoint has float32[3, 4], the model "
        "float32[4, 4]), 'bias' (the checkpoint has float32[3], the model float32[4])",
    )
    for golden in (GOLDEN_V1, GOLDEN_V3):
        assert check_compatible(golden, linear) == (
            "2 tensors in the model are not in the checkpoint: 'weight', 'bias'",
            "6 tensors in the checkpoint are not in the model: 'w', 'tied', 'bf16' and 3 more",
        )


def test_the_compat_verb(tmp_path: Path) -> None:
    spec = ModelSpec(tower_depth=1, tower_width=2)  # Keisei's 13,527 actions: no option for them
    save_state(capture(spec, build_model(spec, seed=0), step=1), tmp_path)
    ok = run("compat", str(tmp_path), "--tower-depth", "1", "--tower_width", "2")
    assert (ok.returncode, ok.stdout) == (
        0,
        "compatible with resnet, depth 1, width 2, se_ratio 0.25\n",
    )
    wider = run("compat", str(tmp_path), "--tower-depth", "1", "--tower-width", "3")
    assert wider.returncode == 1
    assert wider.stdout.splitlines()[0] == "spec differs: tower_width 2 vs 3"
    assert run("compat", str(tmp_path), "--model", "nope").returncode == 2
    as_json = run("compat", str(tmp_path), "--tower-depth", "1", "--tower-width", "3", "--json")
    assert as_json.returncode == 1
    found = json.loads(as_json.stdout)
    assert found["compatible"] is False and found["spec"]["tower_width"] == 3
    assert found["problems"][0] == "spec differs: tower_width 2 vs 3"
