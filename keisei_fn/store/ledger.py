"""The run directory's publication ledger: an append-only JSONL file the store owns.

Publishing (``keisei_fn.publish``) records its intents and outcomes here; retention reads it so
that a checkpoint still pending publication is never deleted. Locally each append is one line
written with a single ``write`` on an ``O_APPEND`` descriptor and fsynced; a torn last line (a
crash mid-append) is ignored when reading. Object stores cannot append: there the ledger object
is read and rewritten whole with the new line, so two processes appending to one remote run
directory at the same instant can lose a record — publish and flush from one process at a time
there (the training process, or a ``keisei-fn flush`` after it).

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
from typing import TYPE_CHECKING, Any

import orjson

from keisei_fn.paths import PathArg, is_remote, run_path
from keisei_fn.store._fs import (
    fsync_dir,
    read_bounded,
    write_bytes_durably,
)

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["LEDGER_NAME", "append_ledger", "pending_publications", "read_ledger"]

log = logging.getLogger("keisei_fn.store")

LEDGER_NAME = "publications.jsonl"
EVENTS = ("pending", "published", "failed")
#: A ledger larger than this is refused unread (about a million records).
MAX_LEDGER_BYTES = 512 * 1024 * 1024


def append_ledger(run_dir: PathArg, record: Mapping[str, Any]) -> dict[str, Any]:
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
    path = run_path(run_dir) / LEDGER_NAME
    line = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n"
    if is_remote(path):
        _append_remote(path, line)
        return entry
    created = not path.exists()
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


def _append_remote(path: UPath, line: bytes) -> None:
    """Append by rewriting the whole object (object stores have no append)."""
    try:
        old = read_bounded(path, limit=MAX_LEDGER_BYTES)
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"  # a torn previous line would swallow this one
    write_bytes_durably(path, old + line)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_ledger(run_dir: PathArg) -> list[dict[str, Any]]:
    """Every complete record, in order; unparsable lines (a torn append) are skipped."""
    path = run_path(run_dir) / LEDGER_NAME
    try:
        raw = read_bounded(path, limit=MAX_LEDGER_BYTES)
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


def pending_publications(run_dir: PathArg) -> dict[tuple[str, str], dict[str, Any]]:
    """Publications whose latest event is ``pending``, by ``(artifact, digest)``."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in read_ledger(run_dir):
        latest[(record.get("artifact", ""), record.get("digest", ""))] = record
    return {key: r for key, r in latest.items() if r.get("event") == "pending"}
