"""The USI engine (keisei_fn.usi): in-process over text streams, and as a real subprocess
driven by cshogi's own USI client and match runner."""

from __future__ import annotations

import io
import os
import queue
import sys
import threading
from pathlib import Path

import cshogi
import cshogi.cli
import cshogi.usi
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import keisei_fn as kf
from keisei_fn import shogi
from keisei_fn.usi import run_engine

NYUGYOKU = "K8/4G4/PPPPPPPPP/9/9/9/9/9/8k b 2R2B3G4S4N4L9p 1"  # Black may declare a win
MATED = "4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1"  # White is mated
REPO = Path(kf.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=0).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("usi") / "run"
    kf.save_final_model(kf.capture(kf.ModelSpec(model_type="testmodel"), model, step=1), path)
    return path


def talk(source: object, *commands: str) -> list[str]:
    out = io.StringIO()
    assert run_engine(source, io.StringIO("".join(c + "\n" for c in commands)), out) == 0  # type: ignore[arg-type]
    return out.getvalue().splitlines()


def legal_usi(sfen: str | None = None, moves: tuple[str, ...] = ()) -> set[str]:
    board = shogi.start_board() if sfen is None else shogi.board_from_sfen(sfen)
    for move in moves:
        board.push_usi(move)
    return {shogi.move_to_usi(m) for m in board.legal_moves}


def test_handshake_lists_the_options(model: nn.Module) -> None:
    lines = talk(model, "usi", "isready", "quit")
    assert lines[0].startswith("id name keisei-fn") and lines[1].startswith("id author")
    options = {line.split()[2] for line in lines if line.startswith("option name")}
    assert options == {"USI_Hash", "USI_Ponder", "Temperature", "Playouts", "ResignValue",
                       "Device", "Seed", "Threads"}  # fmt: skip
    assert lines[-2:] == ["usiok", "readyok"]


def test_threads_sets_torchs_threads(model: nn.Module) -> None:
    before = torch.get_num_threads()
    try:
        talk(model, "setoption name Threads value 3", "quit")
        assert torch.get_num_threads() == 3
        refused = talk(model, "setoption name Threads value 0", "quit")
        assert refused[-1].startswith("info string option Threads: expected an integer in [1,")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_go_prints_a_score_and_a_legal_move(model: nn.Module) -> None:
    moves = ("7g7f", "3c3d")
    go = "go btime 1000 wtime 1000 byoyomi 1000 binc 0 winc 0"
    lines = talk(model, "usi", "isready", "usinewgame", "position startpos moves 7g7f 3c3d",
                 go, "gameover win", "quit")  # fmt: skip
    info, best = lines[-2:]
    words = info.split()
    assert words[:2] == ["info", "depth"] and words[words.index("score") + 1] == "cp"
    int(words[words.index("cp") + 1])
    assert best.split()[0] == "bestmove" and best.split()[1] in legal_usi(moves=moves)
    assert words[words.index("pv") + 1] == best.split()[1]


def test_resign_without_a_move_and_win_by_declaration(model: nn.Module) -> None:
    assert talk(model, f"position sfen {MATED}", "go")[-1] == "bestmove resign"
    assert talk(model, f"position sfen {NYUGYOKU}", "go")[-1] == "bestmove win"


def test_resign_value_is_in_the_printed_units(model: nn.Module) -> None:
    lines = talk(model, "position startpos", "go")
    cp = int(lines[-2].split()[lines[-2].split().index("cp") + 1])
    above = talk(model, f"setoption name ResignValue value {cp + 1}", "position startpos", "go")
    assert above[-1] == "bestmove resign"
    at = talk(model, f"setoption name ResignValue value {cp}", "position startpos", "go")
    assert at[-1] == lines[-1] != "bestmove resign"


def test_temperature_zero_is_deterministic_and_argmax(model: nn.Module) -> None:
    first = talk(model, "position startpos", "go", "position startpos moves 2g2f", "go")
    assert first == talk(model, "position startpos", "go", "position startpos moves 2g2f", "go")
    top = kf_analyze_top(model)
    assert first[1] == f"bestmove {top}"


def kf_analyze_top(model: nn.Module) -> str:
    from keisei_fn.analysis import analyze

    return analyze(model, top_k=1).moves[0].usi


