"""Shogi glue for Keisei networks: the core46 observation and the 13,527-entry action space.

Everything here is computed *from the side to move's perspective*, exactly as Keisei defines it,
on top of `cshogi <https://github.com/TadaoYamaoka/cshogi>`_ boards.

Coordinates
-----------
Keisei addresses the board by ``(r, c)``: ``r`` is the rank index counted from rank ``a`` (the
top row, White's camp), ``0..8``; ``c = 9 - file``, so file 9 is column 0 and file 1 is column 8.
cshogi numbers squares ``sq = (file - 1) * 9 + (rank - 1)`` (``1a`` = 0, ``1i`` = 8, ``9i`` = 80),
hence, for Black to move::

    r = sq % 9          c = 8 - sq // 9

For White to move the board is rotated by 180 degrees first (``sq -> 80 - sq``, equivalently
``r -> 8 - r``, ``c -> 8 - c``), so a network always sees its own pieces coming up from the bottom.
A position and its colour-flipped twin (``cshogi.rotate_sfen``) therefore get identical
observations (except plane 42, the side to move) and identical action indices.

Observation (``core46``, float32, shape ``(46, 9, 9)``)
-------------------------------------------------------
=========  ==================================================================================
planes     content
=========  ==================================================================================
0-7        side to move's unpromoted P, L, N, S, G, B, R, K (one-hot squares)
8-13       side to move's promoted +P, +L, +N, +S, +B (horse), +R (dragon)
14-27      the same 14 planes for the opponent
28-34      side to move's hand P, L, N, S, G, B, R: the whole plane is ``count / max`` with
           max 18 for P, 4 for L, N, S, G and 2 for B, R
35-41      the opponent's hand, same encoding
42         1.0 when Black is to move, else 0.0
43         ``move_count / max_moves`` with ``move_count = board.move_number - 1``
44, 45     reserved, zeros
=========  ==================================================================================

Actions (13,527 indices)
------------------------
* Board moves, indices ``0..12959``: for each ordered pair of distinct squares, iterated
  ``r_from, c_from, r_to, c_to`` (81 * 80 = 6,480 pairs), two entries, no promotion then
  promotion. With ``f = r_from * 9 + c_from`` and ``t = r_to * 9 + c_to``::

      pair  = f * 80 + (t if t < f else t - 1)
      index = 2 * pair + promote

* Drops, indices ``12960..13526``: ``12960 + (r * 9 + c) * 7 + k`` with ``k`` over
  P, L, N, S, G, B, R.

For White all squares are rotated as in the observation (a drop rotates only its target square).

Example:
    >>> board = start_board()
    >>> encode_observation(board).shape
    torch.Size([46, 9, 9])
    >>> usi_to_index("7g7f", board)  # from (6, 2) to (5, 2): 2 * (56 * 80 + 47)
    9054
    >>> index_to_usi(9054, board)
    '7g7f'
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Final

import cshogi
import numpy as np
import numpy.typing as npt
import torch

from keisei_fn.errors import IllegalMoveError, InvalidPositionError, KeiseiFnError, SpecError
from keisei_fn.features import CORE46_PLANES
from keisei_fn.sfen import board_from_sfen, start_board

__all__ = [
    "DEFAULT_MAX_MOVES",
    "NUM_ACTIONS",
    "NUM_BOARD_ACTIONS",
    "NUM_DROP_ACTIONS",
    "NUM_PLANES",
    "InvalidPositionError",
    "board_from_sfen",
    "encode_observation",
    "encode_observations",
    "index_to_move",
    "index_to_usi",
    "iter_random_positions",
    "legal_mask",
    "legal_masks",
    "legal_move_indices",
    "legal_moves",
    "move_to_index",
    "move_to_usi",
    "random_positions",
    "square_to_rc",
    "start_board",
    "usi_to_index",
    "usi_to_move",
]

#: Number of board-move actions (6,480 ordered square pairs x {no promotion, promotion}).
NUM_BOARD_ACTIONS: Final = 81 * 80 * 2
#: Number of drop actions (81 target squares x 7 hand piece kinds).
NUM_DROP_ACTIONS: Final = 81 * 7
#: Size of Keisei's action space; drops start at index ``NUM_BOARD_ACTIONS``.
NUM_ACTIONS: Final = NUM_BOARD_ACTIONS + NUM_DROP_ACTIONS
#: Number of core46 observation planes.
NUM_PLANES: Final = len(CORE46_PLANES)
#: Keisei's default ``max_moves_per_game``, the denominator of plane 43.
DEFAULT_MAX_MOVES: Final = 500

assert NUM_ACTIONS == 13527 and NUM_PLANES == 46


# --------------------------------------------------------------------------------------------
# Tables (built once at import, from cshogi's named constants: no ordering is assumed)
# --------------------------------------------------------------------------------------------

_BLACK: Final[int] = int(cshogi.BLACK)
_WHITE: Final[int] = int(cshogi.WHITE)
assert {_BLACK, _WHITE} == {0, 1}

# Keisei's board plane (side to move's planes 0..13) of each cshogi piece *type*.
# cshogi orders types P L N S B R G K, Keisei P L N S G B R K: mapped by name, not by position.
_TYPE_TO_PLANE: Final[dict[int, int]] = {
    cshogi.PAWN: 0,
    cshogi.LANCE: 1,
    cshogi.KNIGHT: 2,
    cshogi.SILVER: 3,
    cshogi.GOLD: 4,
    cshogi.BISHOP: 5,
    cshogi.ROOK: 6,
    cshogi.KING: 7,
    cshogi.PROM_PAWN: 8,
    cshogi.PROM_LANCE: 9,
    cshogi.PROM_KNIGHT: 10,
    cshogi.PROM_SILVER: 11,
    cshogi.PROM_BISHOP: 12,
    cshogi.PROM_ROOK: 13,
}
# cshogi piece codes (type + colour) of each type, for Black and for White.
_BLACK_CODE: Final[dict[int, int]] = {
    cshogi.PAWN: cshogi.BPAWN,
    cshogi.LANCE: cshogi.BLANCE,
    cshogi.KNIGHT: cshogi.BKNIGHT,
    cshogi.SILVER: cshogi.BSILVER,
    cshogi.GOLD: cshogi.BGOLD,
    cshogi.BISHOP: cshogi.BBISHOP,
    cshogi.ROOK: cshogi.BROOK,
    cshogi.KING: cshogi.BKING,
    cshogi.PROM_PAWN: cshogi.BPROM_PAWN,
    cshogi.PROM_LANCE: cshogi.BPROM_LANCE,
    cshogi.PROM_KNIGHT: cshogi.BPROM_KNIGHT,
    cshogi.PROM_SILVER: cshogi.BPROM_SILVER,
    cshogi.PROM_BISHOP: cshogi.BPROM_BISHOP,
    cshogi.PROM_ROOK: cshogi.BPROM_ROOK,
}
_WHITE_CODE: Final[dict[int, int]] = {
    cshogi.PAWN: cshogi.WPAWN,
    cshogi.LANCE: cshogi.WLANCE,
    cshogi.KNIGHT: cshogi.WKNIGHT,
    cshogi.SILVER: cshogi.WSILVER,
    cshogi.GOLD: cshogi.WGOLD,
    cshogi.BISHOP: cshogi.WBISHOP,
    cshogi.ROOK: cshogi.WROOK,
    cshogi.KING: cshogi.WKING,
    cshogi.PROM_PAWN: cshogi.WPROM_PAWN,
    cshogi.PROM_LANCE: cshogi.WPROM_LANCE,
    cshogi.PROM_KNIGHT: cshogi.WPROM_KNIGHT,
    cshogi.PROM_SILVER: cshogi.WPROM_SILVER,
    cshogi.PROM_BISHOP: cshogi.WPROM_BISHOP,
    cshogi.PROM_ROOK: cshogi.WPROM_ROOK,
}
# Keisei's hand order P L N S G B R, as indices into cshogi's ``pieces_in_hand`` tuples.
_HAND_ORDER: Final[tuple[int, ...]] = (
    cshogi.HPAWN,
    cshogi.HLANCE,
    cshogi.HKNIGHT,
    cshogi.HSILVER,
    cshogi.HGOLD,
    cshogi.HBISHOP,
    cshogi.HROOK,
)
# Keisei's drop index k of each cshogi hand piece (move_drop_hand_piece).
_HAND_PIECE_TO_K: Final[dict[int, int]] = {hp: k for k, hp in enumerate(_HAND_ORDER)}
# Keisei's drop index k of each droppable cshogi piece type (a drop's move_from is 81 + type - 1).
# Keisei's unpromoted planes 0..6 are P, L, N, S, G, B, R: the drop order too.
_DROP_TYPE_TO_K: Final[dict[int, int]] = {t: p for t, p in _TYPE_TO_PLANE.items() if p < 7}
_HAND_MAX: Final = np.array([18, 4, 4, 4, 4, 2, 2], dtype=np.float32)
_HAND_INDEX: Final = np.array(_HAND_ORDER, dtype=np.int64)
_K_LETTERS: Final = "PLNSGBR"
_RANK_LETTERS: Final = "abcdefghi"


def _flat_np(sq: npt.NDArray[np.int64], white: bool) -> npt.NDArray[np.int64]:
    s = 80 - sq if white else sq
    out: npt.NDArray[np.int64] = (s % 9) * 9 + (8 - s // 9)
    return out


def _flat(sq: int, white: bool) -> int:
    """Keisei flat square ``r * 9 + c`` of cshogi square ``sq`` for the given side to move."""
    s = 80 - sq if white else sq
    return (s % 9) * 9 + (8 - s // 9)


_SQUARES: Final = np.arange(81, dtype=np.int64)
# _SQ_TO_FLAT[turn, sq] = Keisei flat square.
_SQ_TO_FLAT: Final = np.stack([_flat_np(_SQUARES, False), _flat_np(_SQUARES, True)])


def _build_piece_table() -> npt.NDArray[np.int64]:
    """``table[turn, code, sq]`` = flat index ``plane * 81 + r * 9 + c`` in the observation."""
    table = np.full((2, 32, 81), -1, dtype=np.int64)
    for turn in (_BLACK, _WHITE):
        own, opp = (_BLACK_CODE, _WHITE_CODE) if turn == _BLACK else (_WHITE_CODE, _BLACK_CODE)
        for piece_type, plane in _TYPE_TO_PLANE.items():
            table[turn, own[piece_type]] = plane * 81 + _SQ_TO_FLAT[turn]
            table[turn, opp[piece_type]] = (plane + 14) * 81 + _SQ_TO_FLAT[turn]
    return table


def _build_action_table() -> npt.NDArray[np.int64]:
    """``table[turn, from_field * 162 + to * 2 + promote]`` = action index, -1 if impossible.

    ``from_field`` is cshogi's ``move_from``: a square 0..80, or ``81 + piece_type - 1`` for a
    drop.
    """
    table = np.full((2, 88, 81, 2), -1, dtype=np.int64)
    for turn in (_BLACK, _WHITE):
        flat = _SQ_TO_FLAT[turn]
        f = flat[:, None]  # from, rows
        t = flat[None, :]  # to, columns
        pair = f * 80 + np.where(t < f, t, t - 1)
        valid = f != t
        table[turn, :81, :, 0] = np.where(valid, 2 * pair, -1)
        table[turn, :81, :, 1] = np.where(valid, 2 * pair + 1, -1)
        for piece_type, k in _DROP_TYPE_TO_K.items():
            table[turn, 81 + piece_type - 1, :, 0] = NUM_BOARD_ACTIONS + flat * 7 + k
    return table.reshape(2, -1)


_PIECE_TABLE: Final = _build_piece_table()
_ACTION_TABLE: Final = _build_action_table()

# cshogi's 32-bit move layout (used only by the vectorised paths; the scalar paths use cshogi's
# own accessors, and the tests check that both agree): to in bits 0-6, from in bits 7-13,
# promotion flag in bit 14.
_TO_MASK: Final = 0x7F
_FROM_SHIFT: Final = 7
_PROMOTE_SHIFT: Final = 14
_MOVE16_MASK: Final = 0xFFFF


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_board(board: Any) -> None:
    if not isinstance(board, cshogi.Board):
        hint = " (parse it with board_from_sfen first)" if isinstance(board, str) else ""
        raise SpecError(f"expected a cshogi.Board, got {type(board).__name__}{hint}")


def _as_int(value: Any, what: str, board: Any = None) -> int:
    """``value`` as a Python int (numpy and 0-d integer tensors accepted), else IllegalMoveError."""
    if isinstance(value, bool):
        raise IllegalMoveError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        where = f" (position: {board.sfen()})" if board is not None else ""
        raise IllegalMoveError(
            f"{what} must be an integer, got {type(value).__name__} {value!r}{where}"
        ) from None


def _check_max_moves(max_moves: Any) -> int:
    if isinstance(max_moves, bool) or not isinstance(max_moves, int | np.integer):
        raise SpecError(f"max_moves must be an int >= 1, got {max_moves!r}")
    if max_moves < 1:
        raise SpecError(f"max_moves must be >= 1, got {max_moves}")
    return int(max_moves)


def _usi_square(sq: int) -> str:
    return f"{sq // 9 + 1}{_RANK_LETTERS[sq % 9]}"


def _square_of_flat(flat: int, white: bool) -> int:
    r, c = divmod(flat, 9)
    sq = (8 - c) * 9 + r
    return 80 - sq if white else sq


def _describe_index(index: int, white: bool) -> str:
    """The move an in-range action index stands for, in USI, for the given side to move."""
    if index >= NUM_BOARD_ACTIONS:
        target, k = divmod(index - NUM_BOARD_ACTIONS, 7)
        return f"{_K_LETTERS[k]}*{_usi_square(_square_of_flat(target, white))}"
    pair, promote = divmod(index, 2)
    f, rest = divmod(pair, 80)
    t = rest if rest < f else rest + 1
    usi = _usi_square(_square_of_flat(f, white)) + _usi_square(_square_of_flat(t, white))
    return usi + ("+" if promote else "")


def _side_name(board: Any) -> str:
    return "Black" if board.turn == _BLACK else "White"


def _legal_array(board: Any) -> npt.NDArray[np.int64]:
    return np.fromiter(board.legal_moves, dtype=np.int64)


def _indices_of(moves: npt.NDArray[np.int64], turn: int) -> npt.NDArray[np.int64]:
    """Vectorised action indices of cshogi moves (bit layout), for side to move ``turn``."""
    key = ((moves >> _FROM_SHIFT) & _TO_MASK) * 162 + (moves & _TO_MASK) * 2
    key += (moves >> _PROMOTE_SHIFT) & 1
    out: npt.NDArray[np.int64] = _ACTION_TABLE[turn][key]
    if out.size and out.min() < 0:  # pragma: no cover - only if cshogi changed its move layout
        raise KeiseiFnError(
            "cshogi's move encoding is not the one keisei_fn.shogi was written for "
            f"(cshogi {getattr(cshogi, '__version__', '?')}); pin a compatible cshogi"
        )
    return out


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def square_to_rc(sq: int, *, white: bool = False) -> tuple[int, int]:
    """Keisei's ``(r, c)`` of cshogi square ``sq`` seen by the side to move.

    Args:
        sq: cshogi square, ``(file - 1) * 9 + (rank - 1)``, 0..80.
        white: True when White is to move (the board is then rotated 180 degrees).

    Returns:
        ``(r, c)``, both 0..8.

    Raises:
        SpecError: ``sq`` is not an int in 0..80.

    Example:
        >>> square_to_rc(60)  # 7g: rank g -> r = 6, file 7 -> c = 2
        (6, 2)
        >>> square_to_rc(60, white=True)
        (2, 6)
    """
    if isinstance(sq, bool) or not isinstance(sq, int | np.integer) or not 0 <= sq <= 80:
        raise SpecError(f"a cshogi square is an int in 0..80, got {sq!r}")
    return divmod(_flat(int(sq), white), 9)


# --------------------------------------------------------------------------------------------
# Observation
# --------------------------------------------------------------------------------------------


def _fill_observation(board: Any, out: npt.NDArray[np.float32], max_moves: int) -> None:
    """Write core46 into ``out`` (float32 zeros, shape ``(46 * 81,)``)."""
    turn = int(board.turn)
    pieces = np.array(board.pieces, dtype=np.int64)
    occupied = np.flatnonzero(pieces)
    out[_PIECE_TABLE[turn, pieces[occupied], occupied]] = 1.0
    planes = out.reshape(NUM_PLANES, 81)
    # hands[colour, k] = count / max, Keisei's P L N S G B R order; own hand first.
    hands = np.array(board.pieces_in_hand, dtype=np.float32)[:, _HAND_INDEX] / _HAND_MAX
    planes[28:35] = hands[turn, :, None]
    planes[35:42] = hands[1 - turn, :, None]
    if turn == _BLACK:
        planes[42] = 1.0
    planes[43] = np.float32(max(int(board.move_number) - 1, 0)) / np.float32(max_moves)


def encode_observation(board: cshogi.Board, *, max_moves: int = DEFAULT_MAX_MOVES) -> torch.Tensor:
    """Encode a position as Keisei's core46 observation, from the side to move's perspective.

    See the module docstring for the plane layout and coordinates.

    Args:
        board: the position.
        max_moves: Keisei's ``max_moves_per_game``; plane 43 is
            ``(board.move_number - 1) / max_moves`` (not clipped at 1; a move number below 1,
            which only a hand-made cshogi board can have, counts as 0).

    Returns:
        A new float32 tensor of shape ``(46, 9, 9)`` on the CPU.

    Raises:
        SpecError: ``max_moves`` is not an int >= 1, or ``board`` is not a ``cshogi.Board``.

    Example:
        >>> obs = encode_observation(start_board())
        >>> obs[7, 8, 4].item(), obs[42].mean().item()  # own king on 5i, Black to move
        (1.0, 1.0)
    """
    _check_board(board)
    max_moves = _check_max_moves(max_moves)
    out = np.zeros(NUM_PLANES * 81, dtype=np.float32)
    _fill_observation(board, out, max_moves)
    return torch.from_numpy(out).view(NUM_PLANES, 9, 9)


def encode_observations(
    boards: Iterable[cshogi.Board], *, max_moves: int = DEFAULT_MAX_MOVES
) -> torch.Tensor:
    """Encode many positions into one batch (each from its own side to move's perspective).

    Args:
        boards: the positions.
        max_moves: as for :func:`encode_observation`.

    Returns:
        A float32 tensor of shape ``(N, 46, 9, 9)``.

    Raises:
        SpecError: ``max_moves`` is invalid or an item is not a ``cshogi.Board``.

    Example:
        >>> encode_observations([start_board(), start_board()]).shape
        torch.Size([2, 46, 9, 9])
    """
    max_moves = _check_max_moves(max_moves)
    boards = list(boards)
    out = np.zeros((len(boards), NUM_PLANES * 81), dtype=np.float32)
    for i, board in enumerate(boards):
        _check_board(board)
        _fill_observation(board, out[i], max_moves)
    return torch.from_numpy(out).view(len(boards), NUM_PLANES, 9, 9)


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


def legal_moves(board: cshogi.Board) -> list[int]:
    """All legal moves of the side to move, as cshogi move ints (cshogi's generation order).

    Args:
        board: the position.

    Returns:
        A new list (empty when the side to move is mated).

    Raises:
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> len(legal_moves(start_board()))
        30
    """
    _check_board(board)
    return [int(m) for m in board.legal_moves]


def _find_legal(move: int, board: Any) -> int:
    """The legal move of ``board`` whose low 16 bits equal ``move``'s, else IllegalMoveError."""
    legal = _legal_array(board)
    hits = np.flatnonzero((legal & _MOVE16_MASK) == (move & _MOVE16_MASK))
    if move <= 0 or hits.size == 0:
        try:
            usi = cshogi.move_to_usi(move) if 0 < move < 2**32 else None
        except (OverflowError, ValueError):  # pragma: no cover - defensive
            usi = None
        shown = f"{move} ({usi})" if usi else str(move)
        raise IllegalMoveError(
            f"move {shown} is not legal for {_side_name(board)} in position {board.sfen()!r}"
        )
    return int(legal[hits[0]])


def move_to_index(move: int, board: cshogi.Board) -> int:
    """The action index of a legal move, relative to the side to move.

    Args:
        move: a cshogi move int (from ``board.legal_moves``, ``board.move_from_usi``, or a 16-bit
            ``cshogi.move16``).
        board: the position the move is played in (it decides the perspective).

    Returns:
        The action index, ``0 <= index < NUM_ACTIONS``.

    Raises:
        IllegalMoveError: ``move`` is not an int or not legal in ``board``.
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> board = start_board()
        >>> move_to_index(board.move_from_usi("7g7f"), board)
        9054
    """
    _check_board(board)
    move = _find_legal(_as_int(move, "a move", board), board)
    white = board.turn == _WHITE
    to = _flat(int(cshogi.move_to(move)), white)
    if cshogi.move_is_drop(move):
        k = _HAND_PIECE_TO_K[int(cshogi.move_drop_hand_piece(move))]
        return NUM_BOARD_ACTIONS + to * 7 + k
    frm = _flat(int(cshogi.move_from(move)), white)
    pair = frm * 80 + (to if to < frm else to - 1)
    return 2 * pair + (1 if cshogi.move_is_promotion(move) else 0)


def _check_index(index: Any, board: Any) -> int:
    index = _as_int(index, "an action index", board)
    if not 0 <= index < NUM_ACTIONS:
        raise IllegalMoveError(
            f"action index {index} is out of range [0, {NUM_ACTIONS}) (position: {board.sfen()!r})"
        )
    return int(index)


def index_to_move(index: int, board: cshogi.Board) -> int:
    """The legal cshogi move an action index stands for in ``board``.

    Args:
        index: an action index, ``0 <= index < NUM_ACTIONS`` (Python, numpy or 0-d tensor int).
        board: the position (it decides the perspective).

    Returns:
        The matching move from ``board.legal_moves`` (with cshogi's full 32-bit encoding).

    Raises:
        IllegalMoveError: ``index`` is out of range, or names a move that is not legal here
            (the message names the index, the move it stands for and the position's SFEN).
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> board = start_board()
        >>> index_to_move(9054, board) == board.move_from_usi("7g7f")
        True
    """
    _check_board(board)
    index = _check_index(index, board)
    legal = _legal_array(board)
    hits = np.flatnonzero(_indices_of(legal, int(board.turn)) == index)
    if hits.size == 0:
        raise IllegalMoveError(
            f"action index {index} ({_describe_index(index, board.turn == _WHITE)} for "
            f"{_side_name(board)}) is not a legal move in position {board.sfen()!r}"
        )
    return int(legal[hits[0]])


def legal_mask(board: cshogi.Board) -> torch.Tensor:
    """Boolean mask over the action space, True exactly at the legal moves' indices.

    Args:
        board: the position.

    Returns:
        A bool tensor of shape ``(NUM_ACTIONS,)`` (all False when the side to move is mated).

    Raises:
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> int(legal_mask(start_board()).sum())
        30
    """
    _check_board(board)
    mask = np.zeros(NUM_ACTIONS, dtype=np.bool_)
    mask[_indices_of(_legal_array(board), int(board.turn))] = True
    return torch.from_numpy(mask)


def legal_move_indices(board: cshogi.Board) -> tuple[list[int], list[int]]:
    """The legal moves of the side to move and their action indices, in the same order.

    Args:
        board: the position.

    Returns:
        ``(moves, indices)``: cshogi move ints (cshogi's generation order) and the action index
        of each (both empty when the side to move is mated).

    Raises:
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> moves, indices = legal_move_indices(start_board())
        >>> len(moves), indices[moves.index(start_board().move_from_usi("7g7f"))]
        (30, 9054)
    """
    _check_board(board)
    legal = _legal_array(board)
    return legal.tolist(), _indices_of(legal, int(board.turn)).tolist()


def legal_masks(boards: Iterable[cshogi.Board]) -> torch.Tensor:
    """Legal-move masks of many positions.

    Args:
        boards: the positions.

    Returns:
        A bool tensor of shape ``(N, NUM_ACTIONS)``.

    Raises:
        SpecError: an item is not a ``cshogi.Board``.

    Example:
        >>> legal_masks([start_board()]).sum(dim=1).tolist()
        [30]
    """
    boards = list(boards)
    mask = np.zeros((len(boards), NUM_ACTIONS), dtype=np.bool_)
    for i, board in enumerate(boards):
        _check_board(board)
        mask[i, _indices_of(_legal_array(board), int(board.turn))] = True
    return torch.from_numpy(mask)


# --------------------------------------------------------------------------------------------
# USI
# --------------------------------------------------------------------------------------------


def move_to_usi(move: int) -> str:
    """The USI string of a cshogi move (``"7g7f"``, ``"8h2b+"``, ``"P*5e"``).

    Args:
        move: a cshogi move int.

    Returns:
        The USI notation (no position is needed).

    Raises:
        IllegalMoveError: ``move`` is not a move int cshogi can render.

    Example:
        >>> move_to_usi(start_board().move_from_usi("7g7f"))
        '7g7f'
    """
    value = _as_int(move, "a move")
    usi = None
    if 0 < value < 2**32:
        usi = cshogi.move_to_usi(value)
    if not isinstance(usi, str) or not usi:
        raise IllegalMoveError(f"{move!r} is not a cshogi move")
    return usi


def usi_to_move(usi: str, board: cshogi.Board) -> int:
    """The legal cshogi move of a USI string in ``board``.

    Args:
        usi: USI notation, e.g. ``"7g7f"``, ``"8h2b+"``, ``"P*5e"`` (surrounding spaces ignored).
        board: the position.

    Returns:
        The matching move from ``board.legal_moves``.

    Raises:
        IllegalMoveError: the string is not a legal move here (message lists the position).
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> move_to_usi(usi_to_move("7g7f", start_board()))
        '7g7f'
    """
    _check_board(board)
    text = usi.strip() if isinstance(usi, str) else None
    if text:
        for move in board.legal_moves:
            if cshogi.move_to_usi(move) == text:
                return int(move)
    raise IllegalMoveError(
        f"{usi!r} is not a legal USI move for {_side_name(board)} in position {board.sfen()!r}"
    )


def index_to_usi(index: int, board: cshogi.Board) -> str:
    """The USI string of the legal move an action index stands for.

    Args:
        index: an action index.
        board: the position.

    Returns:
        USI notation of the move.

    Raises:
        IllegalMoveError: as for :func:`index_to_move`.
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> index_to_usi(9054, start_board())
        '7g7f'
    """
    return move_to_usi(index_to_move(index, board))


def usi_to_index(usi: str, board: cshogi.Board) -> int:
    """The action index of a legal USI move.

    Args:
        usi: USI notation.
        board: the position.

    Returns:
        The action index.

    Raises:
        IllegalMoveError: the string is not a legal move here.
        SpecError: ``board`` is not a ``cshogi.Board``.

    Example:
        >>> usi_to_index("7g7f", start_board())
        9054
    """
    return move_to_index(usi_to_move(usi, board), board)


# --------------------------------------------------------------------------------------------
# Random positions
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{name} must be an int >= 1, got {value!r}")
    return value


def iter_random_positions(
    *, seed: int, max_plies: int = 256, stride: int = 1
) -> Iterator[cshogi.Board]:
    """Endless positions from uniformly random legal self-play, reproducible by ``seed``.

    Games start from the initial position; each ply plays a move drawn uniformly from the legal
    moves (sorted first, so the draw does not depend on cshogi's generation order). A game
    restarts when the side to move has no legal move, a position repeats, or ``max_plies`` plies
    were played. Every ``stride``-th position of this stream is yielded, starting with the
    initial position; a mated position (no legal move) is never yielded.

    Args:
        seed: seed of a private ``random.Random`` (the global RNG is not touched).
        max_plies: longest game before a restart, >= 1.
        stride: yield every ``stride``-th position (>= 1); larger values decorrelate neighbours.
            Prefer an odd stride: with an even stride (and an even ``max_plies``) nearly every
            yielded position has Black to move, since games rarely end on an odd ply.

    Returns:
        An endless iterator of independent ``cshogi.Board`` copies (mutating one does not
        affect the stream).

    Raises:
        SpecError: a bad ``seed``, ``max_plies`` or ``stride`` (raised at the call).

    Example:
        >>> positions = iter_random_positions(seed=0, stride=10)
        >>> next(positions).sfen() == start_board().sfen()
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"seed must be an int, got {seed!r}")
    return _self_play(
        random.Random(seed),
        _check_positive("max_plies", max_plies),
        _check_positive("stride", stride),
    )


def _self_play(rng: random.Random, max_plies: int, stride: int) -> Iterator[cshogi.Board]:
    board = cshogi.Board()
    plies = 0
    counter = 0
    while True:
        moves = sorted(board.legal_moves)
        if not moves or plies >= max_plies or board.is_draw() != cshogi.NOT_REPETITION:
            board.reset()
            plies = 0
            continue
        if counter % stride == 0:
            yield board.copy()
        counter += 1
        board.push(moves[rng.randrange(len(moves))])
        plies += 1


def random_positions(
    n: int, *, seed: int, max_plies: int = 256, stride: int = 1
) -> list[cshogi.Board]:
    """``n`` positions from :func:`iter_random_positions` (same arguments), as a list.

    Args:
        n: number of positions, >= 0.
        seed: RNG seed; the same seed gives the same positions.
        max_plies: longest game before a restart.
        stride: keep every ``stride``-th position of the self-play stream (prefer odd values,
            see :func:`iter_random_positions`).

    Returns:
        A list of ``n`` boards, each with at least one legal move.

    Raises:
        SpecError: a bad ``n``, ``seed``, ``max_plies`` or ``stride``.

    Example:
        >>> [b.sfen() for b in random_positions(3, seed=1)] == [
        ...     b.sfen() for b in random_positions(3, seed=1)]
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SpecError(f"n must be an int >= 0, got {n!r}")
    return list(islice(iter_random_positions(seed=seed, max_plies=max_plies, stride=stride), n))
