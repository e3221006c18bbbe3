"""Elo differences from match results, with confidence intervals, and a gating test.

A match of ``n`` games with ``w`` wins, ``l`` losses and ``d`` draws (for player B against A)
has the score ``s = (w + d / 2) / n``. The logistic Elo model gives B's rating minus A's as::

    elo(s) = 400 * log10(s / (1 - s))      (-inf at s = 0, +inf at s = 1)

The interval is the Wilson score interval on ``s`` (each game scoring 0, 1/2 or 1; the
binomial variance ``s(1 - s)/n`` bounds the true variance from above when there are draws, so
the interval is conservative and never leaves [0, 1]), mapped through ``elo``. The gate
:func:`significantly_better` asks whether the one-sided Wilson lower bound of B's score at
confidence ``c`` is above 1/2.

Example:
    >>> estimate = elo_estimate(wins=30, losses=10, draws=0)
    >>> round(estimate.elo), round(estimate.low), round(estimate.high)
    (191, 69, 313)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from keisei_fn.errors import SpecError

__all__ = [
    "EloEstimate",
    "elo_estimate",
    "elo_from_score",
    "significantly_better",
    "wilson_interval",
]


def elo_from_score(score: float) -> float:
    """The logistic Elo difference of an expected score.

    Args:
        score: in ``[0, 1]``.

    Returns:
        ``400 * log10(score / (1 - score))``: 0 at 1/2, ``-inf`` at 0, ``+inf`` at 1.

    Raises:
        SpecError: a score outside ``[0, 1]``.

    Example:
        >>> round(elo_from_score(0.75), 1)
        190.8
    """
    if not 0.0 <= score <= 1.0:
        raise SpecError(f"a score is in [0, 1], got {score!r}")
    if score == 0.0:
        return -math.inf
    if score == 1.0:
        return math.inf
    return 400.0 * math.log10(score / (1.0 - score))


def wilson_interval(score: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``score`` observed over ``n`` trials.

    Args:
        score: the observed proportion, in ``[0, 1]``.
        n: the number of trials, >= 1.
        z: the normal quantile (1.96 for a two-sided 95% interval).

    Returns:
        ``(low, high)``, within ``[0, 1]``.

    Raises:
        SpecError: ``n < 1`` or a score outside ``[0, 1]``.

    Example:
        >>> [round(x, 3) for x in wilson_interval(0.5, 100, 1.96)]
        [0.404, 0.596]
    """
    if n < 1:
        raise SpecError(f"an interval needs at least one game, got {n}")
    if not 0.0 <= score <= 1.0:
        raise SpecError(f"a score is in [0, 1], got {score!r}")
    z2 = z * z
    centre = (score + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(score * (1 - score) / n + z2 / (4 * n * n))
    low = 0.0 if score == 0.0 else max(0.0, centre - half)
    high = 1.0 if score == 1.0 else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True, slots=True)
class EloEstimate:
    """An Elo difference with its interval.

    Attributes:
        score: the observed score, ``(wins + draws / 2) / games``.
        elo: ``elo_from_score(score)``.
        low: the interval's lower end (Elo).
        high: the interval's upper end (Elo).
        confidence: the interval's two-sided confidence.
    """

    score: float
    elo: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        """``+191 [+69, +313] (95%)`` (30 wins, 10 losses)."""
        return f"{_fmt(self.elo)} [{_fmt(self.low)}, {_fmt(self.high)}] ({self.confidence:.0%})"


def _fmt(elo: float) -> str:
    return f"{elo:+.0f}" if math.isfinite(elo) else ("+inf" if elo > 0 else "-inf")


def _games(wins: int, losses: int, draws: int) -> int:
    counts = (wins, losses, draws)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise SpecError(f"wins, losses and draws are ints >= 0, got {counts}")
    if sum(counts) == 0:
        raise SpecError("no games: an Elo difference needs at least one")
    return sum(counts)


def elo_estimate(*, wins: int, losses: int, draws: int, confidence: float = 0.95) -> EloEstimate:
    """The Elo difference (the winner's side minus the other) of a match, with an interval.

    Args:
        wins: games won.
        losses: games lost.
        draws: games drawn.
        confidence: two-sided confidence of the interval, in ``(0, 1)``.

    Returns:
        The estimate (see the module docstring for the formulas).

    Raises:
        SpecError: negative counts, no games, or a confidence outside ``(0, 1)``.

    Example:
        >>> str(elo_estimate(wins=5, losses=5, draws=10))
        '+0 [-148, +148] (95%)'
    """
    n = _games(wins, losses, draws)
    if not 0.0 < confidence < 1.0:
        raise SpecError(f"confidence is in (0, 1), got {confidence!r}")
    score = (wins + draws / 2) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    low, high = wilson_interval(score, n, z)
    return EloEstimate(
        score=score,
        elo=elo_from_score(score),
        low=elo_from_score(low),
        high=elo_from_score(high),
        confidence=confidence,
    )


def significantly_better(*, wins: int, losses: int, draws: int, confidence: float = 0.95) -> bool:
    """Whether the player with these results is stronger than its opponent at ``confidence``:
    the one-sided Wilson lower bound of its score is above 1/2.

    Args:
        wins: games the candidate won.
        losses: games it lost.
        draws: games drawn.
        confidence: one-sided confidence, in ``(0, 1)``.

    Returns:
        True when the candidate is better at that confidence.

    Raises:
        SpecError: as for :func:`elo_estimate`.

    Example:
        >>> significantly_better(wins=30, losses=10, draws=0)
        True
        >>> significantly_better(wins=12, losses=8, draws=0)
        False
    """
    n = _games(wins, losses, draws)
    if not 0.0 < confidence < 1.0:
        raise SpecError(f"confidence is in (0, 1), got {confidence!r}")
    z = NormalDist().inv_cdf(confidence)
    return wilson_interval((wins + draws / 2) / n, n, z)[0] > 0.5
