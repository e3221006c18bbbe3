"""``migrate``: format-1 checkpoints become format 3 in place, tensors bit-identical, digests
verifying; a second run changes nothing; a dry run writes nothing; corrupt, invalid and current
checkpoints are left alone; a real process SIGKILLed mid-migration leaves every checkpoint
loadable."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from cli_inprocess import run
from fsspec.implementations.memory import MemoryFileSystem
from golden import GOLDEN_V1, GOLDEN_V2, golden_state
from kill_harness import Zygote, sigkilled
from saved_states import expected_state

import keisei_fn as kf
from keisei_fn import (
    RetentionPolicy,
    list_checkpoints,
    load_state,
    migrate,
    prune,
    save_state,
    verify_checkpoint,
)
from keisei_fn.codec import dumps, loads, only_parts
from keisei_fn.errors import CheckpointNotFoundError
from keisei_fn.meta import CheckpointMeta, digest_bytes
from keisei_fn.store import scan_run_dir
from keisei_fn.testing import assert_states_equal


def as_format_1(meta: CheckpointMeta) -> None:
    """Rewrite a format-3 checkpoint as format 1 wrote it: weights in ``<name>.safetensors``,
    no per-tensor digests, no weights file name in the sidecar (re-signed)."""
    sidecar = loads(meta.sidecar_path.read_bytes())
    meta.weights_path.rename(meta.run_dir / f"{meta.name}.safetensors")
    sidecar["format_version"] = 1
    del sidecar["weights"]["file"]
    for entry in sidecar["tensors"].values():
        del entry["digest"]
    del sidecar["digest"]
    meta.sidecar_path.write_bytes(dumps({**sidecar, "digest": digest_bytes(dumps(sidecar))}))


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_the_golden_format_1_checkpoint_migrates_bit_exactly_once(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN_V1, tmp_path, dirs_exist_ok=True)
    old = loads((tmp_path / "checkpoint_ts2048.json").read_bytes())
    done = migrate(tmp_path)
    assert [(m.name, m.status, m.from_version, m.to_version) for m in done] == [
        ("checkpoint_ts2048", "migrated", 1, 3)
    ]
    assert str(done[0]).split() == ["migrated", "checkpoint_ts2048", "format", "1", "→", "3"]
    meta = verify_checkpoint(tmp_path / "checkpoint_ts2048")  # every tensor's own digest too
    assert meta.format_version == 3 and set(meta.tensor_digests) == set(meta.tensors)
    assert sorted(files_of(tmp_path)) == sorted(["checkpoint_ts2048.json", meta.weights_file])
    loaded = load_state(tmp_path)
    assert_states_equal(golden_state(), loaded)
    assert loaded.model["w"] is loaded.model["tied"]
    partial = load_state(tmp_path, parts=["model"])  # read tensor by tensor, each verified
    assert_states_equal(only_parts(golden_state(), ["model"]), partial)
    new = loads(meta.sidecar_path.read_bytes())
    for kept in ("created", "versions", "state", "aliases", "kind", "name"):
        assert new[kept] == old[kept], kept
    assert new["migrated"]["from_format_version"] == 1
    before = files_of(tmp_path)
    again = migrate(tmp_path)
    assert [(m.status, m.from_version) for m in again] == [("current", 3)]
    assert files_of(tmp_path) == before


def test_a_dry_run_writes_nothing(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN_V1, tmp_path, dirs_exist_ok=True)
    before = files_of(tmp_path)
    assert [m.status for m in migrate(tmp_path, dry_run=True)] == ["would migrate"]
    assert files_of(tmp_path) == before


def test_current_sharded_corrupt_and_invalid_checkpoints_are_left_alone(tmp_path: Path) -> None:
    save_state(expected_state(1, 0), tmp_path)  # format 3: current
    as_format_1(save_state(expected_state(2, 0), tmp_path))
    corrupt = save_state(expected_state(3, 0), tmp_path)
    as_format_1(corrupt)
    weights = tmp_path / "checkpoint_ts3.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: listed valid, fails its digest
    weights.write_bytes(bytes(data))
    (tmp_path / "checkpoint_ts4.json").write_bytes(b"{}")  # invalid
    corrupt_files = {n: b for n, b in files_of(tmp_path).items() if "ts3" in n or "ts4" in n}
    before = files_of(tmp_path)
    dry = {m.name: m.status for m in migrate(tmp_path, dry_run=True)}  # predicts the skip
    assert dry == {
        "checkpoint_ts1": "current",
        "checkpoint_ts2": "would migrate",
        "checkpoint_ts3": "skipped",
        "checkpoint_ts4": "skipped",
    }
    assert files_of(tmp_path) == before
    done = {m.name: m for m in migrate(tmp_path)}
    assert {n: m.status for n, m in done.items()} == {
        "checkpoint_ts1": "current",
        "checkpoint_ts2": "migrated",
        "checkpoint_ts3": "skipped",
        "checkpoint_ts4": "skipped",
    }
    assert done["checkpoint_ts3"].detail.startswith("IntegrityError: ")
    assert {n: b for n, b in files_of(tmp_path).items() if "ts3" in n or "ts4" in n} == (
        corrupt_files
    )
    assert_states_equal(expected_state(2, 0), load_state(tmp_path / "checkpoint_ts2"))
    sharded = tmp_path / "sharded"
    shutil.copytree(GOLDEN_V2, sharded)
    before = {p.relative_to(sharded): p.read_bytes() for p in sharded.rglob("*") if p.is_file()}
    assert [(m.status, m.from_version) for m in migrate(sharded)] == [("current", 2)]
    assert before == {
        p.relative_to(sharded): p.read_bytes() for p in sharded.rglob("*") if p.is_file()
    }


def test_a_missing_run_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        migrate(tmp_path / "nope")


STEPS = range(1, 9)
KILLS = 5


def migrate_victim(run_dir: str) -> None:
    """The killed process: migrates the run directory (then waits to be killed)."""
    torch.set_num_threads(1)
    migrate(run_dir)
    time.sleep(60)


def _check_loadable(run_dir: Path) -> set[int]:
    """Every checkpoint is listed, verifies and loads bit-exactly; returns the formats seen."""
    metas = list_checkpoints(run_dir)
    assert [m.step for m in metas] == list(STEPS)
    for meta in metas:
        verify_checkpoint(meta.path)
        assert_states_equal(expected_state(meta.step, 0), load_state(meta.path))
    return {m.format_version for m in metas}


def test_a_migration_killed_at_random_moments_leaves_every_checkpoint_loadable(
    tmp_path: Path,
) -> None:
    template = tmp_path / "template"
    for step in STEPS:
        as_format_1(save_state(expected_state(step, 0), template))
    rng = random.Random(19)
    mixed = 0
    with Zygote("test_migrate:migrate_victim", stderr=subprocess.PIPE) as zygote:
        for kill in range(KILLS):
            run_dir = tmp_path / f"kill{kill}"
            shutil.copytree(template, run_dir)
            pid = zygote.fork(str(run_dir))
            time.sleep(rng.uniform(0.0, 0.15))
            assert sigkilled(zygote.kill(pid))
            formats = _check_loadable(run_dir)
            mixed += formats == {1, 3}
            assert {m.status for m in migrate(run_dir)} <= {"migrated", "current"}
            assert _check_loadable(run_dir) == {3}
            prune(run_dir, RetentionPolicy())  # removes what the kill left unreferenced
            scan = scan_run_dir(run_dir)
            assert not scan.leftovers and not scan.invalid and len(scan.valid) == len(STEPS)
    print(f"{mixed} of {KILLS} kills interrupted the migration between checkpoints or inside one")


def test_the_migrate_verb_and_info_show_formats_and_versions(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN_V1, tmp_path, dirs_exist_ok=True)
    info = run("info", str(tmp_path))
    assert info.returncode == 0, info.stderr
    written = "written by     keisei_fn 0.1.0, torch 2.13.0+cpu; format 1"  # the golden's writer
    assert written + "\n" in info.stdout
    dry_json = json.loads(run("migrate", str(tmp_path), "--dry-run", "--json").stdout)
    assert dry_json == {
        "run_dir": str(tmp_path),
        "dry_run": True,
        "checkpoints": [
            {
                "name": "checkpoint_ts2048",
                "status": "would migrate",
                "from_version": 1,
                "to_version": 3,
                "detail": "",
            }
        ],
    }
    dry = run("migrate", str(tmp_path), "--dry-run")
    assert (dry.returncode, dry.stdout.split()) == (
        0,
        ["would", "migrate", "checkpoint_ts2048", "format", "1", "→", "3"],
    )
    done = run("migrate", str(tmp_path))
    assert done.returncode == 0 and done.stdout.split()[:2] == ["migrated", "checkpoint_ts2048"]
    info = run("info", str(tmp_path))
    by = f"keisei_fn {kf.__version__}, torch {torch.__version__}"
    assert f"{written[:-1]}3 (migrated from format 1 by {by})\n" in info.stdout
    as_json = json.loads(run("info", str(tmp_path), "--json").stdout)
    assert as_json["format_version"] == 3 and as_json["versions"]["keisei_fn"] == "0.1.0"
    assert as_json["migrated"]["from_format_version"] == 1
    again = run("migrate", str(tmp_path))
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1] == f"{tmp_path}: nothing to migrate"
    (tmp_path / "checkpoint_ts9.json").write_bytes(b"{}")
    assert run("migrate", str(tmp_path)).returncode == 1  # a skipped checkpoint
    missing = run("migrate", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no run directory" in missing.stderr


def test_info_says_unknown_for_versions_a_sidecar_does_not_record(tmp_path: Path) -> None:
    meta = save_state(expected_state(1, 0), tmp_path)
    sidecar = loads(meta.sidecar_path.read_bytes())
    sidecar["versions"] = {"python": "3.11.7"}
    del sidecar["digest"]
    meta.sidecar_path.write_bytes(dumps({**sidecar, "digest": digest_bytes(dumps(sidecar))}))
    info = run("info", str(meta.path))
    assert "written by     keisei_fn unknown, torch unknown; format 3\n" in info.stdout


def test_a_run_directory_on_an_fsspec_file_system_migrates() -> None:
    """No lock and no rename there: the weights object is uploaded whole, then the sidecar."""
    url = f"memory://keisei-test/{uuid.uuid4().hex}"
    fs = MemoryFileSystem()
    for path in GOLDEN_V1.iterdir():
        fs.pipe(f"{url.removeprefix('memory://')}/{path.name}", path.read_bytes())
    try:
        assert [m.status for m in migrate(url)] == ["migrated"]
        meta = verify_checkpoint(f"{url}/checkpoint_ts2048")
        assert meta.format_version == 3
        assert_states_equal(golden_state(), load_state(url))
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False)) == sorted(
            ["checkpoint_ts2048.json", meta.weights_file]
        )
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)
