"""keisei_fn.shogi against real cshogi: core46 planes, the 13,527-action space, USI, SFEN parsing.

The reference implementations below are written from the spec (keisei-reference.md) with plain
loops over USI strings and cshogi's piece *symbols*, independently of the module's tables.
"""

import random

import cshogi
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keisei_fn import shogi
from keisei_fn.errors import IllegalMoveError, KeiseiFnError, SpecError
from keisei_fn.features import CORE46_PLANES

START = "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1"
# A position with hands: Black has 2 pawns, White 1 bishop; file 5 has no Black pawn.
HANDS = "lnsgkgsnl/1r7/pppp1pppp/9/9/9/PPPP1PPPP/1B5R1/LNSGKGSNL {side} 2Pb 31"

# ------------------------------------------------------------------------------------------
# Independent reference implementation of the spec
# ------------------------------------------------------------------------------------------

KEISEI_PIECES = ["p", "l", "n", "s", "g", "b", "r", "k", "+p", "+l", "+n", "+s", "+b", "+r"]
KEISEI_HAND = ["p", "l", "n", "s", "g", "b", "r"]
HAND_MAX = {"p": 18, "l": 4, "n": 4, "s": 4, "g": 4, "b": 2, "r": 2}


def ref_rc(file, rank_letter, white):
    """Keisei (r, c) of a USI square like ('7', 'g'), rotated 180 degrees for White."""
    r, c = "abcdefghi".index(rank_letter), 9 - int(file)
    return (8 - r, 8 - c) if white else (r, c)


def ref_index(usi, white):
    """Action index of a USI move string, straight from the spec's formulas."""
    if usi[1] == "*":
        r, c = ref_rc(usi[2], usi[3], white)
        return 12960 + (r * 9 + c) * 7 + "PLNSGBR".index(usi[0])
    rf, cf = ref_rc(usi[0], usi[1], white)
    rt, ct = ref_rc(usi[2], usi[3], white)
    # Enumerate pairs in the spec's iteration order: r_from, c_from, r_to, c_to, skipping equal.
    f, t = rf * 9 + cf, rt * 9 + ct
    pair = f * 80 + (t if t < f else t - 1)
    return 2 * pair + (1 if usi.endswith("+") else 0)


def ref_observation(board, max_moves=500):
    """core46 with plain loops over squares, from cshogi piece symbols."""
    obs = np.zeros((46, 9, 9), dtype=np.float32)
    white = board.turn == cshogi.WHITE
    for sq, code in enumerate(board.pieces):
        if code == 0:
            continue
        piece_white = code >= cshogi.WPAWN
        symbol = cshogi.PIECE_SYMBOLS[code - 16 if piece_white else code]
        plane = KEISEI_PIECES.index(symbol) + (0 if piece_white == white else 14)
        file, rank = sq // 9 + 1, "abcdefghi"[sq % 9]
        r, c = ref_rc(str(file), rank, white)
        obs[plane, r, c] = 1.0
    own, opp = (1, 0) if white else (0, 1)
    for colour, base in ((own, 28), (opp, 35)):
        for i, count in enumerate(board.pieces_in_hand[colour]):
            symbol = cshogi.HAND_PIECE_SYMBOLS[i]
            obs[base + KEISEI_HAND.index(symbol)] = np.float32(count) / np.float32(HAND_MAX[symbol])
    obs[42] = 0.0 if white else 1.0
    obs[43] = np.float32(board.move_number - 1) / np.float32(max_moves)
    return obs


def play(seed, plies):
    """Uniformly random legal play from the start; stops early at mate or repetition."""
    rng = random.Random(seed)
    board = cshogi.Board()
    for _ in range(plies):
        moves = sorted(board.legal_moves)
        if not moves or board.is_draw() != cshogi.NOT_REPETITION:
            break
        board.push(rng.choice(moves))
    return board


positions = st.builds(play, st.integers(0, 2**32 - 1), st.integers(0, 250))


def planes_with_pieces(obs):
    return {p: {tuple(rc) for rc in torch.nonzero(obs[p]).tolist()} for p in range(28)}


