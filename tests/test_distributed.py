"""Replicated (DDP) training with torchrun and the gloo backend: one rank writes, every rank
resumes its own RNG streams, and a resumed 2-process run is bit-identical to a straight one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import keisei_fn as kf

LOOP = Path(__file__).with_name("ddp_loop.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(nproc: int, *args: object) -> None:
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(LOOP), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def fingerprints(out: Path, nproc: int) -> list[dict[str, object]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def saved_at_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory after a 2-rank job trained 3 of 6 steps, saved, and exited (one torchrun
    job for the module's two tests, which only read it)."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    root = tmp_path_factory.mktemp("ddp")
    torchrun(2, root / "run", root / "out", 6, 3)  # train 3 steps, save, exit
    return root / "run"


def test_two_rank_ddp_resume_is_bit_identical(tmp_path, saved_at_3):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(2, straight / "run", straight / "out", 6)
    shutil.copytree(saved_at_3, resumed / "run")
    files = sorted(p.name for p in (resumed / "run").iterdir())
    (meta,) = kf.list_checkpoints(resumed / "run")
    assert files == sorted(["checkpoint_ts3.json", meta.weights_file])  # rank 0 wrote once
    rng = kf.load_state(resumed / "run").rng
    assert rng is not None and rng["world_size"] == 2 and len(rng["ranks"]) == 2
    torchrun(2, resumed / "run", resumed / "out", 6)  # fresh processes resume at step 3
    a, b = fingerprints(straight / "out", 2), fingerprints(resumed / "out", 2)
    assert a == b  # model, optimizer and each rank's RNG streams: identical
    assert a[0]["python"] != a[1]["python"]  # the ranks really had different streams


def test_resume_with_another_world_size_reseeds_with_a_warning(saved_at_3, caplog):
    state = kf.load_state(saved_at_3)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="keisei_fn.distributed"):
        kf.restore_(state, net, optimizer)  # one process now: model and optimizer load
    assert "captured with 2 rank(s), resuming with 1" in caplog.text
    first = torch.rand(3)
    kf.restore_(state, net, optimizer)
    assert torch.equal(first, torch.rand(3))  # the reseed is deterministic
