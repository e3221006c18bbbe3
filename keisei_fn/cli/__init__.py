"""The ``keisei-fn`` command line (also ``python -m keisei_fn``): argument parsing and printing
only; every command is a thin call into the library (see ``keisei_fn.cli.commands``).

Options may come before, between or after a command's positional arguments. Wherever a
command takes a checkpoint, a run directory stands for its final model, else its latest
checkpoint (``keisei_fn.store.locate.run_dir_checkpoint``, the rule of ``load_model``).
``publish``, ``flush`` and ``demo`` write W&B's files under ``<run_dir>/wandb`` unless
``WANDB_DIR`` is set (``keisei_fn.publish.session``).

User errors — a path that does not exist included — print one line ``keisei-fn: error: ...``
and exit 2 (no traceback), before anything is written; so does a bare ``keisei-fn``, after the
list of commands. ``verify`` exits 1 on any corrupt, invalid or unreadable checkpoint (with
``--strict`` also on leftovers of crashed saves).

Example:
    $ keisei-fn demo
    $ keisei-fn ls runs/demo
    $ keisei-fn analyze runs/demo --top-k 3
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from keisei_fn._version import __version__
from keisei_fn.cli import commands
from keisei_fn.errors import KeiseiFnError

__all__ = ["build_parser", "main"]

WANDB_DIR_RULE = "W&B's files go under RUN_DIR/wandb unless WANDB_DIR is set"


class _Parser(argparse.ArgumentParser):
    """A command's parser takes its options anywhere among its positionals
    (``analyze runs/demo --top-k 3 "<SFEN>"``): argparse's intermixed parsing. The top-level
    parser, which holds the commands, parses as usual (argparse cannot intermix around them)."""

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args (3.11)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> timedelta:
    """``30s``, ``90m``, ``6h``, ``7d``, ``2w`` as a timedelta, for argparse (a unit is
    required: a bare ``6`` would be read as seconds by some tools and hours by others)."""
    try:
        seconds = float(text[:-1]) * _UNITS[text[-1:]]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (a number and a unit: s, m, h, d or w; e.g. 6h)"
        ) from None
    return timedelta(seconds=seconds)


def _seed(text: str) -> int:
    """A ``--seed``: an int in [0, 2**63) (what every RNG seeded from it accepts)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {seed}")
    return seed


def _keep_best(text: str) -> tuple[str, str, int]:
    """``METRIC:max|min:K`` as ``RetentionPolicy.keep_best``, for argparse."""
    metric, _, rest = text.partition(":")
    mode, _, k = rest.partition(":")
    if not metric or mode not in ("max", "min") or not k.isdigit():
        raise argparse.ArgumentTypeError(f"expected METRIC:max|min:K, got {text!r}")
    return metric, mode, int(k)


def _registry_target(text: str) -> str:
    """A W&B Registry collection (``keisei_fn.publish.registry_target``), for argparse."""
    from keisei_fn.errors import SpecError
    from keisei_fn.publish.registry import registry_target

    try:
        return registry_target(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _best_by(text: str) -> tuple[str, str]:
    """``METRIC`` or ``METRIC:max|min`` (default max), for argparse."""
    metric, _, mode = text.partition(":")
    if not metric or mode not in ("", "max", "min"):
        raise argparse.ArgumentTypeError(f"expected METRIC or METRIC:max|min, got {text!r}")
    return metric, mode or "max"


def _metric(text: str) -> tuple[str, float]:
    """``NAME=NUMBER``, for argparse."""
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not name or number is None:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}")
    return name, number


def _weights(text: str) -> list[float]:
    """``0.5,0.3,0.2`` as a list of floats, for argparse."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.5,0.3,0.2; got {text!r}"
        ) from None


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Keisei's CLI names for the model spec (its ``train.py`` spells them with underscores;
    both spellings work); unset options fall back to config/defaults."""
    group = parser.add_argument_group("model spec (Keisei's CLI names, - or _ alike)")
    group.add_argument("--model", metavar="TYPE", help="model type (resnet, testmodel, ...)")
    group.add_argument(
        "--input-features",
        "--input_features",
        dest="input_features",
        metavar="NAME",
        help="feature set (core46)",
    )
    group.add_argument(
        "--tower-depth",
        "--tower_depth",
        dest="tower_depth",
        type=int,
        metavar="N",
        help="residual blocks in the tower",
    )
    group.add_argument(
        "--tower-width",
        "--tower_width",
        dest="tower_width",
        type=int,
        metavar="N",
        help="channels of the tower",
    )
    group.add_argument(
        "--se-ratio",
        "--se_ratio",
        dest="se_ratio",
        type=float,
        metavar="RATIO",
        help="squeeze-and-excitation ratio (<= 0 disables SE)",
    )


