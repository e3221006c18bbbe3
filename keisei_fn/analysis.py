"""Analysis of a position by a policy-value network: top legal moves and the value.

Example:
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    >>> result = analyze(model, top_k=3)
    >>> len(result.moves), result.side
    (3, 'black')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from keisei_fn.display import html_table, render_table
from keisei_fn.errors import SpecError

__all__ = ["Analysis", "MoveScore", "analyze"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MoveScore:
    """One legal move: USI, action index, probability among the legal moves."""

    usi: str
    index: int
    probability: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    """What the network thinks of a position.

    Attributes:
        sfen: the position.
        side: ``"black"`` or ``"white"`` to move.
        value: the value head's output (from the side to move's perspective).
        legal_mass: probability the raw policy puts on legal moves (1.0 = knows the rules).
        moves: the top legal moves, by probability renormalised over the legal moves.
    """

    sfen: str
    side: str
    value: float
    legal_mass: float
    moves: tuple[MoveScore, ...]

    #: The columns of the moves table (``keisei-fn analyze`` prints the same).
    HEADER: ClassVar[tuple[str, ...]] = ("#", "move", "prob")

    @property
    def summary(self) -> str:
        """``black to move; value +0.012; legal mass 0.034``."""
        return f"{self.side} to move; value {self.value:+.3f}; legal mass {self.legal_mass:.3f}"

    def rows(self) -> list[list[str]]:
        """The moves table's rows: rank, USI move, probability among the legal moves."""
        return [[str(i + 1), m.usi, f"{m.probability:.3f}"] for i, m in enumerate(self.moves)]

    def __str__(self) -> str:
        """The position, the summary line and the moves table, as ``keisei-fn analyze`` prints
        them (``print(analyze(model))`` in a notebook); ``repr`` is unchanged.

        Example:
            >>> result = Analysis(sfen="9/9/9/9/9/9/9/9/9 b - 1", side="black", value=0.5,
            ...     legal_mass=0.25, moves=(MoveScore(usi="7g7f", index=3, probability=1.0),))
            >>> print(result)
            9/9/9/9/9/9/9/9/9 b - 1
            black to move; value +0.500; legal mass 0.250
            #  move  prob
            1  7g7f  1.000
        """
        return f"{self.sfen}\n{self.summary}\n{render_table(self.HEADER, self.rows())}"

    def _repr_html_(self) -> str:
        """The moves table as HTML, captioned with the position and the summary (Jupyter)."""
        return html_table(self.HEADER, self.rows(), caption=f"{self.sfen}: {self.summary}")


def analyze(
    model: nn.Module, sfen: str | None = None, *, top_k: int = 5, max_moves: int = 500
) -> Analysis:
    """Rank the legal moves of a position by the model's policy.

    Args:
        model: a Keisei actor-critic (``forward(obs) -> (logits, value)``) for core46.
        sfen: the position (the start position when None).
        top_k: how many moves to list.
        max_moves: the encoder's move-count normaliser.

    Returns:
        The analysis.

    Raises:
        SpecError: for ``top_k < 1``.
        InvalidPositionError: for a malformed SFEN.
    """
    from keisei_fn import shogi

    if top_k < 1:
        raise SpecError(f"top_k must be >= 1, got {top_k}")
    board = shogi.start_board() if sfen is None else shogi.board_from_sfen(sfen)
    device = next(model.parameters()).device
    obs = shogi.encode_observation(board, max_moves=max_moves).unsqueeze(0).to(device)
    mask = shogi.legal_mask(board).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, value = model(obs)
    finally:
        model.train(was_training)
    probs = torch.softmax(logits[0].float(), dim=-1)
    legal_mass = float(probs[mask].sum())
    legal = torch.nonzero(mask).flatten()
    legal_probs = probs[legal] / max(legal_mass, torch.finfo(torch.float32).tiny)
    order = torch.argsort(legal_probs, descending=True)[:top_k]
    moves = tuple(
        MoveScore(
            usi=shogi.index_to_usi(int(legal[i]), board),
            index=int(legal[i]),
            probability=float(legal_probs[i]),
        )
        for i in order
    )
    return Analysis(
        sfen=board.sfen(),
        side="black" if board.turn == 0 else "white",
        value=float(value.reshape(-1)[0]),
        legal_mass=legal_mass,
        moves=moves,
    )