def test_temperature_samples_reproducibly_by_seed(model: nn.Module) -> None:
    commands = ["setoption name Temperature value 5", "setoption name Seed value 7",
                *["position startpos", "go"] * 8]  # fmt: skip
    lines = talk(model, *commands)
    assert lines == talk(model, *commands)
    played = {line for line in lines if line.startswith("bestmove")}
    assert len(played) > 1 and all(m.split()[1] in legal_usi() for m in played)


@pytest.mark.parametrize("playouts", [1, 16])
def test_playouts_search_returns_a_legal_move(model: nn.Module, playouts: int) -> None:
    moves = ("2g2f", "8c8d", "2f2e")
    lines = talk(model, f"setoption name Playouts value {playouts}",
                 f"position startpos moves {' '.join(moves)}", "go")  # fmt: skip
    assert f"nodes {playouts + 1} " in lines[-2]
    assert lines[-1].split()[1] in legal_usi(moves=moves)


def test_an_illegal_move_refuses_the_position(model: nn.Module) -> None:
    lines = talk(model, "position startpos moves 7g7f 7g7f", "go")
    assert lines[0].startswith("info string position refused: move 2 '7g7f' is illegal")
    assert lines[-1] == "bestmove resign"  # no position: go still answers
    assert talk(model, "position startpos moves 7g7f 7g7f", "position startpos", "go")[-1] != (
        "bestmove resign"
    )


@pytest.mark.parametrize(
    "line",
    [
        "position sfen 9/9/9 b - 1",
        "position sfen lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL x - 1",
        "position sfen 8k/9/9/9/9/9/9/9/8K b 0P 1",
        "position sfen",
        "position",
        "position startpos moves",
        "position startpos moves zzzz",
        "setoption",
        "setoption name Playouts value many",
        "setoption name Temperature value -1",
        "setoption name Device value nonsense",
        "setoption name Device value meta",
        "setoption name Nope value 1",
        "go byoyomi soon",
        "hello engine",
        "\x00\x01",
    ],
)
def test_malformed_input_is_answered_with_info_string(model: nn.Module, line: str) -> None:
    lines = talk(model, line, "position startpos", "go")
    if line != "position startpos moves":
        assert lines[0].startswith("info string "), lines
    assert lines[-1].split()[1] in legal_usi()


junk_line = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.builds(lambda t: f"position sfen {t}", st.text(max_size=80)),
    st.builds(lambda t: f"position startpos moves {t}", st.text(max_size=30)),
    st.builds(lambda t: f"setoption name {t}", st.text(max_size=30)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(junk_line, max_size=4))
def test_any_junk_never_crashes_the_engine(model: nn.Module, junk: list[str]) -> None:
    junk = [j.replace("\n", " ").replace("\r", " ") for j in junk]
    junk = [j for j in junk if j.split()[:1] not in (["quit"], ["go"])]
    lines = talk(model, *junk, "isready", "position startpos", "go")
    assert "readyok" in lines and lines[-1].split()[1] in legal_usi()


class _Lines(io.TextIOBase):
    """A stdout whose lines arrive in a queue (the engine runs in a thread)."""

    def __init__(self) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        for line in done:
            self.lines.put(line)
        return len(text)

    def next_starting(self, prefix: str) -> str:
        while True:
            line = self.lines.get(timeout=120)
            if line.startswith(prefix):
                return line


def test_go_infinite_answers_on_stop_even_mid_search(model: nn.Module) -> None:
    read_fd, write_fd = os.pipe()
    out = _Lines()
    with open(read_fd, encoding="utf-8") as stdin, open(write_fd, "w", encoding="utf-8") as feed:
        engine = threading.Thread(target=run_engine, args=(model, stdin, out))
        engine.start()
        feed.write("setoption name Playouts value 16000000\nisready\n")  # never finishes alone
        feed.flush()
        out.next_starting("readyok")
        feed.write("position startpos\ngo infinite\nisready\n")
        feed.flush()
        out.next_starting("readyok")  # answered during the search
        feed.write("stop\n")
        feed.flush()
        assert out.next_starting("bestmove").split()[1] in legal_usi()
        feed.write("setoption name Playouts value 0\ngo ponder\n")
        feed.flush()
        out.next_starting("info depth")
        feed.write("ponderhit\nquit\n")
        feed.flush()
        assert out.next_starting("bestmove").split()[1] in legal_usi()
        engine.join(timeout=120)
        assert not engine.is_alive()


