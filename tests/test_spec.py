import argparse
import math
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keisei_fn import FEATURE_SPECS, FeatureSpec, ModelSpec, register_feature_set
from keisei_fn.errors import SpecError
from keisei_fn.spec import TEST_MODEL_TYPES

DEFAULTS = dict(
    model_type="resnet",
    input_features="core46",
    tower_depth=9,
    tower_width=256,
    se_ratio=0.25,
    num_actions=13527,
)


def test_defaults_are_keiseis():
    spec = ModelSpec()
    assert spec.to_json() == DEFAULTS
    assert spec.obs_shape == (46, 9, 9)
    assert spec.feature_spec.num_planes == 46


@pytest.mark.parametrize("model_type", sorted(TEST_MODEL_TYPES))
def test_test_model_types_normalise_tower(model_type):
    spec = ModelSpec(model_type=model_type, tower_depth=20, tower_width=512, se_ratio=0.5)
    assert (spec.tower_depth, spec.tower_width, spec.se_ratio) == (1, 16, 0.0)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, -3])
def test_nonpositive_se_ratio_means_no_se(ratio):
    assert ModelSpec(se_ratio=ratio).se_ratio == 0.0


def test_explicit_zero_se_ratio_override_wins_over_config():
    """Older Keisei versions' bug (fixed in February 2026): `args.se_ratio or
    config.se_ratio` turned an explicit 0 into 0.25."""
    config = {"training": {"se_ratio": 0.25}}
    assert ModelSpec.from_config(config, argparse.Namespace(se_ratio=0.0)).se_ratio == 0.0
    assert ModelSpec.from_config(config, {"se_ratio": 0}).se_ratio == 0.0


def test_nested_config_and_cli_names():
    config = {
        "training": {"model_type": "resnet", "tower_depth": 3, "learning_rate": 3e-4},
        "env": {"num_actions_total": 13527, "device": "cpu"},
    }
    args = argparse.Namespace(model=None, tower_width=32, input_features=None, se_ratio=None)
    spec = ModelSpec.from_config(config, args)
    assert (spec.tower_depth, spec.tower_width, spec.se_ratio) == (3, 32, 0.25)


def test_config_object_with_attributes():
    config = types.SimpleNamespace(
        training=types.SimpleNamespace(tower_depth=2, tower_width=8, se_ratio=0.5),
        env=types.SimpleNamespace(num_actions_total=100),
    )
    spec = ModelSpec.from_config(config)
    assert (spec.tower_depth, spec.tower_width, spec.se_ratio, spec.num_actions) == (2, 8, 0.5, 100)


def test_flat_config_of_field_names_and_unknown_keys():
    assert ModelSpec.from_config({"tower_depth": 2}).tower_depth == 2
    with pytest.raises(SpecError, match="tower_dpeth"):
        ModelSpec.from_config({"tower_dpeth": 2})


CONFIG_VALUES = {
    "tower_depth": st.integers(1, 40),
    "tower_width": st.integers(1, 512),
    "se_ratio": st.sampled_from([0, 0.0, -1.0, 0.125, 0.25, 0.5, 1, 2.0]),
    "input_features": st.sampled_from(["core46", "testfeats", "dummyfeats", "resumefeats"]),
    "model_type": st.sampled_from(["resnet", "dummy", "testmodel", "resumemodel"]),
}
CLI_NAME = {"model_type": "model"}


