"""The GPU section: snapshots, background checkpoints, loads and memory on CUDA.

Skipped, saying why, where torch sees no GPU. Everything runs on the default model (13.2 M
parameters) with Adam after real steps at batch 256, against baselines measured in the same run:

- snapshot: how long ``capture`` (into ``AsyncSaver.staging``'s page-locked buffers) blocks the
  caller, vs the same tensors' non-blocking device-to-host copies into preallocated page-locked
  memory alone (target <= 1.2x);
- loop: a training loop with an ``AsyncSaver`` checkpoint every 5 steps vs none, time to the last
  step's completion (the final write's wait left out; back-pressure waits counted): target
  overhead <= 1%;
- load: ``load_state(map_location="cuda")`` vs ``torch.load(weights_only=True,
  map_location="cuda")`` of the same tensors (target >= 3x faster), and vs one page-locked
  host-to-device copy of the same bytes (the limit);
- memory: the peak GPU memory a capture + background save adds (target: none).

``python -m benchmarks --sections gpu`` runs it with the others; ``python -m benchmarks.gpu
[--quick] [--out FILE]`` runs it alone, importing nothing the other sections need (s3fs, ...):
what ``make gpu-check`` runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.cases import Row, clear, compared, scratch_dir
from benchmarks.timing import measure_rounds
from keisei_fn import AsyncSaver, ModelSpec, build_model, capture, load_state, save_state
from keisei_fn.codec import encode_state
from keisei_fn.staging import PinnedBuffers

BATCH = 256


def no_gpu() -> str | None:
    """Why the GPU section cannot run here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no GPU"
    return None


def gpu_rows(scratch: Path, repeat: int, *, steps: int = 50, every: int = 5) -> list[Row]:
    """Every row of the GPU section (none, with a message on stderr, without a GPU)."""
    why = no_gpu()
    if why is not None:
        print(f"gpu section skipped: {why}", file=sys.stderr, flush=True)
        return []
    spec = ModelSpec()
    model, optimizer, obs = _trained(spec)
    group = f"default model, Adam, {torch.cuda.get_device_name()}"
    rows = _snapshot_rows(group, spec, model, optimizer, repeat)
    rows += _memory_rows(group, spec, model, optimizer, scratch)
    rows += _load_rows(group, spec, model, optimizer, scratch, repeat)
    del model, optimizer, obs
    rows += _loop_rows(group, spec, scratch, repeat, steps, every)
    return rows


