"""``python -m benchmarks``: measure, print Markdown tables, write JSON."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import (
    cases,
    export_bench,
    gpu,
    loop,
    object_store,
    report,
    sharded_bench,
    usi_bench,
)

SECTIONS = (
    "save", "load", "capture", "breakdown", "s3", "sharded", "listing", "import", "loop", "gpu"
)  # fmt: skip
SECTIONS += ("export", "usi", "matches")
DEFAULT_OUT = Path(__file__).parent / "results" / "latest.json"


def _csv(kind: type) -> Any:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark keisei_fn's save, load, capture, listing and import against "
        "baselines measured in the same run (reads are warm-cache).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, no large model, listing up to 1,000"
    )
    parser.add_argument("--repeat", type=int, help="timed rounds per comparison (default 7)")
    parser.add_argument(
        "--models",
        type=_csv(str),
        help=f"models to measure, of {','.join(cases.MODELS)} (default: all)",
    )
    parser.add_argument(
        "--listing",
        type=_csv(int),
        help="run directory sizes for listing (default 10,1000,10000)",
    )
    parser.add_argument(
        "--sections",
        type=_csv(str),
        default=list(SECTIONS),
        help=f"what to measure, of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--dir", type=Path, help="where to write scratch files (default: the system temp dir)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--match-games",
        type=_csv(int),
        help="games of the two matches: step 100 vs 300, policy vs Playouts 200 (default 40,20)",
    )
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 7)
    args.models = args.models or (["test", "default"] if args.quick else list(cases.MODELS))
    args.listing = args.listing or ([10, 1000] if args.quick else [10, 1000, 10000])
    args.match_games = args.match_games or ([10, 4] if args.quick else [40, 20])
    for name in args.models:
        if name not in cases.MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(cases.MODELS)}")
    for name in args.sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    return args


def progress(message: str) -> None:
    """Say what is being measured (stderr: stdout is the table)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the selected sections and report."""
    args = parse_args(argv)
    parent = args.dir or Path(tempfile.gettempdir())
    rows: list[cases.Row] = []
    sizes: dict[str, int] = {}
    save_parts: dict[str, dict[str, float]] = {}
    load_parts: dict[str, dict[str, float]] = {}
    for name in args.models:
        progress(f"model {name}: one Adam step, capture")
        subject = cases.trained(cases.MODELS[name])
        sizes[name] = subject.nbytes
        group = f"{name} ({subject.nbytes / 1e6:.3g} MB)"
        with cases.scratch_dir(parent) as scratch:
            if "save" in args.sections:
                progress(f"model {name}: save")
                rows += cases.save_rows(group, subject, scratch, args.repeat)
            if "load" in args.sections:
                progress(f"model {name}: load")
                rows += cases.load_rows(group, subject, scratch, args.repeat)
            if "capture" in args.sections:
                progress(f"model {name}: capture")
                rows += cases.capture_rows(group, subject, args.repeat)
            if "breakdown" in args.sections:
                progress(f"model {name}: save_state and load_state breakdown")
                save_parts[group] = cases.save_breakdown(subject, scratch, args.repeat)
                load_parts[group] = cases.load_breakdown(subject, scratch, args.repeat)
            if "s3" in args.sections:
                progress(f"model {name}: save and load on S3 (SeaweedFS) vs local disk")
                rows += object_store.s3_rows(group, subject, scratch, args.repeat)
        del subject
    if "listing" in args.sections:
        progress(f"listing over {args.listing} checkpoints (making them first)")
        with cases.scratch_dir(parent) as scratch:
            rows += cases.listing_rows(args.listing, scratch, args.repeat)
    if "sharded" in args.sections:
        model = "test" if args.quick else "default"
        progress(f"sharded save (FSDP2 under torchrun) of the {model} model: 2 processes vs 1")
        with cases.scratch_dir(parent) as scratch:
            rows += sharded_bench.sharded_rows(scratch, args.repeat, model)
    if "import" in args.sections:
        progress("import keisei_fn vs import torch")
        rows += cases.import_rows(max(args.repeat, 11))

    if "loop" in args.sections:
        progress("training loop: no checkpoints vs foreground vs background")
        with cases.scratch_dir(parent) as scratch:
            rows += loop.loop_rows(
                scratch, max(3, args.repeat // 2), steps=10 if args.quick else 20
            )

    if "gpu" in args.sections:
        progress("GPU: snapshot, background checkpoints, loads to the GPU, GPU memory")
        with cases.scratch_dir(parent) as scratch:
            rows += gpu.gpu_rows(scratch, args.repeat, steps=20 if args.quick else 50)
    export_table: list[list[str]] = []
    if "export" in args.sections:
        model = "test" if args.quick else "default"
        progress(f"export bundles of the {model} model: sizes, load, inference, agreement")
        with cases.scratch_dir(parent) as scratch:
            export_rows, export_table = export_bench.export_rows(
                scratch, args.repeat, cases.MODELS[model], model
            )
            rows += export_rows
    matches: list[dict[str, Any]] = []
    if "usi" in args.sections:
        progress("usi: cold isready, nodes/s at Playouts 0 and 800 (default model)")
        with cases.scratch_dir(parent) as scratch:
            rows += usi_bench.usi_rows(scratch, args.repeat, playouts=200 if args.quick else 800)
    if "matches" in args.sections:
        progress(f"matches of the demo's model: {args.match_games} games")
        with cases.scratch_dir(parent) as scratch:
            matches = usi_bench.match_results(
                scratch, games=args.match_games[0], search_games=args.match_games[-1]
            )

    print(report.rows_table(rows))
    if export_table:
        print()
        print(export_bench.TABLE_HEADER)
        for line in export_table:
            print("| " + " | ".join(line) + " |")
    if matches:
        print()
        print(usi_bench.matches_table(matches))
    for title, parts in (("save_state part", save_parts), ("load_state part", load_parts)):
        if parts:
            print()
            print(report.breakdown_table(title, parts))
    print()
    for note in report.NOTES:
        print(f"- {note}")
    results = {
        "environment": report.environment(parent),
        "settings": {
            "repeat": args.repeat,
            "models": args.models,
            "listing": args.listing,
            "sections": args.sections,
        },
        "model_bytes": sizes,
        "breakdown": {"save_state": save_parts, "load_state": load_parts},
        "matches": matches,
    }
    report.write_json(args.out, results, rows)
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
