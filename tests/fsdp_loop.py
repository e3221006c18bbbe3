"""FSDP2 (``fully_shard``) jobs on CPU with gloo for tests/test_sharded.py, under torchrun.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N tests/fsdp_loop.py \
    MODE RUN_DIR OUT_DIR

Modes:
    save: train the test network 2 steps, save_sharded (step 2), train 1 more, save_sharded
        (step 3) and dump the full state at that moment as a single-file checkpoint in
        OUT_DIR/reference (through an unsharded copy and keisei_fn.capture: the layout capture
        gives); then, in the same job: load step 3 into a fresh FSDP model (OUT_DIR/loaded2),
        and load a copy with one corrupted shard byte (OUT_DIR/corrupt_run), explicitly and as
        a run directory. Each rank writes what it saw to OUT_DIR/rank{r}.json.
    load: load RUN_DIR's latest sharded checkpoint into a fresh FSDP model on any number of
        ranks (resharding) and dump its full state to OUT_DIR/loaded{N}.
    kill: save step 1, train, then save step 2 while the rank named by the environment variable
        KEISEI_TEST_KILL_RANK kills itself (SIGKILL) after its shard is written, before the
        sidecar (the hook is patched in here, never in the library).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchrun_exit import run_then_exit

import keisei_fn as kf
from keisei_fn.errors import IntegrityError
from keisei_fn.store import sharded, sharded_save

SPEC = kf.ModelSpec(model_type="testmodel")
KILL_ENV = "KEISEI_TEST_KILL_RANK"  # read here only
STATS = kf.GameStats(black_wins=2, white_wins=1, draws=1)
EPISODES = 7
Job = tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


def extra() -> dict[str, Any]:
    return {
        "elo_state": {"black_rating": 1512.5, "rating_history": [1500.0, float("nan")]},
        "table": torch.arange(6, dtype=torch.int16).reshape(2, 3),
    }


def build(mesh: DeviceMesh, seed: int) -> Job:
    model = kf.build_model(SPEC, seed=seed)
    for block in model.res_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(job: Job, steps: int) -> None:
    model, optimizer, scheduler = job
    for _ in range(steps):
        x = torch.randn(4, 46, 9, 9)  # each rank its own batch (seeded by rank)
        logits, value = model(x)
        loss = logits.logsumexp(-1).mean() + value.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def save(job: Job, run_dir: Path, step: int) -> kf.CheckpointMeta:
    model, optimizer, scheduler = job
    return sharded.save_sharded(
        model,
        optimizer,
        run_dir,
        step=step,
        spec=SPEC,
        episodes=EPISODES,
        stats=STATS,
        extra=extra(),
        scheduler=scheduler,
    )


def dump(job: Job, out: Path, step: int) -> None:
    """The job's full state (model, optimizer, scheduler), as capture gives it for the
    unsharded network, saved as a single-file checkpoint (rank 0's: a collective)."""
    model, optimizer, scheduler = job
    options = StateDictOptions(full_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    plain = kf.build_model(SPEC, seed=99)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.StepLR(plain_optimizer, step_size=2)  # adds "initial_lr"
    # default options: with full_state_dict=True set_state_dict turns Adam's betas into a list
    set_state_dict(
        plain, plain_optimizer, model_state_dict=model_state, optim_state_dict=optim_state
    )
    state = kf.capture(
        SPEC,
        plain,
        plain_optimizer,
        scheduler=scheduler,
        step=step,
        episodes=EPISODES,
        stats=STATS,
        extra=extra(),
        rng=False,
    )
    kf.save_state(state, out)


def corrupt_copy(run_dir: Path, target: Path) -> str:
    """Copy checkpoints 2 and 3 to ``target``, flip one data byte of 3's second shard."""
    target.mkdir(parents=True)
    broken = ""
    for step in (2, 3):
        sidecar = run_dir / f"checkpoint_ts{step}.json"
        shards = json.loads(sidecar.read_bytes())["shards"]["dir"]
        shutil.copytree(run_dir / shards, target / shards)
        shutil.copy2(sidecar, target / sidecar.name)
        if step == 3:
            victim = target / shards / "shard-00002-model-00001-of-00001.safetensors"
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0x01
            victim.write_bytes(bytes(data))
            broken = victim.name
    return broken


def save_mode(mesh: DeviceMesh, run_dir: Path, out: Path, rank: int) -> dict[str, Any]:
    job = build(mesh, seed=0)
    train(job, 2)
    save(job, run_dir, 2)
    train(job, 1)
    rng_at_save = torch.get_rng_state()
    meta = save(job, run_dir, 3)
    dump(job, out / "reference", 3)
    torch.rand(7)  # move the RNG on: the load must put it back

    fresh = build(mesh, seed=1)
    loaded = sharded.load_sharded_(fresh[0], fresh[1], meta.path, scheduler=fresh[2])
    report: dict[str, Any] = {
        "saved": meta.name,
        "loaded": loaded.name,
        "same_meta": loaded.digest == meta.digest,
        "rng_restored": torch.equal(torch.get_rng_state(), rng_at_save),
    }
    dump(fresh, out / "loaded2", 3)

    broken = ""
    if rank == 0:
        broken = corrupt_copy(run_dir, out / "corrupt_run")
    dist.barrier()
    try:
        sharded.load_sharded_(fresh[0], fresh[1], out / "corrupt_run" / "checkpoint_ts3")
        report["corrupt"] = None
    except IntegrityError as exc:
        report["corrupt"] = {"type": type(exc).__name__, "message": str(exc)}
    report["broken"] = broken
    fallback = sharded.load_sharded_(fresh[0], fresh[1], out / "corrupt_run")
    report["fallback_step"] = fallback.step
    return report


def load_mode(mesh: DeviceMesh, run_dir: Path, out: Path, world: int) -> dict[str, Any]:
    job = build(mesh, seed=1)
    meta = sharded.load_sharded_(job[0], job[1], run_dir, scheduler=job[2])
    dump(job, out / f"loaded{world}", meta.step)
    return {"loaded": meta.name}


def kill_mode(mesh: DeviceMesh, run_dir: Path, rank: int) -> dict[str, Any]:
    job = build(mesh, seed=0)
    train(job, 1)
    save(job, run_dir, 1)
    train(job, 1)
    if os.environ.get(KILL_ENV) == str(rank):

        def killed(path: Path) -> tuple[int, str]:  # hashing the shard it has just written
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")

        sharded_save.hash_file = killed  # type: ignore[assignment]
    save(job, run_dir, 2)
    return {"survived": True}


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the value head's view
    mode, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(1000 + rank)  # different batches and RNG streams per rank
        mesh = init_device_mesh("cpu", (world,))
        if mode == "save":
            report = save_mode(mesh, run_dir, out, rank)
        elif mode == "load":
            report = load_mode(mesh, run_dir, out, world)
        elif mode == "kill":
            report = kill_mode(mesh, run_dir, rank)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    finally:  # a process group left alive at exit can abort the interpreter
        dist.destroy_process_group()


if __name__ == "__main__":
    run_then_exit(main)
