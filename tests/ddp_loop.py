"""A 2-rank DDP training loop for tests/test_distributed.py, launched with torchrun (gloo).

Usage: torchrun --standalone --nproc_per_node=N tests/ddp_loop.py RUN_DIR OUT_DIR STEPS [SAVE_AT]
Without SAVE_AT: resume from RUN_DIR if it holds a checkpoint, run to STEPS, write each rank's
final model/optimizer/RNG fingerprint to OUT_DIR/rank{r}.json. With SAVE_AT: run from scratch
to SAVE_AT, save (every rank calls save_state), and exit.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrun_exit import run_then_exit

import keisei_fn as kf


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        train(
            Path(sys.argv[1]),
            Path(sys.argv[2]),
            int(sys.argv[3]),
            int(sys.argv[4]) if len(sys.argv) > 4 else None,
        )
    finally:  # a process group left alive at exit can abort the interpreter
        dist.destroy_process_group()


def train(run_dir: Path, out_dir: Path, steps: int, save_at: int | None) -> None:
    rank = dist.get_rank()
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)  # a different stream per rank: the checkpoint must keep them apart

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    net = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 4))
    torch.manual_seed(1000 + rank)
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    step = 0
    resumed = kf.resume(run_dir) if save_at is None else None
    if resumed is not None:
        kf.restore_(resumed.state, model, optimizer)
        step = resumed.state.step
    while step < (save_at or steps):
        x = torch.randn(8, 16) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    if save_at is not None:
        meta = kf.save_state(kf.capture(None, model, optimizer, step=step), run_dir)
        assert meta.step == step and (run_dir / f"{meta.name}.json").exists()  # committed
        return
    state = kf.capture(None, model, optimizer, step=step, rng=False)
    opt_tensors = {f"{i}/{k}": v for i, s in state.optimizer["state"].items() for k, v in s.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "model": digest(dict(state.model)),
                "optimizer": digest(opt_tensors),
                "torch_rng": hashlib.sha256(torch.get_rng_state().numpy()).hexdigest(),
                "numpy": float(np.random.rand()),
                "python": random.random(),
            }
        )
    )


if __name__ == "__main__":
    run_then_exit(main)
