"""File primitives of the store, for local run directories and fsspec URLs alike.

A run directory is either a local :class:`pathlib.Path` or a :class:`upath.UPath` over an fsspec
filesystem (see ``keisei_fn.paths``). Every function here takes either and does what the medium
allows:

- **Local:** temp file in the same directory → write → flush → fsync → rename → fsync the
  directory. Temp names start with a dot and end with a random suffix, so they never match the
  checkpoint name grammar. Nothing is ever written over in place: loaded tensors may be views of
  an old file's memory.
- **Object stores:** an object appears whole or not at all when its upload completes (a single
  PUT, or a multipart upload that is completed on close); there is no rename. So objects are
  written straight to their final names and a failed upload is aborted, never completed. The
  store's order — weights first, sidecar last — makes the sidecar the commit marker there too.
  Transient errors of whole-object calls are retried here with backoff, on top of the
  backend's own retries (s3fs, botocore's ``AWS_MAX_ATTEMPTS``). fsspec's ``memory://``
  filesystem, for tests, is not atomic: a failed write may leave a partial object, which the
  sidecar check still never takes for a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import blake3

from keisei_fn.errors import IntegrityError
from keisei_fn.paths import RunPath, is_remote

if TYPE_CHECKING:
    from upath import UPath

TEMP_SUFFIX = ".tmp"
#: Delays between tries of a whole-object call on a transient error.
RETRY_DELAYS = (0.5, 2.0)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN")
    if hasattr(errno, name)
)
#: Bytes per read when a file is streamed (copied, hashed or downloaded).
CHUNK_BYTES = 16 << 20
#: An unfinished write (an open S3 multipart upload, an uncommitted shards directory) older
#: than this is taken as abandoned by its process, and pruned.
ABANDONED_AFTER_SECONDS = 3600.0
T = TypeVar("T")


def retrying(call: Callable[[], T], *, what: str) -> T:
    """``call()``, tried again after :data:`RETRY_DELAYS` on a transient error.

    Transient: connection and timeout errors (``ConnectionError``, ``TimeoutError`` and
    ``OSError`` with a network errno). Everything else, ``FileNotFoundError`` included, is
    raised at once; the last error after the last try.
    """
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except OSError as exc:
            transient = isinstance(exc, ConnectionError | TimeoutError) or (
                exc.errno in _TRANSIENT_ERRNOS
            )
            if not transient or delay is None:
                raise
            time.sleep(delay)
    raise AssertionError(what)  # pragma: no cover - the loop returns or raises


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


@contextlib.contextmanager
def writing(final: RunPath) -> Iterator[IO[bytes]]:
    """A binary file whose contents atomically become ``final`` when the block succeeds.

    Local: a temp file, fsynced and renamed over ``final``, then the directory is fsynced.
    Object store: an upload to ``final`` that completes on success and is aborted on failure.
    Either way a failure (KeyboardInterrupt included) leaves ``final`` as it was.
    """
    if is_remote(final):
        file = final.fs.open(final.path, "wb")
        try:
            yield file
        except BaseException:
            with contextlib.suppress(Exception):
                file.discard()  # s3fs: abort the multipart upload
                file.closed = True  # never completed, not even when garbage-collected
            raise
        file.close()
        return
    with removing_on_failure(temp_path(final)) as temp, open(temp, "xb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())
        commit_file(temp, final)


def write_bytes_durably(final: RunPath, data: bytes) -> None:
    """Atomically create or replace ``final`` with ``data`` (see :func:`writing`)."""
    if is_remote(final):
        retrying(lambda: final.fs.pipe_file(final.path, data), what=f"write {final}")
        return
    with writing(final) as file:
        file.write(data)


def remove_durably(*paths: RunPath) -> None:
    """Remove files (and local directory trees) that exist, missing ones are fine; local
    parent directories are fsynced."""
    dirs = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if is_remote(path):
                retrying(partial(path.fs.rm_file, path.path), what=f"remove {path}")
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            dirs.add(path.parent)
    for directory in dirs:
        fsync_dir(directory)


def abort_stale_uploads(directory: RunPath) -> list[str]:
    """Abort incomplete multipart uploads of objects directly in ``directory`` (S3).

    A process killed mid-upload leaves its multipart upload open: invisible (no object, so
    never listed or loaded) but holding storage until aborted. Only uploads started more than
    :data:`ABANDONED_AFTER_SECONDS` ago are aborted, so a save in progress elsewhere is left
    alone. Filesystems without S3's multipart calls (and local directories) have none.

    Returns:
        The names of the objects whose uploads were aborted.
    """
    if not is_remote(directory) or not hasattr(directory.fs, "call_s3"):
        return []
    call_s3 = directory.fs.call_s3
    bucket, _, prefix = directory.path.strip("/").partition("/")
    prefix = f"{prefix}/" if prefix else ""
    now = datetime.now(UTC)
    aborted = []
    for upload in _multipart_uploads(call_s3, bucket, prefix, what=str(directory)):
        key, started = str(upload.get("Key", "")), upload.get("Initiated")
        name = key[len(prefix) :]
        if "/" in name or not name:
            continue
        if isinstance(started, datetime) and (now - started).total_seconds() < (
            ABANDONED_AFTER_SECONDS
        ):
            continue
        abort = partial(
            call_s3, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
        )
        retrying(abort, what=f"abort the upload of {key}")
        aborted.append(name)
    return aborted


def _multipart_uploads(
    call_s3: Callable[..., Any], bucket: str, prefix: str, *, what: str
) -> Iterator[dict[str, Any]]:
    """Every open multipart upload under ``prefix``, page by page."""
    markers: dict[str, str] = {}
    while True:
        list_page = partial(call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        page = retrying(partial(list_page, **markers), what=f"list the uploads in {what}")
        yield from page.get("Uploads", [])
        if not page.get("IsTruncated"):
            return
        markers = {
            "KeyMarker": page.get("NextKeyMarker", ""),
            "UploadIdMarker": page.get("NextUploadIdMarker", ""),
        }


def make_dirs(directory: RunPath) -> None:
    """Create a local directory and its parents; object stores have no directories."""
    if not is_remote(directory):
        directory.mkdir(parents=True, exist_ok=True)


def _info(path: UPath) -> dict[str, Any]:
    """Fresh (uncached) fsspec info of a remote path; FileNotFoundError when absent."""
    path.fs.invalidate_cache(path.path)
    info: dict[str, Any] = retrying(lambda: path.fs.info(path.path), what=f"stat {path}")
    return info


def file_size(path: RunPath) -> int:
    """Byte size of a file.

    Raises:
        FileNotFoundError: when it does not exist.
        IsADirectoryError: when it is a directory.
        IntegrityError: when it is a FIFO, socket or device (never opened: a FIFO would block).
    """
    if not is_remote(path):
        found = path.stat()
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(found.st_mode):
            raise IntegrityError(f"{path} is not a regular file (a FIFO, socket or device)")
        return found.st_size
    info = _info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    return int(info["size"])


def modified_age(path: RunPath) -> float | None:
    """Seconds since a file (or local directory) was last written; None when it is gone or the
    medium does not say."""
    try:
        if not is_remote(path):
            return time.time() - path.stat().st_mtime
        info = _info(path)
    except FileNotFoundError:
        return None
    stamp = info.get("LastModified", info.get("mtime", info.get("created")))
    if isinstance(stamp, datetime):
        return (datetime.now(UTC) - stamp.astimezone(UTC)).total_seconds()
    if isinstance(stamp, int | float):
        return time.time() - float(stamp)
    return None


def file_exists(path: RunPath) -> bool:
    """Whether a file (not a directory) exists at ``path``; a special file counts (reading it
    is refused)."""
    try:
        file_size(path)
    except (FileNotFoundError, IsADirectoryError):
        return False
    except IntegrityError:
        return True
    return True


def file_identity(path: RunPath) -> tuple[object, ...] | None:
    """What changes when the file at ``path`` is replaced (renamed over, rewritten) or removed:
    locally its device, inode, modification time and size; on an object store its size and
    ETag or modification time. None when nothing is there."""
    try:
        if not is_remote(path):
            found = os.lstat(path)
            return found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size
        info = _info(path)
    except FileNotFoundError:
        return None
    return info.get("size"), info.get("ETag"), info.get("LastModified"), info.get("created")


def entry_exists(path: RunPath) -> bool:
    """Whether anything (a file, directory, FIFO, link) is at ``path``; on an object store,
    whether an object is."""
    return file_exists(path) if is_remote(path) else os.path.lexists(path)


def is_directory(path: RunPath) -> bool:
    """Whether ``path`` is a directory (on an object store: a prefix with objects under it)."""
    if not is_remote(path):
        return path.is_dir()
    path.fs.invalidate_cache(path.path)
    return bool(retrying(lambda: path.fs.isdir(path.path), what=f"stat {path}"))


def list_names(directory: RunPath) -> tuple[list[str], list[str]]:
    """``(files, others)``: the names of the regular files directly in ``directory``, and of
    its other entries (directories, FIFOs, sockets, devices, symbolic links; an object store
    has none), in one listing. A missing directory has none.

    Raises:
        NotADirectoryError: when ``directory`` is a file.
    """
    if is_remote(directory):
        return list_file_names(directory), []
    files: list[str] = []
    others: list[str] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                (files if entry.is_file(follow_symlinks=False) else others).append(entry.name)
    except FileNotFoundError:
        pass
    return files, others


def list_file_names(directory: RunPath) -> list[str]:
    """Names of the files directly in ``directory``; a missing directory has none.

    Raises:
        NotADirectoryError: when ``directory`` is a file.
    """
    if not is_remote(directory):
        return list_names(directory)[0]
    fs, root = directory.fs, directory.path.rstrip("/")
    fs.invalidate_cache(root)
    try:
        entries = retrying(lambda: fs.ls(root, detail=True), what=f"list {directory}")
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        listed = str(entry["name"])
        name = listed.rstrip("/")
        if name in (root, root.lstrip("/")):  # the directory itself, or a file listing itself
            if entry.get("type") == "file" and not listed.endswith("/"):  # "dir/": a marker
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
            continue
        if entry.get("type") == "file":
            names.append(name.rsplit("/", 1)[-1])
    return names


def read_bounded(path: RunPath, *, limit: int) -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` bytes before reading it.

    Raises:
        FileNotFoundError: when it does not exist.
        IsADirectoryError: when it is a directory.
        IntegrityError: when it is larger than ``limit``.
    """
    size = file_size(path)
    if size > limit:
        raise IntegrityError(f"{path}: {size} bytes is larger than the {limit}-byte limit")
    if is_remote(path):
        data: bytes = retrying(lambda: path.fs.cat_file(path.path), what=f"read {path}")
        return data
    with open_regular(path) as f:
        return f.read(limit + 1)


