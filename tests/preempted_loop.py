"""A training loop that a preemption signal stops (run by ``test_preemption`` as a script).

    python preempted_loop.py RUN_DIR TOTAL_STEPS MODE

MODE ``checkpointer``: a ``Checkpointer`` that is never due by steps; ``async``: an
``AsyncSaver`` writing a large state every 3 steps. Both inside ``Preemption(SIGTERM,
SIGUSR1)``. The loop resumes from the run directory, prints ``step N`` after each step and
``writing N`` when a background write starts, and saves the final model at the end.
"""

from __future__ import annotations

import signal
import sys

import torch
from torch import nn

import keisei_fn as kf

WIDTH = 2048  # the async mode's state: ~50 MB with Adam, long enough to signal mid-write


def main(run_dir: str, total: int, mode: str) -> None:
    torch.set_num_threads(1)  # bit-exact across processes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Dropout(0.1), nn.Linear(WIDTH, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    resumed = kf.resume(run_dir)
    if resumed is not None:
        kf.restore_(resumed.state, model, optimizer)
        step = resumed.state.step
        print(f"resumed {step}", flush=True)

    def snapshot() -> kf.TrainState:
        return kf.capture(None, model, optimizer, step=step)

    with kf.Preemption(signals=(signal.SIGTERM, signal.SIGUSR1)) as preemption:
        ckpt = kf.Checkpointer(run_dir=run_dir, interval=10**9, preemption=preemption)
        with kf.AsyncSaver(run_dir, preemption=preemption) as saver:
            while step < total:
                x = torch.randn(8, WIDTH)
                loss = (model(x) - x[:, :1]).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                print(f"step {step}", flush=True)
                if mode == "checkpointer":
                    ckpt.maybe_save(snapshot, step=step, last_saved=0)
                elif preemption.requested or step % 3 == 0:
                    saver.save(snapshot())
                    print(f"writing {step}", flush=True)
    kf.save_final_model(kf.capture(None, model, step=step), run_dir)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
