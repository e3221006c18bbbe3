"""Two ranks under torchrun (gloo) whose preemption signal or time-based save would come at
different steps on each rank (run by ``test_preemption``):

    torchrun --nproc_per_node=2 ddp_preemption.py RUN_DIR OUT_DIR signal|time

``signal``: rank 0 gets SIGTERM at step 3, rank 1 at step 5. ``time``: a Checkpointer with
``every_seconds=4`` whose clock runs at one second per step on rank 0 and half that on rank 1.
Each rank writes ``OUT_DIR/rank<R>.json``: the steps its Checkpointer saved, and the step and
code it exited with.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import keisei_fn as kf


def main(run_dir: str, out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    state = kf.TrainState(spec=None, step=0, model={"w": torch.zeros(4)})
    record: dict[str, object] = {"saved": []}
    step = 0

    def clock() -> float:
        return step * (1.0 if rank == 0 else 0.5)

    try:
        with kf.Preemption() as preemption:
            ckpt = kf.Checkpointer(
                run_dir=run_dir,
                interval=None if mode == "time" else 10**9,
                every_seconds=4 if mode == "time" else None,
                clock=clock,
                preemption=preemption,
            )
            last_saved = 0
            for step in range(1, 10):
                grad = torch.ones(4)
                dist.all_reduce(grad)  # the training step's own collective
                if mode == "signal" and step == (3 if rank == 0 else 5):
                    os.kill(os.getpid(), signal.SIGTERM)
                result = ckpt.maybe_save(state.replace(step=step), step=step, last_saved=last_saved)
                if result.status == "saved":
                    record["saved"].append(step)  # type: ignore[attr-defined]
                last_saved = result.last_saved
    except SystemExit as exited:
        record["exit"] = [step, exited.code]
        raise
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    main(sys.argv[1], out, sys.argv[3])
