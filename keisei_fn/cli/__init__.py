"""The ``keisei-fn`` command line (also ``python -m keisei_fn``): argument parsing and printing
only; every command is a thin call into the library (see ``keisei_fn.cli.commands``).

User errors print one line and exit 2 (no traceback); ``verify`` exits 1 on any corrupt,
invalid or unreadable checkpoint (with ``--strict`` also on leftovers of crashed saves).

Example:
    $ keisei-fn demo
    $ keisei-fn ls runs/demo
    $ keisei-fn analyze runs/demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keisei_fn.cli import commands
from keisei_fn.errors import KeiseiFnError

__all__ = ["build_parser", "main"]


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Keisei's CLI names for the model spec; unset options fall back to config/defaults."""
    group = parser.add_argument_group("model spec (Keisei's CLI names)")
    group.add_argument("--model", help="model type (resnet, testmodel, ...)")
    group.add_argument("--input-features", dest="input_features", help="feature set (core46)")
    group.add_argument("--tower-depth", dest="tower_depth", type=int)
    group.add_argument("--tower-width", dest="tower_width", type=int)
    group.add_argument("--se-ratio", dest="se_ratio", type=float, help="<= 0 disables SE")


def _add_wandb_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="W&B mode unless WANDB_MODE is set (default: offline)",
    )
    parser.add_argument("--project", default="keisei-shogi-rl", help="W&B project")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="keisei-fn",
        description="Model lifecycle for Keisei's Shogi networks: pickle-free checkpoints, "
        "exact resume, W&B publishing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the end-to-end demo (train, checkpoint, resume, publish)")
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=3000, help="maximum training steps")
    p.add_argument(
        "--target-legal-mass",
        type=float,
        default=0.9,
        help="stop when the training pool's legal mass reaches this (default 0.9)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-size", type=int, default=512, help="training positions")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode (default: WANDB_MODE, else offline)",
    )
    p.set_defaults(run=commands.cmd_demo)

    p = sub.add_parser("ls", help="table of a run directory's checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--verify", action="store_true", help="also check every weights digest")
    p.set_defaults(run=commands.cmd_ls)

    p = sub.add_parser("info", help="a checkpoint's spec, stats and tensors (or a spec's sizes)")
    p.add_argument("path", nargs="?", help="checkpoint file or stem (omit to describe a spec)")
    _add_spec_options(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["fp16", "bf16"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=commands.cmd_info)

    p = sub.add_parser("verify", help="verify a checkpoint or a run directory (exit 1 if bad)")
    p.add_argument("path")
    p.add_argument(
        "--strict", action="store_true", help="also exit 1 on leftovers of crashed saves"
    )
    p.set_defaults(run=commands.cmd_verify)

    p = sub.add_parser("prune", help="apply a retention policy to a run directory")
    p.add_argument("run_dir")
    p.add_argument("--keep-last", type=int, help="keep the newest N periodic checkpoints")
    p.add_argument("--keep-every", type=int, help="also keep steps that are multiples of N")
    p.add_argument("--keep-best", metavar="METRIC:max|min:K", help="keep the K best by a metric")
    p.add_argument("--max-bytes", type=int, help="delete oldest until the total fits")
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    p.set_defaults(run=commands.cmd_prune)

    p = sub.add_parser("convert", help="import an original Keisei .pth checkpoint")
    p.add_argument("pth")
    p.add_argument("run_dir")
    _add_spec_options(p)
    p.set_defaults(run=commands.cmd_convert)

    p = sub.add_parser(
        "consolidate", help="turn a sharded (FSDP) checkpoint into a single-file one"
    )
    p.add_argument("sharded", help="the sharded checkpoint (or its run directory: the latest)")
    p.add_argument("out_run_dir", help="the run directory to write the single file into")
    p.set_defaults(run=commands.cmd_consolidate)

    p = sub.add_parser("publish", help="publish a checkpoint to W&B")
    p.add_argument("path")
    p.add_argument("--run-name", required=True, help="Keisei run name (artifact name prefix)")
    _add_wandb_options(p)
    p.set_defaults(run=commands.cmd_publish)

    p = sub.add_parser("flush", help="publish the run directory's pending outbox")
    p.add_argument("run_dir")
    _add_wandb_options(p)
    p.set_defaults(run=commands.cmd_flush)

    p = sub.add_parser("analyze", help="top-k legal moves and value of a position")
    p.add_argument("checkpoint", help="checkpoint file, final model or run directory")
    p.add_argument("sfen", nargs="?", help="position (default: the start position)")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(run=commands.cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code.

    Example:
        >>> main(["info", "--model", "testmodel", "--json"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (KeiseiFnError, OSError) as exc:
        print(f"keisei-fn: error: {exc}", file=sys.stderr)
        return 2
