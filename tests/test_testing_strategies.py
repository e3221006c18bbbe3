"""keisei_fn.testing: the strategies generate what they promise, and assert_states_equal catches
real differences with a message naming the key."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from keisei_fn import GameStats, ModelSpec, TrainState, build_model, restore_
from keisei_fn.codec import DTYPE_NAMES
from keisei_fn.state import FrozenList, iter_tensors
from keisei_fn.store.names import parse_stem
from keisei_fn.testing import (
    assert_roundtrip,
    assert_states_equal,
    checkpoint_metas,
    fresh_run_dir,
    game_stats,
    json_values,
    model_specs,
    tensors,
    train_states,
)

T = TypeVar("T")


def examples(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """``n`` examples, the same ones every run (derandomized): what a user's tests would see."""
    found: list[T] = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: T) -> None:
        found.append(example)

    collect()
    return found


def any_tensors() -> st.SearchStrategy[torch.Tensor]:
    return tensors(noncontiguous=True, shapes=st.lists(st.integers(0, 6), max_size=3).map(tuple))


@functools.cache
def tensor_examples() -> list[torch.Tensor]:
    return examples(any_tensors(), 400)


@functools.cache
def json_examples() -> list[Any]:
    return examples(json_values(), 300)


@functools.cache
def state_examples() -> list[TrainState]:
    return examples(train_states(), 120)


class _Found(Exception):
    def __init__(self, example: object) -> None:
        super().__init__("found")
        self.example = example


def search(strategy: st.SearchStrategy[T], condition: Callable[[T], bool], n: int) -> list[T]:
    """An example of ``strategy`` satisfying ``condition`` among its first ``n`` (generation
    stops at the first; nothing is shrunk), or none."""

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def look(example: T) -> None:
        if condition(example):
            raise _Found(example)

    try:
        look()
    except _Found as found:
        return [found.example]  # type: ignore[list-item]
    return []


def exists(
    found: list[T], condition: Callable[[T], bool], strategy: st.SearchStrategy[T] | None = None
) -> T:
    """The first example satisfying ``condition``; fails when none does.

    ``found`` is a cached sample (fast); when none of it satisfies ``condition`` and
    ``strategy`` is given, the strategy's first 1,000 examples are searched too: what a
    derandomized sample holds depends on what the test process ran before (Hypothesis mixes
    constants from the loaded modules into its generation), so a rare branch may be absent
    from one sample while the strategy covers it.
    """
    matches = [x for x in found if condition(x)]
    if not matches and strategy is not None:
        matches = search(strategy, condition, 1000)
    assert matches, f"none of {len(found)} examples satisfies the condition"
    return matches[0]


def bits(t: torch.Tensor) -> list[int]:
    """Each element's bit pattern as an unsigned int."""
    raw = t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).tolist()
    size = t.dtype.itemsize
    return [int.from_bytes(bytes(raw[i : i + size]), "little") for i in range(0, len(raw), size)]


# --- tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=str)
def test_every_stored_dtype_is_generated(dtype: torch.dtype) -> None:
    assert exists(tensor_examples(), lambda t: t.dtype == dtype, any_tensors()).dtype == dtype


def test_bfloat16_nan_payloads_and_signs_are_generated() -> None:
    def odd_nans(t: torch.Tensor) -> set[int]:
        return {b for b in bits(t) if (b & 0x7F80) == 0x7F80 and b & 0x7F and b != 0x7FC0}

    strategy = tensors(dtypes=[torch.bfloat16])
    bf16 = examples(strategy, 100)
    assert odd_nans(exists(bf16, lambda t: len(odd_nans(t)) >= 1, strategy))
    exists(bf16, lambda t: any(b & 0x8000 for b in odd_nans(t)), strategy)  # a negative one


@pytest.mark.parametrize(
    ("dtype", "pattern", "what"),
    [
        (torch.float16, 0x8000, "-0.0"),
        (torch.float32, 0x7F800000, "inf"),
        (torch.float32, 0xFF800000, "-inf"),
        (torch.float64, 0x1, "the smallest subnormal"),
        (torch.float8_e4m3fn, 0xFF, "negative NaN"),
        (torch.float8_e5m2, 0x7C, "inf"),
        (torch.int64, 1 << 63, "the minimum"),
    ],
)
def test_special_values_are_generated(dtype: torch.dtype, pattern: int, what: str) -> None:
    strategy = tensors(dtypes=[dtype])
    assert pattern in bits(exists(examples(strategy, 300), lambda t: pattern in bits(t), strategy))


