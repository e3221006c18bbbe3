"""Elo maths (keisei_fn.elo): the logistic model, the Wilson interval, the gate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keisei_fn.elo import elo_estimate, elo_from_score, significantly_better, wilson_interval
from keisei_fn.errors import SpecError

scores = st.floats(min_value=0.0, max_value=1.0)
counts = st.integers(min_value=0, max_value=500)


@given(st.floats(min_value=1e-6, max_value=1 - 1e-3))
def test_elo_is_antisymmetric_and_increasing(score: float) -> None:
    elo = elo_from_score(score)
    assert elo_from_score(1.0 - score) == pytest.approx(-elo, abs=1e-6)
    assert elo_from_score(score + 1e-3) > elo


def test_elo_known_values() -> None:
    assert elo_from_score(0.5) == 0.0
    assert elo_from_score(0.0) == -math.inf and elo_from_score(1.0) == math.inf
    assert 10 ** (elo_from_score(0.75) / 400) == pytest.approx(3.0)  # odds 3:1


@given(scores, st.integers(min_value=1, max_value=10_000), st.floats(min_value=0.1, max_value=4))
def test_wilson_interval_holds_the_score_within_0_and_1(score: float, n: int, z: float) -> None:
    low, high = wilson_interval(score, n, z)
    assert 0.0 <= low <= high <= 1.0
    assert low <= score + 1e-12 and score - 1e-12 <= high


@given(counts, counts, counts)
def test_estimate_swapping_sides_negates_it(wins: int, losses: int, draws: int) -> None:
    if wins + losses + draws == 0:
        with pytest.raises(SpecError):
            elo_estimate(wins=wins, losses=losses, draws=draws)
        return
    ours = elo_estimate(wins=wins, losses=losses, draws=draws)
    theirs = elo_estimate(wins=losses, losses=wins, draws=draws)
    assert ours.low <= ours.elo <= ours.high
    assert theirs.elo == pytest.approx(-ours.elo, abs=1e-6) or math.isinf(ours.elo)
    assert theirs.low == pytest.approx(-ours.high, abs=1e-6) or math.isinf(ours.high)


@given(counts, counts)
def test_more_games_at_the_same_score_narrow_the_interval(wins: int, losses: int) -> None:
    if wins + losses == 0 or wins == 0 or losses == 0:
        return
    few = elo_estimate(wins=wins, losses=losses, draws=0)
    many = elo_estimate(wins=4 * wins, losses=4 * losses, draws=0)
    assert many.high - many.low < few.high - few.low


@given(counts, counts, counts)
def test_the_gate_is_monotone_in_wins(wins: int, losses: int, draws: int) -> None:
    if wins + losses + draws == 0:
        return
    if significantly_better(wins=wins, losses=losses, draws=draws):
        assert significantly_better(wins=wins + 1, losses=losses, draws=draws)
        assert wins > losses
    if wins <= losses:
        assert not significantly_better(wins=wins, losses=losses, draws=draws)


def test_the_gate_needs_more_evidence_at_higher_confidence() -> None:
    assert significantly_better(wins=14, losses=6, draws=0, confidence=0.90)
    assert not significantly_better(wins=14, losses=6, draws=0, confidence=0.99)
    with pytest.raises(SpecError):
        significantly_better(wins=1, losses=0, draws=0, confidence=1.0)


def test_the_interval_matches_wilson_worked_by_hand() -> None:
    """30 wins, 10 losses: s = 0.75, n = 40, z = 1.959964; Wilson's centre
    (s + z²/2n) / (1 + z²/n) = 0.728095 and half-width z / (1 + z²/n) * sqrt(s(1-s)/n + z²/4n²)
    = 0.130034 give s in [0.598060, 0.858129], i.e. Elo 400 log10(s / (1 - s)) in [+69.03,
    +312.66] around +190.85."""
    estimate = elo_estimate(wins=30, losses=10, draws=0)
    assert (estimate.elo, estimate.low, estimate.high) == pytest.approx(
        (190.85, 69.03, 312.66), abs=0.01
    )
    assert str(estimate) == "+191 [+69, +313] (95%)"
    # A draw counts half: 20 wins and 20 draws score 0.75 as well.
    assert elo_estimate(wins=20, losses=0, draws=20).low == pytest.approx(estimate.low)
