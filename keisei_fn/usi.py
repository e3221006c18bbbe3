"""A USI engine (the protocol of ShogiGUI, Shogidokoro, floodgate clients and match runners)
playing with a Keisei network: ``keisei-fn usi SOURCE`` and :func:`run_engine`.

Commands: ``usi``, ``isready`` (loads the model, then ``readyok``), ``setoption name N value
V``, ``usinewgame``, ``position startpos|sfen <sfen> [moves ...]``, ``go [btime T] [wtime T]
[byoyomi T] [binc T] [winc T] [movetime T] [nodes N] [infinite] [ponder]``, ``stop``,
``ponderhit``, ``gameover``, ``quit`` (``go mate`` is answered ``checkmate notimplemented``).
For ``go`` the engine prints ``info depth 1 nodes N score cp CP pv MOVES`` (the score from
:func:`keisei_fn.player.value_to_cp`) and then ``bestmove MOVE``, ``bestmove resign`` (no legal
move, or a score below ``ResignValue``) or ``bestmove win`` (a declaration win). ``go
infinite`` and ``go ponder`` answer only after ``stop`` (or ``ponderhit``, ``gameover``,
``quit``, or the end of the input); input is read between playouts, so ``stop`` (or
``gameover``, ``quit``) also cuts a search short. A time limit (``byoyomi``, ``movetime``, or a
share of the remaining time) ends a search early too, after at least one playout.

Malformed input, an unknown command or option, a bad SFEN or an illegal move in ``position``
is answered with ``info string ...`` and otherwise ignored; a refused ``position`` leaves the
engine without a position, and a ``go`` then answers ``bestmove resign``. A model that cannot
be loaded, or that is unsound, is reported at ``isready`` and the engine exits with status 2.

Options: ``USI_Hash``, ``USI_Ponder`` (accepted, no effect), ``Temperature`` (0: the best
move; > 0 samples), ``Playouts`` (0: the policy alone; N: a PUCT search of N playouts),
``ResignValue`` (centipawns; the default, -32000, never resigns), ``Device``, ``Seed`` (seeds
the sampler; reseeded at every ``usinewgame``), ``Threads`` (torch's CPU threads, set when the
option is; ``keisei-fn usi`` starts with 1, as two engines of a match share the machine and a
network this size gains little from more: on a shared 2-core machine one forward pass of the
default network took 2.8 s with torch's default of two threads against 0.17 s with one).

Example:
    >>> import io
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    >>> out = io.StringIO()
    >>> run_engine(model, io.StringIO("isready\\nposition startpos\\ngo\\nquit\\n"), out)
    0
    >>> out.getvalue().splitlines()[-1]
    'bestmove 9g9f'
"""

from __future__ import annotations

import io
import math
import queue
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import cshogi
import torch
from torch import nn

from keisei_fn import shogi
from keisei_fn._version import __version__
from keisei_fn.errors import IllegalMoveError, InvalidPositionError
from keisei_fn.paths import PathArg
from keisei_fn.player import choose_move, load_player

__all__ = ["ENGINE_NAME", "NO_RESIGN", "run_engine"]

ENGINE_NAME = f"keisei-fn {__version__}"
#: ``ResignValue``'s default: below every score the engine prints, so it never resigns.
NO_RESIGN = -32000
_SAFETY_MS = 100  # kept back from a time limit for the answer to travel


@dataclass(frozen=True, slots=True)
class _Option:
    kind: str  # spin, check, string
    default: str
    low: int = 0
    high: int = 0

    def declaration(self, name: str) -> str:
        line = f"option name {name} type {self.kind} default {self.default}"
        return line + (f" min {self.low} max {self.high}" if self.kind == "spin" else "")


