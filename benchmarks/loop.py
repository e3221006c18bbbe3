"""A realistic training loop: checkpoints every few steps cost how much of the training time?

The default model (13.2 M parameters) trains with Adam on random observations, batch 64, on the
CPU, three ways in the same run: no checkpoints, a foreground ``save_state`` every ``every``
steps, and a background ``AsyncSaver`` every ``every`` steps (snapshot on the loop's thread,
write on a worker). Reported: seconds per step (median of rounds), the overhead of each way as a
percentage of the no-checkpoint loop (paired per round), and how long the loop is blocked per
background checkpoint compared with the snapshot copy (``capture``) alone.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.cases import Row, clear
from keisei_fn import AsyncSaver, ModelSpec, build_model, capture, save_state


def _loop(
    spec: ModelSpec, steps: int, every: int, mode: str, run_dir: Path
) -> tuple[float, list[float]]:
    """Seconds for ``steps`` training steps, and the loop-side seconds of each checkpoint."""
    torch.manual_seed(0)
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    obs = torch.randn(64, *spec.obs_shape)
    saver = AsyncSaver(run_dir) if mode == "background" else None
    blocked: list[float] = []
    clear(run_dir)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logits, value = model(obs)
        loss = logits.logsumexp(-1).mean() + value.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if mode != "none" and step % every == 0:
            t0 = time.perf_counter()
            state = capture(spec, model, optimizer, step=step)
            if saver is not None:
                saver.save(state)
            else:
                save_state(state, run_dir)
            blocked.append(time.perf_counter() - t0)
    if saver is not None:
        saver.close()  # the last write is part of the run
    return time.perf_counter() - start, blocked


def loop_rows(scratch: Path, repeat: int, *, steps: int = 20, every: int = 5) -> list[Row]:
    """Rows: per-step time of each way, overheads, and background blocking vs the snapshot."""
    spec = ModelSpec()
    modes = ("none", "foreground", "background")
    totals: dict[str, list[float]] = {m: [] for m in modes}
    blocked: dict[str, list[float]] = {m: [] for m in modes}
    _loop(spec, every, every, "background", scratch)  # warm-up
    for round_ in range(repeat):
        for mode in modes[round_ % 3 :] + modes[: round_ % 3]:  # rotate the order
            seconds, waits = _loop(spec, steps, every, mode, scratch)
            totals[mode].append(seconds)
            blocked[mode] += waits
    snapshot = []
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, *spec.obs_shape))[0].sum().backward()
    optimizer.step()
    for _ in range(max(repeat, 5)):
        t0 = time.perf_counter()
        capture(spec, model, optimizer, step=1)
        snapshot.append(time.perf_counter() - t0)
    group = f"default model, batch 64, Adam, {steps} steps, checkpoint every {every}"
    base = statistics.median(totals["none"])
    rows = [
        Row(
            group=group,
            measure="no checkpoints (ms/step)",
            ours_ms=base / steps * 1e3,
            samples_ms={"none": [round(s * 1e3, 1) for s in totals["none"]]},
        )
    ]
    for mode in ("foreground", "background"):
        overhead = statistics.median(
            (t - n) / n * 100 for t, n in zip(totals[mode], totals["none"], strict=True)
        )
        rows.append(
            Row(
                group=group,
                measure=f"{mode} checkpoints (ms/step)",
                ours_ms=statistics.median(totals[mode]) / steps * 1e3,
                baseline="no checkpoints",
                baseline_ms=base / steps * 1e3,
                extra_ms=None,
                ratio=None,
                target="overhead <= 1%" if mode == "background" else None,
                met=overhead <= 1.0 if mode == "background" else None,
                samples_ms={mode: [round(s * 1e3, 1) for s in totals[mode]]},
            )
        )
        rows.append(Row(group=group, measure=f"{mode} overhead (%)", ours_ms=overhead))
    loop_block = statistics.median(blocked["background"])
    snap = statistics.median(snapshot)
    rows.append(
        Row(
            group=group,
            measure="background: loop blocked per checkpoint",
            ours_ms=loop_block * 1e3,
            baseline="capture alone (the snapshot copy)",
            baseline_ms=snap * 1e3,
            ratio=snap / loop_block,
            target="<= 1.5x the snapshot",
            met=loop_block <= 1.5 * snap,
            samples_ms={
                "blocked": [round(s * 1e3, 1) for s in blocked["background"]],
                "capture": [round(s * 1e3, 1) for s in snapshot],
            },
        )
    )
    return rows
