"""``capture`` and ``restore_``: the bridges between live torch objects and TrainState snapshots.

A snapshot is a clone no later step changes; restoring hands torch copies (the snapshot stays
what it was); every mismatch is reported at once, before anything changes; wrappers, scalers,
schedulers and RNGs (global and user-held) round-trip exactly, through the disk too.
"""

from __future__ import annotations

import logging
import random
import tempfile
from typing import Any

import numpy as np
import pytest
import resume_loops as loops
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keisei_fn import TrainState, capture, load_state, restore_, save_state
from keisei_fn.errors import StateMismatchError
from keisei_fn.rng import capture_rng, restore_rng_
from keisei_fn.state import thaw
from keisei_fn.testing import assert_states_equal


def deep_copy(state: TrainState) -> TrainState:
    """The same snapshot with every tensor cloned: a reference that nothing else can change."""
    parts = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")
    return state.replace(
        **{p: thaw(getattr(state, p), on_tensor=torch.Tensor.clone) for p in parts}
    )


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def snapshot(loop: loops.Loop, step: int) -> TrainState:
    model, optimizer, scheduler, scaler = loop
    return capture(loops.SPEC, model, optimizer, scheduler=scheduler, scaler=scaler, step=step)


def train(loop: loops.Loop, steps: range) -> None:
    for step in steps:
        loops.train_step(*loop, step)


def disk_roundtrip(state: TrainState) -> TrainState:
    with tempfile.TemporaryDirectory() as run_dir:
        return load_state(save_state(state, run_dir).path)


