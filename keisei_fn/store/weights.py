"""The weights file: a safetensors file, written straight from tensor memory, read back zero-copy.

Format (safetensors): an 8-byte little-endian header length, a JSON header (``__metadata__``,
then per tensor its ``dtype``, ``shape`` and ``data_offsets`` into the data section) padded with
spaces to a multiple of 8, then the tensors' bytes back to back. Tensors are laid out the way
``safetensors.torch.save_file`` lays them out (by dtype, widest first, then by name) and the
header is serialised the same way, so for the same tensors the file is byte-identical to the
library's — and its digest too.

Writing builds only the header in memory: the tensors' bytes go from their own memory to a local
file in ``writev`` batches of 8 MiB, each followed by a hint that starts the device's writeback
(so the disk works while the next batches are copied), while a worker thread hashes the same
memory with BLAKE3. The long steps (writev, BLAKE3, fsync) release the GIL, so a background
saver running this does not stall the training thread. On an object store the same pieces are
streamed into one upload.

Reading maps a local file copy-on-write (as ``safetensors`` does; a remote file is downloaded
into one buffer), hashes the mapping with BLAKE3 on all cores when a digest is given, checks the
header strictly (size bound, dtypes, shapes, offsets tiling the data section exactly) and
returns every tensor as a view of the mapping: no copy at all. Writing to a returned tensor
copies the touched pages and never reaches the file. Files are never written over in place
(design.md), so the mapping stays what was verified.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import orjson
import torch

from keisei_fn.codec import DTYPE_NAMES, DTYPES_BY_NAME, check_json_cost
from keisei_fn.errors import (
    IncompleteCheckpointError,
    IntegrityError,
    UnsupportedDtypeError,
    UnsupportedValueError,
)
from keisei_fn.paths import RunPath, is_remote
from keisei_fn.store._fs import (
    commit_file,
    file_size,
    hash_chunks,
    open_regular,
    read_into,
    read_ranges,
    removing_on_failure,
    temp_path,
    writing,
)

#: At most this many tensors in one checkpoint (counted before a header is parsed; a save with
#: more is refused before writing): 15x a default Keisei checkpoint's 543 (with Adam state),
#: 3.5x a 48-layer transformer's with Adam. Loading and verifying one costs ~5 KB per tensor
#: (header, sidecar entry, tensor objects, state): ~40 MiB at the cap.
MAX_TENSORS = 8_192
#: A weights file's JSON header larger than this is refused unread (a save with a larger one is
#: refused before writing). A default checkpoint's header is 52 KB; headers at the tensor cap
#: take ~1 MB unless the names are long. Chosen so that a file at both caps costs at most twice
#: this to load.
MAX_HEADER_BYTES = 24 * 1024 * 1024
#: A tensor dimension or element count beyond this is refused (torch's sizes are int64).
_MAX_ELEMENTS = 2**62

#: ``__metadata__`` of every file we write.
METADATA = {"format": "keisei_fn"}

#: The order in which safetensors lays out dtypes (its ``Dtype`` enum, descending): widest
#: first, so every tensor starts at a multiple of its item size.
DTYPE_ORDER = {
    name: rank
    for rank, name in enumerate(
        ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
         "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
    )
}  # fmt: skip

#: Bytes per ``writev`` call; the device's writeback of each batch starts right after it.
BATCH_BYTES = 8 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX")
#: Tensors at least this large are hashed on all cores (threads cost more than they save below).
_PARALLEL_HASH_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class WrittenWeights:
    """What :func:`write_weights` wrote: the file's size and digest, and every tensor's digest.

    Attributes:
        size: the file's byte size.
        digest: ``"blake3:<hex>"`` of the whole file.
        tensor_digests: stored name → ``"blake3:<hex>"`` of that tensor's bytes.
    """

    size: int
    digest: str
    tensor_digests: dict[str, str]


def write_weights(tensors: dict[str, torch.Tensor], path: RunPath) -> WrittenWeights:
    """Atomically write the weights file at ``path`` with ``tensors`` (the commit protocol
    always gives a fresh name; an existing file would be replaced whole, never in place).

    The digests are BLAKE3 of the whole file's bytes and of each tensor's bytes, hashed from
    the same memory while it is written (never by reading the file back). ``tensors`` must not
    change during the call. Local files go through a temp file (fsynced, renamed, directory
    fsynced); on an object store the upload is aborted on failure (see
    ``keisei_fn.store._fs.writing``).

    Args:
        tensors: name → tensor.
        path: the file to write.

    Returns:
        The file's size and digests.

    Raises:
        UnsupportedDtypeError: for a dtype a checkpoint cannot store (nothing is written).
        UnsupportedValueError: more than :data:`MAX_TENSORS` tensors or a header over
            :data:`MAX_HEADER_BYTES` (nothing is written: it could not be read back).
        OSError: when the disk is full or not writable (nothing is left at ``path``, or
            what was there before).
    """
    layout = _layout(tensors)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digests = pool.submit(_hash, layout)
        if is_remote(path):
            with writing(path) as file:
                for piece in _pieces(layout.chunks):
                    file.write(piece)
        else:
            _write_local(path, layout.chunks)
        return digests.result()


def weights_digest(tensors: dict[str, torch.Tensor]) -> WrittenWeights:
    """What :func:`write_weights` would return, without writing anything."""
    return _hash(_layout(tensors))


def _write_local(final: Path, chunks: Sequence[memoryview]) -> None:
    """Write ``chunks`` to a new temp file beside ``final``, fsync it and rename it over."""
    temp = temp_path(final)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    with removing_on_failure(temp):
        try:
            _write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        commit_file(temp, final)


@dataclass(frozen=True, slots=True)
class _Layout:
    """A weights file about to be written: the padded header, then each tensor's bytes (views
    of its memory) in file order, with their names."""

    header: bytes
    names: list[str]
    buffers: list[memoryview]

    @property
    def chunks(self) -> list[memoryview]:
        return [memoryview(self.header), *self.buffers]


def _layout(tensors: dict[str, torch.Tensor]) -> _Layout:
    """The padded header and each tensor's bytes (views of its memory), in file order."""
    if len(tensors) > MAX_TENSORS:
        raise UnsupportedValueError(
            f"{len(tensors)} tensors, more than a checkpoint holds ({MAX_TENSORS}): it could not "
            "be loaded back; store fewer, larger tensors"
        )
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise UnsupportedDtypeError(f"tensor {name!r} has dtype {tensor.dtype}, not storable")
    names = sorted(tensors, key=lambda n: (DTYPE_ORDER[DTYPE_NAMES[tensors[n].dtype]], n))
    header: dict[str, object] = {"__metadata__": METADATA}
    buffers = []
    offset = 0
    for name in names:
        tensor = tensors[name].detach().cpu().resolve_conj().resolve_neg().contiguous()
        data = tensor_bytes(tensor)
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        buffers.append(data)
    raw = orjson.dumps(header)
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise UnsupportedValueError(
            f"a {len(raw)}-byte safetensors header, more than a checkpoint holds "
            f"({MAX_HEADER_BYTES}): shorten the tensor names"
        )
    return _Layout(len(raw).to_bytes(8, "little") + raw, names, buffers)