def _trained(spec: ModelSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    model = build_model(spec, seed=0, device="cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    obs = torch.randn(BATCH, *spec.obs_shape, device="cuda")
    _step(model, optimizer, obs)
    torch.cuda.synchronize()
    return model, optimizer, obs


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, obs: torch.Tensor) -> None:
    logits, value = model(obs)
    optimizer.zero_grad(set_to_none=True)
    (logits.logsumexp(-1).mean() + value.square().mean()).backward()
    optimizer.step()


def _cuda_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = [t for t in model.state_dict().values() if t.is_cuda]
    for entries in optimizer.state.values():
        found += [v for v in entries.values() if isinstance(v, torch.Tensor) and v.is_cuda]
    return found


def _snapshot_rows(
    group: str,
    spec: ModelSpec,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    repeat: int,
) -> list[Row]:
    live = _cuda_tensors(model, optimizer)
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in live]
    staging = PinnedBuffers()

    def snapshot() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        state = capture(spec, model, optimizer, step=1, staging=staging)
        elapsed = time.perf_counter() - start
        del state  # its buffer is free for the next round, as after a write
        return elapsed

    def copy_alone() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for host, tensor in zip(pinned, live, strict=True):
            host.copy_(tensor, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    label = "pinned D2H copy of the same tensors alone"
    samples = measure_rounds({"capture (blocking)": snapshot, label: copy_alone}, repeat=repeat)
    row = compared(group, samples, "capture (blocking)", label)
    slowdown = 1 / row.ratio if row.ratio else float("inf")
    return [replace(row, target="<= 1.2x the copy's time", met=slowdown <= 1.2)]


def _memory_rows(
    group: str,
    spec: ModelSpec,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scratch: Path,
) -> list[Row]:
    run_dir = scratch / "memory"
    run_dir.mkdir()
    with AsyncSaver(run_dir) as saver:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        saver.save(capture(spec, model, optimizer, step=1, staging=saver.staging))
        saver.wait()
        added = torch.cuda.max_memory_allocated() - before
    clear(run_dir)
    return [
        Row(
            group=group,
            measure="peak GPU memory added by capture + background save (MB)",
            ours_ms=added / 1e6,
            baseline="allocated before the save (MB)",
            baseline_ms=before / 1e6,
            target="no increase",
            met=added == 0,
        )
    ]


def _load_rows(
    group: str,
    spec: ModelSpec,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scratch: Path,
    repeat: int,
) -> list[Row]:
    run_dir = scratch / "load"
    run_dir.mkdir()
    state = capture(spec, model, optimizer, step=1)
    save_state(state, run_dir)
    tensors = encode_state(state).tensors
    pt = scratch / "tensors.pt"
    torch.save(tensors, pt)
    nbytes = sum(t.nbytes for t in tensors.values())
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def timed(load: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = load()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        del result
        return elapsed

    ours = "load_state(map_location='cuda')"
    library = "torch.load(weights_only=True, map_location='cuda')"
    limit = "one pinned H2D copy of the same bytes"
    samples = measure_rounds(
        {
            ours: lambda: timed(lambda: load_state(run_dir, map_location="cuda")),
            library: lambda: timed(lambda: torch.load(pt, weights_only=True, map_location="cuda")),
            limit: lambda: timed(lambda: device.copy_(host, non_blocking=True)),
        },
        repeat=repeat,
    )
    clear(run_dir)
    return [
        compared(group, samples, ours, library, minimum=3.0),
        compared(group, samples, ours, limit),
    ]


def _loop(spec: ModelSpec, steps: int, every: int, background: bool, run_dir: Path) -> float:
    """Seconds to the last step's completion (the final write's wait left out)."""
    torch.manual_seed(0)
    model = build_model(spec, seed=0, device="cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    obs = torch.randn(BATCH, *spec.obs_shape, device="cuda")
    clear(run_dir)
    with AsyncSaver(run_dir) as saver:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            _step(model, optimizer, obs)
            if background and step % every == 0:
                saver.save(capture(spec, model, optimizer, step=step, staging=saver.staging))
        torch.cuda.synchronize()
        return time.perf_counter() - start


def _loop_rows(
    group: str, spec: ModelSpec, scratch: Path, repeat: int, steps: int, every: int
) -> list[Row]:
    run_dir = scratch / "loop"
    run_dir.mkdir()
    _loop(spec, every, every, True, run_dir)  # warm-up: kernels, buffers
    totals: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(repeat):
        for background in (round_ % 2 == 0, round_ % 2 == 1):  # alternate the order
            totals[background].append(_loop(spec, steps, every, background, run_dir))
    clear(run_dir)
    overhead = statistics.median(
        (b - n) / n * 100 for b, n in zip(totals[True], totals[False], strict=True)
    )
    base = statistics.median(totals[False]) / steps * 1e3
    group = f"{group}, batch {BATCH}, {steps} steps, checkpoint every {every}"
    return [
        Row(
            group=group,
            measure="background checkpoints (ms/step)",
            ours_ms=statistics.median(totals[True]) / steps * 1e3,
            baseline="no checkpoints",
            baseline_ms=base,
            target="overhead <= 1%",
            met=overhead <= 1.0,
            samples_ms={
                "background": [round(s * 1e3, 1) for s in totals[True]],
                "none": [round(s * 1e3, 1) for s in totals[False]],
            },
        ),
        Row(group=group, measure="background overhead (%)", ours_ms=overhead),
    ]


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.gpu``: the GPU section alone, as a table and a JSON file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 20 loop steps")
    parser.add_argument("--out", type=Path, help="JSON results file (default: none)")
    args = parser.parse_args(argv)
    repeat, steps = (3, 20) if args.quick else (7, 50)
    with scratch_dir(Path(tempfile.gettempdir())) as scratch:
        rows = gpu_rows(scratch, repeat, steps=steps)
    print(report.rows_table(rows))
    if args.out is not None:
        settings = {"repeat": repeat, "steps": steps, "sections": ["gpu"]}
        environment = report.environment(scratch.parent)
        report.write_json(args.out, {"environment": environment, "settings": settings}, rows)


if __name__ == "__main__":
    main()
