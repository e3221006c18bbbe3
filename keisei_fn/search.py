"""PUCT search (AlphaZero-style) guided by a policy-value evaluator.

Every playout walks from the root, at each node taking the move that maximises::

    Q(a) + c_puct * P(a) * sqrt(N) / (1 + N(a))

where ``P`` is the evaluator's prior over the legal moves, ``N(a)`` the move's visit count,
``N`` the node's total and ``Q(a)`` the mean value of the move's visits from the mover's side
(0 before the first visit). The first position not yet in the tree is evaluated once (one
network call) and its value is backed up along the path, negated at every ply. Game ends are
cshogi's: no legal move is a loss for the side to move, a repetition is a draw (a win or loss
for perpetual check, ``board.is_draw()``), a declaration win (``board.is_nyugyoku()``) a win.

Values are from the side to move's perspective, in ``[-1, 1]``.

Example:
    >>> import numpy as np
    >>> from keisei_fn.sfen import start_board
    >>> def uniform(board):
    ...     moves = list(board.legal_moves)
    ...     return moves, np.full(len(moves), 1 / len(moves)), 0.0
    >>> result = puct_search(start_board(), uniform, playouts=40)
    >>> result.playouts, int(result.visits.sum())
    (40, 40)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cshogi
import numpy as np
import numpy.typing as npt

from keisei_fn.errors import SpecError

__all__ = ["Evaluator", "SearchResult", "puct_search", "terminal_value"]

#: ``evaluate(board) -> (legal moves, priors over them, value)``: the moves as cshogi ints, the
#: priors summing to 1, the value in ``[-1, 1]`` from the side to move's perspective.
Evaluator = Callable[[cshogi.Board], tuple[Sequence[int], npt.NDArray[np.float64], float]]


def terminal_value(board: cshogi.Board) -> float | None:
    """The game's value for the side to move when the position ends it, else None.

    Args:
        board: the position (with its history, for repetitions).

    Returns:
        -1.0 when the side to move has no legal move; 0.0 for a repetition draw, +1.0 / -1.0
        when the repetition wins / loses for the side to move (perpetual check); +1.0 when the
        side to move can declare a win; None otherwise.

    Example:
        >>> from keisei_fn.sfen import start_board
        >>> terminal_value(start_board()) is None
        True
    """
    draw = board.is_draw()
    if draw == cshogi.REPETITION_DRAW:
        return 0.0
    if draw == cshogi.REPETITION_WIN:
        return 1.0
    if draw == cshogi.REPETITION_LOSE:
        return -1.0
    if board.is_game_over():
        return -1.0
    if board.is_nyugyoku():
        return 1.0
    return None


@dataclass
class _Node:
    moves: list[int]
    priors: npt.NDArray[np.float64]
    visits: npt.NDArray[np.float64]
    value_sum: npt.NDArray[np.float64]
    terminal: float | None = None
    children: dict[int, _Node] = field(default_factory=dict)

    @classmethod
    def leaf(cls, moves: Sequence[int], priors: npt.NDArray[np.float64]) -> _Node:
        n = len(moves)
        return cls(list(moves), np.asarray(priors, np.float64), np.zeros(n), np.zeros(n))

    def select(self, c_puct: float) -> int:
        total = self.visits.sum()
        q = np.divide(
            self.value_sum, self.visits, out=np.zeros_like(self.value_sum), where=self.visits > 0
        )
        u = c_puct * self.priors * math.sqrt(max(total, 1.0)) / (1.0 + self.visits)
        return int(np.argmax(q + u))


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What a search found at the root.

    Attributes:
        moves: the root's legal moves (cshogi ints).
        priors: the evaluator's priors over them.
        visits: visit count of each move.
        q: mean value of each move's visits for the side to move at the root (0 if unvisited).
        root_value: the evaluator's value of the root.
        playouts: playouts done.
        pv: the principal variation (most visited child at each level), cshogi moves.
    """

    moves: list[int]
    priors: npt.NDArray[np.float64]
    visits: npt.NDArray[np.float64]
    q: npt.NDArray[np.float64]
    root_value: float
    playouts: int
    pv: list[int]


def puct_search(
    board: cshogi.Board,
    evaluate: Evaluator,
    playouts: int,
    *,
    c_puct: float = 1.5,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """Run ``playouts`` PUCT playouts from ``board`` (which is left as it was).

    Args:
        board: the root position; it must have a legal move.
        evaluate: the policy-value evaluator (one call per new node).
        playouts: the number of playouts, >= 1.
        c_puct: the exploration constant.
        should_stop: polled between playouts (after the first); True ends the search early.

    Returns:
        The root's statistics.

    Raises:
        SpecError: ``playouts < 1`` or a root without a legal move.
    """
    if isinstance(playouts, bool) or not isinstance(playouts, int) or playouts < 1:
        raise SpecError(f"playouts must be an int >= 1, got {playouts!r}")
    moves, priors, root_value = evaluate(board)
    if not moves:
        raise SpecError(f"cannot search a position without a legal move: {board.sfen()}")
    root = _Node.leaf(moves, priors)
    board = board.copy()  # keeps the history, so repetitions inside the tree are seen
    done = 0
    while done < playouts:
        if done and should_stop is not None and should_stop():
            break
        _playout(root, board, evaluate, c_puct)
        done += 1
    q = np.divide(
        root.value_sum, root.visits, out=np.zeros_like(root.value_sum), where=root.visits > 0
    )
    return SearchResult(
        moves=root.moves,
        priors=root.priors,
        visits=root.visits,
        q=q,
        root_value=float(root_value),
        playouts=done,
        pv=_principal_variation(root),
    )


def _playout(root: _Node, board: cshogi.Board, evaluate: Evaluator, c_puct: float) -> None:
    path: list[tuple[_Node, int]] = []
    node = root
    while True:
        a = node.select(c_puct)
        path.append((node, a))
        board.push(node.moves[a])
        child = node.children.get(a)
        if child is None:
            value = terminal_value(board)
            if value is None:
                moves, priors, value = evaluate(board)
                child = _Node.leaf(moves, priors)
            else:
                child = _Node.leaf([], np.zeros(0))
                child.terminal = value
            node.children[a] = child
            break
        if child.terminal is not None:
            value = child.terminal
            break
        node = child
    # ``value`` is for the side to move at the leaf; each parent sees its negation.
    for parent, a in reversed(path):
        value = -value
        parent.visits[a] += 1.0
        parent.value_sum[a] += value
        board.pop()


def _principal_variation(root: _Node) -> list[int]:
    pv: list[int] = []
    node: _Node | None = root
    while node is not None and node.moves and node.visits.sum() > 0:
        a = int(np.argmax(node.visits))
        pv.append(node.moves[a])
        node = node.children.get(a)
    return pv