_OPTIONS: dict[str, _Option] = {
    "USI_Hash": _Option("spin", "256", 1, 1 << 20),
    "USI_Ponder": _Option("check", "false"),
    "Temperature": _Option("string", "0"),
    "Playouts": _Option("spin", "0", 0, 1 << 24),
    "ResignValue": _Option("spin", str(NO_RESIGN), NO_RESIGN, 32000),
    "Device": _Option("string", "cpu"),
    "Seed": _Option("spin", "0", 0, (1 << 31) - 1),
    "Threads": _Option("spin", "1", 1, 1024),
}
_GO_NUMBERS = frozenset({"btime", "wtime", "byoyomi", "binc", "winc", "movetime", "nodes"})


class _Lines:
    """stdin as a queue filled by a reader thread, so that a search can poll it."""

    def __init__(self, stdin: TextIO) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._held: deque[str | None] = deque()
        self._later: list[str | None] = []
        threading.Thread(target=self._read, args=(stdin,), daemon=True).start()

    def _read(self, stdin: TextIO) -> None:
        try:
            for line in stdin:
                self._queue.put(line.strip())
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # a closed or broken input
            self._queue.put(f"\x00input error: {exc}")
        self._queue.put(None)

    def get(self) -> str | None:
        """The next line (blocking); None at the end of the input."""
        return self._held.popleft() if self._held else self._queue.get()

    def poll(self) -> str | bool | None:
        """The next line if one is waiting (None at the end of the input), else False."""
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return False

    @property
    def holding_a_search(self) -> bool:
        """Whether a kept line starts another search (``go``) or ends the input: what follows
        is not for the current search."""
        return any(line is None or line.split()[:1] == ["go"] for line in self._later)

    def hold(self, line: str | None) -> None:
        """Keep ``line`` (None: the end of the input) for after the search."""
        self._later.append(line)

    def release(self) -> None:
        """Make the lines kept during a search the next ones read, in their order."""
        self._held.extendleft(reversed(self._later))
        self._later.clear()


