"""``grow``: the grown network computes the same function (eval and train mode) for random
specs and inputs, its state restores into a fresh model and optimizer and trains, the optimizer
moments follow their parameters, and anything but a larger depth or width is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_inprocess import run
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw_bytes
from torch import nn

from keisei_fn import (
    ModelSpec,
    TrainState,
    build_model,
    capture,
    ema_init,
    ema_update,
    grow,
    load_state,
    restore_,
    save_final_model,
    save_state,
)
from keisei_fn.errors import GrowError, StateMismatchError
from keisei_fn.testing import assert_states_equal

#: Output tolerance: the split weights are summed in another order (float32 rounding).
RTOL, ATOL = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomised(spec: ModelSpec, seed: int) -> nn.Module:
    """A model whose BatchNorm scales, shifts and running statistics are random too (a fresh
    one's are 1, 0, 0 and 1, which would hide a wrongly mapped statistic)."""
    model = build_model(spec, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def _trained(spec: ModelSpec, seed: int, optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and its optimizer after a step (so every moment is non-zero)."""
    model = _randomised(spec, seed)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    logits, value = model(torch.randn(2, *spec.obs_shape, generator=generator))
    (logits.square().mean() + value.square().mean()).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _outputs(model: nn.Module, x: torch.Tensor, *, train: bool) -> tuple[torch.Tensor, ...]:
    model.train(train)
    with torch.no_grad():
        return tuple(model(x))


small_specs = st.builds(
    ModelSpec,
    tower_depth=st.integers(1, 2),
    tower_width=st.integers(1, 5),
    se_ratio=st.sampled_from([0.0, 0.25, 0.5]),
    num_actions=st.integers(1, 6),
)


@settings(max_examples=40, deadline=None)
@given(
    spec=small_specs,
    more_depth=st.integers(0, 2),
    more_width=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    optimizer=st.sampled_from(["adam", "sgd"]),
)
def test_grow_preserves_outputs_on_random_inputs_and_the_state_trains_on(
    spec: ModelSpec, more_depth: int, more_width: int, seed: int, optimizer: str
) -> None:
    torch.manual_seed(seed)
    new_spec = spec.replace(
        tower_depth=spec.tower_depth + more_depth, tower_width=spec.tower_width + more_width
    )
    model, opt = _trained(spec, seed, optimizer)
    state = capture(spec, model, opt, step=2, rng=False)
    grown = grow(state, new_spec, seed=seed)
    new_model = build_model(new_spec)
    new_opt = type(opt)(new_model.parameters(), **{"lr": 1e-3})
    restore_(grown, new_model, new_opt, rng=False)
    x = torch.randn(5, *spec.obs_shape, generator=torch.Generator().manual_seed(seed))
    for train in (False, True):  # train mode: batch statistics of copies are copies
        for before, after in zip(
            _outputs(model, x, train=train), _outputs(new_model, x, train=train), strict=True
        ):
            torch.testing.assert_close(after, before, rtol=RTOL, atol=ATOL)
    new_model.train()
    logits, value = new_model(x)
    (logits.square().mean() + value.square().mean()).backward()
    new_opt.step()  # one training step runs on the grown state
    assert all(torch.isfinite(p).all() for p in new_model.parameters())


def test_grow_is_deterministic_and_pure() -> None:
    spec = ModelSpec(tower_depth=1, tower_width=3, num_actions=4)
    model, opt = _trained(spec, 0, "adam")
    state = capture(spec, model, opt, step=2, rng=False)
    before = capture(spec, model, opt, step=2, rng=False)
    new_spec = spec.replace(tower_depth=2, tower_width=5)
    assert_states_equal(grow(state, new_spec, seed=7), grow(state, new_spec, seed=7))
    assert_states_equal(state, before)  # the input state is unchanged
    key = "res_blocks.1.conv1.weight"  # the seed initialises the new block
    other = grow(state, new_spec, seed=8).model[key]
    assert raw_bytes(other) != raw_bytes(grow(state, new_spec, seed=7).model[key])


def test_growing_to_the_same_spec_changes_no_bit() -> None:
    spec = ModelSpec(tower_depth=2, tower_width=3, num_actions=4)
    model, opt = _trained(spec, 1, "sgd")
    state = capture(spec, model, opt, step=2, rng=False)
    assert_states_equal(grow(state, spec), state)


def test_optimizer_moments_follow_their_parameters() -> None:
    """Kept units keep their moments bit for bit; a copied output unit's first moment is its
    original's divided by its copy count, its second moment by the square; a split input's
    moments are copies; the new blocks' moments are zero with step 0."""
    spec = ModelSpec(tower_depth=1, tower_width=2, se_ratio=0.0, num_actions=3)
    model, opt = _trained(spec, 3, "adam")
    state = capture(spec, model, opt, step=2, rng=False)
    new_spec = spec.replace(tower_depth=2, tower_width=4)
    grown = grow(state, new_spec, seed=0)
    assert grown.optimizer is not None and state.optimizer is not None
    old_names = [n for n, _ in build_model(spec, device="meta").named_parameters()]
    new_names = [n for n, _ in build_model(new_spec, device="meta").named_parameters()]
    old = {old_names[i]: e for i, e in state.optimizer["state"].items()}
    new = {new_names[i]: e for i, e in grown.optimizer["state"].items()}
    assert set(new) == set(new_names)
    # which old stem channel each new one copies: read from the copied weights
    stem_old, stem_new = state.model["stem.weight"], grown.model["stem.weight"]
    source = [next(i for i in range(2) if torch.equal(stem_new[j], stem_old[i])) for j in range(4)]
    counts = [source.count(i) for i in range(2)]
    for j in range(4):
        i, n = source[j], counts[source[j]]
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            expected = old["stem.weight"][key][i].double() / n**power
            assert torch.allclose(new["stem.weight"][key][j].double(), expected.float().double())
        assert torch.equal(new["stem.weight"]["step"], old["stem.weight"]["step"])
    for j in range(4):  # the value head's input columns are split: moments copied
        assert torch.equal(
            new["value_head.0.weight"]["exp_avg"][:, j],
            old["value_head.0.weight"]["exp_avg"][:, source[j]],
        )
    assert raw_bytes(new["value_head.4.weight"]["exp_avg"]) == raw_bytes(
        old["value_head.4.weight"]["exp_avg"]
    )
    for name in new_names:
        if name.startswith("res_blocks.1."):
            assert not new[name]["exp_avg"].any() and not new[name]["exp_avg_sq"].any()
            assert new[name]["step"].item() == 0
    assert list(grown.optimizer["param_groups"][0]["params"]) == list(range(len(new_names)))


def test_new_blocks_join_the_group_of_their_counterpart() -> None:
    spec = ModelSpec(tower_depth=1, tower_width=2, num_actions=3)
    model = build_model(spec, seed=0)
    named = list(model.named_parameters())
    norms = [p for n, p in named if "bn" in n]
    others = [p for n, p in named if "bn" not in n]
    # groups in model order within each group; bn first: flattened order is not model order,
    # so torch's param_names decide
    opt = torch.optim.SGD(
        [
            {"params": [(n, p) for n, p in named if "bn" in n], "weight_decay": 0.0},
            {"params": [(n, p) for n, p in named if "bn" not in n], "weight_decay": 1e-4},
        ],
        lr=0.1,
        momentum=0.9,
    )
    assert len(norms) + len(others) == len(named)
    grown = grow(capture(spec, model, opt, step=1, rng=False), spec.replace(tower_depth=2))
    assert grown.optimizer is not None
    groups = grown.optimizer["param_groups"]
    assert all("bn" in n for n in groups[0]["param_names"])
    assert "res_blocks.1.bn2.weight" in groups[0]["param_names"]
    assert "res_blocks.1.conv1.weight" in groups[1]["param_names"]
    new_model = build_model(spec.replace(tower_depth=2))
    new_named = list(new_model.named_parameters())
    new_opt = torch.optim.SGD(
        [
            {"params": [(n, p) for n, p in new_named if "bn" in n]},
            {"params": [(n, p) for n, p in new_named if "bn" not in n]},
        ],
        lr=0.1,
        momentum=0.9,
    )
    restore_(grown, new_model, new_opt, rng=False)
    assert new_opt.param_groups[1]["weight_decay"] == 1e-4


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tower_depth": 1}, "tower_depth"),
        ({"tower_width": 2}, "tower_width"),
        ({"se_ratio": 0.5}, "se_ratio"),
        ({"num_actions": 7}, "num_actions"),
        ({"model_type": "testmodel"}, "model_type"),
    ],
)
def test_anything_but_a_larger_tower_is_refused_naming_the_field(
    change: dict[str, object], field: str
) -> None:
    spec = ModelSpec(tower_depth=2, tower_width=3, num_actions=4)
    state = capture(spec, build_model(spec, seed=0), step=1, rng=False)
    with pytest.raises(GrowError) as caught:
        grow(state, spec.replace(**change))
    assert caught.value.field == field and field in str(caught.value)


def test_a_state_without_spec_or_not_fitting_it_is_refused() -> None:
    spec = ModelSpec(tower_depth=1, tower_width=2, num_actions=3)
    state = capture(spec, build_model(spec, seed=0), step=1, rng=False)
    with pytest.raises(GrowError):
        grow(state.replace(spec=None), spec)
    other = capture(spec, build_model(spec.replace(tower_width=3), seed=0), step=1, rng=False)
    with pytest.raises(StateMismatchError):
        grow(other, spec.replace(tower_width=4))
    assert isinstance(state, TrainState)


def test_the_grow_verb_saves_the_grown_checkpoint_under_the_same_name(tmp_path: Path) -> None:
    spec = ModelSpec(tower_depth=1, tower_width=3, num_actions=4)
    model, opt = _trained(spec, 2, "adam")
    state = capture(spec, model, opt, step=7, rng=False)
    save_state(state, tmp_path / "run")
    out = tmp_path / "grown"
    done = run("grow", str(tmp_path / "run"), str(out), "--tower-depth", "3", "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"grew checkpoint_ts7 (depth 1, width 3) → {out / 'checkpoint_ts7.json'} "
        "(depth 3, width 3)\n"
    )
    assert_states_equal(grow(state, spec.replace(tower_depth=3), seed=4), load_state(out))
    refused = run("grow", str(tmp_path / "run"), str(out), "--tower-width", "2")
    assert refused.returncode == 2 and "cannot shrink" in refused.stderr


def test_the_grow_verb_replaces_nothing_without_force(tmp_path: Path) -> None:
    spec = ModelSpec(tower_depth=1, tower_width=3, num_actions=4)
    source = tmp_path / "run"
    final = save_final_model(capture(spec, build_model(spec, seed=0), step=5), source)
    before = load_state(final.path)
    refused = run("grow", str(source), str(source), "--tower-width", "5")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("keisei-fn: error: ") and "--force" in refused.stderr
    assert_states_equal(before, load_state(final.path))  # the run's own final model is kept
    out = tmp_path / "grown"
    assert run("grow", str(source), str(out), "--tower-width", "5").returncode == 0
    again = run("grow", str(source), str(out), "--tower-width", "5", "--seed", "1")
    assert again.returncode == 2 and "exists" in again.stderr
    assert_states_equal(grow(before, spec.replace(tower_width=5)), load_state(out / "final_model"))
    forced = run("grow", str(source), str(out), "--tower-width", "5", "--seed", "1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert_states_equal(
        grow(before, spec.replace(tower_width=5), seed=1), load_state(out / "final_model")
    )


def test_the_grow_verb_refuses_a_spec_that_does_not_change(tmp_path: Path) -> None:
    spec = ModelSpec(tower_depth=1, tower_width=3, num_actions=4)
    save_state(capture(spec, build_model(spec, seed=0), step=5, rng=False), tmp_path / "run")
    for options in ([], ["--tower-depth", "1", "--tower-width", "3"]):
        done = run("grow", str(tmp_path / "run"), str(tmp_path / "out"), *options)
        assert done.returncode == 2 and "nothing to grow" in done.stderr, done.stderr
    test_spec = ModelSpec(model_type="testmodel", num_actions=4)  # its tower is fixed
    save_state(capture(test_spec, build_model(test_spec, seed=0), step=5), tmp_path / "test")
    done = run("grow", str(tmp_path / "test"), str(tmp_path / "out"), "--tower-depth", "3")
    assert done.returncode == 2 and "cannot grow" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_an_ema_grows_with_the_same_copies_and_shares_as_the_model() -> None:
    # the recipe in grow's docstring: the optimizer state does not change which old unit a new
    # one copies or the split shares, so the EMA's tensors grow as the model's do
    spec = ModelSpec(tower_depth=1, tower_width=3, num_actions=4)
    model, opt = _trained(spec, 2, "adam")
    state = capture(spec, model, opt, step=2, rng=False)
    bigger = spec.replace(tower_depth=2, tower_width=5)
    grown = grow(state, bigger, seed=7)
    ema = ema_init(state, decay=0.5)
    grown_ema = grow(state.replace(model=ema.tensors, optimizer=None), bigger, seed=7).model
    assert {k: raw_bytes(t) for k, t in grown_ema.items()} == {
        k: raw_bytes(t) for k, t in grown.model.items()
    }
    new_model = build_model(bigger)
    restore_(grown, new_model)
    assert ema_update(ema_init(grown_ema), new_model).updates == 1
