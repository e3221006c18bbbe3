import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw
from torch import nn

from keisei_fn import ModelSpec, build_model, canonical_state_dict, register_model, unwrap_model
from keisei_fn.errors import SpecError


def closed_form(planes, width, depth, actions, se_ratio):
    h = max(1, int(width * se_ratio)) if se_ratio > 0 else 0
    se = 2 * width * h + h + width if se_ratio > 0 else 0
    return (
        9 * planes * width
        + 3 * width
        + depth * (18 * width**2 + 6 * width + se)
        + 4 * width
        + 12
        + 163 * actions
        + 163
    )


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bit_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


@pytest.mark.parametrize(
    ("spec", "params", "keys"),
    [
        (ModelSpec(), 13_241_300, 187),
        (ModelSpec(se_ratio=0), 12_943_508, 187 - 9 * 4),
        (ModelSpec(model_type="testmodel"), 2_216_516, 39),
        (ModelSpec(tower_depth=20), 26_598_292, 2 + 5 + 20 * 18 + 18),
    ],
)
def test_reference_parameter_counts(spec, params, keys):
    model = build_model(spec, device="meta")
    assert n_params(model) == params
    assert len(model.state_dict()) == keys


@settings(max_examples=15)
@given(
    depth=st.integers(1, 3),
    width=st.integers(1, 24),
    se=st.sampled_from([0.0, 0.01, 0.25, 0.5, 1.0]),
    actions=st.integers(1, 50),
)
def test_parameter_count_matches_closed_form(depth, width, se, actions):
    spec = ModelSpec(tower_depth=depth, tower_width=width, se_ratio=se, num_actions=actions)
    assert n_params(build_model(spec, device="meta")) == closed_form(46, width, depth, actions, se)


def test_state_dict_keys_are_keiseis():
    keys = set(build_model(ModelSpec(tower_depth=1, tower_width=8), device="meta").state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"stem.weight", "stem.bias", *(f"bn_stem.{k}" for k in bn)}
    for conv in ("conv1", "conv2", "se.fc1", "se.fc2"):
        expected |= {f"res_blocks.0.{conv}.weight", f"res_blocks.0.{conv}.bias"}
    for norm in ("bn1", "bn2"):
        expected |= {f"res_blocks.0.{norm}.{k}" for k in bn}
    for head in ("policy_head", "value_head"):
        expected |= {f"{head}.0.weight", f"{head}.0.bias", f"{head}.4.weight", f"{head}.4.bias"}
        expected |= {f"{head}.1.{k}" for k in bn}
    assert keys == expected


def test_same_seed_same_bits_and_global_rng_untouched():
    spec = ModelSpec(model_type="testmodel")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(spec, seed=7).state_dict()
    b = build_model(spec, seed=7).state_dict()
    c = build_model(spec, seed=8).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(bit_equal(a[k], b[k]) for k in a)
    assert not all(bit_equal(a[k], c[k]) for k in a)


def test_dtype_option():
    model = build_model(ModelSpec(model_type="testmodel"), seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_and_dtypes(dtype):
    model = build_model(ModelSpec(tower_depth=1, tower_width=8), seed=0, dtype=dtype)
    logits, value = model(torch.randn(3, 46, 9, 9, dtype=dtype))
    assert logits.shape == (3, 13527) and value.shape == (3,)
    assert logits.dtype == value.dtype == dtype


def test_bf16_autocast_forward_on_cpu():
    model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randn(2, 46, 9, 9))
    assert logits.dtype == torch.bfloat16


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    deterministic=st.booleans(),
    density=st.sampled_from([0.0, 0.001, 0.05, 1.0]),
)
def test_masked_sampling_is_legal_and_finite(seed, dtype, deterministic, density):
    spec = ModelSpec(tower_depth=1, tower_width=4, num_actions=300)
    model = build_model(spec, seed=0, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(6, 46, 9, 9, generator=gen).to(dtype) * 50  # large logits
    mask = torch.rand(6, 300, generator=gen) < density
    mask[0] = False  # always one all-illegal row
    with torch.no_grad():
        action, log_prob, value = model.get_action_and_value(
            obs, mask, deterministic, generator=gen
        )
        log_probs, entropy, _ = model.evaluate_actions(obs, action, mask)
    for t in (log_prob, value, log_probs, entropy):
        assert torch.isfinite(t.float()).all()
    has_legal = mask.any(-1)
    assert mask[has_legal].gather(-1, action[has_legal, None]).all()
    assert action[0] == 0 and log_prob[0] == 0 and entropy[0] == 0
    assert (log_prob <= 0).all() and (entropy >= 0).all()


def test_sampling_follows_the_generator():
    model = build_model(ModelSpec(tower_depth=1, tower_width=4, num_actions=50), seed=0)
    obs = torch.randn(4, 46, 9, 9)
    with torch.no_grad():
        a = model.get_action_and_value(obs, generator=torch.Generator().manual_seed(3))[0]
        b = model.get_action_and_value(obs, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_mask_shape_is_checked():
    model = build_model(ModelSpec(tower_depth=1, tower_width=4, num_actions=10), seed=0)
    with pytest.raises(ValueError, match="legal_mask shape"):
        model.get_action_and_value(torch.zeros(2, 46, 9, 9), torch.ones(2, 9, dtype=torch.bool))


def test_unwrap_and_canonical_keys():
    net = build_model(ModelSpec(model_type="testmodel"), seed=0)
    wrapped = nn.DataParallel(torch.compile(nn.DataParallel(net)))
    assert unwrap_model(wrapped) is net
    keys = list(wrapped.state_dict())
    assert keys[0].startswith("module._orig_mod.module.")
    assert list(canonical_state_dict(wrapped.state_dict())) == list(net.state_dict())
    # a prefix that only some keys carry is a real submodule name: kept
    mixed = {"module.a": 1, "b": 2}
    assert canonical_state_dict(mixed) == mixed
    assert canonical_state_dict({}) == {}


def test_register_model():
    register_model("tiny_linear", lambda spec: nn.Linear(4, spec.num_actions))
    model = build_model(ModelSpec(model_type="tiny_linear", num_actions=3), seed=1)
    assert isinstance(model, nn.Linear) and model.out_features == 3
    with pytest.raises(SpecError, match="already registered"):
        register_model("tiny_linear", lambda spec: nn.Linear(1, 1))
