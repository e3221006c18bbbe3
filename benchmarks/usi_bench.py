"""The USI engine and matches: ``isready`` from a cold start, nodes/s of ``go`` at ``Playouts``
0 and 800 on the default model, and measured match results with Elo (CPU only).

``isready`` is timed from starting ``python -m keisei_fn usi RUN`` to its ``readyok`` (the
interpreter, the imports and the model load), against a fresh interpreter that imports
keisei_fn and calls ``load_model`` on the same run (the least an engine has to do). Nodes are
network evaluations: one per ``go`` with the policy alone, one per playout (plus the root) with
a search.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import Row
from benchmarks.timing import measure_rounds, run_rounds
from keisei_fn import ModelSpec, build_model, capture, save_final_model, shogi
from keisei_fn.match import play_match
from keisei_fn.player import choose_move


def _cold_isready(run_dir: Path) -> Callable[[], float]:
    def measure() -> float:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "keisei_fn", "usi", str(run_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("usi\nisready\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.strip() == "readyok":
                break
        elapsed = time.perf_counter() - start
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()
        return elapsed

    return measure


def _cold_load(run_dir: Path) -> Callable[[], float]:
    script = f"import keisei_fn as kf\nkf.load_model({str(run_dir)!r})"
    command = [sys.executable, "-c", script]

    def measure() -> float:
        start = time.perf_counter()
        subprocess.run(command, check=True)
        return time.perf_counter() - start

    return measure


def usi_rows(scratch: Path, repeat: int, *, playouts: int = 800) -> list[Row]:
    """``isready`` latency and nodes/s of the default model (random weights: the speed does
    not depend on them)."""
    spec = ModelSpec()
    model = build_model(spec, seed=0).eval()
    run_dir = scratch / "usi-default"
    save_final_model(capture(spec, model, step=1), run_dir)
    rows: list[Row] = []
    cold = measure_rounds(
        {"isready": _cold_isready(run_dir), "load_model": _cold_load(run_dir)}, repeat=repeat
    )
    rows.append(
        Row(
            group=f"default model, cold start ({torch.get_num_threads()} threads)",
            measure="usi + isready → readyok (subprocess)",
            ours_ms=cold.median_ms("isready"),
            baseline="python -c 'import keisei_fn; load_model(run)'",
            baseline_ms=cold.median_ms("load_model"),
            ratio=cold.speedup("isready", "load_model"),
            samples_ms=cold.ms("isready", "load_model"),
        )
    )
    positions = shogi.random_positions(4, seed=0, stride=7)
    position = positions[-1]
    choose_move(model, position)  # warm-up: a search round costs hundreds of evaluations
    searches = run_rounds(
        {
            "policy": lambda: choose_move(model, position),
            "search": lambda: choose_move(model, position, playouts=playouts),
        },
        repeat=max(1, repeat // 2),
        warmup=0,
    )
    policy_ms, search_ms = searches.median_ms("policy"), searches.median_ms("search")
    rows.append(
        Row(
            group=f"default model, go ({torch.get_num_threads()} threads)",
            measure=(
                f"Playouts {playouts}: {(playouts + 1) / search_ms * 1000:.0f} nodes/s "
                f"vs Playouts 0: {1000 / policy_ms:.0f} nodes/s"
            ),
            ours_ms=search_ms,
            baseline="go at Playouts 0 (1 node)",
            baseline_ms=policy_ms,
            ratio=searches.speedup("search", "policy") * (playouts + 1),  # nodes/s ratio
            samples_ms=searches.ms("policy", "search"),
        )
    )
    return rows


def match_results(scratch: Path, *, games: int, search_games: int) -> list[dict[str, Any]]:
    """The demo's step-300 final model against its step-100 checkpoint, and the same final
    model policy-only (A) against ``Playouts=200`` (B); each with W/L/D and Elo ± 95% CI."""
    from keisei_fn.demo import DemoConfig, run_demo

    demo = scratch / "demo"
    with contextlib.redirect_stdout(sys.stderr):  # the demo's progress; stdout is the table
        run_demo(DemoConfig(run_dir=demo, steps=300, target_legal_mass=1.0, wandb="disabled"))
    pairings = [
        ("step 100 (A) vs step 300 (B), policy only", demo / "checkpoint_ts100", demo, 0, games),
        ("step 300: Playouts 0 (A) vs Playouts 200 (B)", demo, demo, (0, 200), search_games),
    ]
    found = []
    for title, a, b, playouts, count in pairings:
        start = time.perf_counter()
        result = play_match(
            a, b, games=count, playouts=playouts, seed=0, out=scratch / f"match-{len(found)}"
        )
        found.append(
            {
                "pairing": title,
                "games": count,
                "a_wins": result.a_wins,
                "b_wins": result.b_wins,
                "draws": result.draws,
                "elo_b_minus_a": str(result.elo()),
                "reasons": sorted({g.reason for g in result.games}),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return found


def matches_table(found: list[dict[str, Any]]) -> str:
    """The match results as a Markdown table."""
    lines = [
        "| pairing | games | A won | B won | draws | Elo of B - A (95%) | seconds |",
        "|---|--:|--:|--:|--:|---|--:|",
    ]
    for m in found:
        lines.append(
            f"| {m['pairing']} | {m['games']} | {m['a_wins']} | {m['b_wins']} | {m['draws']} "
            f"| {m['elo_b_minus_a']} | {m['seconds']} |"
        )
    return "\n".join(lines)
