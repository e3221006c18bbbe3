"""Selective verified loads: ``load_state(parts=...)`` and ``load_model`` read and verify only
the tensors they return (counted in bytes read, never timed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import pytest
import torch
from golden import GOLDEN_V1, GOLDEN_V3, golden_state

import keisei_fn as kf
from keisei_fn.codec import only_parts
from keisei_fn.errors import IntegrityError, SpecError
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


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (Linux's rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


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
    optimizer_bytes = meta.weights_size - model_bytes
    assert optimizer_bytes > 1.9 * model_bytes  # Adam: two moments per parameter
    sidecar = meta.sidecar_path.stat().st_size
    header = int.from_bytes(meta.weights_path.read_bytes()[:8], "little") + 8

    before = bytes_read()
    loaded = kf.load_state(tmp_path, parts=("model",))
    cost = bytes_read() - before
    assert model_bytes <= cost <= model_bytes + header + sidecar + 4096, (cost, model_bytes)

    before = bytes_read()
    model, _ = kf.load_model(meta.path)
    cost = bytes_read() - before
    assert model_bytes <= cost <= model_bytes + header + sidecar + 4096, (cost, model_bytes)
    assert_states_equal(kf.capture(SPEC, model, step=10, rng=False), only_parts(state, {"model"}))
    assert_states_equal(loaded, only_parts(state, {"model"}))


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