def test_bool_tensors_hold_only_valid_bytes_and_shapes_are_respected() -> None:
    @settings(max_examples=50, database=None)
    @given(tensors(dtypes=[torch.bool, torch.int8], shapes=st.just((2, 3)), noncontiguous=True))
    def check(t: torch.Tensor) -> None:
        assert t.dtype in (torch.bool, torch.int8) and tuple(t.shape) == (2, 3)
        if t.dtype == torch.bool:
            assert set(bits(t)) <= {0, 1}

    check()


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("0-d", lambda t: t.dim() == 0),
        ("empty", lambda t: t.numel() == 0 and t.dim() > 0),
        ("non-contiguous", lambda t: not t.is_contiguous()),
        ("expanded (stride 0)", lambda t: 0 in t.stride() and t.numel() > 1),
        ("transposed", lambda t: t.dim() >= 2 and t.stride(-1) > 1 and t.stride(-2) == 1),
        ("offset into a storage", lambda t: t.storage_offset() > 0),
        ("large (seeded fill)", lambda t: t.numel() > 16),
    ],
)
def test_shapes_and_layouts_are_generated(what: str, condition: Callable[[Any], bool]) -> None:
    exists(tensor_examples(), condition, any_tensors())


def test_contiguous_only_by_default() -> None:
    @settings(max_examples=100, database=None)
    @given(tensors())
    def check(t: torch.Tensor) -> None:
        assert t.is_contiguous() and t.storage_offset() == 0

    check()


# --- JSON values, stats, specs, metas ---------------------------------------------------------


def _walk(value: Any) -> list[Any]:
    out = [value]
    if isinstance(value, dict):
        for k, v in value.items():
            out += [k, *_walk(v)]
    elif isinstance(value, list | tuple):
        for v in value:
            out += _walk(v)
    return out


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("NaN", lambda x: isinstance(x, float) and math.isnan(x)),
        ("-0.0", lambda x: isinstance(x, float) and x == 0 and math.copysign(1, x) < 0),
        ("inf", lambda x: isinstance(x, float) and math.isinf(x)),
        ("an int beyond 64 bits", lambda x: type(x) is int and not -(2**63) <= x < 2**64),
        ("a tuple", lambda x: type(x) is tuple and len(x) > 0),
        ("a bool", lambda x: x is True),
        ("None", lambda x: x is None),
        ("a tag-like string", lambda x: x == "__tuple__"),
        ("an int-keyed dict", lambda x: isinstance(x, dict) and any(type(k) is int for k in x)),
        ("a tuple-keyed dict", lambda x: isinstance(x, dict) and any(type(k) is tuple for k in x)),
        ("a tag-like key", lambda x: isinstance(x, dict) and "__float__" in x),
    ],
)
def test_json_values_cover_the_tagged_domain(what: str, condition: Callable[[Any], bool]) -> None:
    exists(json_examples(), lambda v: any(condition(x) for x in _walk(v)), json_values())


@settings(max_examples=50, database=None)
@given(model_specs(), game_stats(), checkpoint_metas())
def test_specs_stats_and_metas_are_valid_and_small(
    spec: ModelSpec, stats: GameStats, meta: Any
) -> None:
    assert 1 <= spec.tower_depth <= 2 and 1 <= spec.tower_width <= 16
    assert 1 <= spec.num_actions <= 32
    assert stats.total >= 0
    parsed = parse_stem(meta.name)
    assert parsed is not None
    assert meta.kind == "final_model" or parsed.step == meta.step
    assert (meta.kind == "final_model") == (meta.name == "final_model")


# --- train states --------------------------------------------------------------------------


def _tied(state: TrainState) -> bool:
    seen: dict[tuple[Any, ...], str] = {}
    for path, t in iter_tensors(dict(state.model)):
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in seen:
                return True
            seen[key] = str(path)
    return False


def _optimizer_has(state: TrainState, condition: Callable[[Any], bool]) -> bool:
    return state.optimizer is not None and any(condition(x) for x in _walk_frozen(state.optimizer))