class _Engine:
    def __init__(self, source: PathArg | nn.Module, out: TextIO, device: str) -> None:
        self.source = source
        self.out = out
        self.options = {name: option.default for name, option in _OPTIONS.items()}
        self.options["Device"] = device
        self.model: nn.Module | None = None
        self.board: cshogi.Board | None = None
        self.rng = random.Random(0)
        self.quit = False

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def info(self, text: str) -> None:
        self.say(f"info string {' '.join(text.split())}")

    # -- commands ---------------------------------------------------------------------------

    def handle(self, line: str, lines: _Lines) -> None:
        words = line.split()
        if not words:
            return
        command, args = words[0], words[1:]
        handlers: dict[str, Callable[[list[str]], None]] = {
            "usi": self.usi,
            "isready": self.isready,
            "setoption": self.setoption,
            "usinewgame": lambda _: self.reseed(),
            "position": self.position,
            "go": lambda a: self.go(a, lines),
            "stop": lambda _: None,
            "ponderhit": lambda _: None,
            "gameover": lambda _: None,
            "quit": self.stop_engine,
        }
        handler = handlers.get(command)
        if handler is None:
            self.info(f"unknown command {line[:80]!r}")
            return
        handler(args)

    def stop_engine(self, _: list[str]) -> None:
        self.quit = True

    def usi(self, _: list[str]) -> None:
        self.say(f"id name {ENGINE_NAME}")
        self.say("id author keisei_fn")
        for name, option in _OPTIONS.items():
            self.say(option.declaration(name))
        self.say("usiok")

    def isready(self, _: list[str]) -> None:
        self.load()
        self.say("readyok")

    def load(self) -> nn.Module:
        """The model, loaded and checked on first use; _Refused if it cannot play."""
        if self.model is None:
            try:
                self.model = load_player(self.source, self.options["Device"])
            except Exception as exc:  # any failure to load is reported, not a crash
                self.info(f"cannot play: {exc}")
                raise _Refused(str(exc)) from exc
        return self.model

    def reseed(self) -> None:
        self.rng = random.Random(int(self.options["Seed"]))

    def setoption(self, args: list[str]) -> None:
        if len(args) < 2 or args[0] != "name":
            self.info("expected: setoption name <name> [value <value>]")
            return
        split = args.index("value") if "value" in args else len(args)
        name, value = " ".join(args[1:split]), " ".join(args[split + 1 :])
        option = _OPTIONS.get(name)
        if option is None:
            self.info(f"unknown option {name!r}; options: {', '.join(_OPTIONS)}")
            return
        problem = _check_value(name, option, value)
        if problem:
            self.info(problem)
            return
        if name == "Device" and self.model is not None and value != self.options[name]:
            try:
                self.model = self.model.to(torch.device(value))
            except Exception as exc:  # torch raises several kinds here
                self.info(f"cannot use device {value!r}: {exc}")
                return
        self.options[name] = value
        if name == "Seed":
            self.reseed()
        elif name == "Threads":
            torch.set_num_threads(int(value))

    def position(self, args: list[str]) -> None:
        self.board = None
        split = args.index("moves") if "moves" in args else len(args)
        where, moves = args[:split], args[split + 1 :]
        try:
            if where == ["startpos"]:
                board = shogi.start_board()
            elif where[:1] == ["sfen"] and len(where) in (4, 5):
                board = shogi.board_from_sfen(" ".join(where[1:]))
            else:
                self.info("expected: position startpos|sfen <sfen> [moves <move> ...]")
                return
            for ply, usi in enumerate(moves, 1):
                try:
                    board.push(shogi.usi_to_move(usi, board))
                except IllegalMoveError:
                    self.info(f"position refused: move {ply} {usi!r} is illegal in {board.sfen()}")
                    return
        except InvalidPositionError as exc:
            self.info(f"position refused: {exc}")
            return
        self.board = board

    def go(self, args: list[str], lines: _Lines) -> None:
        if args[:1] == ["mate"]:  # a tsume search: its answer is checkmate, never bestmove
            self.say("checkmate notimplemented")
            return
        limits: dict[str, int] = {}
        waits = "infinite" in args or "ponder" in args
        i = 0
        while i < len(args):
            word = args[i]
            if word in _GO_NUMBERS and i + 1 < len(args) and _is_int(args[i + 1]):
                limits[word] = int(args[i + 1])
                i += 2
                continue
            if word not in ("infinite", "ponder"):
                self.info(f"go: ignoring {word!r}")
            i += 1
        model = self.load()
        if self.board is None:
            self.info("no valid position; send position first")
            self.say("bestmove resign")
            return
        deadline = None if waits else _deadline(limits, self.board.turn)
        stopped = False

        def should_stop() -> bool:
            nonlocal stopped
            while not stopped and not lines.holding_a_search:
                line = lines.poll()
                if isinstance(line, bool):
                    break
                if line in ("stop", "ponderhit"):
                    stopped = True
                elif line == "isready":
                    self.say("readyok")
                elif line == "quit":
                    stopped = self.quit = True
                else:  # a command for after the search, or the end of the input
                    lines.hold(line)
                    # A finished game needs no move; after the input ends, no stop can come.
                    stopped = _is_gameover(line) or (line is None and waits)
            return stopped or (deadline is not None and time.monotonic() >= deadline)

        playouts = int(self.options["Playouts"])
        if "nodes" in limits:
            playouts = min(playouts, max(limits["nodes"], 1)) if playouts else 0
        resign = int(self.options["ResignValue"])
        try:
            choice = choose_move(
                model,
                self.board,
                temperature=float(self.options["Temperature"]),
                playouts=playouts,
                rng=self.rng,
                resign_cp=None if resign <= NO_RESIGN else resign,
                should_stop=should_stop,
            )
        except Exception as exc:  # a GUI waits for a bestmove whatever happens
            self.info(f"cannot search: {type(exc).__name__}: {exc}")
            self.say("bestmove resign")
            return
        pv = f" pv {' '.join(choice.pv)}" if choice.pv else ""
        self.say(f"info depth 1 nodes {choice.nodes} score cp {choice.cp}{pv}")
        while waits and not stopped and not self.quit:
            line = lines.get()
            if line == "isready":
                self.say("readyok")
            elif line is None or line == "quit":
                self.quit = True
            elif line in ("stop", "ponderhit"):
                stopped = True
            elif _is_gameover(line):
                stopped = True
                lines.hold(line)
            else:
                lines.hold(line)
        lines.release()
        self.say(f"bestmove {choice.move}")


