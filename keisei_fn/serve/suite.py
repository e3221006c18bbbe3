"""The fixed, seeded suite of positions on which exports are compared and models validated.

Opening, middlegame and endgame positions come from the library's uniformly random legal
self-play (``keisei_fn.shogi.iter_random_positions``, seeded), bucketed by the ply they were
reached at; the hand-picked positions add what random play rarely shows at a fixed ply:
pieces in hand for both sides (drops) and moves that may promote, for each side to move. Every
SFEN is validated with ``keisei_fn.sfen.board_from_sfen``.

Example:
    >>> suite = default_suite()
    >>> len(suite), sorted({p.phase for p in suite})
    (78, ['drops', 'endgame', 'middlegame', 'opening', 'promotion'])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from keisei_fn.errors import SpecError

__all__ = [
    "HAND_PICKED",
    "PHASE_PLIES",
    "SuitePosition",
    "default_suite",
    "encode_suite",
    "suite_positions",
]

#: Plies (half-moves from the start) at which random self-play positions count as each phase.
PHASE_PLIES = {"opening": (0, 24), "middlegame": (40, 100), "endgame": (140, 256)}

#: Hand-picked positions: (phase, SFEN, what it shows).
HAND_PICKED: tuple[tuple[str, str, str], ...] = (
    ("drops", "lnsgkg1nl/1r5s1/pppppp1pp/6p2/9/2P6/PP1PPPPPP/7R1/LNSGKGSNL b Bb 5",
     "after the bishop exchange, Black to move: 43 bishop drops"),
    ("drops", "lnsgkg1nl/1r5s1/pppppp1pp/6p2/9/2P4P1/PP1PPPP1P/7R1/LNSGKGSNL w Bb 6",
     "after the bishop exchange, White to move: 43 bishop drops"),
    ("promotion", "lnsgkgsnl/1r5b1/p1ppppppp/7P1/9/1p7/PPPPPPP1P/1B5R1/LNSGKGSNL b - 7",
     "Black's pawn on 2d may take on 2c and promote"),
    ("promotion", "lnsgkgsnl/1r5b1/p1ppppp+Pp/9/9/1p7/PPPPPPP1P/1B5R1/LNSGKGSNL w P 8",
     "White's pawn on 8f may take on 8g and promote; Black has a pawn in hand"),
    ("drops", "4k4/9/4P4/9/9/9/9/9/4K4 b GS2p 1",
     "bare kings, Black to move: gold and silver drops, the pawn may promote on 5b"),
    ("drops", "4k4/9/4P4/9/9/9/9/9/4K4 w GS2p 1",
     "bare kings, White to move: pawn drops"),
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class SuitePosition:
    """One position of the suite.

    Attributes:
        sfen: the position.
        phase: ``"opening"``, ``"middlegame"``, ``"endgame"``, ``"drops"`` or ``"promotion"``.
    """

    sfen: str
    phase: str


def suite_positions(
    *, seed: int = 0, per_phase: int = 24, stride: int = 7
) -> tuple[SuitePosition, ...]:
    """A suite: ``per_phase`` random-play positions of each phase of :data:`PHASE_PLIES`
    (in that order), then the :data:`HAND_PICKED` ones.

    Args:
        seed: the self-play seed.
        per_phase: positions per phase, >= 1.
        stride: keep every ``stride``-th position of the self-play stream (odd: both sides to
            move).

    Returns:
        The positions; the same arguments give the same suite.

    Raises:
        SpecError: for a bad argument.
    """
    from keisei_fn import shogi
    from keisei_fn.sfen import board_from_sfen

    if isinstance(per_phase, bool) or not isinstance(per_phase, int) or per_phase < 1:
        raise SpecError(f"per_phase must be an int >= 1, got {per_phase!r}")
    found: dict[str, list[str]] = {phase: [] for phase in PHASE_PLIES}
    for board in shogi.iter_random_positions(seed=seed, stride=stride):
        ply = board.move_number - 1
        for phase, (low, high) in PHASE_PLIES.items():
            if low <= ply < high and len(found[phase]) < per_phase:
                found[phase].append(board.sfen())
        if all(len(sfens) == per_phase for sfens in found.values()):
            break
    positions = [SuitePosition(sfen=s, phase=p) for p, sfens in found.items() for s in sfens]
    for phase, sfen, _ in HAND_PICKED:
        positions.append(SuitePosition(sfen=board_from_sfen(sfen).sfen(), phase=phase))
    return tuple(positions)


@cache
def default_suite() -> tuple[SuitePosition, ...]:
    """The default suite (seed 0, 24 positions per phase, plus the hand-picked ones): what
    ``compare_models`` and ``validate_model`` use when given no positions."""
    return suite_positions()


def encode_suite(
    positions: Iterable[SuitePosition | str] | None,
) -> tuple[Sequence[str], torch.Tensor, torch.Tensor]:
    """The SFENs, observations and legal masks of positions (the default suite when None).

    Args:
        positions: suite positions or SFEN strings (validated).

    Returns:
        ``(sfens, obs (N, 46, 9, 9) float32, masks (N, 13527) bool)``.

    Raises:
        InvalidPositionError: a malformed SFEN.
        SpecError: no positions, or a position without a legal move.
    """
    from keisei_fn import shogi
    from keisei_fn.sfen import board_from_sfen

    items = default_suite() if positions is None else tuple(positions)
    sfens = [p.sfen if isinstance(p, SuitePosition) else p for p in items]
    if not sfens:
        raise SpecError("no positions to compare on")
    boards = [board_from_sfen(s) for s in sfens]
    masks = shogi.legal_masks(boards)
    empty = [s for s, m in zip(sfens, masks, strict=True) if not bool(m.any())]
    if empty:
        raise SpecError(f"position {empty[0]!r} has no legal move")
    return sfens, shogi.encode_observations(boards), masks
