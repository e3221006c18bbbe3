"""Sharded FSDP2 checkpoints (keisei_fn.store.sharded) with torchrun, gloo and CPU processes.

One 2-rank job trains the test network under ``fully_shard``, saves two sharded checkpoints,
dumps its full state, reloads on 2 ranks and meets a corrupted shard; one 3-rank job reloads
(resharding); killed-rank jobs check the commit protocol. Full states are compared bit-exactly
(dtype, shape, raw bytes) with keisei_fn.testing.assert_states_equal. See tests/fsdp_loop.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_inprocess import run as run_cli
from saved_states import raw

import keisei_fn as kf
from keisei_fn.errors import IncompleteCheckpointError, IntegrityError
from keisei_fn.store import sharded
from keisei_fn.store.convert import consolidate
from keisei_fn.store.listing import read_listed, scan_run_dir
from keisei_fn.store.weights import read_weights
from keisei_fn.testing import assert_states_equal

LOOP = Path(__file__).with_name("fsdp_loop.py")
SHARD = "shard-{:05d}-model-00001-of-00001.safetensors"


def torchrun(
    nproc: int, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(LOOP),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=180,  # a hang fails the test instead of blocking the suite
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def reports(out: Path, mode: str, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the 2-rank save job, then the 3-rank load job, once for this module."""
    root = tmp_path_factory.mktemp("sharded")
    run, out = root / "run", root / "out"
    succeeded(torchrun(2, "save", run, out))
    three = torchrun(3, "load", run, out)
    succeeded(three)
    return {"run": run, "out": out, "three_stderr": three.stderr}


def test_save_on_2_then_load_on_1_2_and_3_ranks_is_bit_exact(jobs):
    run, out = jobs["run"], jobs["out"]
    reference = kf.load_state(out / "reference")  # the 2-rank job's full state when saving
    assert reference.step == 3 and reference.spec == kf.ModelSpec(model_type="testmodel")

    one = kf.load_state(run)  # one process, no process group: the latest, in full
    assert_states_equal(reference, one.replace(rng=None))
    assert isinstance(one.optimizer["param_groups"][0]["betas"], tuple)
    assert one.rng is not None and one.rng["world_size"] == 2
    ranks = one.rng["ranks"]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank's own stream

    for nproc in (2, 3):  # loaded into fresh FSDP models, gathered back to full state dicts
        assert_states_equal(reference, kf.load_state(out / f"loaded{nproc}"))
    assert all(r["loaded"] == "checkpoint_ts3" for r in reports(out, "load", 3))

    same = reports(out, "save", 2)
    assert all(r["same_meta"] and r["rng_restored"] for r in same)  # 2 → 2: RNG restored
    assert "captured with 2 rank(s), resuming with 3" in jobs["three_stderr"]  # 2 → 3: reseeded


def test_sidecar_records_the_sharded_layout(jobs):
    run = jobs["run"]
    meta, sidecar = read_listed(run / "checkpoint_ts3")
    assert meta.format_version == sidecar["format_version"] == 2
    assert sidecar["layout"] == "sharded" and sidecar["shards"]["world_size"] == 2
    shards = run / sidecar["shards"]["dir"]
    assert shards.name.startswith("checkpoint_ts3.") and shards.name.endswith(".shards")
    files = sidecar["shards"]["files"]
    assert sorted(files) == [SHARD.format(1), SHARD.format(2), "state.safetensors"]
    for name, record in files.items():
        assert (shards / name).stat().st_size == record["size"]
        assert record["digest"].startswith("blake3:")
    assert meta.weights_size == sum(r["size"] for r in files.values())
    # full (unsharded) dtype and shape of every tensor
    assert sidecar["tensors"]["model/policy_head.4.weight"] == {
        "dtype": "F32",
        "shape": [13527, 162],
    }
    assert sidecar["tensors"]["optimizer/state/value_head.4.bias/exp_avg"]["shape"] == [1]
    assert sidecar["tensors"]["rng/ranks/1/torch"]["dtype"] == "U8"
    # the store lists, verifies and picks it as latest like any checkpoint
    scan = scan_run_dir(run)
    assert not scan.invalid and not scan.leftovers and not scan.unreadable
    assert [(m.name, m.sharded, m.world_size) for m in scan.valid] == [
        ("checkpoint_ts2", True, 2),
        ("checkpoint_ts3", True, 2),
    ]
    assert meta.weights_path == shards == kf.latest_checkpoint(run)
    assert kf.verify_checkpoint(shards) == kf.verify_checkpoint(run / "checkpoint_ts3.json") == meta


