"""File primitives of the store: durable atomic writes, bounded reads, hashing.

Write protocol (design.md): temp file in the same directory → write → flush → fsync → rename →
fsync the directory. Temp names start with a dot and end with a random suffix, so they never
match the checkpoint name grammar. Nothing is ever written over in place: loaded tensors may be
views of an old file's memory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3

from keisei_fn.errors import IntegrityError

TEMP_SUFFIX = ".tmp"


def temp_path(final: Path) -> Path:
    """A fresh hidden temp path beside ``final``: ``.<name>.<random>.tmp``."""
    return final.parent / f".{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temp files."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def removing_on_failure(path: Path) -> Iterator[Path]:
    """Yield ``path``; delete it if the block raises anything (KeyboardInterrupt included)."""
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def commit_file(temp: Path, final: Path) -> None:
    """Durably rename a fully written and fsynced temp file to its final name."""
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_durably(final: Path, write: Callable[[Path], None]) -> None:
    """Atomically create or replace ``final``: ``write(temp)`` fills a temp file, then it is
    fsynced and renamed over ``final``, and the directory is fsynced. On any failure the temp
    file is removed and ``final`` is untouched."""
    with removing_on_failure(temp_path(final)) as temp:
        write(temp)
        fsync_file(temp)
        commit_file(temp, final)


def write_bytes_durably(final: Path, data: bytes) -> None:
    """:func:`write_durably` for bytes."""

    def write(temp: Path) -> None:
        with open(temp, "xb") as f:
            f.write(data)

    write_durably(final, write)


def unlink_durably(*paths: Path) -> None:
    """Remove files that exist (missing ones are fine) and fsync their directories."""
    dirs = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            dirs.add(path.parent)
    for directory in dirs:
        fsync_dir(directory)


def read_bounded(path: Path, *, limit: int) -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` bytes before reading it.

    Raises:
        FileNotFoundError: when it does not exist.
        IntegrityError: when it is larger than ``limit``.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise IntegrityError(f"{path}: {size} bytes is larger than the {limit}-byte limit")
        return f.read(size + 1)


def hash_file(path: Path) -> tuple[int, str]:
    """``(size, "blake3:<hex>")`` of a file, hashed from a memory map with all cores."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = path.stat().st_size
    if size:
        hasher.update_mmap(path)
    return size, "blake3:" + hasher.hexdigest()


def hash_chunks() -> blake3.blake3:
    """A hasher for incremental updates: it releases the GIL and uses all cores on large ones."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)
