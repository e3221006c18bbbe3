"""Checkpoints written by earlier on-disk format versions keep loading, bit-exactly."""

from __future__ import annotations

from golden import GOLDEN_V1, golden_state

from keisei_fn import list_checkpoints, load_state, verify_checkpoint
from keisei_fn.meta import FORMAT_VERSION
from keisei_fn.testing import assert_states_equal


def test_format_v1_golden_checkpoint_loads_bit_exact():
    meta = verify_checkpoint(GOLDEN_V1 / "checkpoint_ts2048")
    assert meta.format_version == 1 <= FORMAT_VERSION
    assert [m.name for m in list_checkpoints(GOLDEN_V1)] == ["checkpoint_ts2048"]
    loaded = load_state(GOLDEN_V1)
    assert_states_equal(loaded, golden_state())
    assert loaded.model["w"] is loaded.model["tied"]  # aliases come back shared