def test_consolidate_gives_a_single_file_checkpoint_for_load_model(jobs, tmp_path):
    meta = consolidate(jobs["run"] / "checkpoint_ts3.json", tmp_path / "single")
    assert (meta.name, meta.format_version, meta.kind) == ("checkpoint_ts3", 3, "periodic")
    assert_states_equal(kf.load_state(jobs["run"]), kf.load_state(tmp_path / "single"))
    model, loaded = kf.load_model(tmp_path / "single")  # one CPU, no process group
    assert loaded.name == "checkpoint_ts3"
    expected, found = kf.load_state(jobs["out"] / "reference").model, model.state_dict()
    assert list(found) == list(expected)
    for key, tensor in expected.items():
        assert (found[key].dtype, found[key].shape) == (tensor.dtype, tensor.shape), key
        assert torch.equal(raw(found[key]), raw(tensor)), key
    with pytest.raises(kf.errors.SpecError, match="another run directory"):
        consolidate(jobs["run"], jobs["run"])


def test_a_corrupt_shard_raises_integrity_error_on_every_rank(jobs, tmp_path):
    seen = reports(jobs["out"], "save", 2)
    broken = next(r["broken"] for r in seen if r["broken"])
    assert broken == SHARD.format(2)
    for report in seen:  # rank 1 hashed it; rank 0 raises the same error, naming the file
        assert report["corrupt"]["type"] == "IntegrityError"
        assert broken in report["corrupt"]["message"]
        assert report["fallback_step"] == 2  # a run directory falls back past it
    corrupt = jobs["out"] / "corrupt_run"
    with pytest.raises(IntegrityError, match=re.escape(broken)):
        kf.load_state(corrupt / "checkpoint_ts3")
    assert kf.load_state(corrupt).step == 2


def test_nothing_pickled_is_written(jobs):
    run = jobs["run"]
    for path in sorted(run.rglob("*")):
        if path.is_dir():
            assert path.name.endswith(".shards") and path.parent == run
            continue
        data = path.read_bytes()
        assert path.suffix in (".json", ".safetensors"), path
        assert ".metadata" not in path.name and not path.name.startswith(".")
        if path.suffix == ".json":
            json.loads(data)
            continue
        # a safetensors file, checked strictly: an 8-byte header length, a JSON header, then
        # tensors tiling the rest exactly. (Its first byte alone proves nothing: a header
        # length of 128 + 256·k bytes starts with b"\x80", pickle's PROTO opcode.)
        header_len = int.from_bytes(data[:8], "little")
        assert data[8:9] == b"{" and json.loads(data[8 : 8 + header_len])
        tensors = read_weights(path, size=len(data), digest=None)
        assert tensors
        assert b"torch._utils" not in data[: 8 + header_len]


@pytest.mark.parametrize("killed", [0, 1])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_latest(tmp_path, killed):
    run, out = tmp_path / "run", tmp_path / "out"
    result = torchrun(2, "kill", run, out, env={"KEISEI_TEST_KILL_RANK": str(killed)})
    assert result.returncode != 0  # torchrun reports the killed rank and stops the other
    assert "SIGKILL" in result.stderr
    sidecars = sorted(p.name for p in run.glob("*.json"))
    assert sidecars == ["checkpoint_ts1.json"]  # step 2 never committed
    referenced = json.loads((run / "checkpoint_ts1.json").read_bytes())["shards"]["dir"]
    half = list(run.glob("checkpoint_ts2.*.shards"))
    assert all(p.name != referenced for p in half)
    if killed == 0:  # nobody was left to clean up: the half-written shards stay, unreferenced
        assert len(half) == 1 and (half[0] / SHARD.format(1)).exists()
        with pytest.raises(IncompleteCheckpointError, match="never committed"):
            read_listed(run / "checkpoint_ts2")
    state = kf.load_state(run)  # the latest is still step 1, and it loads
    assert state.step == 1 and state.rng is not None and state.rng["world_size"] == 2


# --- one process, no process group (a plain model): the same code path, quickly -------------


def plain_job(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = kf.build_model(kf.ModelSpec(model_type="testmodel"), seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 46, 9, 9))[0].sum().backward()
    optimizer.step()
    return model, optimizer


