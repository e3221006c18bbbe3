"""Matches (keisei_fn.match): model players in process, USI engines as subprocesses, CSA
records that cshogi parses back, summary.json, the Elo interval and the gate."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import cshogi
import cshogi.CSA
import orjson
import pytest
import torch
from torch import nn

import keisei_fn as kf
from keisei_fn.errors import InvalidModelError, KeiseiFnError, SpecError
from keisei_fn.match import GameResult, MatchResult, UsiCommand, is_better, play_match
from keisei_fn.publish.plan import check_metrics
from tests import cli_inprocess

SPEC = kf.ModelSpec(model_type="testmodel")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return kf.build_model(SPEC, seed=0).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("match") / "run"
    kf.save_final_model(kf.capture(SPEC, kf.build_model(SPEC, seed=1), step=1), path)
    return path


def replay(record: Path) -> list[str]:
    """The moves of a CSA record, checked legal from its initial position by cshogi."""
    (game,) = cshogi.CSA.Parser.parse_file(str(record))
    board = cshogi.Board(game.sfen)
    for move in game.moves:
        assert board.is_legal(move)
        board.push(move)
    return [cshogi.move_to_usi(m) for m in game.moves]


def check_records(out: Path, games: int) -> dict[str, object]:
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["games"] == games == len(summary["results"])
    for game in summary["results"]:
        assert replay(out / game["record"]) == game["moves"]
        (parsed,) = cshogi.CSA.Parser.parse_file(str(out / game["record"]))
        winner = {cshogi.BLACK_WIN: game["black"], cshogi.DRAW: None}.get(parsed.win)
        if parsed.win == cshogi.WHITE_WIN:
            winner = "B" if game["black"] == "A" else "A"
        assert winner == game["winner"], (parsed.endgame, game["reason"])
    return summary


def test_models_play_a_match_and_write_records(
    model: nn.Module, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = play_match(model, run_dir, games=4, playouts=2, seed=5, move_cap=24)
    assert result.out.parent == tmp_path and result.out.name.startswith("match-")
    assert result.a_wins + result.b_wins + result.draws == 4
    assert [g.black for g in result.games] == ["A", "B", "A", "B"]
    assert result.games[0].opening == result.games[1].opening != result.games[2].opening
    assert all(g.reason in ("mate", "resign", "repetition", "move cap") for g in result.games)
    summary = check_records(result.out, 4)
    assert summary["b"] == str(run_dir) and summary["settings"]["playouts"] == [2, 2]  # type: ignore[index]
    low, high = summary["elo_interval"]  # type: ignore[misc]
    assert low is None or high is None or low <= high
    figures = result.metrics("vs_model")  # for publish(meta, metrics=...)
    assert figures["vs_model_games"] == 4.0
    assert figures["vs_model_score"] == (result.b_wins + result.draws / 2) / 4
    assert set(figures) <= {
        f"vs_model_{k}" for k in ("games", "score", "elo", "elo_low", "elo_high")
    }
    check_metrics(figures)  # what publish accepts
    again = play_match(model, run_dir, games=4, playouts=2, seed=5, move_cap=24, out="again")
    assert [g.moves for g in again.games] == [g.moves for g in result.games]  # reproducible


def test_match_cli_against_an_external_engine(run_dir: Path, tmp_path: Path) -> None:
    engine = f"{sys.executable} -m keisei_fn usi {run_dir}"
    out = tmp_path / "out"
    ran = cli_inprocess.run(
        "match", run_dir, "--engine-b", engine, "--games", "2", "--move-cap", "12",
        "--playouts", "0", "--playouts-b", "2", "--out", out, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "(B): 2 games" in ran.stdout and "Elo of B - A: " in ran.stdout
    assert "[" in ran.stdout.split("Elo of B - A: ")[1]  # the interval
    assert f"records and summary.json in {out}" in ran.stdout
    summary = check_records(out, 2)
    assert str(summary["b"]).startswith("keisei-fn")
    assert summary["settings"]["playouts"] == [0, 2]  # type: ignore[index]
    again = cli_inprocess.run("match", run_dir, run_dir, "--games", "1", "--out", out)
    assert again.returncode == 2 and "already holds a match" in again.stderr


BROKEN_ENGINE = """
import sys
for line in sys.stdin:
    word = line.split()[0] if line.split() else ""
    if word == "usi":
        print("id name broken\\nusiok", flush=True)
    elif word == "isready":
        print("readyok", flush=True)
    elif word == "go":
        if "{mode}" == "exit":
            sys.exit(3)
        while "{mode}" == "chatter":  # info lines without end, never a bestmove
            print("info string thinking", flush=True)
        print("bestmove 1a1a", flush=True)
    elif word == "quit":
        break