class _Refused(Exception):
    """The model cannot play: the engine reports it and exits."""


def _is_gameover(line: str | None) -> bool:
    return line is not None and line.split()[:1] == ["gameover"]


def _is_int(text: str) -> bool:
    """An optionally signed run of ASCII digits (``str.isdigit`` also takes ``"²"``, which
    ``int`` refuses)."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


def _check_value(name: str, option: _Option, value: str) -> str | None:
    """Why ``value`` is not valid for an option, or None."""
    if option.kind == "spin":
        if not _is_int(value) or not option.low <= int(value) <= option.high:
            span = f"[{option.low}, {option.high}]"
            return f"option {name}: expected an integer in {span}, got {value!r}"
    elif option.kind == "check":
        if value not in ("true", "false"):
            return f"option {name}: expected true or false, got {value!r}"
    elif name == "Temperature":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            return f"option Temperature: expected a number >= 0, got {value!r}"
    elif name == "Device":
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            return f"option Device: not a torch device: {value!r}"
        if device.type == "meta":
            return "option Device: a meta device holds no weights"
        try:  # a valid name is not a usable device (no CUDA here, no such ordinal)
            torch.empty(0, device=device)
        except Exception as exc:  # torch raises AssertionError, RuntimeError, ...
            return f"option Device: cannot use {value!r}: {exc}"
    return None


def _deadline(limits: dict[str, int], turn: int) -> float | None:
    """When a timed ``go`` must stop searching (monotonic seconds), or None if untimed."""
    mine = limits.get("btime" if turn == cshogi.BLACK else "wtime")
    increment = limits.get("binc" if turn == cshogi.BLACK else "winc", 0)
    if "movetime" in limits:
        budget = limits["movetime"]
    elif "byoyomi" in limits or mine is not None:
        budget = limits.get("byoyomi", 0) + increment + (mine or 0) // 40
    else:
        return None
    budget = min(budget, 2**53)  # ~285,000 years: beyond it, int / float overflows
    return time.monotonic() + max(budget - _SAFETY_MS, 0) / 1000.0


def run_engine(
    source: PathArg | nn.Module,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    *,
    device: str = "cpu",
) -> int:
    """Run a USI engine on ``stdin``/``stdout`` until ``quit`` or the end of the input.

    Args:
        source: a checkpoint, final model, run directory (its final model, else its latest
            checkpoint) or export bundle, or an ``nn.Module`` (``forward(obs) -> (logits,
            value)``); loaded and checked at the first ``isready`` (or ``go``).
        stdin: the commands (default ``sys.stdin``); a text file's undecodable bytes are
            read as U+FFFD (it is reconfigured with ``errors="replace"``).
        stdout: where the answers go, flushed line by line (default ``sys.stdout``).
        device: the ``Device`` option's initial value.

    Returns:
        0 after ``quit`` or the end of the input; 2 when the model could not be loaded or
        was refused (said in an ``info string``).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> run_engine("no/such/run", io.StringIO("usi\\nisready\\n"), out)
        2
        >>> out.getvalue().splitlines()[-1]
        'info string cannot play: no checkpoint at no/such/run'
    """
    engine = _Engine(source, stdout or sys.stdout, device)
    stdin = stdin or sys.stdin
    if isinstance(stdin, io.TextIOWrapper):  # a GUI's Shift-JIS path must not end the input
        stdin.reconfigure(errors="replace")
    lines = _Lines(stdin)
    while not engine.quit:
        line = lines.get()
        if line is None:
            break
        try:
            engine.handle(line, lines)
        except _Refused:
            return 2
    return 0