def test_one_process_round_trip_matches_capture(tmp_path):
    spec = kf.ModelSpec(model_type="testmodel")
    model, optimizer = plain_job()
    extra = {"elo_state": {"k_factor": 32.0}, "ids": torch.arange(3)}
    expected = kf.capture(spec, model, optimizer, step=5, extra=extra)
    meta = sharded.save_sharded(model, optimizer, tmp_path, step=5, spec=spec, extra=extra)
    assert meta.format_version == 2 and meta.step == 5
    assert_states_equal(expected, kf.load_state(tmp_path / "checkpoint_ts5"))

    fresh, fresh_optimizer = plain_job(seed=1)
    torch.rand(3)  # the load puts the RNG back where it was when saving
    assert sharded.load_sharded_(fresh, fresh_optimizer, tmp_path).step == 5
    assert_states_equal(expected, kf.capture(spec, fresh, fresh_optimizer, step=5, extra=extra))


def test_load_sharded_is_a_deprecated_alias_of_load_sharded_(tmp_path):
    model, optimizer = plain_job()
    sharded.save_sharded(model, optimizer, tmp_path, step=5)
    fresh, fresh_optimizer = plain_job(seed=1)
    with pytest.warns(DeprecationWarning, match=r"load_sharded is deprecated.*load_sharded_") as w:
        meta = kf.load_sharded(fresh, fresh_optimizer, tmp_path, rng=False)
    assert w[0].filename == __file__  # points at the caller
    assert meta.step == 5 and sharded.load_sharded.__name__ == "load_sharded"
    assert_states_equal(
        kf.capture(None, model, optimizer, step=5), kf.capture(None, fresh, fresh_optimizer, step=5)
    )


def test_one_process_errors(tmp_path):
    model, optimizer = plain_job()
    meta = sharded.save_sharded(model, optimizer, tmp_path, step=5)
    with pytest.raises(kf.errors.CheckpointExistsError):
        sharded.save_sharded(model, optimizer, tmp_path, step=5)
    old = next(tmp_path.glob("*.shards"))
    again = sharded.save_sharded(model, optimizer, tmp_path, step=5, overwrite=True)
    assert again.digest != meta.digest and not old.exists()  # a fresh directory; old removed
    with pytest.raises(kf.errors.SpecError):
        sharded.save_sharded(model, optimizer, tmp_path, step=0)

    other = torch.nn.Linear(2, 2)  # does not fit: every kind of problem summarised
    with pytest.raises(kf.errors.StateMismatchError) as failure:
        sharded.load_sharded_(other, None, tmp_path)
    assert str(failure.value) == (
        "checkpoint checkpoint_ts5 does not fit the live objects:\n"
        "  - 2 tensors in the model are not in the checkpoint: 'weight', 'bias'\n"
        "  - 39 tensors in the checkpoint are not in the model: 'stem.weight', 'stem.bias', "
        "'bn_stem.weight' and 36 more"
    )
    narrow = kf.build_model(kf.ModelSpec(model_type="testmodel", num_actions=8))
    with pytest.raises(kf.errors.StateMismatchError) as failure:
        sharded.load_sharded_(narrow, torch.optim.Adam(narrow.parameters()), tmp_path)
    lines = str(failure.value).splitlines()
    assert lines[1] == (  # the model's differences summarised, then the optimizer's, each
        "  - 2 tensors have other shapes: 'policy_head.4.weight' (the checkpoint has "
        "float32[13527, 162], the model float32[8, 162]), 'policy_head.4.bias' (the checkpoint "
        "has float32[13527], the model float32[8])"
    )
    assert lines[2] == (
        "  - 'optimizer/state/policy_head.4.bias/exp_avg': checkpoint has float32[13527], "
        "live float32[8]"
    )
    assert len(lines) == 6

    sidecar = tmp_path / "checkpoint_ts5.json"
    edited = sidecar.read_bytes().replace(b'"episodes":0', b'"episodes":1')
    sidecar.write_bytes(edited)
    with pytest.raises(IntegrityError, match="modified"):
        kf.load_state(sidecar)

    single = tmp_path / "single"
    kf.save_state(kf.capture(None, model, optimizer, step=7), single)
    with pytest.raises(kf.errors.UnsupportedFormatError, match="single-file"):
        sharded.load_sharded_(model, optimizer, single / "checkpoint_ts7")
    with pytest.raises(kf.errors.CheckpointNotFoundError, match="no valid sharded"):
        sharded.load_sharded_(model, optimizer, single)  # no sharded checkpoint in the run dir