def test_an_unsound_model_is_refused(model: nn.Module) -> None:
    broken = kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=0)
    with torch.no_grad():
        next(broken.parameters())[0] = float("nan")
    out = io.StringIO()
    assert run_engine(broken, io.StringIO("usi\nisready\n"), out) == 2
    assert "non-finite" in out.getvalue().splitlines()[-1]
    assert "readyok" not in out.getvalue()


# -- a real subprocess, driven by cshogi ----------------------------------------------------


def engine_script(tmp_path: Path, source: Path, name: str = "engine.sh") -> str:
    """A wrapper script: cshogi's Engine starts a single executable without arguments."""
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={REPO} OMP_NUM_THREADS=1 exec {sys.executable} -m keisei_fn usi {source}\n"
    )
    script.chmod(0o755)
    return str(script)


def test_cshogi_engine_drives_keisei_fn_usi(tmp_path: Path, run_dir: Path) -> None:
    engine = cshogi.usi.Engine(engine_script(tmp_path, run_dir))
    try:
        assert engine.name.startswith("keisei-fn")
        engine.setoption("Playouts", 8)
        engine.isready()
        engine.usinewgame()
        engine.position(["7g7f", "3c3d"])
        listener = cshogi.usi.InfoListener()
        best, _ = engine.go(byoyomi=2000, listener=listener.listen())
        assert best in legal_usi(moves=("7g7f", "3c3d"))
        assert isinstance(listener.score, int) and listener.pv[0] == best
        engine.position(sfen=f"sfen {NYUGYOKU}")
        assert engine.go(byoyomi=1000)[0] == "win"
    finally:
        engine.quit()


def _cshogi_games(tmp_path: Path, run_dir: Path, games: int) -> None:
    one = engine_script(tmp_path, run_dir, "one.sh")
    two = engine_script(tmp_path, run_dir, "two.sh")
    csa = tmp_path / "games.csa"
    result = cshogi.cli.main(
        one, two, options1={"Playouts": 2}, options2={"Temperature": "1", "Seed": 3},
        games=games, byoyomi=1000, draw=40, opening_moves=0, keep_process=True,
        csa=str(csa), multi_csa=True, print_summary=False,
    )  # fmt: skip
    assert result["total"] == games
    parsed = list(cshogi.CSA.Parser.parse_file(str(csa)))
    assert len(parsed) == games
    for game in parsed:  # every game ended by mate, resignation, repetition or the move cap
        assert game.endgame in ("%TORYO", "%SENNICHITE", "%JISHOGI", "%KACHI"), game.endgame
        board = cshogi.Board()
        for move in game.moves:
            assert board.is_legal(move)
            board.push(move)


def test_cshogi_runs_complete_games_between_two_engines(tmp_path: Path, run_dir: Path) -> None:
    _cshogi_games(tmp_path, run_dir, games=2)


@pytest.mark.slow
def test_cshogi_runs_ten_complete_games_between_two_engines(tmp_path: Path, run_dir: Path) -> None:
    _cshogi_games(tmp_path, run_dir, games=10)


