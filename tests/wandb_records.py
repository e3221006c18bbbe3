"""Read what an offline W&B run wrote: the protobuf records of its ``run-<id>.wandb`` file.

wandb has no public reader, so the tests carry this small one. The file is a LevelDB-style log:

- a 7-byte header: ``b":W&B"``, the magic ``0xBEE1`` (little-endian uint16), version ``0``;
- then 32 KiB blocks (the header counts towards the first) of chunks, each a 7-byte header —
  CRC-32 (4 bytes LE, of the type byte followed by the data), data length (2 bytes LE), type
  (1 byte: FULL=1, FIRST=2, MIDDLE=3, LAST=4) — and the data. A record is one FULL chunk or a
  FIRST, MIDDLEs and a LAST. A block tail shorter than a chunk header is zero padding;
- each record is a serialised ``wandb.proto.wandb_internal_pb2.Record``.

Checked with wandb 0.31. ``run.finish()`` returns before the file is complete (wandb-core
writes it asynchronously; often only the 7-byte header is there yet), so :func:`read_finished`
waits for the run's ``exit`` record.

Example:
    >>> header(b":W&B\\xe1\\xbe\\x00")
    (b':W&B', 48865, 0)
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def header(data: bytes) -> tuple[bytes, int, int]:
    """``(ident, magic, version)`` of a run file's first 7 bytes."""
    ident, magic, version = HEADER.unpack_from(data)
    return ident, magic, version


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """The raw records of a whole run file, checking every chunk's CRC.

    Raises:
        ValueError: a wrong header, a CRC mismatch, or chunks out of order.
    """
    if header(data) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"not a W&B run file (header {data[: HEADER.size]!r})")
    pos, parts = HEADER.size, None
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK.size:
            pos += left_in_block  # zero padding at a block's end
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if len(body) < length:
            break  # a record still being written
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"CRC mismatch in the chunk at byte {pos}")
        pos += CHUNK.size + length
        if kind == FULL and parts is None:
            yield body
        elif kind == FIRST and parts is None:
            parts = [body]
        elif kind in (MIDDLE, LAST) and parts is not None:
            parts.append(body)
            if kind == LAST:
                yield b"".join(parts)
                parts = None
        else:
            raise ValueError(f"chunk of type {kind} out of order at byte {pos}")


def read_records(path: str | Path) -> list[Any]:
    """Every record of a run file as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in iter_payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_finished(path: str | Path, *, timeout: float = 30.0) -> list[Any]:
    """The records of a finished run, waiting until wandb has written its ``exit`` record.

    Raises:
        TimeoutError: no ``exit`` record within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s")
        time.sleep(0.02)


def run_file(run_dir: str | Path) -> Path:
    """The ``run-*.wandb`` file of a run's directory (``Path(run.dir).parent``)."""
    (found,) = Path(run_dir).glob("run-*.wandb")
    return found


def artifacts(path: str | Path) -> list[dict[str, Any]]:
    """The artifacts a finished run's file records, as plain dicts (metadata parsed).

    Each: ``name``, ``type``, ``aliases`` (a set), ``metadata``, ``description``, ``digest``
    (W&B's manifest digest) and ``files``: path in the artifact → ``{"digest", "size",
    "local_path", "ref", "extra"}`` (``ref``: a reference's URI, ``""`` for a file W&B holds;
    ``extra``: the entry's extra fields, JSON-parsed, e.g. an S3 reference's ``etag``).
    """
    found = []
    for record in read_finished(path):
        if record.WhichOneof("record_type") != "artifact":
            continue
        artifact = record.artifact
        found.append(
            {
                "name": artifact.name,
                "type": artifact.type,
                "aliases": set(artifact.aliases),
                "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                "description": artifact.description,
                "digest": artifact.digest,
                "files": {
                    entry.path: {
                        "digest": entry.digest,
                        "size": entry.size,
                        "local_path": entry.local_path,
                        "ref": entry.ref,
                        "extra": {e.key: json.loads(e.value_json) for e in entry.extra},
                    }
                    for entry in artifact.manifest.contents
                },
            }
        )
    return found