# ------------------------------------------------------------------------------------------
# Properties over random legal positions
# ------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(positions)
def test_every_legal_move_has_a_distinct_index_and_back(board):
    white = board.turn == cshogi.WHITE
    moves = shogi.legal_moves(board)
    assert moves == list(board.legal_moves)
    indices = [shogi.move_to_index(m, board) for m in moves]
    assert len(set(indices)) == len(moves)
    for move, index in zip(moves, indices, strict=True):
        assert 0 <= index < shogi.NUM_ACTIONS
        assert shogi.index_to_move(index, board) == move
        usi = shogi.move_to_usi(move)
        assert index == ref_index(usi, white)
        assert shogi.usi_to_index(usi, board) == index
        assert shogi.index_to_usi(index, board) == usi
        assert shogi.usi_to_move(usi, board) == move
        # numpy and 0-d tensor indices are accepted too
        assert shogi.index_to_move(np.int64(index), board) == move
        assert shogi.index_to_move(torch.tensor(index), board) == move


@settings(deadline=None)
@given(positions)
def test_legal_mask_is_exactly_the_legal_moves(board):
    mask = shogi.legal_mask(board)
    assert mask.dtype == torch.bool and mask.shape == (13527,)
    expected = {
        ref_index(cshogi.move_to_usi(m), board.turn == cshogi.WHITE) for m in board.legal_moves
    }
    assert int(mask.sum()) == len(expected) == len(list(board.legal_moves))
    assert set(torch.nonzero(mask).flatten().tolist()) == expected


@settings(deadline=None)
@given(positions)
def test_observation_matches_reference_encoding(board):
    obs = shogi.encode_observation(board)
    assert obs.dtype == torch.float32 and obs.shape == (46, 9, 9) and obs.is_contiguous()
    assert obs.numpy().tobytes() == ref_observation(board).tobytes()
    # one piece per occupied square, none elsewhere
    occupancy = obs[:28].sum(dim=0)
    assert occupancy.max() <= 1
    assert int(occupancy.sum()) == sum(1 for code in board.pieces if code)
    assert int(obs[7].sum()) == int(obs[21].sum()) == 1  # one king each
    assert not obs[44:].any()


@settings(deadline=None)
@given(positions)
def test_rotated_twin_has_same_observation_and_action_indices(board):
    """Keisei's symmetry bug: the observation was flipped for White but the actions were not."""
    twin = shogi.board_from_sfen(cshogi.rotate_sfen(board.sfen()))
    assert twin.turn != board.turn
    # rotate_sfen keeps the move number, so plane 43 must match as well
    assert twin.move_number == board.move_number
    obs, twin_obs = shogi.encode_observation(board), shogi.encode_observation(twin)
    others = [p for p in range(46) if p != 42]
    assert obs[others].numpy().tobytes() == twin_obs[others].numpy().tobytes()
    assert torch.equal(obs[42] + twin_obs[42], torch.ones(9, 9))
    moves = list(board.legal_moves)
    assert len(moves) == len(list(twin.legal_moves))
    for move in moves:
        assert shogi.move_to_index(move, board) == shogi.move_to_index(
            cshogi.move_rotate(move), twin
        )
    assert torch.equal(shogi.legal_mask(board), shogi.legal_mask(twin))


@settings(deadline=None, max_examples=10)
@given(st.lists(positions, min_size=0, max_size=6))
def test_batch_functions_match_single_ones(boards):
    obs = shogi.encode_observations(boards, max_moves=80)
    masks = shogi.legal_masks(boards)
    assert obs.shape == (len(boards), 46, 9, 9) and masks.shape == (len(boards), 13527)
    for i, board in enumerate(boards):
        assert torch.equal(obs[i], shogi.encode_observation(board, max_moves=80))
        assert torch.equal(masks[i], shogi.legal_mask(board))


@settings(deadline=None, max_examples=10)
@given(positions)
def test_board_from_sfen_accepts_every_played_position(board):
    assert shogi.board_from_sfen(board.sfen()).sfen() == board.sfen()