def _hash(layout: _Layout) -> WrittenWeights:
    """The whole file's digest and each tensor's, from the bytes about to be written."""
    whole = hash_chunks()
    whole.update(layout.header)
    tensor_digests = {}
    for name, buffer in zip(layout.names, layout.buffers, strict=True):
        whole.update(buffer)
        tensor_digests[name] = digest_of(buffer)
    size = len(layout.header) + sum(buffer.nbytes for buffer in layout.buffers)
    return WrittenWeights(size, "blake3:" + whole.hexdigest(), tensor_digests)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as a view of its memory (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def digest_of(data: memoryview | bytes) -> str:
    """``"blake3:<hex>"`` of one tensor's bytes (all cores only when it is large)."""
    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_HASH_BYTES else 1
    return "blake3:" + blake3.blake3(data, max_threads=threads).hexdigest()


def _write_all(fd: int, chunks: Sequence[memoryview]) -> None:
    """Write every chunk in order, in ``writev`` batches of about :data:`BATCH_BYTES`.

    After each batch the device's writeback of it is started: the disk writes while the next
    batches are copied, and the final fsync has little left to wait for (``python -m
    benchmarks``: write_weights vs a raw write+fsync of the same bytes).
    """
    position = 0
    for batch in _batches(chunks):
        size = sum(piece.nbytes for piece in batch)
        _writev_fully(fd, batch)
        _start_writeback(fd, position, size)
        position += size


def _pieces(chunks: Sequence[memoryview]) -> Iterator[memoryview]:
    """The chunks cut into pieces of at most BATCH_BYTES."""
    for chunk in chunks:
        for start in range(0, chunk.nbytes, BATCH_BYTES):
            yield chunk[start : start + BATCH_BYTES]


def _batches(chunks: Sequence[memoryview]) -> Iterator[list[memoryview]]:
    """Pieces of at most BATCH_BYTES grouped into batches of about BATCH_BYTES."""
    batch: list[memoryview] = []
    size = 0
    for piece in _pieces(chunks):
        batch.append(piece)
        size += piece.nbytes
        if size >= BATCH_BYTES or len(batch) == _IOV_MAX:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _writev_fully(fd: int, pieces: list[memoryview]) -> None:
    """``writev`` until every byte of ``pieces`` is written (resuming after a short write)."""
    while pieces:
        written = os.writev(fd, pieces)
        done = 0
        while done < len(pieces) and written >= pieces[done].nbytes:
            written -= pieces[done].nbytes
            done += 1
        pieces = pieces[done:]
        if written:
            pieces[0] = pieces[0][written:]


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing a just-written range to the device, without waiting for it.

    On Linux, ``POSIX_FADV_DONTNEED`` on dirty pages starts their writeback and leaves them
    cached (only clean pages are dropped): the effect of ``sync_file_range(...,
    SYNC_FILE_RANGE_WRITE)``, which ``os`` does not offer. Elsewhere nothing is done here; the
    fsync writes everything.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def read_weights(
    path: RunPath, *, size: int, digest: str | None, recheck: bool = False
) -> dict[str, torch.Tensor]:
    """Read and (when ``digest`` is given) verify a weights file.

    A local file this process verified before is not hashed again while its identity (device,
    inode, size, modification and change times, taken with ``fstat`` from the very file
    mapped) and the digest asked for are the same: a file the store wrote is never changed in
    place, and any change in place changes its times. Only files last changed at least
    :data:`TRUSTED_AGE_NS` before the load began are remembered, so a change within the file
    system's timestamp granularity, even one during the hash, cannot go unseen.
    (Bit rot under an unchanged identity is ``verify_checkpoint``'s to find: it always hashes.)

    Args:
        path: the ``.safetensors`` file.
        size: its recorded size; a different size is corruption.
        digest: the recorded digest, or None to skip hashing.
        recheck: hash it even if this process verified it before (``verify_checkpoint``).

    Returns:
        name → CPU tensor: local files give copy-on-write views of one private memory map of
        the file; remote files are downloaded once into memory and viewed there.

    Raises:
        IncompleteCheckpointError: when the file is missing.
        OSError: when it cannot be mapped or downloaded.
        IntegrityError: naming the file, for any size, digest or header problem.
    """
    _check_size(path, size)
    identity = None  # of the local file mapped: what the cache of verified files knows it by
    if is_remote(path):
        data = _download(path, size)
    else:
        started = time.time_ns()  # before the mapping: a change during the hash is newer
        data, found = _map(path, size)
        identity = (
            found.st_dev,
            found.st_ino,
            found.st_size,
            found.st_mtime_ns,
            found.st_ctime_ns,
            digest,
        )
    if digest is not None and (recheck or identity is None or identity not in _verified):
        hasher = hash_chunks()
        hasher.update(data)
        found_digest = "blake3:" + hasher.hexdigest()
        if found_digest != digest:
            raise IntegrityError(
                f"{path}: weights digest is {found_digest}, the sidecar records {digest}"
            )
        if identity is not None and started - found.st_ctime_ns >= TRUSTED_AGE_NS:
            _verified.add(identity)
    return _parse(data, path)


#: A file is remembered as verified only if it was last changed (its ctime, which any write or
#: ``utime`` sets to now) this long before: 2 s, more than the timestamp granularity of common
#: file systems, so a later change in place always gives it new times.
TRUSTED_AGE_NS = 2_000_000_000


class _Verified:
    """The identities of the local files this process verified (the newest 4,096)."""

    def __init__(self, limit: int = 4096) -> None:
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def __contains__(self, identity: object) -> bool:
        with self._lock:
            return identity in self._seen

    def add(self, identity: tuple[Any, ...]) -> None:
        with self._lock:
            self._seen[identity] = None
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)


