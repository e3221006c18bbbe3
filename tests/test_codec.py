"""The codec: tagged JSON round trips exactly, encoding is byte-deterministic, the sidecar round
trips, and what cannot be stored exactly is refused with a typed error naming where it is."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import GameStats, ModelSpec, TrainState
from keisei_fn.codec import (
    decode_json,
    decode_state,
    dumps,
    encode_json,
    encode_state,
    loads,
)
from keisei_fn.errors import IntegrityError, UnsupportedDtypeError, UnsupportedValueError
from keisei_fn.meta import CheckpointMeta, build_sidecar, check_sidecar
from keisei_fn.testing import assert_states_equal, json_values, train_states


def _wrap(value: Any) -> TrainState:
    return TrainState(spec=None, step=1, model={}, extra={"v": value})


def assert_exact(expected: Any, actual: Any) -> None:
    """Exact equality of nested values: types, float bits, tuple vs list, key types."""
    assert_states_equal(_wrap(expected), _wrap(actual))


def _through_json(value: Any) -> Any:
    return decode_json(loads(dumps(encode_json(value))))


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def _bits(x: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", x))[0])


def _from_bits(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


@given(json_values())
def test_tagged_json_round_trip_is_exact(value: Any) -> None:
    assert_exact(value, _through_json(value))


@given(json_values())
def test_encoded_json_is_plain_json_with_string_keys(value: Any) -> None:
    def check(data: Any) -> None:
        if isinstance(data, dict):
            assert all(isinstance(k, str) for k in data)
            for v in data.values():
                check(v)
        elif isinstance(data, list):
            for v in data:
                check(v)
        else:
            assert data is None or isinstance(data, bool | int | float | str)
            assert not isinstance(data, float) or math.isfinite(data)

    check(encode_json(value))


def test_round_trip_of_the_hard_cases() -> None:
    value = {
        "nan": math.nan,
        "neg_nan_payload": _from_bits(0xFFF8_0000_0000_0001),
        "signalling_nan": _from_bits(0x7FF0_0000_0000_0001),
        "inf": (math.inf, -math.inf),
        "zeros": [0.0, -0.0],
        "pcg64": 2**128 - 1,
        "negative_big": -(2**64),
        "u64_max": 2**64 - 1,
        "i64_min": -(2**63),
        "types": [1, 1.0, True, None, "1"],
        0: "int key",
        (1, "a"): "tuple key",
        "__tuple__": [1, 2],
        "__float__": "nan",
        "nested": {"__items__": {"__tensor__": "x"}, 3: (4, [5, (6,)])},
    }
    back = _through_json(value)
    assert_exact(value, back)
    assert _bits(back["neg_nan_payload"]) == 0xFFF8_0000_0000_0001
    assert _bits(back["signalling_nan"]) == 0x7FF0_0000_0000_0001
    assert type(back["nested"][3]) is tuple and type(back["nested"][3][1]) is list


def test_exact_check_sees_what_equality_misses() -> None:
    """The comparison used above is stricter than ==, or the round-trip property proves little."""
    for expected, actual in [
        ({"x": -0.0}, {"x": 0.0}),
        ({"x": 1}, {"x": 1.0}),
        ({"x": 1}, {"x": True}),
        ({"x": (1,)}, {"x": [1]}),
        ({1: "a"}, {True: "a"}),
        ({"x": math.nan}, {"x": _from_bits(0x7FF8_0000_0000_0001)}),
    ]:
        with pytest.raises(AssertionError):
            assert_exact(expected, actual)


@settings(deadline=None, max_examples=15)
@given(train_states())
def test_encoding_the_same_state_twice_gives_identical_bytes(state: TrainState) -> None:
    first, second = encode_state(state), encode_state(state)
    assert dumps(first.header) == dumps(second.header)
    assert first.aliases == second.aliases
    assert list(first.tensors) == list(second.tensors)
    for name, tensor in first.tensors.items():
        other = second.tensors[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape
        assert torch.equal(_raw(tensor), _raw(other))


def test_string_keyed_dicts_encode_independently_of_insertion_order() -> None:
    a = TrainState(spec=None, step=1, model={}, extra={"b": 1, "a": {"y": 2, "x": 3}})
    b = TrainState(spec=None, step=1, model={}, extra={"a": {"x": 3, "y": 2}, "b": 1})
    assert dumps(encode_state(a).header) == dumps(encode_state(b).header)


@settings(deadline=None, max_examples=15)
@given(train_states())
def test_encode_decode_state_round_trip(state: TrainState) -> None:
    encoded = encode_state(state)
    header = loads(dumps(encoded.header))
    assert_states_equal(state, decode_state(encoded.tensors, encoded.aliases, header))


@settings(deadline=None, max_examples=15)
@given(train_states())
def test_sidecar_round_trip(state: TrainState) -> None:
    encoded = encode_state(state)
    name = f"checkpoint_ts{state.step}"
    sidecar = build_sidecar(
        loads(dumps(encoded.header)),
        name=name,
        kind="periodic",
        tensors=encoded.tensors,
        aliases=encoded.aliases,
        weights_file=f"{name}.0123456789abcdef.safetensors",
        weights_size=123,
        weights_digest="blake3:" + "ab" * 32,
        tensor_digests={k: "blake3:" + "cd" * 32 for k in encoded.tensors},
    )
    raw = dumps(sidecar)
    parsed = check_sidecar(raw, name=name)
    assert parsed == sidecar and dumps(parsed) == raw
    meta = CheckpointMeta.from_sidecar(parsed, run_dir=Path("run"))
    assert (meta.name, meta.step, meta.episodes, meta.kind) == (
        name,
        state.step,
        state.episodes,
        "periodic",
    )
    assert meta.stats == state.stats and meta.spec == state.spec
    assert meta.weights_size == 123 and meta.digest == sidecar["digest"]
    assert set(meta.tensors) == set(encoded.tensors)
    assert meta.weights_file == f"{name}.0123456789abcdef.safetensors"
    assert meta.tensor_digests == {k: "blake3:" + "cd" * 32 for k in encoded.tensors}


def test_meta_of_a_state_with_a_tensor_in_extra_names_the_tensor() -> None:
    state = TrainState(spec=None, step=3, model={}, extra={"table": torch.ones(2), "elo": 1500.0})
    encoded = encode_state(state)
    sidecar = build_sidecar(
        loads(dumps(encoded.header)),
        name="checkpoint_ts3",
        kind="periodic",
        tensors=encoded.tensors,
        aliases=encoded.aliases,
        weights_file="checkpoint_ts3.0123456789abcdef.safetensors",
        weights_size=8,
        weights_digest="blake3:00",
        tensor_digests={k: "blake3:00" for k in encoded.tensors},
    )
    meta = CheckpointMeta.from_sidecar(sidecar, run_dir=Path("run"))
    assert meta.extra == {"table": "extra/table", "elo": 1500.0}


def test_model_keys_with_slashes_and_percent_signs_round_trip() -> None:
    model = {"/": torch.ones(1), "a/b": torch.zeros(2), "%2F": torch.ones(3), "a%b": torch.ones(4)}
    state = TrainState(spec=None, step=1, model=model)
    encoded = encode_state(state)
    assert len(encoded.tensors) == 4
    assert_states_equal(state, decode_state(encoded.tensors, encoded.aliases, encoded.header))


def test_tensors_under_colliding_names_are_all_stored() -> None:
    """An int key 0 and a str key "0" in one dict must not be refused or mixed up."""
    extra = {0: torch.ones(1), "0": torch.zeros(1), "0#1": torch.full((1,), 2.0)}
    state = TrainState(spec=None, step=1, model={}, extra=extra)
    encoded = encode_state(state)
    assert len(encoded.tensors) == 3
    assert_states_equal(state, decode_state(encoded.tensors, encoded.aliases, encoded.header))


def test_tied_tensors_are_stored_once_and_decoded_shared() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    state = TrainState(
        spec=None,
        step=1,
        model={"embed.weight": w, "head.weight": w, "half": w[1:]},
        optimizer={"state": {0: {"exp_avg": w}}, "param_groups": []},
    )
    encoded = encode_state(state)
    assert set(encoded.tensors) == {"model/embed.weight", "model/half"}
    assert set(encoded.aliases) == {"model/head.weight", "optimizer/state/0/exp_avg"}
    decoded = decode_state(encoded.tensors, encoded.aliases, encoded.header)
    assert decoded.model["embed.weight"] is decoded.model["head.weight"]
    assert decoded.optimizer is not None
    assert decoded.optimizer["state"][0]["exp_avg"] is decoded.model["embed.weight"]
    assert_states_equal(state, decoded)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32, torch.float8_e8m0fnu])
@pytest.mark.parametrize(
    ("part", "name"),
    [("model", "model/bad"), ("optimizer", "optimizer/state/0/exp_avg"), ("extra", "extra/bad")],
)
def test_unstorable_dtypes_are_refused(dtype: torch.dtype, part: str, name: str) -> None:
    bad = torch.zeros(2, dtype=dtype)
    fields: dict[str, Any] = {"model": {"ok": torch.zeros(1)}}
    if part == "model":
        fields["model"] = {"ok": torch.zeros(1), "bad": bad}
    elif part == "optimizer":
        fields["optimizer"] = {"state": {0: {"exp_avg": bad}}, "param_groups": []}
    else:
        fields["extra"] = {"bad": bad}
    with pytest.raises(UnsupportedDtypeError, match=name) as info:
        encode_state(TrainState(spec=None, step=1, **fields))
    assert str(dtype).removeprefix("torch.") in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (object(), "['a'][1]['b']"),
        ({1, 2}, "['a'][1]['b']"),
        (b"bytes", "['a'][1]['b']"),
        ("\ud800", "['a'][1]['b']"),
        (torch.nn.Linear(1, 1), "['a'][1]['b']"),
    ],
)
def test_unstorable_values_are_refused_with_their_path(value: Any, where: str) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        encode_state(TrainState(spec=None, step=1, model={}, extra={"a": [0, {"b": value}]}))
    assert where in str(info.value)


def test_lone_surrogate_in_a_key_is_refused() -> None:
    with pytest.raises(UnsupportedValueError, match="not UTF-8"):
        encode_json({"\udc80": 1})


def test_tensor_outside_a_state_is_refused_in_json() -> None:
    with pytest.raises(UnsupportedValueError, match=r"\['w'\]"):
        encode_json({"w": torch.zeros(1)})


@pytest.mark.parametrize(
    "data",
    [
        {"__float__": "not-a-float"},
        {"__float__": "nan:zz"},
        {"__int__": "12x"},
        {"__tuple__": 5},
        {"__items__": [[1]]},
        {"__items__": [[{"a": 1}, "an unhashable key"]]},
        {"__tensor__": "missing"},
    ],
)
def test_malformed_tags_raise_integrity_error(data: Any) -> None:
    with pytest.raises(IntegrityError, match="malformed JSON tag"):
        decode_json(data, tensors={})


def test_invalid_json_raises_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="invalid JSON"):
        loads(b'{"a": ')


def test_numpy_scalars_are_stored_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    back = _through_json({"f": np.float32(0.5), "i": np.int64(-3), "b": np.bool_(True)})
    assert_exact({"f": 0.5, "i": -3, "b": True}, back)


def test_state_header_holds_the_counters() -> None:
    spec = ModelSpec(model_type="testmodel", num_actions=8)
    state = TrainState(
        spec=spec, step=10240, episodes=7, stats=GameStats(black_wins=2, draws=1), model={}
    )
    header = loads(dumps(encode_state(state).header))
    assert header["step"] == 10240 and header["episodes"] == 7
    assert header["stats"] == {"black_wins": 2, "white_wins": 0, "draws": 1}
    assert ModelSpec.from_json(header["spec"]) == spec


@given(st.integers())
def test_any_int_round_trips(value: int) -> None:
    back = _through_json(value)
    assert type(back) is int and back == value


def test_counters_beyond_64_bits_are_refused_typed() -> None:
    state = TrainState(spec=None, step=2**64, model={})
    with pytest.raises(UnsupportedValueError, match="JSON"):
        dumps(encode_state(state).header)