# ------------------------------------------------------------------------------------------
# Hand-checked positions
# ------------------------------------------------------------------------------------------


def test_start_position_planes():
    board = shogi.start_board()
    assert board.sfen() == START
    obs = shogi.encode_observation(board)
    back = {(8, 0), (8, 8)}
    expected = {
        0: {(6, c) for c in range(9)},  # own pawns on rank g
        1: back,  # lances on 9i, 1i
        2: {(8, 1), (8, 7)},  # knights 8i, 2i
        3: {(8, 2), (8, 6)},  # silvers 7i, 3i
        4: {(8, 3), (8, 5)},  # golds 6i, 4i
        5: {(7, 1)},  # bishop 8h: rank h -> r 7, file 8 -> c 1
        6: {(7, 7)},  # rook 2h: file 2 -> c 7
        7: {(8, 4)},  # king 5i
        14: {(2, c) for c in range(9)},  # White's pawns on rank c
        15: {(0, 0), (0, 8)},
        16: {(0, 1), (0, 7)},
        17: {(0, 2), (0, 6)},
        18: {(0, 3), (0, 5)},
        19: {(1, 7)},  # White's bishop on 2b
        20: {(1, 1)},  # White's rook on 8b: rank b -> r 1, file 8 -> c 1
        21: {(0, 4)},
    }
    assert planes_with_pieces(obs) == {p: expected.get(p, set()) for p in range(28)}
    assert not obs[28:42].any()
    assert torch.equal(obs[42], torch.ones(9, 9))
    assert not obs[43:].any()  # move_count = 1 - 1 = 0
    assert len(CORE46_PLANES) == shogi.NUM_PLANES == 46


def test_first_move_index_by_hand():
    board = shogi.start_board()
    # 7g7f: 7g -> (r 6, c 9-7=2), f = 6*9+2 = 56; 7f -> (5, 2), t = 5*9+2 = 47.
    # t < f, so pair = 56*80 + 47 = 4527; no promotion -> index = 2*4527 + 0 = 9054.
    assert shogi.usi_to_index("7g7f", board) == 9054
    assert shogi.index_to_usi(9054, board) == "7g7f"
    assert shogi.index_to_move(9054, board) == board.move_from_usi("7g7f")
    # 2g2f: (6, 7) -> (5, 7): f = 61, t = 52, pair = 61*80 + 52 = 4932, index 9864
    assert shogi.usi_to_index("2g2f", board) == 9864
    # 5i4h (king): (8, 4) -> (7, 5): f = 76, t = 68, pair = 76*80 + 68 = 6148, index 12296
    assert shogi.usi_to_index("5i4h", board) == 12296
    # t > f uses t - 1: rook 2h1h: (7, 7) -> (7, 8): f = 70, t = 71, pair = 70*80 + 70 = 5670
    assert shogi.usi_to_index("2h1h", board) == 2 * 5670 == 11340


def test_white_to_move_is_rotated():
    board = shogi.start_board()
    board.push_usi("7g7f")
    assert board.turn == cshogi.WHITE
    # White's 3c3d is the mirror image of Black's 7g7f: 3c = (r 2, c 9-3=6) rotated to
    # (8-2, 8-6) = (6, 2); 3d = (3, 6) rotated to (5, 2). Same pair as 7g7f: index 9054.
    assert shogi.usi_to_index("3c3d", board) == 9054
    # Without the rotation it would have been f = 2*9+6 = 24, t = 3*9+6 = 33,
    # pair = 24*80 + 32 = 1952, index 3904: make sure that is not what we produce.
    assert shogi.usi_to_index("3c3d", board) != 3904
    with pytest.raises(IllegalMoveError):  # 3904 from White's view is 7g7f: not White's move
        shogi.index_to_move(3904, board)

    obs = shogi.encode_observation(board)
    assert not obs[42].any()  # White to move
    assert torch.allclose(obs[43], torch.full((9, 9), 1 / 500))  # move number 2 -> count 1
    planes = planes_with_pieces(obs)
    assert planes[0] == {(6, c) for c in range(9)}  # White's own pawns, rotated to the bottom
    assert planes[7] == {(8, 4)}  # White's king 5a -> (0, 4) -> (8, 4)
    assert planes[6] == {(7, 7)}  # White's rook 8b -> (1, 1) -> (7, 7)
    assert planes[5] == {(7, 1)}  # White's bishop 2b -> (1, 7) -> (7, 1)
    # Black's pawn now on 7f: (5, 2) rotated to (3, 6); the other eight stay on row 8-6 = 2.
    assert planes[14] == {(2, c) for c in range(9) if c != 6} | {(3, 6)}
    assert planes[21] == {(0, 4)}


