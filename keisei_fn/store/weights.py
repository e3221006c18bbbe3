"""The weights file: safetensors written by the safetensors library, read back zero-copy.

Writing uses ``safetensors.torch.save_file`` (it streams tensor memory to the file, without
building the file in memory), then hashes the file with BLAKE3 from the page cache.

Reading reads the file once into one buffer, hashing each chunk in a worker thread while the
next one is read (BLAKE3 releases the GIL), checks the digest, then parses the safetensors
header (8-byte little-endian length + JSON) and builds every tensor as a view of that buffer:
one copy from the kernel, no per-tensor copies. The header is checked strictly (size bound,
dtypes, shapes, offsets inside the data, no overlaps) before anything is built.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from keisei_fn.codec import DTYPES_BY_NAME
from keisei_fn.errors import IntegrityError
from keisei_fn.store._fs import CHUNK, fsync_file, hash_chunks, hash_file, removing_on_failure

MAX_HEADER_BYTES = 100 * 1024 * 1024


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, str]:
    """Write ``tensors`` to a new file at ``path`` and fsync it.

    Returns:
        ``(size, digest)`` of the written file.

    Raises:
        OSError: when the disk is full or not writable (the partial file is removed).
    """
    with removing_on_failure(path):
        try:
            save_file(tensors, path, metadata={"format": "keisei_fn"})
        except SafetensorError as exc:  # e.g. an I/O error inside the Rust writer
            raise OSError(f"cannot write {path}: {exc}") from exc
        fsync_file(path)
        return hash_file(path)


def read_weights(path: Path, *, size: int, digest: str | None) -> dict[str, torch.Tensor]:
    """Read and (when ``digest`` is given) verify a weights file.

    Args:
        path: the ``.safetensors`` file.
        size: its recorded size; a different size is corruption.
        digest: the recorded digest, or None to skip hashing.

    Returns:
        name → CPU tensor (views of one private buffer).

    Raises:
        FileNotFoundError: when the file is missing.
        IntegrityError: naming the file, for any size, digest or header problem.
    """
    with open(path, "rb", buffering=0) as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise IntegrityError(f"{path}: size is {actual} bytes, the sidecar records {size}")
        buffer = np.empty(size, dtype=np.uint8)
        view = buffer.data
        hasher = hash_chunks() if digest is not None else None
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[object] | None = None
            position = 0
            while position < size:
                n = f.readinto(view[position : position + CHUNK])
                if not n:
                    raise IntegrityError(f"{path}: truncated at byte {position} of {size}")
                if hasher is not None:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(hasher.update, view[position : position + n])
                position += n
            if pending is not None:
                pending.result()
    if hasher is not None:
        found = "blake3:" + hasher.hexdigest()
        if found != digest:
            raise IntegrityError(f"{path}: weights digest is {found}, the sidecar records {digest}")
    return _parse(buffer, path)


def _parse(buffer: np.ndarray, path: Path) -> dict[str, torch.Tensor]:
    size = len(buffer)
    if size < 8:
        raise IntegrityError(f"{path}: {size} bytes is too short for a safetensors file")
    header_len = int.from_bytes(buffer[:8].tobytes(), "little")
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise IntegrityError(f"{path}: header length {header_len} exceeds the file or the limit")
    try:
        header = orjson.loads(buffer[8 : 8 + header_len].tobytes())
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"{path}: safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start
    spans = []
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES_BY_NAME[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{path}: bad header entry for {name!r}: {exc!r}") from exc
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len:
            raise IntegrityError(f"{path}: tensor {name!r} lies outside the data section")
        if end - begin != numel * dtype.itemsize:
            raise IntegrityError(f"{path}: tensor {name!r} has {end - begin} bytes for {shape}")
        spans.append((begin, end, name))
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=data_start + begin)
            tensors[name] = flat.reshape(shape)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise IntegrityError(f"{path}: tensors {a!r} and {b!r} overlap")
    return tensors
