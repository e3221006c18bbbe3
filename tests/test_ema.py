"""EMA: a pure update, exact fixed points, and a bit-exact resume in a fresh process."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import resume_loops as loops
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw_bytes

import keisei_fn as kf
from keisei_fn.errors import StateMismatchError
from keisei_fn.testing import assert_states_equal

STEPS = 5
EMA_LOOP = Path(__file__).with_name("ema_loop.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(tensors: dict[str, torch.Tensor] | object) -> dict[str, bytes]:
    assert isinstance(tensors, dict)
    return {k: raw_bytes(t) for k, t in tensors.items()}


def straight_run(run_dir: Path, *, save_at: int) -> kf.TrainState:
    """Train STEPS steps of the plain loop from seed 0 with an EMA updated after each step,
    saving a checkpoint (EMA in ``extra``) after ``save_at`` steps on the way."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loop = loops.setup_plain()
    model, optimizer = loop[0], loop[1]
    ema = kf.ema_init(model, decay=0.8)
    for step in range(STEPS):
        if step == save_at:
            kf.save_state(
                kf.capture(loops.SPEC, model, optimizer, step=step, extra={"ema": ema.to_extra()}),
                run_dir,
            )
        loops.train_step(*loop, step)
        ema = kf.ema_update(ema, model)
    return kf.capture(loops.SPEC, model, optimizer, step=STEPS, extra={"ema": ema.to_extra()})


def test_ema_resumes_bit_exactly_in_a_fresh_process(tmp_path: Path) -> None:
    save_at = 2
    straight = straight_run(tmp_path, save_at=save_at)
    done = subprocess.run(
        [sys.executable, str(EMA_LOOP), str(tmp_path / f"checkpoint_ts{save_at}"), str(STEPS),
         str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    resumed = kf.load_state(tmp_path, prefix=loops.RESUMED_PREFIX)
    assert_states_equal(straight, resumed)  # the EMA's tensors, decay and count included
    ema = kf.EMA.from_extra(resumed.extra["ema"])
    assert (ema.decay, ema.updates) == (0.8, STEPS)
    # the EMA is not the model: it lags behind it
    key = "stem.weight"
    assert raw_bytes(ema.tensors[key]) != raw_bytes(resumed.model[key])
    # and it loads into the network
    net = kf.ema_model(ema, loops.SPEC)
    assert not net.training
    assert snapshot(kf.canonical_state_dict(net.state_dict())) == snapshot(dict(ema.tensors))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    decay=st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_update_is_pure_with_exact_fixed_points(
    seed: int, decay: float, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    start = {"w": torch.randn(3, 4, generator=gen).to(dtype), "n": torch.tensor(3)}
    now = {"w": torch.randn(3, 4, generator=gen).to(dtype), "n": torch.tensor(7)}
    before = snapshot(now)
    ema = kf.ema_init(start, decay=decay)
    first = snapshot(dict(ema.tensors))
    later = kf.ema_update(ema, now)
    assert snapshot(dict(ema.tensors)) == first and snapshot(now) == before  # nothing mutated
    assert (later.updates, later.decay, int(later.tensors["n"])) == (1, decay, 7)
    # following the average itself changes nothing; decay 0 follows the model exactly
    assert snapshot(dict(kf.ema_update(ema, ema.tensors).tensors)) == first
    assert snapshot(dict(kf.ema_update(kf.ema_init(start, decay=0.0), now).tensors)) == before


def test_ema_refusals() -> None:
    ema = kf.ema_init({"w": torch.zeros(2)}, decay=0.5)
    with pytest.raises(StateMismatchError) as failure:
        kf.ema_update(ema, {"v": torch.zeros(2)})
    assert str(failure.value) == (
        "the model does not fit the EMA:\n"
        "  - 1 tensor in the EMA is not in the model: 'w'\n"
        "  - 1 tensor in the model is not in the EMA: 'v'"
    )
    with pytest.raises(
        StateMismatchError,
        match=r"1 tensor has another shape: 'w' \(the model has float32\[3\], the EMA "
        r"float32\[2\]\)",
    ):
        kf.ema_update(ema, {"w": torch.zeros(3)})
    for decay in (1.0, -0.1, float("nan"), True):
        with pytest.raises(StateMismatchError, match="decay"):
            kf.ema_init({"w": torch.zeros(2)}, decay=decay)
    with pytest.raises(StateMismatchError, match="not an EMA"):
        kf.EMA.from_extra({"decay": 0.5})