def _wandb_mode_option(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=default,
        help=f"W&B mode unless WANDB_MODE is set (default: offline); {WANDB_DIR_RULE}",
    )


def _add_wandb_options(parser: argparse.ArgumentParser) -> None:
    _wandb_mode_option(parser, default="offline")
    parser.add_argument(
        "--project", default="keisei-shogi-rl", help="W&B project (default: keisei-shogi-rl)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command.

    Returns:
        The parser; each command's namespace has ``run``, the function that runs it.

    Example:
        >>> build_parser().parse_args(["analyze", "runs/demo", "--top-k", "3"]).top_k
        3
    """
    parser = _Parser(
        prog="keisei-fn",
        description="Model lifecycle for Keisei's Shogi networks: pickle-free checkpoints, "
        "exact resume, W&B publishing.",
        epilog="Wherever a checkpoint is expected, a run directory means its final model, "
        "else its latest checkpoint.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"keisei-fn {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(
        dest="command",
        title="commands",
        metavar="COMMAND",
        help="`keisei-fn COMMAND --help` describes one",
    )

    p = sub.add_parser("demo", help="the end-to-end demo (train, checkpoint, resume, publish)")
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="train to step N, stopping earlier at the target legal mass (default: 3000, or "
        "the step an interrupted run was training to); on a complete run, N beyond its step "
        "trains on from its last checkpoint",
    )
    p.add_argument(
        "--target-legal-mass",
        type=float,
        default=0.9,
        help="stop when the training pool's legal mass reaches this (default 0.9)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seeds the network, positions and batches")
    p.add_argument("--pool-size", type=int, default=512, help="training positions")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    _wandb_mode_option(p, default=None)
    p.set_defaults(run=commands.cmd_demo)

    p = sub.add_parser("ls", help="table of a run directory's checkpoints")
    p.add_argument("run_dir", help="the run directory (local or an fsspec URL)")
    p.add_argument("--verify", action="store_true", help="also check every weights digest")
    p.set_defaults(run=commands.cmd_ls)

    p = sub.add_parser("info", help="a checkpoint's spec, stats and tensors (or a spec's sizes)")
    p.add_argument(
        "path",
        nargs="?",
        help="checkpoint file, stem or run directory (omit to describe the spec the options give)",
    )
    _add_spec_options(p)
    p.add_argument("--device", default="cpu", help="device for the precision policy (default: cpu)")
    p.add_argument(
        "--mixed-precision",
        dest="mixed_precision",
        choices=["fp16", "bf16"],
        help="describe this mixed-precision policy",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=commands.cmd_info)

    p = sub.add_parser("verify", help="verify a checkpoint or a run directory (exit 1 if bad)")
    p.add_argument(
        "path", help="a checkpoint, or a run directory (every checkpoint in it; none: exit 2)"
    )
    p.add_argument(
        "--strict", action="store_true", help="also exit 1 on leftovers of crashed saves"
    )
    p.set_defaults(run=commands.cmd_verify)

    p = sub.add_parser("prune", help="apply a retention policy to a run directory")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--keep-last", type=int, help="keep the newest N periodic checkpoints")
    p.add_argument("--keep-every", type=int, help="also keep steps that are multiples of N")
    p.add_argument(
        "--keep-best",
        type=_keep_best,
        metavar="METRIC:max|min:K",
        help="also keep the K best by a metric in extra",
    )
    p.add_argument(
        "--keep-within",
        type=_duration,
        metavar="DURATION",
        help="also keep what was saved in the last DURATION (e.g. 90m, 6h, 7d)",
    )
    p.add_argument(
        "--keep-hourly", type=int, metavar="N", help="also keep the newest of each of N hours"
    )
    p.add_argument(
        "--keep-daily", type=int, metavar="N", help="also keep the newest of each of N days"
    )
    p.add_argument("--max-bytes", type=int, help="delete oldest until the total fits")
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    p.set_defaults(run=commands.cmd_prune)

    p = sub.add_parser("convert", help="import an original Keisei .pth checkpoint")
    p.add_argument("pth", help="the Keisei .pth file (loaded without running any code)")
    p.add_argument("run_dir", help="the run directory to write the checkpoint into")
    p.add_argument(
        "--kind",
        choices=list(commands.CONVERT_KINDS),
        help="checkpoint: checkpoint_ts<N>, full state (a resume point); final: the same, "
        "marked as a run's last state; final-model: final_model, weights only (optimizer and "
        "scheduler dropped). Default: final-model for final_model.pth, else checkpoint",
    )
    _add_spec_options(p)
    p.set_defaults(run=commands.cmd_convert)

    p = sub.add_parser(
        "consolidate", help="turn a sharded (FSDP) checkpoint into a single-file one"
    )
    p.add_argument("sharded", help="the sharded checkpoint (or its run directory: the latest)")
    p.add_argument("out_run_dir", help="the run directory to write the single file into")
    p.set_defaults(run=commands.cmd_consolidate)

    p = sub.add_parser("publish", help="publish a checkpoint to W&B")
    p.add_argument("path", help="checkpoint file, stem or run directory")
    p.add_argument("--run-name", required=True, help="Keisei run name (artifact name prefix)")
    p.add_argument(
        "--metric",
        type=_metric,
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="an evaluation result for the artifact's metrics (repeatable)",
    )
    p.add_argument(
        "--link-to",
        type=_registry_target,
        metavar="COLLECTION",
        help="link the artifact to a W&B Registry collection, "
        "[ORG/]wandb-registry-REGISTRY/COLLECTION (online runs only)",
    )
    p.add_argument(
        "--best",
        type=_best_by,
        metavar="METRIC[:max|min]",
        help="move the run's best alias here if this is the best published by METRIC",
    )
    p.add_argument(
        "--best-link-to",
        type=_registry_target,
        metavar="COLLECTION",
        help="with --best: link each new best to this W&B Registry collection",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="for an s3:// checkpoint: upload copies instead of W&B references",
    )
    _add_wandb_options(p)
    p.set_defaults(run=commands.cmd_publish)

    p = sub.add_parser("flush", help="publish the run directory's pending outbox")
    p.add_argument("run_dir", help="the run directory")
    _add_wandb_options(p)
    p.set_defaults(run=commands.cmd_flush)

    p = sub.add_parser("analyze", help="top-k legal moves and value of a position")
    p.add_argument("checkpoint", help="checkpoint file, final model or run directory")
    p.add_argument(
        "sfen", nargs="?", help="position, quoted, or startpos (default: the start position)"
    )
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="moves to show (default: 5)")
    p.set_defaults(run=commands.cmd_analyze)

    p = sub.add_parser(
        "export", help="a verified inference bundle (float32, bfloat16, float16, int8; ONNX)"
    )
    p.add_argument("source", help="checkpoint file, final model, run directory or bundle")
    p.add_argument("out_dir", help="the bundle directory to write (not a run directory)")
    p.add_argument(
        "--dtype",
        required=True,
        choices=["float32", "bfloat16", "float16", "int8"],
        help="how the weights are stored (int8: weight-only, per output channel)",
    )
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (serve extra)")
    p.add_argument(
        "--force", action="store_true", help="write it even when the behaviour gate fails"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a bundle in OUT_DIR")
    p.add_argument("--json", action="store_true", help="the bundle's record as JSON")
    p.set_defaults(run=commands.cmd_export)

    p = sub.add_parser("diff", help="what changed between two checkpoints")
    p.add_argument("before", help="the older checkpoint (file, stem or run directory)")
    p.add_argument("after", help="the newer checkpoint (file, stem or run directory)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="tensors to show (default: 10)")
    p.add_argument("--json", action="store_true", help="the whole diff as JSON")
    p.set_defaults(run=commands.cmd_diff)

    p = sub.add_parser(
        "average", help="average checkpoints into one model (a model soup) in a run directory"
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="checkpoints to average (file, stem or run directory); with --last, one run directory",
    )
    p.add_argument(
        "out", metavar="OUT", help="run directory to write the average into, as its final model"
    )
    p.add_argument(
        "--last",
        type=int,
        metavar="N",
        help="average the N newest checkpoint_ts* checkpoints of the run directory SOURCE",
    )
    p.add_argument(
        "--weights",
        type=_weights,
        metavar="W,W,...",
        help="one weight per checkpoint, oldest first with --last (default: equal)",
    )
    p.add_argument(
        "--recompute-bn",
        type=int,
        metavar="N",
        help="recompute BatchNorm statistics on N positions of seeded random legal play "
        "(every 3rd position, as the demo's; default: average them)",
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the --recompute-bn positions (default: 0)"
    )
    p.add_argument("--force", action="store_true", help="write into OUT even if it exists")
    p.set_defaults(run=commands.cmd_average)

    p = sub.add_parser(
        "migrate", help="rewrite a run directory's older-format checkpoints in the newest format"
    )
    p.add_argument("run_dir", help="the run directory (in place; each checkpoint atomically)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    p.add_argument("--json", action="store_true", help="each checkpoint's outcome as JSON")
    p.set_defaults(run=commands.cmd_migrate)

    p = sub.add_parser(
        "grow", help="a checkpoint for a deeper and/or wider tower computing the same function"
    )
    p.add_argument("checkpoint", help="checkpoint file, stem or run directory")
    p.add_argument("out_run_dir", help="the run directory to save the grown checkpoint into")
    p.add_argument(
        "--tower-depth",
        "--tower_depth",
        dest="tower_depth",
        type=int,
        metavar="N",
        help="residual blocks (default: unchanged)",
    )
    p.add_argument(
        "--tower-width",
        "--tower_width",
        dest="tower_width",
        type=int,
        metavar="N",
        help="channels (default: unchanged)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seeds the new blocks and the widening's random choices (default: 0)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace a checkpoint of the same name in OUT_RUN_DIR"
    )
    p.set_defaults(run=commands.cmd_grow)

    p = sub.add_parser(
        "compat",
        help="would a checkpoint load into the network a spec describes (sidecar only)",
        description="Exit 0 when the checkpoint's model would load into the network the spec "
        "options describe (Keisei's defaults for the options not given: resnet, depth 9, width "
        "256), 1 with the problems when not. Reads the sidecar only.",
    )
    p.add_argument("checkpoint", help="checkpoint file, stem or run directory")
    _add_spec_options(p)
    p.add_argument("--json", action="store_true", help="the spec and the problems as JSON")
    p.set_defaults(run=commands.cmd_compat)

    p = sub.add_parser("usi", help="a USI engine on stdin/stdout (for GUIs and match runners)")
    p.add_argument("source", help="checkpoint, final model, run directory or export bundle")
    p.add_argument("--device", default="cpu", help="the Device option's default (default: cpu)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch's CPU threads until a Threads option (1)"
    )
    p.set_defaults(run=commands.cmd_usi)

    p = sub.add_parser("match", help="play two models or USI engines; W/L/D and Elo")
    p.add_argument(
        "players",
        nargs="*",
        metavar="PLAYER",
        help="A and B: checkpoints, final models, run directories or bundles (or --engine-a/-b)",
    )
    p.add_argument(
        "--engine-a", metavar="CMD", help='player A as a USI engine command: "path args"'
    )
    p.add_argument(
        "--engine-b", metavar="CMD", help='player B as a USI engine command: "path args"'
    )
    p.add_argument("--games", type=int, default=10, metavar="N", help="games (default: 10)")
    p.add_argument(
        "--playouts", type=int, default=0, metavar="K", help="playouts per move (default: 0)"
    )
    p.add_argument("--playouts-b", type=int, metavar="K", help="B's playouts, if not --playouts")
    p.add_argument("--seed", type=_seed, default=0, help="seeds the openings (default: 0)")
    p.add_argument(
        "--move-cap", type=int, default=256, metavar="N", help="draw after N plies (default: 256)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="a new or empty folder for the records and summary.json "
        "(default: a new ./match-<UTC time>)",
    )
    p.set_defaults(run=commands.cmd_match)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code.

    Args:
        argv: the arguments after ``keisei-fn`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when a command found a problem (``verify``: a bad checkpoint; the
        demo: target not reached); 2 for a user error (one line on stderr) or no command (the
        list of commands on stderr).

    Raises:
        SystemExit: from argparse, for ``--help``, ``--version`` and malformed arguments.

    Example:
        >>> main(["info", "--model", "testmodel", "--json"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except BrokenPipeError:  # `keisei-fn ls | head`: the reader is gone; leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a program killed by it
    except (KeiseiFnError, OSError) as exc:
        print(f"keisei-fn: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _storage_error(exc):
            raise
        print(f"keisei-fn: error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    """An error message as the one line the command line prints for it. A message that lists
    problems on further lines (``StateMismatchError.listing``, from ``average`` or ``restore_``:
    a header, then ``  - problem`` lines) becomes its header, its first problem and how many
    more lines the Python API's error holds; a one-line message is kept as it is.

    Example:
        >>> _one_line("cannot average:\\n  - spec differs\\n  - 2 tensors have other shapes")
        "cannot average: spec differs (+1 more line in the Python API's error)"
        >>> _one_line("no checkpoint at runs/x")
        'no checkpoint at runs/x'
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) < 2:
        return message
    head, first, rest = lines[0], lines[1].removeprefix("- "), len(lines) - 2
    joined = f"{head} {first}" if head.endswith(":") else f"{head}; {first}"
    more = f" (+{rest} more line{'s' if rest > 1 else ''} in the Python API's error)"
    return joined + (more if rest else "")


def _storage_error(exc: Exception) -> bool:
    """Whether an error comes from an object store's client (no credentials, no endpoint, a
    refused request): the user's setup, not a bug, so one line like every user error."""
    clients = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp"}
    return any(kind.__module__.split(".")[0] in clients for kind in type(exc).__mro__)