_verified = _Verified()


def _check_size(path: RunPath, size: int) -> None:
    """Raise unless a weights file is there with its recorded ``size`` (at least 8 bytes)."""
    try:
        actual = file_size(path)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path}: the weights file is missing") from None
    if actual != size:
        raise IntegrityError(f"{path}: size is {actual} bytes, the sidecar records {size}")
    if size < 8:
        raise IntegrityError(f"{path}: {size} bytes is too short for a safetensors file")


def _map(
    path: Path, size: int, ranges: Sequence[tuple[int, int]] | None = None
) -> tuple[memoryview, os.stat_result]:
    """A private copy-on-write memory map of a local file, and the ``fstat`` of exactly the
    file mapped. With ``ranges``, only those are read: the kernel's readahead is off for the
    map and asked for those ranges alone.

    Raises:
        IncompleteCheckpointError: when the file is gone.
        IntegrityError: when its size is not ``size``.
        OSError: when it cannot be mapped.
    """
    try:
        file = open_regular(path)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path}: the weights file is missing") from None
    with file:
        found = os.fstat(file.fileno())
        if found.st_size != size:
            raise IntegrityError(
                f"{path}: size is {found.st_size} bytes, the sidecar records {size}"
            )
        try:
            mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot map {path}: {exc}") from exc
    if ranges is not None:
        mapping.madvise(mmap.MADV_RANDOM)
        for start, end in ranges:
            aligned = start - start % mmap.PAGESIZE
            if end > aligned:
                mapping.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)
    return memoryview(mapping), found