def test_prune_and_resume_treat_sharded_checkpoints_like_any_other(tmp_path):
    model, optimizer = plain_job()
    run = tmp_path / "run"
    for step in (3, 5):
        sharded.save_sharded(model, optimizer, run, step=step)
    orphan = run / "checkpoint_ts4.0badc0de.shards"  # a save killed before its sidecar
    orphan.mkdir()
    (orphan / SHARD.format(1)).write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    os.utime(orphan, (hours_ago, hours_ago))  # abandoned
    pending = run / "checkpoint_ts2.0badc0de.shards"  # young: maybe a save in progress
    pending.mkdir()
    assert scan_run_dir(run).leftovers == [orphan]
    plan = kf.prune(run, kf.RetentionPolicy(keep_last=1))
    assert set(plan.delete) == {"checkpoint_ts3", orphan.name}
    assert sorted(p.name for p in run.iterdir() if p != pending) == sorted(
        ["checkpoint_ts5.json", kf.latest_checkpoint(run).name]
    )
    resumed = kf.resume(tmp_path / "run" / "child")  # copied from the parent, shards and all
    assert resumed is not None and resumed.state.step == 5
    assert kf.list_checkpoints(run / "child")[0].sharded


def test_cli_and_publish_on_a_sharded_run(tmp_path):
    spec = kf.ModelSpec(model_type="testmodel")
    model, optimizer = plain_job()
    sharded.save_sharded(model, optimizer, tmp_path / "run", step=5, spec=spec)

    listed = run_cli("ls", "--verify", tmp_path / "run")
    assert listed.returncode == 0 and "periodic (1 shards)" in listed.stdout
    assert "verified" in listed.stdout
    assert run_cli("verify", tmp_path / "run").returncode == 0
    done = run_cli("consolidate", tmp_path / "run", tmp_path / "single")
    assert done.returncode == 0, done.stderr
    loaded, meta = kf.load_model(tmp_path / "single")
    assert meta.name == "checkpoint_ts5" and not meta.sharded
    assert_states_equal(kf.capture(spec, model, step=5), kf.capture(spec, loaded, step=5))
    result = kf.publish(tmp_path / "run" / "checkpoint_ts5", run_name="r", run=object())
    assert result.status == "failed" and "consolidate" in result.reason


def test_grad_scaler_state_is_saved_and_restored(tmp_path):
    model, optimizer = plain_job()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(1))  # the scale exists once something was scaled
    scaler.update(new_scale=512.0)
    sharded.save_sharded(model, optimizer, tmp_path, step=5, scaler=scaler)
    assert kf.load_state(tmp_path).scaler == scaler.state_dict()
    fresh_model, fresh_optimizer = plain_job(seed=1)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    sharded.load_sharded_(fresh_model, fresh_optimizer, tmp_path, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0


def test_verify_checks_every_file_without_loading(tmp_path):
    model, optimizer = plain_job()
    meta = sharded.save_sharded(model, optimizer, tmp_path, step=5)
    assert kf.verify_checkpoint(tmp_path / "checkpoint_ts5") == meta
    shard = meta.weights_path / SHARD.format(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=re.escape(SHARD.format(1))):
        kf.verify_checkpoint(meta.path)
    (meta.weights_path / "extra.safetensors").write_bytes(b"")  # DCP would read it: refused
    assert kf.list_checkpoints(tmp_path) == []


def test_a_shards_directory_names_its_checkpoint_only_when_committed(tmp_path):
    model, optimizer = plain_job()
    meta = sharded.save_sharded(model, optimizer, tmp_path, step=5)
    latest = kf.latest_checkpoint(tmp_path)
    assert latest == meta.weights_path
    assert kf.load_state(latest).step == 5 and kf.verify_checkpoint(latest) == meta
    assert kf.resume(tmp_path, resume=latest).state.step == 5
    stale = tmp_path / "checkpoint_ts5.0badc0de.shards"  # an uncommitted save of that step
    stale.mkdir()
    with pytest.raises(IncompleteCheckpointError, match="never committed"):
        kf.load_state(stale)
    done = run_cli("verify", latest)
    assert done.returncode == 0 and "ok  checkpoint_ts5" in done.stdout
