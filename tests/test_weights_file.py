"""The weights file: our writer and reader against the safetensors library, and corruption."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from keisei_fn.codec import DTYPE_NAMES
from keisei_fn.errors import IncompleteCheckpointError, IntegrityError, UnsupportedDtypeError
from keisei_fn.store import weights
from keisei_fn.store._fs import hash_file
from keisei_fn.store.weights import METADATA, read_weights, write_weights

DTYPES = list(DTYPE_NAMES)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: NaN payloads, signed zeros, subnormals included."""
    numel = 1
    for d in shape:
        numel *= d
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert same_bits(found[name], tensor), name


def every_dtype() -> dict[str, torch.Tensor]:
    """0-d, empty and large (0.25 to 2 MiB) tensors of every stored dtype."""
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        name = DTYPE_NAMES[dtype]
        tensors[f"{name}/scalar"] = random_tensor(dtype, (), seed=3 * i)
        tensors[f"{name}/empty"] = random_tensor(dtype, (0, 3), seed=3 * i + 1)
        tensors[f"{name}/large"] = random_tensor(dtype, (1031, 257), seed=3 * i + 2)
    return tensors


def test_every_dtype_reads_back_with_safetensors_and_ours(tmp_path: Path) -> None:
    tensors = every_dtype()
    path = tmp_path / "w.safetensors"
    written = write_weights(tensors, path)
    size, digest = written.size, written.digest
    assert (size, digest) == hash_file(path)
    assert set(written.tensor_digests) == set(tensors)
    assert_same(load_file(path), tensors)
    assert_same(read_weights(path, size=size, digest=digest), tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
def test_each_dtype_alone_is_byte_identical_to_save_file(tmp_path: Path, dtype: torch.dtype):
    tensors = {"a": random_tensor(dtype, (7, 5), seed=1), "z": random_tensor(dtype, (), seed=2)}
    save_file(tensors, tmp_path / "lib.safetensors", metadata=METADATA)
    write_weights(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "lib.safetensors"
    ).read_bytes()


def test_mixed_dtypes_are_laid_out_like_save_file(tmp_path: Path) -> None:
    tensors = every_dtype()
    save_file(tensors, tmp_path / "lib.safetensors", metadata=METADATA)
    write_weights(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "lib.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_reads_files_written_by_save_file(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = every_dtype()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata=metadata)
    size, digest = hash_file(path)
    assert_same(read_weights(path, size=size, digest=digest), tensors)
    assert_same(read_weights(path, size=size, digest=None), tensors)


def test_empty_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    written = write_weights({}, path)
    size, digest = written.size, written.digest
    assert load_file(path) == {}
    assert read_weights(path, size=size, digest=digest) == {}


def test_strided_device_and_conjugate_views_are_written_as_values(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    complex_ = torch.randn(5, dtype=torch.complex64)
    tensors = {
        "transposed": base.t(),
        "sliced": base[:, ::2],
        "grad": torch.ones(3, requires_grad=True),
        "conj": complex_.conj(),
        "neg": complex_.conj().imag,
    }
    path = tmp_path / "w.safetensors"
    write_weights(tensors, path)
    expected = {k: v.detach().resolve_conj().resolve_neg().contiguous() for k, v in tensors.items()}
    assert_same(load_file(path), expected)


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writev = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        return writev(fd, [buffers[0][:1000]])  # at most 1000 bytes of the first buffer

    monkeypatch.setattr(weights.os, "writev", short_writev)
    tensors = every_dtype()
    path = tmp_path / "w.safetensors"
    written = write_weights(tensors, path)
    assert (written.size, written.digest) == hash_file(path)
    assert_same(load_file(path), tensors)


def test_small_batches_cover_the_file_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "BATCH_BYTES", 1000)
    monkeypatch.setattr(weights, "_IOV_MAX", 3)
    ranges: list[tuple[int, int]] = []
    monkeypatch.setattr(weights, "_start_writeback", lambda fd, at, size: ranges.append((at, size)))
    tensors = every_dtype()
    save_file(tensors, tmp_path / "lib.safetensors", metadata=METADATA)
    size = write_weights(tensors, tmp_path / "ours.safetensors").size
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "lib.safetensors"
    ).read_bytes()
    assert [at for at, _ in ranges] == [0, *itertools.accumulate(n for _, n in ranges[:-1])]
    assert sum(n for _, n in ranges) == size
    assert max(n for _, n in ranges) < 2000


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_removes_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    writev = os.writev
    calls = []

    def failing_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(1)
        if len(calls) > 1:
            raise error
        return writev(fd, [buffers[0][:100]])

    monkeypatch.setattr(weights.os, "writev", failing_writev)
    with pytest.raises(type(error)):
        write_weights(every_dtype(), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_atomically_never_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.safetensors"
    written = write_weights({"a": torch.zeros(1000)}, path)
    size, digest = written.size, written.digest
    old = read_weights(path, size=size, digest=digest)  # a live mapping of the old file
    monkeypatch.setattr(weights.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError, match="EIO"):
        write_weights({"a": torch.ones(1000)}, path)
    monkeypatch.undo()
    assert hash_file(path) == (size, digest) and sorted(p.name for p in tmp_path.iterdir()) == [
        "w.safetensors"
    ]
    new = write_weights({"a": torch.ones(1000)}, path)
    assert hash_file(path) == (new.size, new.digest) != (size, digest)
    assert old["a"].sum().item() == 0  # the old mapping still shows the old bytes


def test_unsupported_dtype_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedDtypeError, match="'c'"):
        write_weights({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_loaded_tensors_are_private(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    written = write_weights({"a": torch.zeros(1000), "b": torch.zeros(10)}, path)
    size, digest = written.size, written.digest
    loaded = read_weights(path, size=size, digest=digest)
    loaded["a"] += 1  # copy-on-write: the file does not change
    assert hash_file(path) == (size, digest)
    path.unlink()  # the mapping outlives the file
    assert loaded["a"].sum().item() == 1000 and loaded["b"].sum().item() == 0


# --- corruption ----------------------------------------------------------------------------


def craft(path: Path, header: Any, data: bytes = b"", *, header_len: int | None = None) -> int:
    """Write a file with a hand-made header; returns its size."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path.stat().st_size


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CORRUPT: dict[str, tuple[Any, bytes, int | None, str]] = {
    "huge header length": ({}, b"", 2**62, "header length"),
    "header length past the end": ({"a": entry("F32", [1], 0, 4)}, b"\0" * 4, 4096, "header"),
    "non-JSON": (b"{not json", b"", None, "not JSON"),
    "not an object": ([1, 2], b"", None, "not an object"),
    "unknown dtype": ({"a": entry("F128", [1], 0, 16)}, b"\0" * 16, None, "bad header entry"),
    "missing offsets": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "bad header"),
    "offsets past the data": ({"a": entry("U8", [8], 0, 8)}, b"\0" * 4, None, "outside"),
    "reversed offsets": ({"a": entry("U8", [0], 4, 0)}, b"\0" * 4, None, "outside"),
    "negative dimension": ({"a": entry("U8", [-4], 0, 4)}, b"\0" * 4, None, "bad shape"),
    "float dimension": ({"a": entry("U8", [4.0], 0, 4)}, b"\0" * 4, None, "bad shape"),
    "string offset": ({"a": entry("U8", [4], "0", 4)}, b"\0" * 4, None, "bad shape"),
    "shape not a list": ({"a": entry("U8", 4, 0, 4)}, b"\0" * 4, None, "bad header entry"),
    "size does not fit shape": ({"a": entry("F32", [2], 0, 4)}, b"\0" * 4, None, "4 bytes"),
    "overlap": (
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)},
        b"\0" * 6,
        None,
        "overlaps",
    ),
    "gap": ({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, b"\0" * 6, None, "gap"),
    "trailing bytes": ({"a": entry("U8", [2], 0, 2)}, b"\0" * 6, None, "data section has"),
}


@pytest.mark.parametrize("case", CORRUPT, ids=list(CORRUPT))
@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_headers_are_integrity_errors(tmp_path: Path, case: str, verify: bool) -> None:
    header, data, header_len, message = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    size = craft(path, header, data, header_len=header_len)
    digest = hash_file(path)[1] if verify else None
    with pytest.raises(IntegrityError, match=message) as info:
        read_weights(path, size=size, digest=digest)
    assert str(path) in str(info.value)


def test_an_unpadded_header_from_another_writer_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    values = torch.tensor([1.5, -0.0, float("nan")], dtype=torch.float64)
    size = craft(path, {"x": entry("F64", [3], 0, 24)}, values.numpy().tobytes())
    assert (size - 24 - 8) % 8 != 0
    assert_same(read_weights(path, size=size, digest=None), {"x": values})


def test_size_digest_and_short_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    written = write_weights({"a": torch.arange(100)}, path)
    size, digest = written.size, written.digest
    with pytest.raises(IntegrityError, match="size is"):
        read_weights(path, size=size + 1, digest=digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="digest"):
        read_weights(path, size=size, digest=digest)
    path.write_bytes(b"1234")
    with pytest.raises(IntegrityError, match="too short"):
        read_weights(path, size=4, digest=None)
    with pytest.raises(IncompleteCheckpointError, match="missing"):  # its sidecar names it
        read_weights(tmp_path / "missing.safetensors", size=size, digest=digest)
