"""diff_states / diff_checkpoints / ``keisei-fn diff``: what changed between two states."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import keisei_fn as kf
from keisei_fn.cli import main
from keisei_fn.testing import train_states

SPEC = kf.ModelSpec(model_type="resnet", tower_depth=1, tower_width=8, se_ratio=0, num_actions=16)


def trained(steps: int, seed: int = 0) -> kf.TrainState:
    torch.manual_seed(seed)
    model = kf.build_model(SPEC, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits, value = model(torch.randn(4, *SPEC.obs_shape))
        loss = logits.logsumexp(-1).mean() + value.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return kf.capture(SPEC, model, optimizer, step=steps * 10, extra={"elo": 1500.0 + steps})


@settings(max_examples=25, deadline=None)
@given(train_states())
def test_a_state_is_identical_to_itself_and_to_its_saved_copy(state: kf.TrainState) -> None:
    assert kf.diff_states(state, state).identical
    assert str(kf.diff_states(state, state)) == "identical"


def test_a_training_step_changes_weights_moments_step_and_extra() -> None:
    before, after = trained(1), trained(2)
    found = kf.diff_states(before, after)
    assert not found.identical and found.spec == ()
    assert ("step", 10, 20) in found.metadata and ("extra.elo", 1501.0, 1502.0) in found.metadata
    names = {t.name for t in found.tensors}
    assert "model/stem.weight" in names and "optimizer/state/0/exp_avg" in names
    assert "optimizer/state/0/step" in names  # Adam's step count
    weight = next(t for t in found.tensors if t.name == "model/stem.weight")
    a, b = before.model["stem.weight"].double(), after.model["stem.weight"].double()
    assert weight.status == "changed" and weight.before == ("float32", tuple(a.shape))
    assert weight.l2 == pytest.approx(float((b - a).norm()))
    assert weight.max_abs == pytest.approx(float((b - a).abs().max()))
    assert weight.relative == pytest.approx(float((b - a).norm() / a.norm()))
    assert 0 < weight.fraction_changed <= 1
    assert all(t.status == "changed" for t in found.tensors)
    top = found.top(3)
    assert [t.relative for t in top] == sorted((t.relative for t in top), reverse=True)
    assert "tensors differ" in str(found) and "model/" in found.summary(top=50)


def test_structure_changes_and_nans() -> None:
    w = torch.tensor([1.0, math.nan, 3.0])
    a = kf.TrainState(
        spec=SPEC,
        step=1,
        model={"w": w, "gone": torch.zeros(2), "shape": torch.zeros(2), "kind": torch.zeros(2)},
    )
    b = a.replace(
        spec=SPEC.replace(tower_width=16),
        model={
            "w": w.clone(),  # the NaN stays a NaN: unchanged
            "new": torch.zeros(1),
            "shape": torch.zeros(3),
            "kind": torch.zeros(2, dtype=torch.float64),
        },
    )
    found = kf.diff_states(a, b)
    assert found.spec == (("tower_width", 8, 16),)
    assert {t.name: t.status for t in found.tensors} == {
        "model/gone": "removed",
        "model/shape": "reshaped",
        "model/kind": "retyped",
        "model/new": "added",
    }
    c = a.replace(model={**a.model, "w": torch.tensor([1.0, 2.0, 3.0])})  # the NaN is gone
    (changed,) = kf.diff_states(a, c).tensors
    assert changed.name == "model/w" and changed.fraction_changed == pytest.approx(1 / 3)


def test_scheduler_and_rng_differences_are_values() -> None:
    a = kf.TrainState(spec=None, step=1, model={}, scheduler={"last_epoch": 3, "_last_lr": [0.1]})
    b = a.replace(scheduler={"last_epoch": 4, "_last_lr": [0.1]})
    assert kf.diff_states(a, b).values == (("scheduler.last_epoch", 3, 4),)
    assert kf.diff_states(a, a.replace(scheduler={"last_epoch": 3.0, "_last_lr": [0.1]})).values


def test_checkpoints_with_equal_digests_are_identical_without_reading_tensors(
    tmp_path: Path,
) -> None:
    meta = kf.save_state(trained(1), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = tmp_path / "b" / meta.weights_file
    copy.write_bytes(b"\0" * copy.stat().st_size)  # not read: verify's question, not diff's
    found = kf.diff_checkpoints(tmp_path / "a", tmp_path / "b")
    assert found.identical and not found.read_tensors
    assert "tensors not read" in str(found)
    kf.save_state(trained(2), tmp_path / "a")
    assert not kf.diff_checkpoints(meta.path, tmp_path / "a").identical  # a run dir: its latest


def test_the_diff_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = kf.save_state(trained(1), tmp_path)
    second = kf.save_state(trained(2), tmp_path)
    assert main(["diff", str(first.path), str(second.path), "--top", "3"]) == 1
    out = capsys.readouterr().out
    assert "step: 10 -> 20" in out and len([ln for ln in out.splitlines() if "/" in ln]) >= 3
    assert main(["diff", "--json", str(first.path), str(second.path)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["identical"] is False and data["tensors"]
    assert main(["diff", str(first.path), str(first.path)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "nope"), str(first.path)]) == 2
