"""Plain-text rendering for the command line: aligned tables, sizes and ages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    """``1.5 MB`` style sizes (decimal units)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_age(created: str, *, now: datetime | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d`` since an ISO-8601 UTC time."""
    try:
        then = datetime.fromisoformat(created)
    except ValueError:
        return "?"
    seconds = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"