def _walk_frozen(value: Any) -> list[Any]:
    out = [value]
    if hasattr(value, "items"):
        for k, v in value.items():
            out += [k, *_walk_frozen(v)]
    elif isinstance(value, tuple):
        for v in value:
            out += _walk_frozen(v)
    return out


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("tied parameters", _tied),
        ("an arbitrary module", lambda s: s.spec is None and len(s.model) >= 2),
        ("a Keisei spec", lambda s: s.spec is not None),
        ("int-keyed optimizer state", lambda s: s.optimizer is not None
         and any(type(k) is int for k in s.optimizer["state"])),
        ("a tuple (betas)", lambda s: _optimizer_has(s, lambda x: type(x) is tuple and x)),
        ("a tensor lr", lambda s: s.optimizer is not None and any(
            isinstance(g["lr"], torch.Tensor) for g in s.optimizer["param_groups"])),
        ("None and bools in param_groups", lambda s: _optimizer_has(s, lambda x: x is None)
         and _optimizer_has(s, lambda x: x is True)),
        ("ReduceLROnPlateau best=inf", lambda s: s.scheduler is not None
         and s.scheduler.get("best") == math.inf),
        ("a scaler", lambda s: s.scaler is not None and "scale" in s.scaler),
        ("RNG with ints beyond 64 bits", lambda s: s.rng is not None
         and any(type(x) is int and x >= 2**64 for x in _walk_frozen(s.rng))),
        ("Keisei's elo and metrics", lambda s: "elo_state" in s.extra
         and "metrics_history" in s.extra),
        ("a tensor in extra", lambda s: any(
            isinstance(v, torch.Tensor) for v in s.extra.values())),
        ("a list in extra", lambda s: any(
            isinstance(v, FrozenList) for v in _walk_frozen(s.extra))),
    ],
)  # fmt: skip
def test_train_states_cover_what_they_promise(what: str, condition: Callable[[Any], bool]) -> None:
    exists(state_examples(), condition, train_states())


@settings(max_examples=15, deadline=None, database=None)
@given(train_states(specs=model_specs()))
def test_spec_states_fit_the_network_they_describe(state: TrainState) -> None:
    assert state.spec is not None
    model = build_model(state.spec)
    live = model.state_dict()
    assert list(state.model) == list(live)
    for key, tensor in live.items():
        assert (state.model[key].shape, state.model[key].dtype) == (tensor.shape, tensor.dtype)
    restore_(state.replace(optimizer=None), model, rng=False)
    assert torch.equal(
        bits_tensor(model.state_dict()["stem.weight"]), bits_tensor(state.model["stem.weight"])
    )
    if state.optimizer is not None:
        params = list(model.parameters())
        for index, entry in state.optimizer["state"].items():
            for name, value in entry.items():
                if name != "step" and value is not None:
                    assert value.shape == params[index].shape


def bits_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def test_train_states_respect_their_options() -> None:
    @settings(max_examples=20, database=None, deadline=None)
    @given(train_states(specs=st.none(), steps=st.just(7)))
    def check(state: TrainState) -> None:
        assert state.spec is None and state.step == 7

    check()


# --- assert_states_equal -------------------------------------------------------------------

