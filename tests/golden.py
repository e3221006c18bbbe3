"""The state stored in tests/data/golden/format_v<N>, one run directory per on-disk format
version (write the current version's: python tests/golden.py tests/data/golden/format_v<N>,
adding --sharded for the sharded format)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from keisei_fn import GameStats, ModelSpec, TrainState, save_state

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_V1 = GOLDEN / "format_v1"
GOLDEN_V2 = GOLDEN / "format_v2"  # sharded (keisei_fn.store.sharded), one rank
GOLDEN_V3 = GOLDEN / "format_v3"


def golden_state() -> TrainState:
    """A small state touching every part of the format, built without any RNG."""
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    return TrainState(
        spec=ModelSpec(model_type="testmodel"),
        step=2048,
        episodes=17,
        stats=GameStats(black_wins=5, white_wins=4, draws=8),
        model={
            "w": weight,
            "tied": weight,  # shared storage, stored once
            "bf16": torch.tensor([1.5, -0.0, math.inf], dtype=torch.bfloat16),
            "steps": torch.tensor(3, dtype=torch.int64),
            "empty": torch.zeros(0, 2, dtype=torch.float16),
            "mask": torch.tensor([True, False]),
        },
        optimizer={
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": weight * 0.5}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        scheduler={"best": math.inf, "last_epoch": 3, "_last_lr": [1e-3]},
        scaler=None,
        rng={"python": (3, tuple(range(5)), None), "pcg": {"state": 2**100 + 7}},
        extra={"elo_state": {"black_rating": 1510.5}, "metrics_history": [math.nan, 0.25]},
    )


def golden_sharded_model() -> torch.nn.Module:
    """The model stored in the format-2 (sharded) golden checkpoint, built without any RNG."""
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7)
        model.bias.copy_(torch.tensor([-0.0, math.inf, 0.5]))
    return model


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--sharded":
        from keisei_fn.store.sharded import save_sharded

        print(save_sharded(golden_sharded_model(), None, target, step=2048).weights_path)
    else:
        print(save_state(golden_state(), target).weights_path)
