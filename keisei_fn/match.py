"""Matches between two players, with Elo: :func:`play_match` and ``keisei-fn match``.

A player is a model (a checkpoint, final model, run directory, export bundle or ``nn.Module``,
played in this process by :func:`keisei_fn.player.choose_move`, the USI engine's own move
choice) or any USI engine, started as a subprocess (:class:`UsiCommand`;
``keisei-fn usi SOURCE`` is one).

Games start from seeded random-legal openings (``opening_plies`` uniformly random legal moves
from the start position, :func:`keisei_fn.shogi.iter_random_positions`); each opening is played
twice, A taking Black in the first game and White in the second. cshogi decides everything
about the rules: legality, mate, a fourfold repetition (a draw, or a loss for the side giving
perpetual check: ``board.is_draw()``), a declaration win (``board.is_nyugyoku()``). A game
reaching ``move_cap`` plies is a draw. An illegal move, an unjustified ``win``, or a protocol
failure of an engine (it exits, answers garbage, or takes more than ``byoyomi_ms`` + 30 s)
loses the game for that player; the reason is recorded and the engine is restarted before
the next game (a restart that fails loses that game too).

Every game is written as a CSA record (``game-001.csa``, by cshogi's exporter, whose ending
cshogi's parser reads as the same winner: a loss by a breach of the rules or an engine failure
is ``%+ILLEGAL_ACTION``/``%-ILLEGAL_ACTION``, the move cap ``%MAX_MOVES``) and the match as
``summary.json`` (players, settings, each game's result and reason, W/L/D and the Elo of B
relative to A with its 95% interval, :mod:`keisei_fn.elo`; an infinite Elo is written as null).

Example:
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as out:
    ...     result = play_match(model, model, games=2, move_cap=6, out=out)
    >>> result.a_wins + result.b_wins + result.draws
    2
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import cshogi
import cshogi.CSA
import orjson
from torch import nn

from keisei_fn import shogi
from keisei_fn.elo import EloEstimate, elo_estimate, significantly_better
from keisei_fn.errors import IllegalMoveError, KeiseiFnError, SpecError
from keisei_fn.paths import PathArg
from keisei_fn.player import choose_move, load_player

__all__ = ["GameResult", "MatchResult", "UsiCommand", "is_better", "play_match"]

_STARTUP_TIMEOUT_S = 120.0
_MOVE_SLACK_S = 30.0


@dataclass(frozen=True, slots=True)
class UsiCommand:
    """An external USI engine: the command that starts it and the options to set.

    Attributes:
        argv: the program and its arguments, e.g. ``("keisei-fn", "usi", "runs/demo")``.
        options: ``setoption`` values sent after ``usi``.
        name: the name in records (default: the engine's ``id name``).
    """

    argv: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise SpecError(f"a USI engine command is a non-empty tuple of strings: {self.argv!r}")


class _EngineFailure(KeiseiFnError):
    """An engine broke the protocol (exited, timed out, answered garbage)."""


class _Player(Protocol):
    name: str

    def new_game(self, seed: int) -> None: ...

    def move(self, board: cshogi.Board, start_sfen: str, moves: list[str]) -> str: ...

    def end(self, result: str) -> None: ...

    def close(self) -> None: ...


class _ModelPlayer:
    def __init__(self, model: nn.Module, name: str, playouts: int, temperature: float) -> None:
        self.model, self.name = model, name
        self.playouts, self.temperature = playouts, temperature
        self.rng = random.Random(0)

    def new_game(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def move(self, board: cshogi.Board, start_sfen: str, moves: list[str]) -> str:
        return choose_move(
            self.model,
            board,
            temperature=self.temperature,
            playouts=self.playouts,
            rng=self.rng,
        ).move

    def end(self, result: str) -> None:
        pass

    def close(self) -> None:
        pass


class _EnginePlayer:
    """A USI engine in a subprocess, restarted after a failure."""

    def __init__(self, command: UsiCommand, playouts: int, byoyomi_ms: int, log: Path) -> None:
        self.command, self.playouts, self.byoyomi_ms, self.log = command, playouts, byoyomi_ms, log
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.declared: set[str] = set()
        self.failed = False  # broke the protocol: restarted before the next game
        self.name = command.name or os.path.basename(command.argv[0])
        self.start()

    def start(self) -> None:
        self.close()
        self.failed = False
        self.lines = queue.Queue()
        with open(self.log, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                self.command.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                encoding="utf-8",
                errors="replace",  # an engine's Shift-JIS name must not end its output
                bufsize=1,
            )
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        try:
            self._handshake()
        except _EngineFailure:
            self.failed = True
            self.close()  # the caller never gets this player to close: end the process here
            raise

    def _handshake(self) -> None:
        self.send("usi")
        for line in self.until("usiok", _STARTUP_TIMEOUT_S):
            if line.startswith("id name ") and self.command.name is None:
                self.name = line[len("id name ") :].strip() or self.name
            if line.startswith("option name "):
                self.declared.add(line.split()[2])
        options = dict(self.command.options)
        if "Playouts" in self.declared:
            options.setdefault("Playouts", str(self.playouts))
        for key, value in options.items():
            self.send(f"setoption name {key} value {value}")
        self.send("isready")
        self.until("readyok", _STARTUP_TIMEOUT_S)

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in proc.stdout:
                lines.put(line.strip())
        lines.put(None)

    def send(self, line: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise _EngineFailure(f"{self.name} is not running")
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self.failed = True
            raise _EngineFailure(f"{self.name} stopped reading its input ({exc})") from exc

    def until(self, prefix: str, timeout: float) -> list[str]:
        """Lines up to and including the first that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:  # an engine printing junk without end never waits
                    raise queue.Empty
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                self.failed = True
                raise _EngineFailure(f"{self.name}: no {prefix!r} within {timeout:.0f} s") from None
            if line is None:
                self.failed = True
                raise _EngineFailure(f"{self.name} closed its output before {prefix!r}")
            seen.append(line)
            if line.split()[:1] == [prefix]:
                return seen

    def new_game(self, seed: int) -> None:
        if self.failed or self.proc is None or self.proc.poll() is not None:
            self.start()
        if "Seed" in self.declared and "Seed" not in self.command.options:
            self.send(f"setoption name Seed value {seed}")
        self.send("usinewgame")

    def move(self, board: cshogi.Board, start_sfen: str, moves: list[str]) -> str:
        self.send(f"position sfen {start_sfen}" + (f" moves {' '.join(moves)}" if moves else ""))
        self.send(f"go btime 0 wtime 0 byoyomi {self.byoyomi_ms}")
        line = self.until("bestmove", self.byoyomi_ms / 1000 + _MOVE_SLACK_S)[-1]
        words = line.split()
        if len(words) < 2:
            raise _EngineFailure(f"{self.name} answered {line!r}")
        return words[1]

    def end(self, result: str) -> None:
        with contextlib.suppress(_EngineFailure):
            self.send(f"gameover {result}")

    def close(self) -> None:
        if self.proc is None:
            return
        if not self.failed:
            with contextlib.suppress(_EngineFailure):
                self.send("quit")
        try:
            self.proc.wait(timeout=0 if self.failed else 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        self.proc = None


@dataclass(frozen=True, slots=True)
class GameResult:
    """One game of a match.

    Attributes:
        index: 1-based game number.
        black: ``"A"`` or ``"B"``, the player who had Black.
        opening: the opening position (SFEN).
        winner: ``"A"``, ``"B"``, or None for a draw.
        reason: how it ended (``mate``, ``resign``, ``declaration``, ``repetition``,
            ``perpetual check``, ``move cap``, ``illegal move ...``, ``engine failure ...``).
        moves: the moves played from the opening, in USI.
        record: the CSA file's name in the match folder.
    """

    index: int
    black: str
    opening: str
    winner: str | None
    reason: str
    moves: tuple[str, ...]
    record: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "index": self.index,
            "black": self.black,
            "opening": self.opening,
            "winner": self.winner,
            "reason": self.reason,
            "plies": len(self.moves),
            "moves": list(self.moves),
            "record": self.record,
        }


@dataclass(frozen=True, slots=True)
class MatchResult:
    """A match's outcome.

    Attributes:
        a: player A's name.
        b: player B's name.
        games: every game.
        out: the folder with the records and ``summary.json``.
    """

    a: str
    b: str
    games: tuple[GameResult, ...]
    out: Path

    @property
    def a_wins(self) -> int:
        """Games A won."""
        return sum(g.winner == "A" for g in self.games)

    @property
    def b_wins(self) -> int:
        """Games B won."""
        return sum(g.winner == "B" for g in self.games)

    @property
    def draws(self) -> int:
        """Drawn games."""
        return sum(g.winner is None for g in self.games)

    def elo(self, confidence: float = 0.95) -> EloEstimate:
        """B's Elo minus A's, with a two-sided interval (:func:`keisei_fn.elo.elo_estimate`)."""
        return elo_estimate(
            wins=self.b_wins, losses=self.a_wins, draws=self.draws, confidence=confidence
        )

    def summary(self) -> str:
        """``A vs B: 12 games, A won 3, B won 7, 2 draws; Elo of B - A: +120 [-77, +318] (95%)``."""
        return (
            f"{self.a} (A) vs {self.b} (B): {len(self.games)} games, A won {self.a_wins}, "
            f"B won {self.b_wins}, {self.draws} draws; Elo of B - A: {self.elo()}"
        )

    def metrics(self, prefix: str = "match") -> dict[str, float]:
        """B's evaluation figures, for ``publish(meta, metrics=...)`` (the artifact's
        ``"metrics"``) or a checkpoint's ``extra`` (where ``keep_best`` ranks): ``games``,
        ``score`` (wins + draws / 2, per game), ``elo``, ``elo_low``, ``elo_high`` (B minus A;
        an infinite bound is left out), each named ``<prefix>_<figure>``.

        Example:
            >>> result = MatchResult("a", "b", (), Path("out"))
            >>> sorted(result.metrics("vs_step100"))
            ['vs_step100_games']
        """
        figures: dict[str, float] = {f"{prefix}_games": float(len(self.games))}
        if self.games:
            estimate = self.elo()
            named = {"score": estimate.score, "elo": estimate.elo}
            named |= {"elo_low": estimate.low, "elo_high": estimate.high}
            figures |= {f"{prefix}_{k}": v for k, v in named.items() if math.isfinite(v)}
        return figures

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite Elo values as None)."""
        estimate = self.elo()

        def finite(x: float) -> float | None:
            return round(x, 1) if abs(x) != float("inf") else None

        return {
            "a": self.a,
            "b": self.b,
            "games": len(self.games),
            "a_wins": self.a_wins,
            "b_wins": self.b_wins,
            "draws": self.draws,
            "score_b": estimate.score,
            "elo_b_minus_a": finite(estimate.elo),
            "elo_interval": [finite(estimate.low), finite(estimate.high)],
            "confidence": estimate.confidence,
            "elo_formula": "400*log10(s/(1-s)); interval: Wilson score interval on s",
            "results": [g.to_json() for g in self.games],
        }


def is_better(result: MatchResult, confidence: float = 0.95) -> bool:
    """The gate: is B better than A at ``confidence`` (one-sided; see
    :func:`keisei_fn.elo.significantly_better`)?

    Args:
        result: a match's result.
        confidence: in ``(0, 1)``.

    Returns:
        True when B's score is above 1/2 at that confidence.

    Example:
        >>> result = MatchResult(a="old", b="new", games=(), out=Path("."))
        >>> is_better(result)
        Traceback (most recent call last):
        ...
        keisei_fn.errors.SpecError: no games: an Elo difference needs at least one
    """
    return significantly_better(
        wins=result.b_wins, losses=result.a_wins, draws=result.draws, confidence=confidence
    )


def _openings(n: int, *, seed: int, plies: int) -> list[str]:
    """``n`` positions after ``plies`` random legal moves from the start (distinct games)."""
    stream: Iterator[cshogi.Board] = shogi.iter_random_positions(seed=seed, max_plies=plies + 1)
    at_ply = (b.sfen() for b in stream if b.move_number == plies + 1)
    return list(islice(at_ply, n))


def _new_out_dir(out: PathArg | None) -> tuple[Path, bool]:
    """The match folder, and whether this call made it."""
    if out is not None:
        path = Path(str(out))
        if (path / "summary.json").exists():
            raise SpecError(f"{path} already holds a match (summary.json); choose another --out")
        if path.is_dir() and any(path.iterdir()):  # e.g. an interrupted match's records
            raise SpecError(f"{path} is not empty; a match writes into a new or empty folder")
        made = not path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path, made
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for suffix in range(1000):
        path = Path.cwd() / (f"match-{stamp}" + (f"-{suffix}" if suffix else ""))
        try:
            path.mkdir()
            return path, True
        except FileExistsError:
            continue
    raise SpecError(f"cannot make a new match folder under {Path.cwd()}")


def _tidy_unstarted(folder: Path, made: bool) -> None:
    """After a match that never started: drop empty engine logs, and the folder if this match
    made it and nothing else is in it (a log that says something is kept)."""
    for log in folder.glob("engine-*.stderr.log"):
        with contextlib.suppress(OSError):
            if log.stat().st_size == 0:
                log.unlink()
    if made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _make_player(
    source: PathArg | nn.Module | UsiCommand,
    *,
    label: str,
    playouts: int,
    temperature: float,
    device: str,
    byoyomi_ms: int,
    out: Path,
) -> _Player:
    if isinstance(source, UsiCommand):
        return _EnginePlayer(source, playouts, byoyomi_ms, out / f"engine-{label}.stderr.log")
    name = type(source).__name__ if isinstance(source, nn.Module) else str(source)
    return _ModelPlayer(load_player(source, device), str(name), playouts, temperature)


#: Endings cshogi reads right from the side to move: it resigns or is mated (%TORYO),
#: declares (%KACHI), or the game is drawn. A loss by a breach of the rules (an illegal move,
#: perpetual check, an engine failure) names the loser instead: ``%+ILLEGAL_ACTION`` (Black)
#: or ``%-ILLEGAL_ACTION`` (White), as floodgate writes it.
_CSA_END = {
    "mate": "%TORYO",
    "resign": "%TORYO",
    "declaration": "%KACHI",
    "repetition": "%SENNICHITE",
    "move cap": "%MAX_MOVES",
}


def _new_game(
    players: dict[str, _Player], seed: int
) -> tuple[str | None, str, list[int], list[str]] | None:
    """Start a game for both players (B's sampler seeded ``seed + 1``); None, or the game lost
    before its first move by an engine that could not be restarted."""
    for label, player in players.items():
        try:
            player.new_game(seed + (label == "B"))
        except _EngineFailure as exc:
            return ("B" if label == "A" else "A"), f"engine failure of {label}: {exc}", [], []
    return None


def _play_game(
    players: dict[str, _Player], black: str, opening: str, move_cap: int
) -> tuple[str | None, str, list[int], list[str]]:
    """Play one game; ``(winner label or None, reason, cshogi moves, usi moves)``."""
    white = "B" if black == "A" else "A"
    board = shogi.board_from_sfen(opening)
    counts: dict[int, int] = {board.zobrist_hash(): 1}
    moves: list[int] = []
    usi_moves: list[str] = []
    while len(moves) < move_cap:
        mover = black if board.turn == cshogi.BLACK else white
        other = white if mover == black else black
        if board.is_game_over():
            return other, "mate", moves, usi_moves
        try:
            answer = players[mover].move(board, opening, usi_moves)
        except _EngineFailure as exc:
            return other, f"engine failure of {mover}: {exc}", moves, usi_moves
        if answer == "resign":
            return other, "resign", moves, usi_moves
        if answer == "win":
            if board.is_nyugyoku():
                return mover, "declaration", moves, usi_moves
            return (
                other,
                f"illegal move by {mover}: win declared without the right",
                moves,
                usi_moves,
            )
        try:
            move = shogi.usi_to_move(answer, board)
        except IllegalMoveError:
            return other, f"illegal move by {mover}: {answer!r}", moves, usi_moves
        board.push(move)
        moves.append(move)
        usi_moves.append(answer)
        key = board.zobrist_hash()
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= 4:
            draw = board.is_draw()
            if draw == cshogi.REPETITION_WIN:  # the side to move was checked perpetually
                return other, "perpetual check", moves, usi_moves
            if draw == cshogi.REPETITION_LOSE:
                return mover, "perpetual check", moves, usi_moves
            return None, "repetition", moves, usi_moves
    if board.is_game_over():
        mover = black if board.turn == cshogi.BLACK else white
        return ("B" if mover == "A" else "A"), "mate", moves, usi_moves
    return None, "move cap", moves, usi_moves


def _write_record(
    path: Path,
    opening: str,
    names: list[str],
    moves: list[int],
    reason: str,
    black_wins: bool | None,
) -> None:
    """A game's CSA record; ``black_wins`` None for a draw."""
    ending = _CSA_END.get(reason, "%-ILLEGAL_ACTION" if black_wins else "%+ILLEGAL_ACTION")
    exporter = cshogi.CSA.Exporter(str(path))
    try:
        exporter.info(init_board=shogi.board_from_sfen(opening), names=names)
        for move in moves:
            exporter.move(move)
        exporter.endgame(ending)
    finally:
        exporter.close()


def play_match(
    a: PathArg | nn.Module | UsiCommand,
    b: PathArg | nn.Module | UsiCommand,
    *,
    games: int = 10,
    playouts: int | tuple[int, int] = 0,
    seed: int = 0,
    out: PathArg | None = None,
    move_cap: int = 256,
    opening_plies: int = 8,
    temperature: float = 0.0,
    device: str = "cpu",
    byoyomi_ms: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> MatchResult:
    """Play ``games`` games between A and B and write their records and a summary.

    Args:
        a: player A: a checkpoint, final model, run directory or export bundle, an
            ``nn.Module``, or a :class:`UsiCommand`.
        b: player B, likewise.
        games: number of games, >= 1 (consecutive pairs share an opening, colours swapped).
        playouts: PUCT playouts per move of the model players (0: the policy alone), or
            ``(A's, B's)``; also set as the ``Playouts`` option of engines that declare one.
        seed: seeds the openings and the players' samplers (and engines' ``Seed`` option).
        out: the folder for ``game-NNN.csa`` and ``summary.json``, new or empty (default: a
            new ``match-<UTC time>`` folder in the current directory).
        move_cap: plies after which a game is drawn.
        opening_plies: random legal moves in each opening.
        temperature: the model players' temperature (0: best move).
        device: where model players run.
        byoyomi_ms: the time per move given to engines (``go btime 0 wtime 0 byoyomi T``).
        progress: called with one line per finished game.

    Returns:
        The result; ``result.elo()`` is B's Elo minus A's.

    Raises:
        SpecError: bad settings, or ``out`` is not empty (it holds a match, or part of one).
        and every error of :func:`keisei_fn.player.load_player` for a model player; an engine
        that cannot be started or fails its first handshake raises ``KeiseiFnError``.
    """
    counts = (
        ("games", games, 1),
        ("move_cap", move_cap, 1),
        ("opening_plies", opening_plies, 0),
        ("byoyomi_ms", byoyomi_ms, 0),
    )
    for label, value, low in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(f"{label} must be an int >= {low}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise SpecError(f"temperature must be a finite number >= 0, got {temperature!r}")
    per_player = playouts if isinstance(playouts, tuple) else (playouts, playouts)
    for count in per_player:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise SpecError(f"playouts must be ints >= 0, got {count!r}")
    folder, made = _new_out_dir(out)
    players: dict[str, _Player] = {}
    results: list[GameResult] = []
    started = False
    try:
        for label, source, count in (("A", a, per_player[0]), ("B", b, per_player[1])):
            players[label] = _make_player(
                source,
                label=label,
                playouts=count,
                temperature=temperature,
                device=device,
                byoyomi_ms=byoyomi_ms,
                out=folder,
            )
        started = True
        openings = _openings((games + 1) // 2, seed=seed, plies=opening_plies)
        for i in range(games):
            black = "A" if i % 2 == 0 else "B"
            opening = openings[i // 2]
            ended = _new_game(players, seed * 1_000_003 + i * 2)
            winner, reason, moves, usi_moves = ended or _play_game(
                players, black, opening, move_cap
            )
            for label, player in players.items():
                player.end("draw" if winner is None else ("win" if winner == label else "lose"))
            record = f"game-{i + 1:03d}.csa"
            white = "B" if black == "A" else "A"
            names = [players[black].name, players[white].name]
            black_wins = None if winner is None else winner == black
            _write_record(folder / record, opening, names, moves, reason, black_wins)
            game = GameResult(
                index=i + 1,
                black=black,
                opening=opening,
                winner=winner,
                reason=reason,
                moves=tuple(usi_moves),
                record=record,
            )
            results.append(game)
            if progress is not None:
                outcome = "draw" if winner is None else f"{winner} wins"
                progress(
                    f"game {i + 1}/{games} (A {'black' if black == 'A' else 'white'}): "
                    f"{outcome} by {reason} after {len(moves)} plies"
                )
    finally:
        for player in players.values():
            player.close()
        if not started:
            _tidy_unstarted(folder, made)
    result = MatchResult(a=players["A"].name, b=players["B"].name, games=tuple(results), out=folder)
    summary = {
        **result.to_json(),
        "settings": {
            "games": games,
            "playouts": list(per_player),
            "seed": seed,
            "move_cap": move_cap,
            "opening_plies": opening_plies,
            "temperature": temperature,
            "byoyomi_ms": byoyomi_ms,
        },
    }
    temp = folder / "summary.json.tmp"
    temp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    os.replace(temp, folder / "summary.json")
    return result