"""


@pytest.mark.parametrize("mode", ["illegal", "exit"])
def test_an_engine_that_breaks_the_rules_loses(model: nn.Module, tmp_path: Path, mode: str) -> None:
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_ENGINE.replace("{mode}", mode))
    broken = UsiCommand((sys.executable, str(script)))
    result = play_match(model, broken, games=2, out=tmp_path / "out")
    assert (result.a_wins, result.b_wins, result.draws) == (2, 0, 0)
    why = "illegal move by B: '1a1a'" if mode == "illegal" else "engine failure of B"
    assert all(g.reason.startswith(why) for g in result.games), result.games
    check_records(result.out, 2)


def test_an_unsound_model_is_refused(model: nn.Module, tmp_path: Path) -> None:
    broken = kf.build_model(SPEC, seed=0)
    with torch.no_grad():
        next(broken.parameters())[0] = float("inf")
    with pytest.raises(InvalidModelError, match="non-finite"):
        play_match(model, broken, games=1, out=tmp_path)
    assert not (tmp_path / "summary.json").exists()


def _result(b_wins: int, a_wins: int, draws: int) -> MatchResult:
    def game(winner: str | None) -> GameResult:
        return GameResult(index=1, black="A", opening="", winner=winner, reason="x", moves=(),
                          record="")  # fmt: skip

    games = [game("B")] * b_wins + [game("A")] * a_wins + [game(None)] * draws
    return MatchResult(a="old", b="new", games=tuple(games), out=Path("."))


def test_the_gate_asks_whether_b_is_better() -> None:
    assert is_better(_result(30, 10, 0))
    assert not is_better(_result(10, 30, 0))
    assert not is_better(_result(12, 8, 0))
    assert is_better(_result(12, 8, 0), confidence=0.75)
    assert _result(30, 10, 0).elo().elo > 0 > _result(10, 30, 0).elo().elo


def test_match_cli_needs_two_players(run_dir: Path) -> None:
    for args in ([run_dir], [run_dir, run_dir, run_dir], ["--engine-a", "x", run_dir, run_dir]):
        ran = cli_inprocess.run("match", *args)
        assert ran.returncode == 2 and "match needs two players" in ran.stderr


@pytest.mark.parametrize(
    ("reason", "plies", "black_wins"),
    [
        ("resign", 0, False), ("resign", 1, True),  # the side to move loses
        ("illegal move by A: '1a1a'", 0, False), ("illegal move by B: '1a1a'", 1, True),
        ("declaration", 0, True), ("declaration", 1, False),  # the side to move wins
        ("perpetual check", 0, True), ("perpetual check", 1, False),  # the checker just moved
        ("engine failure of A: it exited", 0, True), ("engine failure of B: it exited", 0, False),
        ("engine failure of A: it exited", 1, False), ("engine failure of B: it exited", 1, True),
    ],
)  # fmt: skip
def test_a_record_names_the_winner_as_the_summary_does(
    tmp_path: Path, reason: str, plies: int, black_wins: bool
) -> None:
    """cshogi reads a record's winner from its ending and the side to move: a loss by
    perpetual check (the checker has just moved) or by an engine failure must read right too
    (they were written as %ILLEGAL_MOVE and %CHUDAN: the wrong winner, and no winner)."""
    from keisei_fn.match import _write_record

    board = kf.shogi.start_board()
    moves = [board.move_from_usi("7g7f")][:plies]
    record = tmp_path / "game.csa"
    _write_record(record, board.sfen(), ["a", "b"], moves, reason, black_wins)
    (parsed,) = cshogi.CSA.Parser.parse_file(str(record))
    assert parsed.win == (cshogi.BLACK_WIN if black_wins else cshogi.WHITE_WIN), parsed.endgame


SILENT_ENGINE = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
for line in sys.stdin:
    if line.split()[:1] == ["usi"]:
        print("id name silent\\nusiok", flush=True)
    elif line.split()[:1] == ["isready"]:
        os.close(1)  # never answers readyok, and lives on
        time.sleep(600)
"""


def test_an_engine_that_fails_its_handshake_is_not_left_running(
    model: nn.Module, tmp_path: Path
) -> None:
    script, pid_file = tmp_path / "silent.py", tmp_path / "pid"
    script.write_text(SILENT_ENGINE)
    with pytest.raises(KeiseiFnError, match="closed its output before 'readyok'"):
        play_match(model, UsiCommand((sys.executable, str(script), str(pid_file))), games=1,
                   out=tmp_path / "out")  # fmt: skip
    assert not Path(f"/proc/{pid_file.read_text()}").exists()  # killed and reaped