class Tiny(nn.Module):
    """Linear → BatchNorm → Linear: parameters, float buffers and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(6, 4)).square().mean().backward()
    optimizer.step()


# --- snapshots are values ---------------------------------------------------------------------


def test_capture_clones_so_later_steps_do_not_change_the_state() -> None:
    seed_all(0)
    loop = loops.setup_adam()
    train(loop, range(3))
    state = snapshot(loop, 3)
    reference = deep_copy(state)
    train(loop, range(3, 5))
    assert_states_equal(reference, state)
    live = dict(loop[0].named_parameters())
    assert all(t.data_ptr() != live[k].data_ptr() for k, t in state.model.items() if k in live)
    assert not any(t.requires_grad for t in state.model.values())


def test_restore_hands_copies_and_leaves_the_state_unchanged() -> None:
    seed_all(0)
    loop = loops.setup_adam()
    train(loop, range(3))
    state = snapshot(loop, 3)
    reference = deep_copy(state)
    train(loop, range(3, 6))  # the original run goes on
    finals = [snapshot(loop, 6)]
    for offset in (1.0, 2.0):  # two fresh pairs, made different first
        model, optimizer, scheduler, scaler = fresh = loops.setup_adam()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(offset)
        restore_(state, model, optimizer, scheduler=scheduler, scaler=scaler)
        train(fresh, range(3, 6))
        finals.append(snapshot(fresh, 6))
    assert_states_equal(finals[0], finals[1])
    assert_states_equal(finals[0], finals[2])
    assert_states_equal(reference, state)


def test_extra_state_is_handed_a_copy() -> None:
    class RunningStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.stats = torch.zeros(3)

        def get_extra_state(self) -> torch.Tensor:
            return self.stats

        def set_extra_state(self, state: torch.Tensor) -> None:
            self.stats = state  # keeps what it is given

    source = RunningStats()
    source.stats.add_(5.0)
    state = capture(None, source, step=1)
    target = RunningStats()
    restore_(state, target)
    target.stats.add_(1.0)
    assert target.stats.tolist() == [6.0, 6.0, 6.0]
    assert state.model["_extra_state"].tolist() == [5.0, 5.0, 5.0]


# --- what restore_ puts back ------------------------------------------------------------------


def test_optimizer_int_keys_and_adam_betas_tuple_survive_the_disk() -> None:
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.95))
    for _ in range(2):
        tiny_step(model, optimizer)
    state = disk_roundtrip(capture(None, model, optimizer, step=2))
    fresh = Tiny()
    restored = torch.optim.Adam(fresh.parameters())
    restore_(state, fresh, restored)
    saved = restored.state_dict()
    assert list(saved["state"]) == list(optimizer.state_dict()["state"]) == [0, 1, 2, 3, 4, 5]
    assert all(type(k) is int for k in saved["state"])
    group = restored.param_groups[0]
    assert type(group["betas"]) is tuple and group["betas"] == (0.8, 0.95)
    assert group["lr"] == 3e-3
    assert_states_equal(
        capture(None, model, optimizer, step=2), capture(None, fresh, restored, step=2)
    )


def test_a_mismatch_lists_every_problem_and_changes_nothing() -> None:
    source = Tiny()
    optimizer = torch.optim.Adam(source.parameters())
    tiny_step(source, optimizer)
    good = capture(None, source, optimizer, step=1)
    model_part = dict(good.model)
    del model_part["body.2.bias"]
    model_part["body.3.weight"] = torch.zeros(2)
    model_part["body.0.weight"] = torch.zeros(5, 4)
    model_part["body.1.running_mean"] = torch.zeros(8, dtype=torch.float64)
    optimizer_part = thaw(good.optimizer)
    optimizer_part["state"][2]["exp_avg"] = torch.zeros(3)
    bad = good.replace(model=model_part, optimizer=optimizer_part)

    target = Tiny()
    target_optimizer = torch.optim.Adam(target.parameters())
    tiny_step(target, target_optimizer)
    user_rng = np.random.default_rng(5)
    before = capture(None, target, target_optimizer, step=1, generators={"env": user_rng})
    with pytest.raises(StateMismatchError) as failure:
        restore_(bad, target, target_optimizer, generators={"env": user_rng})
    message = str(failure.value)
    for problem in (
        "1 tensor in the model is not in the state: 'body.2.bias'",
        "1 tensor in the state is not in the model: 'body.3.weight'",
        "1 tensor has another shape: 'body.0.weight' (the state has float32[5, 4], the model "
        "float32[8, 4])",
        "1 tensor has another dtype: 'body.1.running_mean' (the state has float64[8], the model "
        "float32[8])",
        "optimizer state[2]['exp_avg']: state has float32[3], param is float32[8]",
        "generator 'env' is not in the saved state",
    ):
        assert problem in message
    after = capture(None, target, target_optimizer, step=1, generators={"env": user_rng})
    assert_states_equal(before, after)  # weights, optimizer and RNGs untouched


def test_a_wrong_bit_generator_is_refused_before_anything_changes() -> None:
    saved = capture_rng({"env": np.random.default_rng(1)})
    random.seed(3)
    expected = random.random()
    random.seed(3)
    with pytest.raises(StateMismatchError, match="saved PCG64 state, live generator uses Philox"):
        restore_rng_(saved, {"env": np.random.Generator(np.random.Philox(1))})
    assert random.random() == expected


def test_wrappers_give_canonical_keys_both_ways() -> None:
    def weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        return capture(None, model, optimizer, step=1, rng=False)

    plain = Tiny()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    tiny_step(plain, optimizer)
    compiled = torch.compile(plain, backend="eager")
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    state = weights(compiled, optimizer)
    assert list(state.model) == list(plain.state_dict())

    wrapped = nn.DataParallel(Tiny())
    wrapped_optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    restore_(state, wrapped, wrapped_optimizer)
    assert_states_equal(state, weights(wrapped, wrapped_optimizer))

    back = torch.compile(Tiny(), backend="eager")
    back_optimizer = torch.optim.SGD(back.parameters(), lr=0.5)
    restore_(weights(wrapped, wrapped_optimizer), back, back_optimizer)
    assert_states_equal(state, weights(back, back_optimizer))


# --- scaler and scheduler -----------------------------------------------------------------------


def test_a_disabled_scaler_is_captured_as_none() -> None:
    model = Tiny()
    state = capture(None, model, scaler=torch.amp.GradScaler("cpu", enabled=False), step=1)
    assert state.scaler is None


def test_cpu_grad_scaler_round_trips_through_the_disk() -> None:
    # CPU GradScaler is enabled in torch >= 2.3; the loops' scaler overflows now and then.
    seed_all(0)
    loop = loops.setup_sgd()
    scaler = loop[3]
    assert scaler is not None and scaler.is_enabled()
    initial = scaler.get_scale()
    train(loop, range(4))
    assert scaler.get_scale() != initial
    state = disk_roundtrip(snapshot(loop, 4))
    assert state.scaler is not None and dict(state.scaler) == scaler.state_dict()
    fresh = loops.setup_sgd()
    train(loop, range(4, 8))
    restore_(state, fresh[0], fresh[1], scheduler=fresh[2], scaler=fresh[3])
    assert fresh[3] is not None and fresh[3].state_dict() == state.scaler
    train(fresh, range(4, 8))
    assert_states_equal(snapshot(loop, 8), snapshot(fresh, 8))


def test_restoring_a_scaler_from_a_state_without_one_warns_and_leaves_it_fresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Tiny()
    state = capture(None, model, step=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with caplog.at_level(logging.WARNING, logger="keisei_fn"):
        restore_(state, Tiny(), scaler=scaler)
    assert "holds no GradScaler state: scaler left fresh" in caplog.text
    assert scaler.state_dict() == torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()


def test_restoring_a_scheduler_from_a_state_without_one_warns_and_leaves_it_fresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = capture(None, model, optimizer, step=1)
    target = Tiny()
    target_optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(target_optimizer, step_size=1, gamma=0.5)
    fresh = dict(scheduler.state_dict())
    with caplog.at_level(logging.WARNING, logger="keisei_fn"):
        restore_(state, target, target_optimizer, scheduler=scheduler)
    assert "holds no scheduler state: scheduler left fresh" in caplog.text
    assert scheduler.state_dict() == fresh


# --- RNGs -------------------------------------------------------------------------------------


def draw(generators: dict[str, Any]) -> tuple[Any, ...]:
    """One draw from every global RNG and every user generator."""
    return (
        random.random(),
        np.random.random(),
        torch.rand(3).view(torch.int32).tolist(),
        torch.rand(2, generator=generators["torch"]).view(torch.int32).tolist(),
        generators["numpy"].integers(2**62, size=3).tolist(),
        generators["python"].random(),
    )


def user_generators(seed: int) -> dict[str, Any]:
    return {
        "torch": torch.Generator().manual_seed(seed),
        "numpy": np.random.default_rng(seed),
        "python": random.Random(seed),
    }


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), pcg_seed=st.integers(0, 2**128 - 1))
def test_every_rng_is_restored_exactly_through_the_disk(seed: int, pcg_seed: int) -> None:
    seed_all(seed)
    generators = user_generators(seed)
    generators["numpy"] = np.random.default_rng(pcg_seed)
    model = nn.Linear(2, 2)
    state = disk_roundtrip(capture(None, model, step=1, generators=generators))
    first = draw(generators)
    draw(generators)  # move every RNG on
    restore_(state, model, generators=generators)
    assert draw(generators) == first


def test_numpy_pcg64_state_holds_128_bit_ints() -> None:
    state = capture_rng({"numpy": np.random.default_rng(2**100)})
    pcg = state["generators"]["numpy"]["state"]["state"]
    assert max(pcg["state"], pcg["inc"]) >= 2**64


@pytest.mark.parametrize("how", ["rng=False", "state without rng"])
def test_rngs_are_left_alone(how: str) -> None:
    generators = user_generators(0)
    model = nn.Linear(2, 2)
    state = capture(None, model, step=1, rng=how != "state without rng", generators=generators)
    draw(generators)

    def rngs_at_seven() -> dict[str, Any]:
        seed_all(7)
        return user_generators(7)

    expected = draw(rngs_at_seven())
    generators = rngs_at_seven()
    restore_(state, model, rng=how != "rng=False", generators=generators)
    assert draw(generators) == expected