BASE = TrainState(
    spec=None,
    step=5,
    model={"w": torch.tensor([1.0, float("nan"), -0.0]), "head.weight": torch.ones(2)},
    optimizer={"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"betas": (0.9, 0.99)}]},
    extra={"elo": 1500.0, "n": 1, "flag": True, "hist": [1, 2], "pair": (1, 2)},
)


def _fails(a: TrainState, b: TrainState) -> str:
    with pytest.raises(AssertionError) as info:
        assert_states_equal(a, b)
    return str(info.value)


def test_equal_states_pass_including_nan_and_a_copy() -> None:
    copy = BASE.replace(model={k: v.clone() for k, v in BASE.model.items()})
    assert_states_equal(BASE, BASE)
    assert_states_equal(BASE, copy)


def test_one_flipped_bit_is_caught_and_named() -> None:
    w = BASE.model["w"].clone()
    w.view(torch.int32)[0] ^= 1
    message = _fails(BASE, BASE.replace(model={**BASE.model, "w": w}))
    assert "model['w']" in message and "1 of 3 elements differ" in message
    assert "0x3f800000" in message and "0x3f800001" in message


@pytest.mark.parametrize(
    ("changes", "where", "detail"),
    [
        ({"model": {"w": torch.tensor([1.0, float("nan"), 0.0]), "head.weight": torch.ones(2)}},
         "model['w']", "-0.0 (0x80000000) vs 0.0 (0x00000000)"),
        ({"extra": {**BASE.extra, "n": 1.0}}, "extra['n']", "int 1 vs float 1.0"),
        ({"extra": {**BASE.extra, "flag": 1}}, "extra['flag']", "bool True vs int 1"),
        ({"extra": {**BASE.extra, "pair": [1, 2]}}, "extra['pair']", "tuple (1, 2) vs list [1, 2]"),
        ({"extra": {**BASE.extra, "hist": (1, 2)}}, "extra['hist']", "list [1, 2] vs tuple (1, 2)"),
        ({"extra": {**BASE.extra, "elo": -0.0}}, "extra['elo']", "1500.0"),
        ({"optimizer": {"state": {"0": {"exp_avg": torch.zeros(3)}},
                        "param_groups": [{"betas": (0.9, 0.99)}]}},
         "optimizer['state']", "key 0 only in the first"),
        ({"model": {"w": BASE.model["w"].double(), "head.weight": torch.ones(2)}},
         "model['w']", "dtype torch.float32 vs torch.float64"),
        ({"model": {"w": BASE.model["w"].reshape(1, 3), "head.weight": torch.ones(2)}},
         "model['w']", "shape (3,) vs (1, 3)"),
        ({"model": {"w": BASE.model["w"]}}, "model", "key 'head.weight' only in the first"),
        ({"step": 6}, "step", "5 vs 6"),
        ({"stats": GameStats(draws=1)}, "stats['draws']", "0 vs 1"),
    ],
)  # fmt: skip
def test_differences_are_caught_and_named(changes: dict, where: str, detail: str) -> None:
    message = _fails(BASE, BASE.replace(**changes))
    assert where in message and detail in message, message


def test_nan_payloads_differ_in_tensors_and_json() -> None:
    other_nan = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    w = torch.cat([BASE.model["w"][:1], other_nan, BASE.model["w"][2:]])
    assert "model['w']" in _fails(BASE, BASE.replace(model={**BASE.model, "w": w}))
    payload = torch.tensor([0x7FF8000000000001], dtype=torch.int64).view(torch.float64).item()
    a = BASE.replace(extra={"x": math.nan})
    assert "extra['x']" in _fails(a, BASE.replace(extra={"x": payload}))


def test_an_untied_parameter_is_caught() -> None:
    w = torch.randn(4)
    tied = TrainState(spec=None, step=1, model={"embed": w, "head": w})
    untied = TrainState(spec=None, step=1, model={"embed": w, "head": w.clone()})
    message = _fails(tied, untied)
    assert "model['embed'], model['head']: one shared tensor in the first state" in message
    message = _fails(untied, tied)
    assert "one shared tensor in the second state, not in the first" in message


def test_every_difference_is_listed_in_one_error() -> None:
    other = BASE.replace(step=9, extra={**BASE.extra, "elo": 1.0, "hist": [1, 3]})
    message = _fails(BASE, other)
    assert message.startswith("TrainStates differ in 3 places:")
    for where in ("step", "extra['elo']", "extra['hist'][1]"):
        assert where in message


@settings(max_examples=25, deadline=None)
@given(train_states(), st.data())
def test_any_flipped_bit_in_any_model_tensor_is_caught(
    state: TrainState, data: st.DataObject
) -> None:
    assert_states_equal(state, state)
    keys = [k for k, t in state.model.items() if t.numel()]
    if not keys:
        return
    key = data.draw(st.sampled_from(keys))
    raw = bits_tensor(state.model[key])
    position = data.draw(st.integers(0, raw.numel() - 1))
    flipped = raw.clone()
    flipped[position] ^= 1 << data.draw(st.integers(0, 7))
    if state.model[key].dtype == torch.bool:  # keep bools valid: flip between 0 and 1
        flipped[position] = 1 - raw[position]
    changed = flipped.view(state.model[key].dtype).reshape(state.model[key].shape)
    message = _fails(state, state.replace(model={**state.model, key: changed}))
    assert f"model[{key!r}]" in message


# --- fresh_run_dir, assert_roundtrip, imports ------------------------------------------------


def test_fresh_run_dir_is_empty_private_and_removed() -> None:
    with fresh_run_dir(name="run.v1.2") as run_dir:
        assert run_dir.is_dir() and run_dir.name == "run.v1.2"
        assert list(run_dir.parent.iterdir()) == [run_dir]
        kept = run_dir
    assert not kept.exists() and not kept.parent.exists()
    with fresh_run_dir() as a, fresh_run_dir() as b:
        assert a != b


def test_assert_roundtrip_returns_the_loaded_state() -> None:
    with fresh_run_dir() as run_dir:
        loaded = assert_roundtrip(BASE, run_dir=run_dir)
        assert loaded is not BASE and loaded.step == 5
        assert (Path(run_dir) / "checkpoint_ts5.json").is_file()


def test_testing_needs_neither_wandb_nor_cshogi() -> None:
    code = (
        "import sys, keisei_fn.testing;print([m for m in ('wandb', 'cshogi') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
