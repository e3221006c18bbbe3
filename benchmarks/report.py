"""Rendering results: Markdown tables for the terminal, JSON for the record."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import torch

from benchmarks.cases import Row

NOTES = [
    "Times are medians over the rounds; a speed-up is the median of per-round ratios "
    "baseline / ours (> 1: ours is faster), both variants measured back to back in each round.",
    "Reads are warm-cache: the page cache is not dropped (shared machine), so loads measure "
    "CPU and memory work, not the disk.",
    "Saves include fsync (the disk); save_state also writes the sidecar and fsyncs the "
    "directory after each rename; torch.save + fsync is one file, no rename.",
    "import keisei_fn vs import torch: the import timed inside fresh interpreters (start-up "
    "left out), paired median difference; bytecode caches allowed.",
    "S3 rows: a SeaweedFS server on loopback through s3fs (a ratio < 1: S3 is slower); the "
    "cost of the protocol and client, not of a network.",
]

PART_LABELS = {
    "encode_state": "encode_state (tensors + JSON state)",
    "dumps": "codec.dumps (header and sidecar JSON)",
    "loads": "codec.loads (header round trip)",
    "committed": "check for an existing checkpoint",
    "write_weights": "write_weights (total)",
    "_layout": "  - header + tensor views",
    "_write_all": "  - writev into the page cache",
    "weights_rest": "  - rest: hash wait, fsync, rename + fsync dir",
    "_hash": "  - BLAKE3 in the worker (overlaps writev)",
    "build_sidecar": "build_sidecar (dict + own digest)",
    "write_bytes_durably": "sidecar: write, fsync, rename, fsync dir (the commit)",
    "remove_durably": "remove_durably (the replaced weights file, after the commit)",
    "from_sidecar": "CheckpointMeta.from_sidecar",
    "read_listed": "read_listed (sidecar read + checks + meta)",
    "read_weights": "read_weights (map + verify + views)",
    "decode_state": "decode_state",
    "other": "other (paths, mkdir, glue)",
    "total": "**total**",
}


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def rows_table(rows: list[Row]) -> str:
    """The main table: one row per (ours, baseline) pair or absolute figure."""
    lines = [
        "| subject | ours | ms | baseline | ms | speed-up | target | met |",
        "|---|---|--:|---|--:|--:|---|---|",
    ]
    for row in rows:
        if row.ratio is not None:
            ratio = f"{row.ratio:.2f}x"
        elif row.extra_ms is not None:
            ratio = f"{row.extra_ms:+.0f} ms"
        else:
            ratio = ""
        met = "" if row.met is None else ("yes" if row.met else "**NO**")
        lines.append(
            f"| {row.group} | {row.measure} | {_ms(row.ours_ms)} | {row.baseline or ''} | "
            f"{_ms(row.baseline_ms)} | {ratio} | {row.target or ''} | {met} |"
        )
    return "\n".join(lines)


def breakdown_table(title: str, parts: dict[str, dict[str, float]]) -> str:
    """Median ms per part (rows) and model (columns)."""
    models = list(parts)
    names = list(dict.fromkeys(name for model in models for name in parts[model]))
    names.sort(key=lambda n: list(PART_LABELS).index(n) if n in PART_LABELS else len(PART_LABELS))
    lines = [
        f"| {title} | " + " | ".join(f"{m} ms" for m in models) + " |",
        "|---|" + "--:|" * len(models),
    ]
    for name in names:
        cells = " | ".join(_ms(parts[m].get(name)) for m in models)
        lines.append(f"| {PART_LABELS.get(name, name)} | {cells} |")
    return "\n".join(lines)


def environment(scratch_parent: Path) -> dict[str, Any]:
    """What the figures depend on."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "scratch_dir": str(scratch_parent),
        "argv": sys.argv[1:],
    }


def write_json(path: Path, results: dict[str, Any], rows: list[Row]) -> None:
    """Write everything measured to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**results, "notes": NOTES, "rows": [asdict(row) for row in rows]}
    path.write_text(json.dumps(document, indent=2) + "\n")