def test_promotion_index_is_odd():
    board = shogi.start_board()
    for usi in ("7g7f", "3c3d"):
        board.push_usi(usi)
    # 8h2b: 8h = (7, 1), f = 64; 2b = (1, 7), t = 16; pair = 64*80 + 16 = 5136.
    assert shogi.usi_to_index("8h2b", board) == 2 * 5136 == 10272
    assert shogi.usi_to_index("8h2b+", board) == 2 * 5136 + 1 == 10273
    promoted = shogi.index_to_move(10273, board)
    assert cshogi.move_is_promotion(promoted) and shogi.move_to_usi(promoted) == "8h2b+"
    unpromoted = shogi.index_to_move(10272, board)
    assert not cshogi.move_is_promotion(unpromoted) and shogi.move_to_usi(unpromoted) == "8h2b"
    board.push(promoted)
    obs = shogi.encode_observation(board)  # White to move: Black's horse is the opponent's
    assert planes_with_pieces(obs)[14 + 12] == {(7, 1)}  # 2b -> (1, 7) -> rotated (7, 1)
    assert torch.allclose(obs[35], torch.zeros(9, 9))
    assert torch.allclose(obs[35 + 5], torch.full((9, 9), 0.5))  # Black holds 1 bishop of 2


def test_drops_and_hand_planes_black():
    board = shogi.board_from_sfen(HANDS.format(side="b"))
    obs = shogi.encode_observation(board)
    assert torch.equal(obs[28], torch.full((9, 9), 2 / 18, dtype=torch.float32))  # own pawns
    assert torch.equal(obs[35 + 5], torch.full((9, 9), 0.5))  # opponent's bishop, 1 of 2
    assert not obs[29:35].any() and not obs[35:40].any() and not obs[41].any()
    assert torch.equal(obs[43], torch.full((9, 9), 30 / 500))  # move number 31
    # P*5e: 5e = (r 4, c 9-5=4) -> 4*9+4 = 40; index = 12960 + 40*7 + 0 (pawn) = 13240
    assert shogi.usi_to_index("P*5e", board) == 13240
    move = shogi.index_to_move(13240, board)
    assert cshogi.move_is_drop(move) and shogi.move_to_usi(move) == "P*5e"
    # half the max: plane 43 = 30 / 60
    assert torch.equal(shogi.encode_observation(board, max_moves=60)[43], torch.full((9, 9), 0.5))


def test_drops_and_hand_planes_white():
    board = shogi.board_from_sfen(HANDS.format(side="w"))
    obs = shogi.encode_observation(board)
    assert torch.equal(obs[28 + 5], torch.full((9, 9), 0.5))  # own (White's) bishop
    assert torch.equal(obs[35], torch.full((9, 9), 2 / 18))  # opponent's (Black's) pawns
    assert not obs[42].any()
    # B*9e by White: 9e = (r 4, c 0), rotated to (4, 8) -> 4*9+8 = 44;
    # index = 12960 + 44*7 + 5 (bishop) = 13273 (unrotated it would be 12960 + 36*7 + 5 = 13217)
    assert shogi.usi_to_index("B*9e", board) == 13273
    assert shogi.index_to_usi(13273, board) == "B*9e"
    # and 13217 from White's view is (4, 0), i.e. 1e after the rotation
    assert shogi.index_to_usi(13217, board) == "B*1e"