def test_the_usi_command(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import cli_inprocess

    monkeypatch.setattr(sys, "stdin", io.StringIO("usi\nisready\nposition startpos\ngo\nquit\n"))
    ran = cli_inprocess.run("usi", run_dir)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert "usiok" in lines and "readyok" in lines and lines[-1].split()[1] in legal_usi()
    monkeypatch.setattr(sys, "stdin", io.StringIO("usi\nisready\n"))
    missing = cli_inprocess.run("usi", run_dir.parent / "nothing")  # refused before `usi`
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("keisei-fn: error: no checkpoint at")


def test_a_failing_search_still_answers_bestmove(model: nn.Module) -> None:
    class Failing(nn.Module):
        """Sound on validate_model's batch of positions; the search's batch of one fails."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if obs.shape[0] == 1:
                raise RuntimeError("out of memory")
            return self.inner(obs)  # type: ignore[no-any-return]

    lines = talk(Failing(), "isready", "position startpos", "go")
    assert lines[-2:] == [
        "info string cannot search: RuntimeError: out of memory",
        "bestmove resign",
    ]


def test_an_ensemble_plays(model: nn.Module) -> None:
    other = kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=1).eval()
    ensemble = kf.Ensemble([model, other], weights=[3, 1])
    lines = talk(ensemble, "setoption name Playouts value 4", "position startpos", "go")
    assert lines[-1].split()[1] in legal_usi()


START_SFEN = "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b -"


@pytest.mark.parametrize(
    "line",
    [
        "setoption name Playouts value ²",  # str.isdigit() is True, int() refuses it
        "setoption name Seed value --5",
        "go btime ² wtime 0",
        "go byoyomi --3",
        f"position sfen {START_SFEN} ²",
        f"position sfen {START_SFEN} ¹²",
    ],
)
def test_numbers_that_int_refuses_are_answered_not_raised(model: nn.Module, line: str) -> None:
    lines = talk(model, line, "position startpos", "go")
    assert any(entry.startswith("info string ") for entry in lines), lines
    assert lines[-1].split()[1] in legal_usi()


def _talk_in_thread(model: nn.Module, *commands: str) -> list[str]:
    """``talk``, but a hang fails the test instead of stalling the suite."""
    out = io.StringIO()
    stdin = io.StringIO("".join(c + "\n" for c in commands))
    engine = threading.Thread(target=run_engine, args=(model, stdin, out), daemon=True)
    engine.start()
    engine.join(timeout=120)
    assert not engine.is_alive(), f"the engine hangs: {out.getvalue().splitlines()[-3:]}"
    return out.getvalue().splitlines()


@pytest.mark.parametrize("ending", [[], ["gameover lose"], ["gameover draw", "quit"]])
def test_go_infinite_ends_at_the_end_of_input_or_gameover(
    model: nn.Module, ending: list[str]
) -> None:
    """Nothing can stop the search after the input ends, and a game that is over needs no
    move: the engine answers bestmove instead of searching on (16M playouts never end)."""
    lines = _talk_in_thread(model, "setoption name Playouts value 16000000", "position startpos",
                            "go infinite", *ending)  # fmt: skip
    assert lines[-1].split()[1] in legal_usi()


def test_a_device_that_cannot_be_used_is_refused_at_setoption(model: nn.Module) -> None:
    """cuda:99 is a valid torch device name that no machine here has; the engine keeps its
    device and plays (it used to accept the option, then fail to load and exit)."""
    lines = talk(model, "setoption name Device value cuda:99", "isready", "position startpos", "go")
    assert lines[0].startswith("info string option Device: cannot use 'cuda:99'"), lines
    assert "readyok" in lines and lines[-1].split()[1] in legal_usi()


def test_go_mate_is_answered_with_checkmate_notimplemented(model: nn.Module) -> None:
    """USI's tsume search answers ``checkmate ...``, never ``bestmove`` (a GUI waiting for
    ``checkmate`` got a bestmove)."""
    lines = talk(model, "position startpos", "go mate 1000", "go mate infinite")
    assert lines == ["checkmate notimplemented", "checkmate notimplemented"]


def test_stop_is_read_after_a_command_kept_for_after_the_search(model: nn.Module) -> None:
    """A command that arrives mid-search is kept for after it; a stop behind it still ends
    the search (polling ended at the first kept line, so 16M playouts ran on)."""
    lines = _talk_in_thread(model, "setoption name Playouts value 16000000", "position startpos",
                            "go infinite", "setoption name Playouts value 0", "stop",
                            "position startpos", "go")  # fmt: skip
    best = [line for line in lines if line.startswith("bestmove")]
    assert len(best) == 2 and all(b.split()[1] in legal_usi() for b in best)
    assert lines[-2].startswith("info depth 1 nodes 1 ")  # the kept setoption ran before go


def test_a_time_beyond_any_float_is_read_as_no_limit(model: nn.Module) -> None:
    """int / float overflowed on a 400-digit time (OverflowError killed the engine)."""
    huge = "9" * 400
    for go in (f"go movetime {huge}", f"go btime {huge} wtime 0 byoyomi {huge}"):
        lines = talk(model, "setoption name Playouts value 2", "position startpos", go)
        assert lines[-1].split()[1] in legal_usi(), lines


def test_bytes_that_are_not_utf8_do_not_end_the_input(tmp_path: Path, run_dir: Path) -> None:
    """A Japanese GUI may send Shift-JIS (a path in a setoption): with a strict UTF-8 stdin
    (a UTF-8 locale) the first such byte ended the engine's input."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "keisei_fn", "usi", str(run_dir)],
        input=b"setoption name EvalDir value C:\\\x95\x5c\x8e\xa6\nposition startpos\ngo\nquit\n",
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict"},
    )
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("info string unknown option 'EvalDir"), lines
    assert lines[-1].split()[1] in legal_usi(), lines
