"""Rendering for people: aligned text tables, HTML tables, sizes, ages and short values.

One place for both the command line (``keisei_fn.cli.table`` re-exports the text part) and the
notebook representations of the library's values (``str(meta)``, ``meta._repr_html_()``,
``print(analyze(model))``, ``list_checkpoints(run_dir)``), so that they render alike. Pure:
no I/O, no torch.

Example:
    >>> print(render_table(["name", "step"], [["checkpoint_ts10", "10"]]))
    name             step
    checkpoint_ts10  10
    >>> html_table(["a<b"], [["x&y"]])
    '<table><thead><tr><th>a&lt;b</th></tr></thead><tbody><tr><td>x&amp;y</td></tr></tbody></table>'
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from keisei_fn.spec import ModelSpec

__all__ = [
    "extra_rows",
    "fields_html",
    "fields_text",
    "format_value",
    "html_table",
    "human_age",
    "human_bytes",
    "parse_utc",
    "render_table",
    "spec_summary",
]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line.

    Args:
        header: the column names.
        rows: the cells, one sequence per row, as many as ``header``.

    Returns:
        The table's lines joined by newlines (trailing spaces stripped).

    Example:
        >>> print(render_table(["#", "move"], [["1", "7g7f"]]))
        #  move
        1  7g7f
    """
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    return "\n".join(lines)


def html_table(
    header: Sequence[str] | None, rows: Sequence[Sequence[str]], *, caption: str | None = None
) -> str:
    """The same table as HTML (for Jupyter's ``_repr_html_``); every text is escaped.

    Args:
        header: the column names, or None for a table without a header row.
        rows: the cells.
        caption: a caption above the table.

    Returns:
        One ``<table>`` element.

    Example:
        >>> html_table(None, [["step", "10"]], caption="<ckpt>")
        '<table><caption>&lt;ckpt&gt;</caption><tbody><tr><td>step</td><td>10</td></tr></tbody></table>'
    """
    parts = ["<table>"]
    if caption is not None:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    if header is not None:
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        parts.append(f"<thead><tr>{cells}</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def human_bytes(n: int) -> str:
    """``1.5 MB`` style sizes (decimal units).

    Example:
        >>> human_bytes(999), human_bytes(1_500_000)
        ('999 B', '1.5 MB')
    """
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def parse_utc(text: str) -> datetime | None:
    """An ISO-8601 time as an aware UTC datetime (a time without an offset is taken as UTC),
    or None when it is not one or cannot be expressed in UTC (near the calendar's limits).

    Example:
        >>> parse_utc("2026-12-07T21:00:00+09:00")
        datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.timezone.utc)
        >>> parse_utc("yesterday") is None
        True
    """
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        return None


def human_age(created: str, *, now: datetime | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d`` since an ISO-8601 UTC time (``?`` when unparsable).

    Example:
        >>> human_age("2025-01-01T00:00:00+00:00", now=datetime(2025, 1, 1, 3, tzinfo=UTC))
        '3h'
    """
    then = parse_utc(created)
    if then is None:
        return "?"
    seconds = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def format_value(value: Any) -> str:
    """A short rendering of a JSON-like value: numbers to 4 significant digits, containers
    by their size (a metrics history can hold thousands of values).

    Example:
        >>> format_value(0.123456), format_value(True), format_value([1, 2, 3])
        ('0.1235', 'True', 'list of 3')
        >>> format_value({"k_factor": 32})
        'dict of 1 (k_factor)'
    """
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, Mapping):
        keys = ", ".join(map(str, list(value)[:4])) + (", ..." if len(value) > 4 else "")
        return f"dict of {len(value)} ({keys})" if value else "dict of 0"
    if isinstance(value, Sequence):
        return f"list of {len(value)}"
    return type(value).__name__


def spec_summary(spec: ModelSpec | None) -> str:
    """One line for a spec, as ``keisei-fn info`` shows it.

    Example:
        >>> spec_summary(ModelSpec(model_type="testmodel"))
        'testmodel  depth 1  width 16  se_ratio 0.0  core46 (46 planes)  13527 actions'
    """
    if spec is None:
        return "none (an arbitrary user model)"
    return (
        f"{spec.model_type}  depth {spec.tower_depth}  width {spec.tower_width}  "
        f"se_ratio {spec.se_ratio}  {spec.input_features} ({spec.obs_shape[0]} planes)  "
        f"{spec.num_actions} actions"
    )


def extra_rows(extra: Mapping[str, Any]) -> list[list[str]]:
    """``[["extra.<key>", short value], ...]``: a state's user ``extra``, one row per key.

    Example:
        >>> extra_rows({"legal_mass": 0.91234, "elo_state": {"k_factor": 32.0}})
        [['extra.legal_mass', '0.9123'], ['extra.elo_state', 'dict of 1 (k_factor)']]
    """
    return [[f"extra.{key}", format_value(value)] for key, value in extra.items()]


def fields_text(title: str, rows: Sequence[Sequence[str]]) -> str:
    """A value as text: its title, then a ``field``/``value`` table.

    Example:
        >>> print(fields_text("TrainState", [["step", "10"]]))
        TrainState
        field  value
        step   10
    """
    return f"{title}\n{render_table(['field', 'value'], rows)}"


def fields_html(title: str, rows: Sequence[Sequence[str]]) -> str:
    """The same as an HTML table captioned with the title (for ``_repr_html_``).

    Example:
        >>> fields_html("<s>", [["step", "10"]])[:42]
        '<table><caption>&lt;s&gt;</caption><thead>'
    """
    return html_table(["field", "value"], rows, caption=title)
