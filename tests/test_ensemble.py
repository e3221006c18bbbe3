"""Ensemble: policies mixed in probability space, values averaged; one member is the model.

Every check is exact: an ensemble of one model is compared bit for bit, and the mixture of
several is checked through decisions that do not depend on rounding (which move is ranked
where, masked moves, dyadic values).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw_bytes
from torch import nn

import keisei_fn as kf
from keisei_fn.analysis import analyze
from keisei_fn.errors import SpecError
from keisei_fn.shogi import legal_mask, start_board
from keisei_fn.testing import model_specs


class Fixed(nn.Module):
    """A member whose policy and value are the same for every position."""

    def __init__(self, probs: list[float], value: float) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())
        self.value = value

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = obs.shape[0]
        return self.logits.expand(batch, -1), torch.full((batch,), self.value)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape, raw_bytes(a)) == (b.dtype, b.shape, raw_bytes(b))


@settings(max_examples=8, deadline=None)
@given(
    spec=model_specs(num_actions=(1, 32)),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    masked=st.booleans(),
)
def test_an_ensemble_of_one_model_is_the_model(
    spec: kf.ModelSpec, seed: int, batch: int, masked: bool
) -> None:
    model = kf.build_model(spec, seed=seed).eval()
    ensemble = kf.Ensemble([model]).eval()
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, *spec.obs_shape, generator=gen)
    mask = torch.rand(batch, spec.num_actions, generator=gen) < 0.5 if masked else None
    with torch.no_grad():
        logits, value = model(obs)
        mixed_logits, mixed_value = ensemble(obs, mask)
        if mask is not None:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        assert same(mixed_logits, logits) and same(mixed_value, value)
        picks = [
            net.get_action_and_value(obs, mask, generator=torch.Generator().manual_seed(seed))
            for net in (model, ensemble)
        ]
    assert all(same(a, b) for a, b in zip(*picks, strict=True))


def test_analyze_with_an_ensemble_of_one_is_analyze_with_the_model() -> None:
    model = kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=0)
    assert analyze(kf.Ensemble([model]), top_k=4) == analyze(model, top_k=4)


def test_analyze_with_an_ensemble_of_two() -> None:
    spec = kf.ModelSpec(model_type="testmodel")
    a, b = kf.build_model(spec, seed=1), kf.build_model(spec, seed=2)
    mixed = analyze(kf.Ensemble([a, b]), top_k=5)
    alone = analyze(a, top_k=5), analyze(b, top_k=5)
    # the value: a float32 sum of halves, which float64 holds exactly before the one rounding
    assert mixed.value == float(np.float32(alone[0].value / 2 + alone[1].value / 2))
    legal = set(torch.nonzero(legal_mask(start_board())).flatten().tolist())
    assert {m.index for m in mixed.moves} <= legal and len(mixed.moves) == 5
    probs = [m.probability for m in mixed.moves]
    assert probs == sorted(probs, reverse=True)


def test_policies_mix_in_probability_space() -> None:
    # averaging logits would rank move 2 first (its mean log-prob is highest); the mixture of
    # probabilities is (0.47, 0.05, 0.41, 0.07): move 0, then 2, 3, 1
    a = Fixed([0.90, 0.01, 0.08, 0.01], value=1.0)
    b = Fixed([0.04, 0.09, 0.74, 0.13], value=-1.0)
    obs = torch.zeros(2, 1)
    logits, value = kf.Ensemble([a, b])(obs)
    assert logits.argsort(dim=-1, descending=True).tolist() == [[0, 2, 3, 1]] * 2
    assert (a.logits + b.logits).argmax().item() == 2
    assert same(value, torch.zeros(2))
    # weights: b three times as heavy -> 0.255, 0.07, 0.575, 0.1; the value -0.5 exactly
    logits, value = kf.Ensemble([a, b], weights=[1, 3])(obs)
    assert logits.argsort(dim=-1, descending=True).tolist() == [[2, 0, 3, 1]] * 2
    assert same(value, torch.full((2,), -0.5))


def test_a_legal_mask_renormalises_the_mixture_over_the_legal_moves() -> None:
    a = Fixed([0.90, 0.01, 0.08, 0.01], value=0.0)
    b = Fixed([0.04, 0.09, 0.74, 0.13], value=0.0)
    ensemble = kf.Ensemble([a, b])
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    logits, _ = ensemble(torch.zeros(2, 1), mask)
    lowest = torch.finfo(logits.dtype).min
    assert logits[~mask].eq(lowest).all() and bool(torch.isfinite(logits).all())
    assert logits.argsort(dim=-1, descending=True)[:, :2].tolist() == [[2, 3], [0, 1]]
    action, _, _ = ensemble.get_action_and_value(torch.zeros(2, 1), mask, deterministic=True)
    assert action.tolist() == [2, 0]


def test_ensemble_refusals() -> None:
    a = Fixed([0.5, 0.5], value=0.0)
    with pytest.raises(SpecError, match="an ensemble needs at least one model"):
        kf.Ensemble([])
    with pytest.raises(SpecError, match="2 weights for 1 inputs"):
        kf.Ensemble([a], weights=[1, 2])
    with pytest.raises(SpecError, match="different shapes"):
        kf.Ensemble([a, Fixed([0.2, 0.3, 0.5], value=0.0)])(torch.zeros(1, 1))
    with pytest.raises(SpecError, match="legal_mask shape"):
        kf.Ensemble([a])(torch.zeros(1, 1), torch.ones(1, 3, dtype=torch.bool))


def test_an_ensemble_is_a_module_of_its_members() -> None:
    a, b = Fixed([0.5, 0.5], value=0.0), Fixed([0.25, 0.75], value=0.0)
    ensemble = kf.Ensemble([a, b]).eval()
    assert not a.training and not b.training
    assert list(ensemble.state_dict()) == ["members.0.logits", "members.1.logits"]
