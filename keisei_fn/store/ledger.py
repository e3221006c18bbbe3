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
The key of a publication is ``(artifact, digest)``. A ``published`` record with a
``best_artifact`` field says that publication moved that artifact's ``best`` alias to its
checkpoint (:func:`best_publications`).

What a hostile ledger can cost is bounded: at most :data:`MAX_LEDGER_BYTES` bytes (checked
before reading) and :data:`MAX_LEDGER_RECORDS` records (counted while reading line by line),
so reading it costs at most about twice its cap in memory.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from keisei_fn.codec import check_json_cost
from keisei_fn.errors import IntegrityError, SpecError
from keisei_fn.paths import PathArg, RunPath, is_remote, run_path
from keisei_fn.store._fs import (
    file_size,
    fsync_dir,
    open_regular,
    read_bounded,
    write_bytes_durably,
)

if TYPE_CHECKING:
    from upath import UPath

__all__ = [
    "LEDGER_NAME",
    "append_ledger",
    "best_publications",
    "pending_publications",
    "read_ledger",
]

log = logging.getLogger("keisei_fn.store")

LEDGER_NAME = "publications.jsonl"
EVENTS = ("pending", "published", "failed")
#: A ledger larger than this is refused unread. A record is ~300 bytes; a run publishing every
#: periodic checkpoint of 100 M steps at Keisei's interval writes ~20,000 (6 MB).
MAX_LEDGER_BYTES = 64 * 1024 * 1024
#: At most this many records (3x that run); each costs ~1.2 KB parsed, ~80 MB in all.
MAX_LEDGER_RECORDS = 65_536
#: A record has a dozen fields; a line with more values or containers is corrupt (skipped
#: unparsed), and :func:`append_ledger` refuses to write one.
_RECORD_VALUES = 256
_RECORD_CONTAINERS = 8


def append_ledger(run_dir: PathArg, record: Mapping[str, Any]) -> dict[str, Any]:
    """Durably append one record (``time`` added when absent).

    Raises:
        SpecError: for an unknown ``event``, a record without ``artifact``/``digest``, or one
            the reader would skip as corrupt (over 256 JSON values or 8 containers: e.g. the
            caller's metadata nested deeply), which would lose a pending publication.
        IntegrityError: the ledger is not a regular file (a FIFO, a device).
        OSError: when the run directory is not writable.
    """
    entry = dict(record)
    if entry.get("event") not in EVENTS:
        raise SpecError(f"ledger event must be one of {EVENTS}, got {entry.get('event')!r}")
    if not entry.get("artifact") or not entry.get("digest"):
        raise SpecError("a ledger record needs 'artifact' and 'digest'")
    entry.setdefault("time", datetime.now(UTC).isoformat(timespec="microseconds"))
    path = run_path(run_dir) / LEDGER_NAME
    line = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n"
    try:
        _check_record_cost(line)
    except IntegrityError as exc:
        raise SpecError(f"publication record of {entry['artifact']} is too big: {exc}") from None
    if is_remote(path):
        _append_remote(path, line)
        return entry
    created = not path.exists()
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader (O_NONBLOCK does not wait)
            raise IntegrityError(f"{path} is not a regular file, not a publication ledger") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would block every append
            raise IntegrityError(f"{path} is not a regular file, not a publication ledger")
        os.set_blocking(fd, True)
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
    with open_regular(path) as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_ledger(run_dir: PathArg) -> list[dict[str, Any]]:
    """Every complete record, in order; unparsable lines (a torn append) are skipped.

    Raises:
        IntegrityError: the ledger is over :data:`MAX_LEDGER_BYTES` or
            :data:`MAX_LEDGER_RECORDS`, or not a regular file.
    """
    return list(_records(run_path(run_dir) / LEDGER_NAME))


def _records(path: RunPath) -> Iterator[dict[str, Any]]:
    """The ledger's records, parsed one line at a time (a local ledger is never whole in
    memory)."""
    try:
        size = file_size(path)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise IntegrityError(f"{path} is a directory, not a publication ledger") from None
    if size > MAX_LEDGER_BYTES:
        raise IntegrityError(f"{path}: {size} bytes is over the {MAX_LEDGER_BYTES}-byte limit")
    with (
        io.BytesIO(read_bounded(path, limit=MAX_LEDGER_BYTES))
        if is_remote(path)
        else open_regular(path)
    ) as lines:
        for number, line in enumerate(lines, 1):
            if number > MAX_LEDGER_RECORDS:
                raise IntegrityError(f"{path}: more than {MAX_LEDGER_RECORDS} records")
            if not line.strip():
                continue
            try:
                _check_record_cost(line)
                record = orjson.loads(line)
            except (orjson.JSONDecodeError, IntegrityError):
                log.warning("%s:%d: skipping a torn or corrupt ledger line", path, number)
                continue
            if isinstance(record, dict):
                yield record


def _check_record_cost(line: bytes) -> None:
    check_json_cost(
        line, max_values=_RECORD_VALUES, max_containers=_RECORD_CONTAINERS, where="ledger line"
    )


def pending_publications(run_dir: PathArg) -> dict[tuple[str, str], dict[str, Any]]:
    """Publications whose latest event is ``pending``, by ``(artifact, digest)``.

    Raises:
        IntegrityError: the ledger cannot be read (see :func:`read_ledger`).
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in _records(run_path(run_dir) / LEDGER_NAME):
        key = (str(record.get("artifact", "")), str(record.get("digest", "")))
        if record.get("event") == "pending":
            latest[key] = record
        else:
            latest.pop(key, None)
    return latest


def best_publications(run_dir: PathArg) -> dict[str, dict[str, Any]]:
    """Per best artifact (``best_artifact``), the last ``published`` record that moved its
    ``best`` alias: the checkpoint W&B's ``best`` names now.

    Raises:
        IntegrityError: the ledger cannot be read (see :func:`read_ledger`).
    """
    latest: dict[str, dict[str, Any]] = {}
    for record in _records(run_path(run_dir) / LEDGER_NAME):
        if record.get("event") == "published" and record.get("best_artifact"):
            latest[str(record["best_artifact"])] = record
    return latest
