"""A network as a Shogi player: load and check it, evaluate positions, choose moves.

Shared by the USI engine (``keisei_fn.usi``) and matches (``keisei_fn.match``), so that an
engine and an in-process match player with the same settings play the same moves.

Scores are reported in centipawns, from the value head ``v`` (side to move's perspective,
clamped to ``[-1, 1]``) read as an expected score ``p = (1 + v) / 2`` and mapped by the
logistic curve used by Shogi engines (600 cp per unit of log-odds)::

    cp = round(600 * ln(p / (1 - p))),   p clamped to [1e-4, 1 - 1e-4]  (|cp| <= 5526)

Example:
    >>> value_to_cp(0.0), value_to_cp(0.5), value_to_cp(-1.0)
    (0, 659, -5526)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cshogi
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from keisei_fn import shogi
from keisei_fn.errors import InvalidModelError, SpecError
from keisei_fn.paths import PathArg
from keisei_fn.search import puct_search
from keisei_fn.serve.validate import validate_model

__all__ = ["CP_PER_LOGIT", "Choice", "choose_move", "evaluator", "load_player", "value_to_cp"]

#: Centipawns per unit of log-odds of the expected score (the usual Shogi-engine scale).
CP_PER_LOGIT = 600.0
_P_CLAMP = 1e-4


def value_to_cp(value: float) -> int:
    """The value head's output as centipawns (see the module docstring for the formula).

    Args:
        value: the value, side to move's perspective (clamped to ``[-1, 1]``).

    Returns:
        Centipawns, ``|cp| <= 5526``.

    Example:
        >>> value_to_cp(1.0)
        5526
    """
    v = min(max(float(value), -1.0), 1.0) if math.isfinite(value) else 0.0
    p = min(max((1.0 + v) / 2.0, _P_CLAMP), 1.0 - _P_CLAMP)
    return round(CP_PER_LOGIT * math.log(p / (1.0 - p)))


def load_player(source: PathArg | nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """The network a player uses, checked before it plays: the one place where ``usi`` and
    ``match`` load and refuse models.

    Args:
        source: a checkpoint, a final model, a run directory (its final model, else its latest
            checkpoint, as ``load_model``), or an ``nn.Module`` whose ``forward(obs)`` returns
            ``(policy logits, value)``.
        device: where to put the network.

    Returns:
        The network, in eval mode, on ``device`` (a module given is moved and switched to eval
        mode in place).

    Raises:
        InvalidModelError: :func:`keisei_fn.validate_model` finds it unfit (a non-finite
            parameter or output, policy or value out of their sane ranges).
        and every error of :func:`keisei_fn.load_model`.

    Example:
        >>> from keisei_fn import ModelSpec, build_model
        >>> load_player(build_model(ModelSpec(model_type="testmodel"), seed=0)).training
        False
    """
    if isinstance(source, nn.Module):
        model = source.to(device)
    else:
        from keisei_fn.store.checkpoints import load_model

        model = load_model(source, device=device)[0]
    report = validate_model(model)
    if not report.ok:
        raise InvalidModelError(f"refusing to play with this model: {'; '.join(report.problems)}")
    return model.eval()


def evaluator(
    model: nn.Module, *, max_moves: int = shogi.DEFAULT_MAX_MOVES
) -> Callable[[cshogi.Board], tuple[Sequence[int], npt.NDArray[np.float64], float]]:
    """A :data:`keisei_fn.search.Evaluator` for a network: legal moves, the policy's softmax
    renormalised over them, and the value clamped to ``[-1, 1]``.

    Args:
        model: ``forward(obs) -> (logits, value)`` for core46.
        max_moves: the encoder's move-count normaliser.

    Returns:
        ``evaluate(board) -> (moves, priors, value)``.

    Example:
        >>> from keisei_fn import ModelSpec, build_model
        >>> evaluate = evaluator(build_model(ModelSpec(model_type="testmodel"), seed=0))
        >>> moves, priors, value = evaluate(shogi.start_board())
        >>> len(moves), round(float(priors.sum()), 6), -1.0 <= value <= 1.0
        (30, 1.0, True)
    """
    device = next(model.parameters()).device

    def evaluate(board: cshogi.Board) -> tuple[list[int], npt.NDArray[np.float64], float]:
        moves, indices = shogi.legal_move_indices(board)
        obs = shogi.encode_observation(board, max_moves=max_moves).unsqueeze(0).to(device)
        with torch.no_grad():
            logits, value = model(obs)
        legal = logits[0, indices].double().cpu().numpy() if moves else np.zeros(0)
        priors = np.exp(legal - legal.max()) if moves else legal
        priors /= priors.sum() if moves else 1.0
        v = float(value.reshape(-1)[0])
        return moves, priors, min(max(v, -1.0), 1.0) if math.isfinite(v) else 0.0

    return evaluate


@dataclass(frozen=True, slots=True)
class Choice:
    """A player's decision.

    Attributes:
        move: the USI move, ``"resign"`` or ``"win"``.
        cp: the score in centipawns for the side to move (see :func:`value_to_cp`).
        pv: the principal variation in USI (empty for resign/win).
        nodes: 0 for a game end at the root, 1 for the policy alone, else the playouts
            done + 1 (the root); a playout that ends at a known game end (mate, repetition)
            calls no network.
    """

    move: str
    cp: int
    pv: tuple[str, ...]
    nodes: int


def choose_move(
    model: nn.Module,
    board: cshogi.Board,
    *,
    temperature: float = 0.0,
    playouts: int = 0,
    rng: random.Random | None = None,
    resign_cp: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Choice:
    """Choose a move: ``resign`` without a legal move, ``win`` where a declaration wins,
    else the policy's move (``playouts=0``) or a PUCT search's (``playouts > 0``).

    Args:
        model: the network.
        board: the position (not modified).
        temperature: 0 plays the most probable (policy) / most visited (search) move, ties to
            the first; > 0 samples from the policy softmax at that temperature, or from visit
            counts raised to ``1 / temperature``.
        playouts: 0 for the policy alone, else the number of PUCT playouts.
        rng: the sampler for ``temperature > 0`` (a fresh ``random.Random(0)`` if None).
        resign_cp: resign when the score is below this (None: never, except without a move).
        should_stop: polled between playouts; True ends the search early.

    Returns:
        The choice.

    Raises:
        SpecError: a negative temperature or playout count.

    Example:
        >>> from keisei_fn import ModelSpec, build_model
        >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0).eval()
        >>> choice = choose_move(model, shogi.start_board())
        >>> choice.move in [shogi.move_to_usi(m) for m in shogi.start_board().legal_moves]
        True
    """
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise SpecError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(playouts, bool) or not isinstance(playouts, int) or playouts < 0:
        raise SpecError(f"playouts must be an int >= 0, got {playouts!r}")
    if board.is_game_over():
        return Choice(move="resign", cp=value_to_cp(-1.0), pv=(), nodes=0)
    if board.is_nyugyoku():
        return Choice(move="win", cp=value_to_cp(1.0), pv=(), nodes=0)
    rng = rng or random.Random(0)
    evaluate = evaluator(model)
    if playouts == 0:
        moves, priors, value = evaluate(board)
        pick = _pick(priors, temperature, rng)
        cp, pv, nodes = value_to_cp(value), [moves[pick]], 1
    else:
        found = puct_search(board, evaluate, playouts, should_stop=should_stop)
        pick = _pick(found.visits, temperature, rng)
        pv = found.pv if found.pv[:1] == [found.moves[pick]] else [found.moves[pick]]
        q = found.q[pick] if found.visits[pick] > 0 else found.root_value
        cp, nodes = value_to_cp(q), found.playouts + 1
    if resign_cp is not None and cp < resign_cp:
        return Choice(move="resign", cp=cp, pv=(), nodes=nodes)
    usi = tuple(shogi.move_to_usi(m) for m in pv)
    return Choice(move=usi[0], cp=cp, pv=usi, nodes=nodes)


def _pick(weights: npt.NDArray[np.float64], temperature: float, rng: random.Random) -> int:
    """Argmax (first of ties) at temperature 0, else a draw proportional to
    ``weights ** (1 / temperature)`` (for policy priors: the softmax of ``logits / T``)."""
    tempered = weights if temperature == 0 else weights / weights.max()
    if temperature > 0:
        tempered = tempered ** (1.0 / temperature)
    if temperature == 0 or not np.isfinite(tempered).all() or tempered.sum() <= 0:
        return int(np.argmax(weights))
    cumulative = np.cumsum(tempered / tempered.sum())
    drawn = int(np.searchsorted(cumulative, rng.random(), side="right"))
    return min(drawn, len(weights) - 1)
