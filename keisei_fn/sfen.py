"""Shogi positions from SFEN strings, validated strictly.

cshogi accepts many malformed SFENs silently (missing ranks, ``0P`` hands, a missing king, and
``Board.set_sfen`` on junk can even abort the process), so :func:`board_from_sfen` checks the
syntax, piece counts, kings, dead pieces, two pawns on a file and that the side *not* to move is
not in check before cshogi ever sees the string.

Example:
    >>> board_from_sfen("4k4/9/9/9/9/9/9/9/4K4 b 2P 1").turn
    0
"""

from __future__ import annotations

import re
from typing import Final

import cshogi

from keisei_fn.errors import InvalidPositionError

__all__ = ["MAX_MOVE_NUMBER", "board_from_sfen", "start_board"]

_BLACK: Final[int] = int(cshogi.BLACK)
_RANK_LETTERS: Final = "abcdefghi"
#: The largest move number accepted: cshogi keeps it in a 32-bit int, silently clamps larger
#: ones to 2**31 - 1, and wraps to negative on a push beyond that; 2**30 leaves room to play.
MAX_MOVE_NUMBER: Final = 2**30


def start_board() -> cshogi.Board:
    """Return a new board in the standard starting position (Black to move, move number 1).

    Returns:
        A fresh ``cshogi.Board``.

    Example:
        >>> start_board().sfen()
        'lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1'
    """
    return cshogi.Board()


_PROMOTABLE: Final = frozenset("PLNSBR")
_PIECE_LETTERS: Final = frozenset("PLNSGBRK")
_PIECE_MAX: Final[dict[str, int]] = {"P": 18, "L": 4, "N": 4, "S": 4, "G": 4, "B": 2, "R": 2}
_HAND_RE: Final = re.compile(r"([1-9][0-9]*)?([PLNSGBRplnsgbr])")


def _invalid(sfen: str, why: str) -> InvalidPositionError:
    return InvalidPositionError(f"invalid SFEN {sfen!r}: {why}")


def _validate_sfen(sfen: str) -> str:
    """Check an SFEN strictly (cshogi accepts much junk silently); return it normalised."""
    fields = sfen.split()
    if len(fields) == 3:
        fields.append("1")
    if len(fields) != 4:
        raise _invalid(
            sfen,
            f"expected 4 space-separated fields (board, side, hands, move number), "
            f"got {len(fields)}",
        )
    placement, side, hands, number = fields

    counts = dict.fromkeys(_PIECE_MAX, 0)
    kings = {"K": 0, "k": 0}
    pawn_files: set[tuple[bool, int]] = set()
    ranks = placement.split("/")
    if len(ranks) != 9:
        raise _invalid(sfen, f"the board needs 9 ranks separated by '/', got {len(ranks)}")
    for r, rank in enumerate(ranks):
        col = 0
        i = 0
        while i < len(rank):
            ch = rank[i]
            if ch in "123456789":
                col += int(ch)
                i += 1
                continue
            promoted = ch == "+"
            if promoted:
                i += 1
                ch = rank[i] if i < len(rank) else ""
                if ch.upper() not in _PROMOTABLE or not ch:
                    raise _invalid(sfen, f"rank {_RANK_LETTERS[r]}: '+' before {ch!r}")
            if not ch or ch.upper() not in _PIECE_LETTERS:
                raise _invalid(sfen, f"rank {_RANK_LETTERS[r]}: unknown piece {ch!r}")
            if col >= 9:
                raise _invalid(sfen, f"rank {_RANK_LETTERS[r]} has more than 9 squares")
            black = ch.isupper()
            kind = ch.upper()
            file = 9 - col
            if kind == "K":
                kings[ch] += 1
            else:
                counts[kind] += 1
            if not promoted:
                # Pieces that could never move again ("dead" pieces) and two pawns on one file.
                rows_left = r if black else 8 - r
                if (kind in "PL" and rows_left < 1) or (kind == "N" and rows_left < 2):
                    raise _invalid(
                        sfen,
                        f"{'Black' if black else 'White'} {ch} on "
                        f"{file}{_RANK_LETTERS[r]} could never move",
                    )
                if kind == "P":
                    if (black, file) in pawn_files:
                        raise _invalid(
                            sfen,
                            f"two unpromoted {'Black' if black else 'White'} pawns on "
                            f"file {file} (nifu)",
                        )
                    pawn_files.add((black, file))
            col += 1
            i += 1
        if col != 9:
            raise _invalid(sfen, f"rank {_RANK_LETTERS[r]} has {col} squares, expected 9")
    if kings != {"K": 1, "k": 1}:
        raise _invalid(sfen, f"each side needs exactly one king, got K={kings['K']} k={kings['k']}")

    if side not in ("b", "w"):
        raise _invalid(sfen, f"side to move must be 'b' or 'w', got {side!r}")

    if hands != "-":
        pos = 0
        seen: set[str] = set()
        for match in _HAND_RE.finditer(hands):
            if match.start() != pos:
                break
            pos = match.end()
            letter = match.group(2)
            if letter in seen:
                raise _invalid(sfen, f"hand piece {letter!r} listed twice")
            seen.add(letter)
            counts[letter.upper()] += int(match.group(1) or 1)
        if pos != len(hands) or not hands:
            raise _invalid(sfen, f"bad hands field {hands!r} (e.g. '-', 'P', '2Pb')")

    for kind, total in counts.items():
        if total > _PIECE_MAX[kind]:
            raise _invalid(
                sfen,
                f"{total} pieces of kind {kind} on the board and in hand, "
                f"at most {_PIECE_MAX[kind]} exist",
            )

    if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= MAX_MOVE_NUMBER:
        raise _invalid(
            sfen, f"move number must be an integer in [1, {MAX_MOVE_NUMBER}], got {number!r}"
        )
    return " ".join((placement, side, hands, str(int(number))))


def board_from_sfen(sfen: str) -> cshogi.Board:
    """Parse and validate an SFEN position.

    cshogi accepts many malformed SFENs silently (missing ranks, ``0P`` hands, a missing king);
    this function checks the syntax, piece counts, kings, dead pieces, two pawns on a file and
    that the side *not* to move is not in check. The move number may be omitted (then 1); it
    is at most :data:`MAX_MOVE_NUMBER`.

    Args:
        sfen: ``"<board> <b|w> <hands> [<move number>]"``, e.g. the output of ``board.sfen()``.

    Returns:
        A new ``cshogi.Board`` in that position.

    Raises:
        InvalidPositionError: the string is not a valid position (message says why).

    Example:
        >>> board_from_sfen("4k4/9/9/9/9/9/9/9/4K4 b 2P 1").pieces_in_hand[0][0]
        2
    """
    if not isinstance(sfen, str):
        raise InvalidPositionError(f"an SFEN must be a str, got {type(sfen).__name__}")
    normalised = _validate_sfen(sfen)
    try:
        board = cshogi.Board(normalised)
        flipped = cshogi.Board(_flip_side(normalised))
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - caught by the checks above
        raise _invalid(sfen, f"cshogi rejected it ({exc})") from exc
    if flipped.is_check():
        raise _invalid(
            sfen,
            f"the side not to move ({'White' if board.turn == _BLACK else 'Black'}) is in check",
        )
    if not board.is_ok():  # pragma: no cover - caught by the checks above
        raise _invalid(sfen, "cshogi's consistency check failed")
    return board


def _flip_side(sfen: str) -> str:
    placement, side, rest = sfen.split(" ", 2)
    return f"{placement} {'w' if side == 'b' else 'b'} {rest}"