@given(
    config=st.fixed_dictionaries({}, optional=CONFIG_VALUES),
    overrides=st.fixed_dictionaries(
        {}, optional={k: st.one_of(st.none(), v) for k, v in CONFIG_VALUES.items()}
    ),
    as_namespace=st.booleans(),
)
def test_override_precedence(config, overrides, as_namespace):
    """Property: a field is the override when not None, else the config's, else the default."""
    nested = {"training": dict(config)}
    cli = {CLI_NAME.get(k, k): v for k, v in overrides.items()}
    spec = ModelSpec.from_config(nested, argparse.Namespace(**cli) if as_namespace else cli)
    expected = dict(DEFAULTS)
    expected.update(config)
    expected.update({k: v for k, v in overrides.items() if v is not None})
    assert spec == ModelSpec(**expected)
    assert spec.model_type == expected["model_type"]
    if spec.model_type not in TEST_MODEL_TYPES:
        assert spec.tower_depth == expected["tower_depth"]
        assert spec.se_ratio == max(float(expected["se_ratio"]), 0.0)


@given(
    depth=st.integers(1, 30),
    width=st.integers(1, 300),
    se=st.floats(-1, 2, allow_nan=False),
    model_type=st.sampled_from(["resnet", "testmodel"]),
)
def test_json_round_trip_and_hash(depth, width, se, model_type):
    spec = ModelSpec(model_type=model_type, tower_depth=depth, tower_width=width, se_ratio=se)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert len({spec, again}) == 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model_type", "resnett", "model_type 'resnett' is unknown"),
        ("model_type", None, "model_type"),
        ("input_features", "core46+all", "unknown input_features 'core46\\+all'"),
        ("input_features", 46, "unknown input_features"),
        ("tower_depth", 0, "tower_depth must be >= 1"),
        ("tower_depth", "9", "tower_depth must be an int"),
        ("tower_depth", 9.0, "tower_depth must be an int"),
        ("tower_depth", True, "tower_depth must be an int"),
        ("tower_width", -1, "tower_width must be >= 1"),
        ("se_ratio", math.nan, "se_ratio must be finite"),
        ("se_ratio", math.inf, "se_ratio must be finite"),
        ("se_ratio", "0.25", "se_ratio must be a number"),
        ("se_ratio", None, "se_ratio must be a number"),
        ("num_actions", 0, "num_actions must be >= 1"),
    ],
)
def test_bad_values_raise_spec_error(field, value, match):
    with pytest.raises(SpecError, match=match):
        ModelSpec(**{field: value})
    with pytest.raises(ValueError):  # SpecError is also a ValueError
        ModelSpec(**{field: value})


def test_from_json_rejects_unknown_fields():
    with pytest.raises(SpecError, match="unknown ModelSpec fields"):
        ModelSpec.from_json({**DEFAULTS, "depth": 3})
    with pytest.raises(SpecError):
        ModelSpec.from_json([1, 2])


def test_replace_validates():
    assert ModelSpec().replace(tower_depth=2).tower_depth == 2
    with pytest.raises(SpecError):
        ModelSpec().replace(tower_depth=0)


def test_feature_registry():
    assert set(FEATURE_SPECS) >= {"core46", "dummyfeats", "testfeats", "resumefeats"}
    # Keisei declared 51 planes for "core46+all" but never produced them: not registered.
    assert "core46+all" not in FEATURE_SPECS
    for name in ("dummyfeats", "testfeats", "resumefeats"):
        assert FEATURE_SPECS[name].plane_names == FEATURE_SPECS["core46"].plane_names
    assert FEATURE_SPECS["core46"].plane_names[42] == "black_to_move"
    with pytest.raises(TypeError):
        FEATURE_SPECS["x"] = FEATURE_SPECS["core46"]  # read-only view


def test_register_user_feature_set():
    spec = register_feature_set(
        FeatureSpec(name="two_planes", num_planes=2, plane_names=("a", "b"))
    )
    assert ModelSpec(input_features="two_planes").obs_shape == (2, 9, 9)
    with pytest.raises(SpecError, match="already registered"):
        register_feature_set(spec.replace(plane_names=("c", "d")))
    with pytest.raises(SpecError, match="num_planes=3"):
        FeatureSpec(name="bad", num_planes=3, plane_names=("a",))
    with pytest.raises(SpecError, match="has no encoder"):
        spec.load_encoder()