def test_hand_ordering_pinned_one_piece_at_a_time():
    # cshogi orders piece types P L N S B R G but hands P L N S G B R: check each hand plane.
    for k, letter in enumerate("PLNSGBR"):
        sfen = f"4k4/9/9/9/9/9/9/9/4K4 b {letter} 1"
        board = shogi.board_from_sfen(sfen)
        obs = shogi.encode_observation(board)
        expected = 1 / {"P": 18, "B": 2, "R": 2}.get(letter, 4)
        for plane in range(28, 42):
            value = expected if plane == 28 + k else 0.0
            assert torch.equal(obs[plane], torch.full((9, 9), value, dtype=torch.float32)), (
                letter,
                plane,
            )
        # the drop index uses the same order: drop on 5e (flat 40)
        assert shogi.usi_to_index(f"{letter}*5e", board) == 12960 + 40 * 7 + k


def test_board_plane_ordering_pinned_one_piece_at_a_time():
    # cshogi's types go P L N S B R G K, Keisei's planes P L N S G B R K: put one piece of each
    # kind on 5e, the centre (4, 4) for both sides, with the kings on 8a and 2i out of its reach.
    kinds = ["P", "L", "N", "S", "G", "B", "R", None, "+P", "+L", "+N", "+S", "+B", "+R"]
    for plane, kind in enumerate(kinds):
        if kind is None:
            continue
        for piece in (kind, kind.lower()):
            for side in ("b", "w"):
                board = shogi.board_from_sfen(f"1k7/9/9/9/4{piece}4/9/9/9/7K1 {side} - 1")
                obs = shogi.encode_observation(board)
                own = piece[-1].isupper() == (side == "b")
                assert obs[plane if own else plane + 14, 4, 4] == 1.0, (piece, side)
                assert int(obs[:28].sum()) == 3


def test_mated_position_has_no_legal_action():
    board = shogi.board_from_sfen("4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1")
    assert shogi.legal_moves(board) == []
    assert not shogi.legal_mask(board).any()
    with pytest.raises(IllegalMoveError):
        shogi.index_to_move(0, board)


def test_square_to_rc():
    assert shogi.square_to_rc(0) == (0, 8)  # 1a
    assert shogi.square_to_rc(80) == (8, 0)  # 9i
    assert shogi.square_to_rc(60) == (6, 2)  # 7g
    assert shogi.square_to_rc(60, white=True) == (2, 6)
    with pytest.raises(SpecError):
        shogi.square_to_rc(81)


def test_sixteen_bit_moves_are_accepted():
    board = shogi.start_board()
    move = board.move_from_usi("7g7f")
    assert shogi.move_to_index(cshogi.move16(move), board) == 9054


# ------------------------------------------------------------------------------------------
# Random positions
# ------------------------------------------------------------------------------------------


def test_random_positions_are_reproducible_and_playable():
    first = shogi.random_positions(300, seed=7, max_plies=60)
    again = shogi.random_positions(300, seed=7, max_plies=60)
    other = shogi.random_positions(300, seed=8, max_plies=60)
    assert [b.sfen() for b in first] == [b.sfen() for b in again]
    assert [b.sfen() for b in first] != [b.sfen() for b in other]
    assert all(list(b.legal_moves) for b in first)
    assert max(b.move_number for b in first) <= 60
    assert sum(b.sfen() == START for b in first) >= 5  # games restarted at max_plies
    # copies: playing on one does not change the next
    first[0].push_usi("7g7f")
    assert first[1].move_number == 2


def test_random_positions_restart_and_stride():
    numbers = [b.move_number for b in shogi.random_positions(7, seed=0, max_plies=3)]
    assert numbers == [1, 2, 3, 1, 2, 3, 1]
    strided = [b.move_number for b in shogi.random_positions(4, seed=0, max_plies=100, stride=5)]
    assert strided == [1, 6, 11, 16]
    state = random.getstate()
    shogi.random_positions(20, seed=3)
    assert random.getstate() == state  # the global RNG is untouched
    assert shogi.random_positions(0, seed=0) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1, "seed": 0},
        {"n": 2, "seed": "x"},
        {"n": 2, "seed": 0, "max_plies": 0},
        {"n": 2, "seed": 0, "stride": 0},
        {"n": 1.5, "seed": 0},
    ],
)
def test_random_positions_bad_arguments(kwargs):
    n = kwargs.pop("n")
    with pytest.raises(SpecError):
        shogi.random_positions(n, **kwargs)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [-1, 13527, 10**9])
