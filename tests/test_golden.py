"""Checkpoints written by earlier on-disk format versions keep loading, bit-exactly, and every
weights file stays readable by stock ``safetensors``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from golden import GOLDEN_V1, GOLDEN_V2, GOLDEN_V3, golden_sharded_model, golden_state
from safetensors import safe_open

from keisei_fn import list_checkpoints, load_state, save_state, verify_checkpoint
from keisei_fn.meta import FORMAT_VERSION, NEWEST_FORMAT_VERSION
from keisei_fn.store import scan_run_dir
from keisei_fn.testing import assert_states_equal


@pytest.mark.parametrize(("golden", "version"), [(GOLDEN_V1, 1), (GOLDEN_V3, 3)])
def test_golden_checkpoint_loads_bit_exact(golden: Path, version: int) -> None:
    meta = verify_checkpoint(golden / "checkpoint_ts2048")
    assert meta.format_version == version <= NEWEST_FORMAT_VERSION
    assert [m.name for m in list_checkpoints(golden)] == ["checkpoint_ts2048"]
    assert scan_run_dir(golden).leftovers == []
    loaded = load_state(golden)
    assert_states_equal(loaded, golden_state())
    assert loaded.model["w"] is loaded.model["tied"]  # aliases come back shared
    assert verify_checkpoint(meta.weights_path) == meta  # the payload names its checkpoint


def test_format_3_names_a_generation_weights_file_with_per_tensor_digests() -> None:
    meta = verify_checkpoint(GOLDEN_V3 / "checkpoint_ts2048.json")
    assert FORMAT_VERSION == 3
    assert meta.weights_file.startswith("checkpoint_ts2048.") and meta.weights_file != (
        "checkpoint_ts2048.safetensors"
    )
    assert set(meta.tensor_digests) == set(meta.tensors)


@pytest.mark.parametrize("golden", [GOLDEN_V1, GOLDEN_V3])
def test_stock_safetensors_reads_every_weights_file(golden: Path) -> None:
    meta = list_checkpoints(golden)[0]
    loaded = load_state(golden)
    with safe_open(str(meta.weights_path), framework="pt") as f:
        assert set(f.keys()) == set(meta.tensors)
        weight = f.get_tensor("model/w")
    assert_states_equal(loaded.replace(model={**loaded.model, "w": weight, "tied": weight}), loaded)


def test_overwriting_a_format_1_checkpoint_replaces_its_weights_file(tmp_path: Path) -> None:
    for name in ("checkpoint_ts2048.json", "checkpoint_ts2048.safetensors"):
        (tmp_path / name).write_bytes((GOLDEN_V1 / name).read_bytes())
    newer = golden_state().replace(episodes=18)
    meta = save_state(newer, tmp_path, overwrite=True)
    assert meta.format_version == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint_ts2048.json", meta.weights_file]
    )
    assert_states_equal(load_state(tmp_path), newer)


def test_format_2_sharded_golden_checkpoint_loads_bit_exact() -> None:
    meta = verify_checkpoint(GOLDEN_V2 / "checkpoint_ts2048")
    assert meta.format_version == 2 and meta.sharded and meta.world_size == 1
    assert [m.name for m in list_checkpoints(GOLDEN_V2)] == ["checkpoint_ts2048"]
    assert scan_run_dir(GOLDEN_V2).leftovers == []
    loaded = load_state(GOLDEN_V2)
    expected = golden_sharded_model().state_dict()
    assert set(loaded.model) == set(expected)
    for key, tensor in expected.items():
        found = loaded.model[key]
        assert (found.dtype, found.shape) == (tensor.dtype, tensor.shape), key
        assert found.reshape(-1).view(torch.uint8).numpy().tobytes() == (
            tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        ), key
    for shard in meta.weights_path.iterdir():  # DCP's shards and our state file alike
        with safe_open(str(shard), framework="pt") as f:
            assert list(f.keys())
