"""The run directory's publication ledger: an append-only JSONL file the store owns.

Publishing (``keisei_fn.publish``) records its intents and outcomes here; retention reads it so
that a checkpoint still pending publication is never deleted. Each append is one line written
with a single ``write`` on an ``O_APPEND`` descriptor and fsynced; a torn last line (a crash
mid-append) is ignored when reading.

Record fields: ``event`` ("pending", "published", "failed"), ``artifact`` (artifact name),
``digest`` (weights digest), ``checkpoint`` (stem name), ``time`` (UTC ISO) and any extras.
The key of a publication is ``(artifact, digest)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from keisei_fn.store._fs import fsync_dir

__all__ = ["LEDGER_NAME", "append_ledger", "pending_publications", "read_ledger"]

log = logging.getLogger("keisei_fn.store")

LEDGER_NAME = "publications.jsonl"
EVENTS = ("pending", "published", "failed")


def append_ledger(run_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> dict[str, Any]:
    """Durably append one record (``time`` added when absent).

    Raises:
        ValueError: for an unknown ``event`` or a record without ``artifact``/``digest``.
        OSError: when the run directory is not writable.
    """
    entry = dict(record)
    if entry.get("event") not in EVENTS:
        raise ValueError(f"ledger event must be one of {EVENTS}, got {entry.get('event')!r}")
    if not entry.get("artifact") or not entry.get("digest"):
        raise ValueError("a ledger record needs 'artifact' and 'digest'")
    entry.setdefault("time", datetime.now(UTC).isoformat(timespec="microseconds"))
    path = Path(run_dir) / LEDGER_NAME
    created = not path.exists()
    line = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A torn previous line would swallow this one: start on a fresh line.
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return entry


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_ledger(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record, in order; unparsable lines (a torn append) are skipped."""
    path = Path(run_dir) / LEDGER_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("%s:%d: skipping a torn or corrupt ledger line", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def pending_publications(run_dir: str | os.PathLike[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Publications whose latest event is ``pending``, by ``(artifact, digest)``."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in read_ledger(run_dir):
        latest[(record.get("artifact", ""), record.get("digest", ""))] = record
    return {key: r for key, r in latest.items() if r.get("event") == "pending"}