def test_index_out_of_range(index):
    board = shogi.start_board()
    with pytest.raises(IllegalMoveError, match=f"{index}.*out of range") as info:
        shogi.index_to_move(index, board)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeiseiFnError)
    assert START in str(info.value)


@pytest.mark.parametrize("index", [1.0, "5", None, True])
def test_index_of_wrong_type(index):
    with pytest.raises(IllegalMoveError):
        shogi.index_to_move(index, shogi.start_board())


def test_index_of_illegal_move_names_index_move_and_position():
    board = shogi.start_board()
    # index 0: pair 0 = (0, 0) -> (0, 1): 9a8a, a White lance moving onto a White knight
    with pytest.raises(IllegalMoveError) as info:
        shogi.index_to_move(0, board)
    message = str(info.value)
    assert "action index 0" in message and "9a8a" in message and START in message
    with pytest.raises(IllegalMoveError):
        shogi.index_to_usi(13240, board)  # P*5e without a pawn in hand


@pytest.mark.parametrize("usi", ["7g7e", "3c3d", "P*5e", "zzz", "", "7g7f+", "7G7F"])
def test_illegal_usi(usi):
    board = shogi.start_board()
    with pytest.raises(IllegalMoveError, match="not a legal USI move"):
        shogi.usi_to_move(usi, board)
    with pytest.raises(IllegalMoveError):
        shogi.usi_to_index(usi, board)


def test_move_to_index_rejects_illegal_moves():
    board = shogi.start_board()
    white_move = cshogi.move_rotate(board.move_from_usi("7g7f"))  # 3c3d, White's move
    with pytest.raises(IllegalMoveError, match="3c3d"):
        shogi.move_to_index(white_move, board)
    for bad in (0, -5, 2**40, 1.5, "7g7f"):
        with pytest.raises(IllegalMoveError):
            shogi.move_to_index(bad, board)
    for bad in (0, -1, 2**40):
        with pytest.raises(IllegalMoveError):
            shogi.move_to_usi(bad)


@pytest.mark.parametrize(
    "sfen",
    [
        "garbage",
        "",
        "startpos",
        None,
        "9/9/9/9/9/9/9/9/9 b - 1",  # no kings
        "4k4/9/9/9/9/9/9/9/4KK3 b - 1",  # two Black kings
        "4k4/4R4/9/9/9/9/9/9/4K4 b - 1",  # White in check with Black to move
        "4k4/9/9/9/9/9/9/9/4+K4 b - 1",  # promoted king
        "4k4/9/9/9/9/9/9/9/4X4 b - 1",  # unknown piece
        "4k4/9/9/9/9/9/9/9/4K5 b - 1",  # 10 squares on a rank
        "4k4/9/9/9/9/9/9/9/4K3 b - 1",  # 8 squares on a rank
        "4k4/9/9/9/9/9/9/9 b - 1",  # 8 ranks
        "4k4/9/9/9/9/9/9/9/4K4 x - 1",  # side
        "4k4/9/9/9/9/9/9/9/4K4 b 0P 1",  # zero count
        "4k4/9/9/9/9/9/9/9/4K4 b 19P 1",  # too many pawns
        "4k4/9/9/9/9/9/9/9/4K4 b 3R 1",  # too many rooks
        "4k4/9/9/9/9/9/9/9/4K4 b K 1",  # king in hand
        "4k4/9/9/9/9/9/9/9/4K4 b PP 1",  # listed twice
        "4k4/9/9/9/9/9/9/9/4K4 b - 0",  # move number
        "4k4/9/9/9/9/9/9/9/4K4 b - abc",
        "4k4/9/9/9/9/9/9/9/4K4 b - \u00b2",  # str.isdigit() is True, int() refuses it
        "4k4/9/9/9/9/9/9/9/4K4 b - 2147483648",  # cshogi clamped it to 2**31 - 1
        "4k4/9/9/9/9/9/9/9/4K4 b - 1073741825",  # 2**30 + 1: a push could wrap around
        "4k4/9/9/9/9/9/9/9/4K4 b - 1 extra",
        "P3k4/9/9/9/9/9/9/9/4K4 b - 1",  # dead pawn
        "4k4/9/9/9/9/9/9/n8/4K4 w - 1",  # White knight on 9h can never move
        "4k4/9/9/9/9/9/4P4/4P4/4K4 b - 1",  # two pawns on a file
    ],
)
def test_bad_sfen(sfen):
    with pytest.raises(shogi.InvalidPositionError) as info:
        shogi.board_from_sfen(sfen)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeiseiFnError)


