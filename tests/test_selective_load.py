"""Selective verified loads: ``load_state(parts=...)`` and ``load_model`` read and verify only
the tensors they return (counted in bytes read, never timed)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
from golden import GOLDEN_V1, GOLDEN_V3, golden_state

import keisei_fn as kf
from keisei_fn.codec import only_parts
from keisei_fn.errors import IntegrityError, SpecError
from keisei_fn.store import weights
from keisei_fn.testing import assert_states_equal

SPEC = kf.ModelSpec(tower_depth=2, tower_width=64)


def adam_state(step: int = 10) -> kf.TrainState:
    """A default-architecture (small tower) state whose Adam moments are twice the model."""
    torch.manual_seed(0)
    model = kf.build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits, value = model(torch.randn(2, *SPEC.obs_shape))
    (logits.logsumexp(-1).mean() + value.pow(2).mean()).backward()
    optimizer.step()
    return kf.capture(SPEC, model, optimizer, step=step, extra={"elo": 1500.0})


def storage_reads() -> int:
    """Bytes this process has had the kernel fetch from storage (Linux's read_bytes): reads
    and memory-mapped page faults alike, page cache hits not."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def evict(path: Path) -> None:
    """Drop a (durable) file's pages from the page cache, so that reading it costs storage
    reads; skip the test where the file system keeps them (tmpfs, some overlays)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = storage_reads()
        os.pread(fd, 4096, 0)
        if storage_reads() - before < 4096:
            pytest.skip(f"the page cache of {path.parent} cannot be dropped")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def first_byte_of(path: Path, tensor: str) -> int:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return 8 + header_len + json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"][0]


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_a_model_only_load_reads_only_the_models_bytes(tmp_path: Path) -> None:
    state = adam_state()
    meta = kf.save_state(state, tmp_path)
    model_bytes = sum(t.nbytes for t in state.model.values())
    assert meta.weights_size - model_bytes > 1.9 * model_bytes  # Adam: two moments each
    header = int.from_bytes(meta.weights_path.read_bytes()[:8], "little") + 8
    pages = 4096 * (2 + len(state.model))  # a partial page at each end of each read

    for load in (
        partial(kf.load_state, tmp_path, parts=("model",)),
        partial(kf.load_model, meta.path),
    ):
        evict(meta.weights_path)
        before = storage_reads()
        load()
        cost = storage_reads() - before
        assert model_bytes <= cost <= model_bytes + header + pages, (load, cost, model_bytes)
    evict(meta.weights_path)
    before = storage_reads()
    assert_states_equal(kf.load_state(tmp_path), state)
    assert storage_reads() - before >= meta.weights_size  # a full load reads it all
    assert_states_equal(kf.load_state(tmp_path, parts=("model",)), only_parts(state, {"model"}))


def test_parts_load_exactly_what_a_full_load_holds_of_them(tmp_path: Path) -> None:
    state = adam_state()
    kf.save_state(state, tmp_path)
    full = kf.load_state(tmp_path)
    assert_states_equal(full, state)
    for parts in (("model",), ("optimizer",), ("rng", "extra"), ("model", "scheduler")):
        loaded = kf.load_state(tmp_path, parts=parts)
        assert_states_equal(loaded, only_parts(state, set(parts)))
    model_only = kf.load_state(tmp_path, parts=("model",))
    assert model_only.optimizer is None and model_only.rng is None and dict(model_only.extra) == {}
    assert model_only.spec == SPEC and model_only.step == 10


def test_a_tensor_outside_the_parts_may_be_corrupt_one_inside_may_not(tmp_path: Path) -> None:
    state = adam_state()
    meta = kf.save_state(state, tmp_path)
    optimizer_tensor = next(n for n in meta.tensors if n.startswith("optimizer/"))
    flip(meta.weights_path, first_byte_of(meta.weights_path, optimizer_tensor))
    assert_states_equal(kf.load_state(meta.path, parts=("model",)), only_parts(state, {"model"}))
    with pytest.raises(IntegrityError, match="digest"):
        kf.load_state(meta.path)
    with pytest.raises(IntegrityError, match=re.escape(optimizer_tensor)):
        kf.load_state(meta.path, parts=("optimizer",))
    flip(meta.weights_path, first_byte_of(meta.weights_path, "model/stem.weight"))
    with pytest.raises(IntegrityError, match=re.escape("model/stem.weight")):
        kf.load_state(meta.path, parts=("model",))
    # unverified, the flipped byte comes through: verification is what refused it
    unverified = kf.load_state(meta.path, parts=("model",), verify=False)
    assert not torch.equal(unverified.model["stem.weight"], state.model["stem.weight"])


def test_shared_tensors_across_parts_are_read_through_their_alias(tmp_path: Path) -> None:
    weight = torch.arange(6, dtype=torch.float32)
    state = kf.TrainState(
        spec=None,
        step=1,
        model={"w": weight, "tied": weight, "other": torch.ones(3)},
        extra={"snapshot_of_w": weight, "note": "shares w's storage"},
    )
    kf.save_state(state, tmp_path)
    for parts in (("extra",), ("model",), ("model", "extra")):
        loaded = kf.load_state(tmp_path, parts=parts)
        assert_states_equal(loaded, only_parts(state, set(parts)))
    model = kf.load_state(tmp_path, parts=("model",)).model
    assert model["w"].data_ptr() == model["tied"].data_ptr()  # still tied


@pytest.mark.parametrize("golden", [GOLDEN_V1, GOLDEN_V3])
@pytest.mark.parametrize("verify", [True, False])
def test_every_format_loads_parts(golden: Path, verify: bool) -> None:
    """Format 1 has no per-tensor digests: a verified partial load reads it in full."""
    for parts in (("model",), ("optimizer", "scaler")):
        loaded = kf.load_state(golden, parts=parts, verify=verify)
        assert_states_equal(loaded, only_parts(golden_state(), set(parts)))


def test_unknown_parts_are_refused(tmp_path: Path) -> None:
    kf.save_state(adam_state(), tmp_path)
    with pytest.raises(SpecError, match="optimiser"):
        kf.load_state(tmp_path, parts=("model", "optimiser"))
    with pytest.raises(SpecError, match="string"):
        kf.load_state(tmp_path, parts="model")


def test_a_remote_model_only_load_fetches_only_the_models_byte_ranges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "memory://selective-load/run"
    state = adam_state()
    meta = kf.save_state(state, url)
    model_bytes = sum(t.nbytes for t in state.model.values())
    fs = fsspec.filesystem("memory")
    header_len = int.from_bytes(fs.cat_file(meta.weights_path.path, start=0, end=8), "little")
    fetched: list[int] = []
    real_cat_file = type(fs).cat_file

    def counting_cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
        data = real_cat_file(self, path, start=start, end=end, **kwargs)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(type(fs), "cat_file", counting_cat_file)
    try:
        loaded = kf.load_state(url, parts=("model",))
        assert_states_equal(loaded, only_parts(state, {"model"}))
        # ... the sidecar, then 8 bytes, the header, and the model's tensors in one range
        assert fetched[-3:] == [8, header_len, model_bytes], fetched
        assert sum(fetched) < meta.weights_size / 2
    finally:
        fs.rm("/selective-load", recursive=True)


class CountingHashes:
    """Counts the whole-file hashes ``read_weights`` starts (the digest itself still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = weights.hash_chunks

        def counting() -> object:
            self.count += 1
            return real()

        monkeypatch.setattr(weights, "hash_chunks", counting)

    def __call__(self, load: Callable[[], object]) -> int:
        """How many times ``load()`` hashed a whole file."""
        before = self.count
        load()
        return self.count - before


def test_a_file_verified_before_is_not_hashed_again_while_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = adam_state()
    meta = kf.save_state(state, tmp_path)
    hashes = CountingHashes(monkeypatch)
    load = partial(kf.load_state, meta.path)
    assert hashes(load) == hashes(load) == 1  # just written: too young to be remembered
    monkeypatch.setattr(weights, "TRUSTED_AGE_NS", 0)
    assert hashes(load) == 1
    assert hashes(load) == 0  # remembered: the same file, unchanged
    assert_states_equal(load(), state)
    assert hashes(partial(kf.verify_checkpoint, meta.path)) == 1  # it always hashes
    flip(meta.weights_path, first_byte_of(meta.weights_path, "model/stem.weight"))
    with pytest.raises(IntegrityError, match="digest"):  # changed in place: new times
        load()
    replaced = kf.save_state(state.replace(extra={"elo": 1.0}), tmp_path, overwrite=True)
    load = partial(kf.load_state, replaced.path)
    assert hashes(load) == 1 and hashes(load) == 0  # a new file is hashed, once
    os.utime(replaced.weights_path, ns=(0, 0))  # a back-dated mtime still changes the ctime
    assert hashes(load) == 1


def test_a_file_changed_during_its_verification_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The identity remembered is the one mapped (fstat of the mapped file, taken before the
    hash), so a change in place right after the hash is seen by the next load."""
    state = adam_state()
    meta = kf.save_state(state, tmp_path)
    real_time_ns = time.time_ns
    monkeypatch.setattr(weights, "time", SimpleNamespace(time_ns=lambda: real_time_ns() + 10**10))
    real = weights.hash_chunks

    class ChangingAfterTheHash:
        def __init__(self) -> None:
            self._hasher = real()

        def update(self, data: object) -> None:
            self._hasher.update(data)

        def hexdigest(self) -> str:
            digest = self._hasher.hexdigest()  # of the bytes as they were: verification passes
            flip(meta.weights_path, first_byte_of(meta.weights_path, "model/stem.weight"))
            return digest

    monkeypatch.setattr(weights, "hash_chunks", ChangingAfterTheHash)
    kf.load_state(meta.path)
    monkeypatch.setattr(weights, "hash_chunks", real)
    with pytest.raises(IntegrityError, match="digest"):
        kf.load_state(meta.path)
