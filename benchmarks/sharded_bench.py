"""Sharded saves of FSDP2 training: ``save_sharded`` with 2 processes against 1.

``python -m benchmarks.sharded_bench [--repeat N] [--model default] [--dir DIR]`` launches
``torch.distributed.run --standalone`` with 1 and then 2 CPU processes (gloo, one thread
each). Every process builds the model under FSDP2 ``fully_shard``, takes one Adam step, then
times ``save_sharded`` ``N`` times after one warm-up save (each into a fresh run directory,
removed between rounds outside the timing). The 1-process job also times ``save_state`` of the
same network unsharded (one file), as a reference. Medians and ratios are printed; the two
launches run one after the other, so their ratio is a ratio of medians, not paired rounds.

``sharded_rows`` returns the same figures as ``benchmarks.cases.Row`` values, for a
``sharded`` section of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _worker(out: Path, scratch: Path, repeat: int, model_name: str) -> None:
    """One process of a torchrun job: time ``save_sharded`` (and, alone, ``save_state``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from benchmarks import cases
    from keisei_fn import build_model, save_state
    from keisei_fn.store.sharded import save_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        spec = cases.MODELS[model_name]
        mesh = init_device_mesh("cpu", (world,))
        model = build_model(spec, seed=0)
        for block in model.res_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        logits, value = model(torch.randn(2, *spec.obs_shape))
        (logits.logsumexp(-1).mean() + value.square().mean()).backward()
        optimizer.step()

        run_dir = scratch / f"sharded{world}"
        seconds: list[float] = []
        size = 0
        for round_ in range(repeat + 1):  # round 0 warms up
            gc.collect()
            dist.barrier()
            start = time.perf_counter()
            meta = save_sharded(model, optimizer, run_dir, step=round_ + 1, spec=spec)
            elapsed = time.perf_counter() - start  # save_sharded ends in a collective
            size = meta.weights_size
            if round_:
                seconds.append(elapsed)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(run_dir)
            dist.barrier()
        result: dict[str, Any] = {"world": world, "bytes": size, "save_sharded": seconds}
        if world == 1:  # the same network unsharded, saved as one file
            state = cases.trained(spec).state
            single = scratch / "single"
            result["save_state"] = []
            for round_ in range(repeat + 1):
                gc.collect()
                start = time.perf_counter()
                save_state(state, single)
                elapsed = time.perf_counter() - start
                if round_:
                    result["save_state"].append(elapsed)
                shutil.rmtree(single)
        if rank == 0:
            out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_job(nproc: int, scratch: Path, repeat: int, model: str) -> dict[str, Any]:
    """Launch one torchrun job and return rank 0's timings."""
    out = scratch / f"result{nproc}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "benchmarks.sharded_bench",
        "--worker",
        str(out),
        str(scratch),
        str(repeat),
        model,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} processes failed:\n{result.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def measure(scratch: Path, repeat: int, model: str) -> dict[int, dict[str, Any]]:
    """Timings of the 1-process and the 2-process job."""
    return {nproc: run_job(nproc, scratch, repeat, model) for nproc in (1, 2)}


def sharded_rows(scratch: Path, repeat: int, model: str = "default") -> list[Any]:
    """``benchmarks.cases.Row`` values: 2 processes against 1, and 1 against save_state."""
    from benchmarks.cases import Row

    found = measure(scratch, repeat, model)
    one, two = found[1]["save_sharded"], found[2]["save_sharded"]
    single = found[1]["save_state"]
    group = f"{model} FSDP2 ({found[1]['bytes'] / 1e6:.3g} MB)"
    return [
        Row(
            group=group,
            measure="save_sharded, 2 processes",
            ours_ms=_median_ms(two),
            baseline="save_sharded, 1 process",
            baseline_ms=_median_ms(one),
            ratio=_median_ms(one) / _median_ms(two),
            samples_ms={"2 processes": [s * 1e3 for s in two], "1 process": [s * 1e3 for s in one]},
        ),
        Row(
            group=group,
            measure="save_sharded, 1 process",
            ours_ms=_median_ms(one),
            baseline="save_state (one file)",
            baseline_ms=_median_ms(single),
            ratio=_median_ms(single) / _median_ms(one),
            samples_ms={
                "1 process": [s * 1e3 for s in one],
                "save_state": [s * 1e3 for s in single],
            },
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Measure and print."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--worker"]:
        out, scratch, repeat, model = args[1:5]
        _worker(Path(out), Path(scratch), int(repeat), model)
        # Skip interpreter finalization: gloo's threads can abort it even after
        # destroy_process_group (pytorch/pytorch#190489); the results are written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_bench", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="timed saves per job (default 5)")
    parser.add_argument("--model", default="default", help="test, default or large")
    parser.add_argument("--dir", type=Path, help="scratch parent (default: the system temp dir)")
    options = parser.parse_args(args)
    scratch = Path(tempfile.mkdtemp(prefix="keisei-sharded-", dir=options.dir))
    try:
        found = measure(scratch, options.repeat, options.model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    one, two = found[1]["save_sharded"], found[2]["save_sharded"]
    single = found[1]["save_state"]
    print(f"model {options.model}: {found[1]['bytes'] / 1e6:.1f} MB of shards + state per save")
    print(f"save_state, one file, 1 process:  median {_median_ms(single):8.1f} ms")
    print(f"save_sharded, 1 process:          median {_median_ms(one):8.1f} ms")
    print(f"save_sharded, 2 processes:        median {_median_ms(two):8.1f} ms")
    print(f"ratio 1 process / 2 processes:    {_median_ms(one) / _median_ms(two):.2f}x")
    print(f"ratio save_state / save_sharded(1): {_median_ms(single) / _median_ms(one):.2f}x")
    for name, seconds in (("1 process", one), ("2 processes", two), ("save_state", single)):
        print(f"  {name}: " + ", ".join(f"{s * 1e3:.0f}" for s in seconds) + " ms")


if __name__ == "__main__":
    main()
