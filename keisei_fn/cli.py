"""The ``keisei-fn`` command line: argument parsing and printing only; every command is a thin
call into the library.

Example:
    $ keisei-fn info --model testmodel
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson

from keisei_fn.errors import KeiseiFnError
from keisei_fn.info import model_info
from keisei_fn.precision import precision_policy
from keisei_fn.spec import ModelSpec

__all__ = ["main"]


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Keisei's CLI names for the model spec; unset options fall back to the defaults."""
    parser.add_argument("--model", help="model type (resnet, testmodel, ...)")
    parser.add_argument("--input-features", dest="input_features", help="feature set")
    parser.add_argument("--tower-depth", dest="tower_depth", type=int)
    parser.add_argument("--tower-width", dest="tower_width", type=int)
    parser.add_argument("--se-ratio", dest="se_ratio", type=float, help="<= 0 disables SE")


def _cmd_info(args: argparse.Namespace) -> int:
    spec = ModelSpec.from_config(None, args)
    precision = precision_policy(args.device, mixed_precision=args.mixed_precision or False)
    info = model_info(spec, precision=precision, device=args.device)
    if args.json:
        sys.stdout.write(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(
        f"model          {spec.model_type}  depth {spec.tower_depth}  width {spec.tower_width}"
        f"  se_ratio {spec.se_ratio}"
    )
    print(
        f"features       {spec.input_features} ({spec.obs_shape[0]} planes), "
        f"obs {tuple(spec.obs_shape)}, {spec.num_actions} actions"
    )
    print(f"parameters     {info['parameters']:,} ({info['trainable_parameters']:,} trainable)")
    print(f"state_dict     {info['state_dict_keys']} keys, {info['buffers']:,} buffer elements")
    print(f"precision      {info['mixed_precision']['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="keisei-fn", description="Model lifecycle for Keisei's Shogi networks."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="show a model spec's architecture and sizes")
    _add_spec_options(info)
    info.add_argument("--device", default="cpu")
    info.add_argument("--mixed-precision", dest="mixed_precision", choices=["fp16", "bf16"])
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (user errors print one line, exit 2).

    Example:
        >>> main(["info", "--model", "testmodel", "--json"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeiseiFnError as exc:
        print(f"keisei-fn: error: {exc}", file=sys.stderr)
        return 2