def test_an_engine_that_chatters_without_a_move_loses_on_time(
    model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines keep arriving, so waiting for the next one never times out: the deadline is
    checked between lines (a guard: the queue happened to drain often enough before)."""
    monkeypatch.setattr("keisei_fn.match._MOVE_SLACK_S", 1.0)
    script = tmp_path / "chatty.py"
    script.write_text(BROKEN_ENGINE.replace("{mode}", "chatter"))
    chatty = UsiCommand((sys.executable, str(script)))
    result = play_match(model, chatty, games=1, byoyomi_ms=100, out=tmp_path / "out")
    assert result.games[0].winner == "A"
    assert result.games[0].reason.startswith("engine failure of B: broken: no 'bestmove'")
    check_records(result.out, 1)


def test_out_must_be_new_or_empty(model: nn.Module, tmp_path: Path) -> None:
    """A folder left by an interrupted match (records, no summary.json) is not reused: the
    new match's records would mix with, and partly overwrite, the old ones."""
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "game-007.csa").write_text("old")
    with pytest.raises(SpecError, match="not empty"):
        play_match(model, model, games=1, move_cap=2, out=stale)
    assert sorted(p.name for p in stale.iterdir()) == ["game-007.csa"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert play_match(model, model, games=1, move_cap=2, out=empty).out == empty


CRASHING_ENGINE = """
import os, sys
started = os.path.exists(sys.argv[1])
open(sys.argv[1], "a").close()
for line in sys.stdin:
    word = line.split()[0] if line.split() else ""
    if word == "usi" and started:
        sys.exit(1)  # the restart fails
    if word == "usi":
        print("id name crashing\\nusiok", flush=True)
    elif word == "isready":
        print("readyok", flush=True)
    elif word == "go":
        sys.exit(3)
"""


def test_an_engine_that_cannot_restart_loses_its_games(model: nn.Module, tmp_path: Path) -> None:
    """Only the first start succeeds: the games after the crash are lost by the engine, and
    the match still ends with its summary (the failed restart aborted the match before)."""
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING_ENGINE)
    engine = UsiCommand((sys.executable, str(script), str(tmp_path / "started")))
    result = play_match(model, engine, games=3, out=tmp_path / "out")
    assert [g.winner for g in result.games] == ["A", "A", "A"]
    assert all(g.reason.startswith("engine failure of B") for g in result.games[1:])
    check_records(result.out, 3)


def test_a_match_that_cannot_start_leaves_no_folder(
    model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A player that cannot be loaded or started left an empty ``match-*`` folder (with an
    empty engine log) behind each time."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kf.errors.CheckpointNotFoundError):
        play_match(tmp_path / "no-run", model, games=1)
    with pytest.raises(FileNotFoundError):
        play_match(model, UsiCommand((str(tmp_path / "no-engine"),)), games=1)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "given"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        play_match(model, UsiCommand((str(tmp_path / "no-engine"),)), games=1, out=empty)
    assert empty.is_dir() and list(empty.iterdir()) == []  # the user's folder stays


@pytest.mark.parametrize(
    "settings",
    [{"opening_plies": -1}, {"byoyomi_ms": -5}, {"games": 0}, {"move_cap": True},
     {"temperature": -1.0}, {"temperature": math.nan}],
)  # fmt: skip
def test_bad_settings_are_refused_before_anything_is_made(
    model: nn.Module, tmp_path: Path, settings: dict[str, int]
) -> None:
    """A negative opening length was refused (as "max_plies") only after the folder was made
    and the players loaded; a negative byoyomi was sent to engines as is."""
    with pytest.raises(SpecError, match=next(iter(settings))):
        play_match(model, model, out=tmp_path / "out", **settings)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


SHIFT_JIS_ENGINE = """
import sys
for line in sys.stdin:
    word = line.split()[0] if line.split() else ""
    if word == "usi":
        sys.stdout.buffer.write(b"id name \\x95\\x5c\\x8e\\xa6\\nusiok\\n")  # Shift-JIS
        sys.stdout.flush()
    elif word == "isready":
        print("readyok", flush=True)
    elif word == "go":
        print("bestmove resign", flush=True)
    elif word == "quit":
        break
"""


def test_an_engine_that_prints_shift_jis_plays(model: nn.Module, tmp_path: Path) -> None:
    """Undecodable output ended the reader (a UnicodeDecodeError is a ValueError): the
    engine 'closed its output' at its handshake and the match could not start."""
    script = tmp_path / "sjis.py"
    script.write_text(SHIFT_JIS_ENGINE)
    result = play_match(model, UsiCommand((sys.executable, str(script))), games=2,
                        out=tmp_path / "out")  # fmt: skip
    assert [g.reason for g in result.games] == ["resign", "resign"]
    assert result.b == "\ufffd\\\ufffd\ufffd"  # the name, undecodable bytes replaced
    check_records(result.out, 2)