def read_head(path: RunPath, *, limit: int) -> bytes:
    """A file's first ``limit`` bytes (all of it when it is shorter); never more is read.

    Raises:
        FileNotFoundError: when it does not exist.
        IntegrityError: when it is not a regular file (a FIFO is never waited on).
    """
    if is_remote(path):
        head: bytes = retrying(
            lambda: path.fs.cat_file(path.path, start=0, end=limit), what=f"read {path}"
        )
        return head[:limit]
    with open_regular(path) as f:
        return f.read(limit)


def open_regular(path: Path) -> IO[bytes]:
    """Open a local regular file for reading; a FIFO or device swapped in after a stat is
    refused without blocking (opened non-blocking, checked with fstat).

    Raises:
        FileNotFoundError: when it does not exist.
        IntegrityError: when it is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{path} is not a regular file (a FIFO, socket or device)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_chunks(path: RunPath) -> Iterator[bytes]:
    """A local or remote file's bytes, in pieces of at most :data:`CHUNK_BYTES`.

    Raises:
        FileNotFoundError: when it does not exist.
    """
    with path.fs.open(path.path, "rb") if is_remote(path) else open_regular(path) as file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def read_into(path: RunPath, buffer: bytearray) -> None:
    """Fill ``buffer`` with the first ``len(buffer)`` bytes of a remote or local file.

    Raises:
        IntegrityError: when the file is shorter than the buffer.
    """

    def read() -> int:
        view, done = memoryview(buffer), 0
        for chunk in read_chunks(path):
            taken = min(len(chunk), len(buffer) - done)
            view[done : done + taken] = chunk[:taken]
            done += taken
            if done == len(buffer):
                break
        return done

    done = retrying(read, what=f"read {path}")
    if done != len(buffer):
        raise IntegrityError(f"{path}: {done} bytes read, {len(buffer)} expected")


def read_ranges(path: RunPath, ranges: Sequence[tuple[int, int]]) -> list[bytearray]:
    """The bytes ``[start, end)`` of a local or remote file for each range, and nothing else
    (local: ``pread``; remote: one ranged GET per range).

    Raises:
        FileNotFoundError: when it does not exist.
        IntegrityError: when the file ends before a range does.
    """
    if is_remote(path):
        read = path.fs.cat_file
        found = [
            bytearray(retrying(partial(read, path.path, start=s, end=e), what=f"read {path}"))
            for s, e in ranges
        ]
    else:
        found = []
        with open_regular(path) as file:
            fd = file.fileno()
            for start, end in ranges:
                buffer = bytearray(end - start)
                view, done = memoryview(buffer), 0
                while done < len(buffer) and (n := os.preadv(fd, [view[done:]], start + done)):
                    done += n
                view.release()
                del buffer[done:]  # short: the file ended
                found.append(buffer)
    for (start, end), data in zip(ranges, found, strict=True):
        if len(data) != end - start:
            raise IntegrityError(f"{path}: ends before byte {end} ({len(data)} of {end - start})")
    return found


def copy_file(source: RunPath, target: RunPath) -> None:
    """Copy a file between any two places, atomically at ``target`` (see :func:`writing`)."""
    with writing(target) as file:
        for chunk in read_chunks(source):
            file.write(chunk)


def hash_file(path: RunPath) -> tuple[int, str]:
    """``(size, "blake3:<hex>")`` of a file: local files hashed from a memory map with all
    cores, remote ones streamed."""
    hasher = hash_chunks()
    if is_remote(path):
        size = 0
        for chunk in read_chunks(path):
            hasher.update(chunk)
            size += len(chunk)
        return size, "blake3:" + hasher.hexdigest()
    size = path.stat().st_size
    if size:
        hasher.update_mmap(path)
    return size, "blake3:" + hasher.hexdigest()


def hash_chunks() -> blake3.blake3:
    """A hasher for incremental updates: it releases the GIL and uses all cores on large ones."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)