def _download(path: RunPath, size: int) -> memoryview:
    """A remote file's bytes in one writable buffer (tensors are views of it)."""
    buffer = bytearray(size)
    read_into(path, buffer)
    return memoryview(buffer)


Bytes = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class _Span:
    """One tensor's place in a weights file: ``[begin, end)`` of the data section."""

    begin: int
    end: int
    name: str
    dtype: torch.dtype
    shape: list[int]


def _header_length(first8: Bytes, size: int, path: RunPath) -> int:
    """The header length a file's first 8 bytes give, refused beyond the file or the cap."""
    header_len = int.from_bytes(bytes(first8), "little")
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise IntegrityError(
            f"{path}: header length {header_len} exceeds the file or the "
            f"{MAX_HEADER_BYTES}-byte limit"
        )
    return header_len


def _spans(raw_header: Bytes, data_bytes: int, path: RunPath) -> list[_Span]:
    """Check a safetensors header strictly (cost caps, dtypes, shapes, offsets tiling a data
    section of ``data_bytes`` exactly) and return its tensors' spans, in file order."""
    # Each tensor's entry is an object with two arrays (shape, offsets).
    check_json_cost(
        raw_header,
        max_containers=3 * MAX_TENSORS + 2,
        max_values=16 * MAX_TENSORS,
        where=f"{path}: safetensors header",
    )
    try:
        header = orjson.loads(raw_header)
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"{path}: safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise IntegrityError(f"{path}: {len(header)} tensors, more than the cap of {MAX_TENSORS}")
    spans: list[_Span] = []
    for name, info in header.items():
        try:
            dtype = DTYPES_BY_NAME[info["dtype"]]
            shape = list(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{path}: bad header entry for {name!r}: {exc!r}") from exc
        if not all(type(x) is int and x >= 0 for x in (*shape, begin, end)) or not _sane(shape):
            raise IntegrityError(
                f"{path}: tensor {name!r} has a bad shape or offsets: {info!r:.200}"
            )
        if not begin <= end <= data_bytes:
            raise IntegrityError(f"{path}: tensor {name!r} lies outside the data section")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise IntegrityError(f"{path}: tensor {name!r} has {end - begin} bytes for {shape}")
        spans.append(_Span(begin, end, name, dtype, shape))
    spans.sort(key=lambda span: (span.begin, span.end))
    position = 0
    for span in spans:
        if span.begin != position:
            what = "overlaps the previous tensor" if span.begin < position else "leaves a gap"
            raise IntegrityError(f"{path}: tensor {span.name!r} at byte {span.begin} {what}")
        position = span.end
    if position != data_bytes:
        raise IntegrityError(
            f"{path}: the data section has {data_bytes} bytes, its tensors {position}"
        )
    return spans


def _view(span: _Span, data: Bytes, offset: int) -> torch.Tensor:
    """The tensor of ``span`` as a view of ``data``, whose byte ``offset`` is its first."""
    if span.begin == span.end:
        return torch.empty(span.shape, dtype=span.dtype)
    count = (span.end - span.begin) // span.dtype.itemsize
    return torch.frombuffer(data, dtype=span.dtype, count=count, offset=offset).reshape(span.shape)


def _parse(data: memoryview, path: RunPath) -> dict[str, torch.Tensor]:
    """Check the header strictly, then view every tensor in ``data`` (each its own storage,
    so that encoding a loaded state does not take them for views of one shared tensor)."""
    header_len = _header_length(data[:8], len(data), path)
    data_start = 8 + header_len
    # the header is a view of the mapping: never copied whole
    spans = _spans(data[8:data_start], len(data) - data_start, path)
    return {span.name: _view(span, data, data_start + span.begin) for span in spans}


def read_tensors(
    path: RunPath, names: Collection[str], *, size: int, digests: Mapping[str, str] | None
) -> dict[str, torch.Tensor]:
    """Read only the named tensors of a weights file (and its header), verifying each against
    its own recorded digest: what a selective load costs is what it returns.

    Args:
        path: the ``.safetensors`` file (local: ``pread``; remote: ranged reads).
        names: the stored tensor names to read.
        size: the file's recorded size; a different size is corruption.
        digests: stored name → ``"blake3:<hex>"`` (the sidecar's per-tensor digests), or None
            to skip verification.

    Returns:
        name → CPU tensor: local files give copy-on-write views of a private map of the file
        from which only those tensors' pages are read; remote files give views of one buffer
        per ranged read.

    Raises:
        IncompleteCheckpointError: when the file is missing.
        IntegrityError: naming the file, for a size, header or digest problem, or a name the
            file does not hold.
    """
    _check_size(path, size)
    header_len = _header_length(read_ranges(path, [(0, 8)])[0], size, path)
    data_start = 8 + header_len
    (raw_header,) = read_ranges(path, [(8, data_start)])
    by_name = {span.name: span for span in _spans(raw_header, size - data_start, path)}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise IntegrityError(f"{path}: holds no tensor {missing[0]!r}")
    wanted = sorted((by_name[name] for name in set(names)), key=lambda span: span.begin)
    runs: list[list[_Span]] = []  # adjacent tensors are read in one piece
    for span in wanted:
        if runs and runs[-1][-1].end == span.begin:
            runs[-1].append(span)
        else:
            runs.append([span])
    ranges = [(data_start + run[0].begin, data_start + run[-1].end) for run in runs]
    if is_remote(path):
        pieces: list[Bytes] = list(read_ranges(path, ranges))  # one ranged GET each
    else:
        mapped = _map(path, size, ranges)[0]
        pieces = [mapped[start:end] for start, end in ranges]
    tensors: dict[str, torch.Tensor] = {}
    pieces_of: dict[str, memoryview] = {}
    for run, piece in zip(runs, pieces, strict=True):
        for span in run:
            offset = span.begin - run[0].begin
            pieces_of[span.name] = memoryview(piece)[offset : offset + span.end - span.begin]
            tensors[span.name] = _view(span, piece, offset)
    if digests is not None:
        check_digests(path, pieces_of, digests)
    return tensors


def check_digests(
    path: RunPath, pieces: Mapping[str, memoryview], digests: Mapping[str, str]
) -> None:
    """Check each tensor's bytes against its recorded digest, hashing on every core (reading
    a mapped file's pages as they are hashed).

    Args:
        path: the weights file, for the message.
        pieces: stored name → that tensor's bytes.
        digests: stored name → its recorded ``"blake3:<hex>"``.

    Raises:
        IntegrityError: naming the file and the first tensor that differs (or has no digest).
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = dict(zip(pieces, pool.map(digest_of, pieces.values()), strict=True))
    for name, digest in found.items():
        if digest != digests.get(name):
            raise IntegrityError(
                f"{path}: tensor {name!r} has digest {digest}, the sidecar records "
                f"{digests.get(name)}"
            )


def _sane(shape: list[int]) -> bool:
    """Whether torch can make a tensor of ``shape``: its non-zero dimensions multiply to at
    most 2**62 (so ``[2**64 - 1, 0]`` or ``[2**62, 2**62, 0]``, empty as they are, are not)."""
    elements = 1
    for size in shape:
        elements *= max(size, 1)
        if elements > _MAX_ELEMENTS:
            return False
    return True


def check_listed(
    tensors: Mapping[str, torch.Tensor], recorded: Mapping[str, Any], where: RunPath
) -> None:
    """Check that a file's tensors are exactly the ones a sidecar lists, by name, dtype and
    shape (``recorded``: name → ``{"dtype", "shape"}``, as in the sidecar's ``"tensors"``).

    Raises:
        IntegrityError: naming ``where`` when they differ.
    """
    found = {k: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()}
    if found != {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in recorded.items()}:
        raise IntegrityError(f"{where}: tensors do not match the sidecar's list")