def test_good_sfens_are_accepted_and_normalised():
    assert shogi.board_from_sfen(START).sfen() == START
    for sfen in (
        "4k4/9/9/9/9/9/9/9/N3K4 w - 1",  # a Black knight on 9i can move
        "4k4/9/9/9/9/9/9/+n8/4K4 b - 1",  # a promoted White knight on 9h can move
        "4k4/9/9/9/9/9/4P4/4p4/4K4 b - 1",  # one pawn of each colour on a file
        "4k4/9/9/9/9/9/9/9/4K4 b - 1073741824",  # the largest move number: 2**30
    ):
        assert shogi.board_from_sfen(sfen).sfen() == sfen
    assert shogi.board_from_sfen("4k4/9/9/9/9/9/9/9/4K4 b 2p").sfen() == (
        "4k4/9/9/9/9/9/9/9/4K4 b 2p 1"
    )
    assert shogi.board_from_sfen("  4k4/9/9/9/9/9/9/9/4K4  w  -  12 ").move_number == 12


@pytest.mark.parametrize("max_moves", [0, -1, True, 1.5, "500", None])
def test_bad_max_moves(max_moves):
    with pytest.raises(SpecError, match="max_moves"):
        shogi.encode_observation(shogi.start_board(), max_moves=max_moves)
    with pytest.raises(SpecError, match="max_moves"):
        shogi.encode_observations([shogi.start_board()], max_moves=max_moves)


def test_not_a_board():
    for fn in (shogi.encode_observation, shogi.legal_mask, shogi.legal_moves):
        with pytest.raises(SpecError, match="board_from_sfen"):
            fn(START)
    with pytest.raises(SpecError):
        shogi.index_to_move(0, None)


def test_sweep_covers_drops_promotions_and_both_sides():
    """A deterministic sweep, so the properties above surely meet drops, promotions and White."""
    seen = {"drop": 0, "promotion": 0, "white": 0, "black": 0}
    for board in shogi.random_positions(150, seed=2024, max_plies=200, stride=3):
        white = board.turn == cshogi.WHITE
        seen["white" if white else "black"] += 1
        twin = shogi.board_from_sfen(cshogi.rotate_sfen(board.sfen()))
        mask = shogi.legal_mask(board)
        assert torch.equal(mask, shogi.legal_mask(twin))
        indices = set()
        for move in board.legal_moves:
            index = shogi.move_to_index(move, board)
            assert index == ref_index(cshogi.move_to_usi(move), white)
            assert index == shogi.move_to_index(cshogi.move_rotate(move), twin)
            assert shogi.index_to_move(index, board) == move
            indices.add(index)
            seen["drop"] += bool(cshogi.move_is_drop(move))
            seen["promotion"] += bool(cshogi.move_is_promotion(move))
        assert set(torch.nonzero(mask).flatten().tolist()) == indices
        obs = shogi.encode_observation(board)
        assert obs.numpy().tobytes() == ref_observation(board).tobytes()
    assert all(count > 0 for count in seen.values()), seen
