"""The resumed half of the EMA resume test, run in a fresh process.

``python ema_loop.py CHECKPOINT STOP OUT_DIR`` loads the checkpoint, restores the ``plain``
loop of ``resume_loops`` and the EMA its ``extra`` holds, trains to step ``STOP`` updating the
EMA after every step (as ``test_ema.straight_run`` does) and saves the final state, EMA
included, to ``OUT_DIR`` with the prefix ``resumed_ts``. Torch runs single-threaded.
"""

from __future__ import annotations

import sys

import resume_loops as loops
import torch

from keisei_fn import EMA, capture, ema_update, load_state, restore_, save_state


def main(checkpoint: str, stop: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    state = load_state(checkpoint)
    loop = loops.setup_plain()
    model, optimizer = loop[0], loop[1]
    restore_(state, model, optimizer)
    ema = EMA.from_extra(state.extra["ema"])
    for step in range(state.step, stop):
        loops.train_step(*loop, step)
        ema = ema_update(ema, model)
    final = capture(loops.SPEC, model, optimizer, step=stop, extra={"ema": ema.to_extra()})
    save_state(final, out_dir, prefix=loops.RESUMED_PREFIX)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
