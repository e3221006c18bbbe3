"""Run directories on object storage: every store function on fsspec URLs.

Each test runs twice: on ``memory://`` (fsspec's in-process filesystem) and on ``s3://`` against
a real SeaweedFS server on loopback (the ``s3_url`` fixture of conftest.py), reached through
s3fs configured the standard AWS way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import gc
import io
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout

import fsspec
import fsspec.config
import pytest
import torch
import upath.registry
from cli_inprocess import run as run_cli
from fsspec.implementations.memory import MemoryFileSystem
from kill_harness import Log, Zygote, read_log, sigkilled
from saved_states import raw_bytes
from upath.implementations.memory import MemoryPath

from keisei_fn import (
    AsyncSaver,
    Checkpointer,
    ModelSpec,
    RetentionPolicy,
    TrainState,
    build_model,
    capture,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_state,
    prune,
    resume,
    save_final_model,
    save_state,
    verify_checkpoint,
)
from keisei_fn.cli import main as cli_main
from keisei_fn.errors import IntegrityError
from keisei_fn.paths import is_remote, run_path
from keisei_fn.store import (
    _fs,
    append_ledger,
    pending_publications,
    read_ledger,
    retention,
    scan_run_dir,
)
from keisei_fn.testing import assert_states_equal

SPEC = ModelSpec(model_type="testmodel")


@pytest.fixture(params=["memory", "s3"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty run directory URL on each backend."""
    if request.param == "s3":
        yield request.getfixturevalue("s3_url")
        return
    root = f"keisei-test/{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = MemoryFileSystem()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def trained_state(step: int, *, seed: int = 0):
    """Keisei's test network and Adam after one real step: a 26 MB checkpoint."""
    torch.manual_seed(seed)
    model = build_model(SPEC, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, *SPEC.obs_shape)
    policy, value = model(x)
    (policy.logsumexp(-1).sum() + value.sum()).backward()
    optimizer.step()
    return capture(SPEC, model, optimizer, step=step, extra={"loss": float(step)})


def objects(url: str) -> list[str]:
    """Names of the objects directly under a URL, as the filesystem lists them."""
    return sorted(_fs.list_file_names(run_path(url)))


def test_round_trip_is_bit_exact_and_paths_stay_urls(url: str) -> None:
    state = trained_state(10)
    meta = save_state(state, url)
    assert is_remote(meta.path) and str(meta.weights_path) == f"{url}/{meta.weights_file}"
    assert re.fullmatch(r"checkpoint_ts10\.[0-9a-f]+\.safetensors", meta.weights_file)
    assert objects(url) == sorted(["checkpoint_ts10.json", meta.weights_file])  # no temps
    assert_states_equal(load_state(url), state)
    assert verify_checkpoint(f"{url}/checkpoint_ts10.json") == meta
    model, loaded_meta = load_model(url)
    assert loaded_meta == meta
    for key, tensor in model.state_dict().items():
        expected = state.model[key]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape)
        assert raw_bytes(tensor) == raw_bytes(expected)
    assert save_state(state, url) == meta  # identical re-save: nothing written
    final = save_final_model(state, url)
    assert load_model(url)[1] == final


def test_latest_list_prune_and_resume(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    metas = {step: save_state(trained_state(step, seed=step), url) for step in (10, 20, 30)}
    assert str(latest_checkpoint(url)) == f"{url}/{metas[30].weights_file}"
    assert [m.step for m in list_checkpoints(url)] == [10, 20, 30]
    # An upload cut off after the weights (no sidecar) is never latest, and pruning removes it
    # (on an object store once it is older than ABANDONED_AFTER_SECONDS: 0 here).
    weights = run_path(url) / "checkpoint_ts40.0123456789abcdef.safetensors"
    weights.fs.pipe_file(weights.path, b"partial upload")
    assert str(latest_checkpoint(url)) == f"{url}/{metas[30].weights_file}"
    assert scan_run_dir(url).leftovers == [weights]
    monkeypatch.setattr(retention, "ABANDONED_AFTER_SECONDS", 0.0)
    plan = prune(url, RetentionPolicy(keep_last=1))
    assert set(plan.delete) == {"checkpoint_ts10", "checkpoint_ts20", weights.name}
    assert objects(url) == sorted(["checkpoint_ts30.json", metas[30].weights_file])
    resumed = resume(url)
    assert resumed is not None and resumed.state.step == 30
    assert str(resumed.path) == f"{url}/{metas[30].weights_file}"


def test_a_corrupt_newest_checkpoint_falls_back(url: str, caplog: pytest.LogCaptureFixture) -> None:
    save_state(trained_state(10), url)
    newest = save_state(trained_state(20, seed=1), url)
    data = bytearray(_fs.read_bounded(newest.weights_path, limit=1 << 30))
    data[-1] ^= 0x01  # same size: listed-valid, fails verification
    _fs.write_bytes_durably(newest.weights_path, bytes(data))
    with pytest.raises(IntegrityError, match="digest"):
        verify_checkpoint(newest.path)
    assert load_state(url).step == 10
    assert "falling back" in caplog.text


def test_resume_copies_the_parents_latest_into_an_empty_run_dir(url: str) -> None:
    state = trained_state(10)
    meta = save_state(state, url)
    resumed = resume(f"{url}/child")
    assert resumed is not None and str(resumed.path) == f"{url}/child/{meta.weights_file}"
    assert str(resumed.copied_from) == f"{url}/{meta.weights_file}"
    assert_states_equal(resumed.state, state)


def test_the_publication_ledger_appends_without_append(url: str) -> None:
    meta = save_state(trained_state(10), url)
    record = {"artifact": "a", "digest": meta.weights_digest, "checkpoint": meta.name}
    append_ledger(url, {"event": "pending", **record})
    ledger = run_path(url) / "publications.jsonl"
    ledger.fs.pipe_file(ledger.path, _fs.read_bounded(ledger, limit=1 << 20) + b'{"torn')
    append_ledger(url, {"event": "published", **record})
    assert [r["event"] for r in read_ledger(url)] == ["pending", "published"]
    assert pending_publications(url) == {}


def test_loop_helpers_on_a_url(url: str) -> None:
    """Checkpointer (with retention) and AsyncSaver take URLs like paths."""
    checkpointer = Checkpointer(run_dir=url, interval=10, retention=RetentionPolicy(keep_last=1))
    last = 0
    for step in (10, 20):
        result = checkpointer.maybe_save(trained_state(step), step=step, last_saved=last)
        assert result.status == "saved", result.reason
        last = result.last_saved
    assert [m.step for m in list_checkpoints(url)] == [20]
    with AsyncSaver(url) as saver:
        meta = saver.save(trained_state(30)).wait()
    assert verify_checkpoint(meta.path) == meta


def test_cli_ls_and_verify_on_a_url(url: str) -> None:
    save_state(trained_state(10), url)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["ls", "--verify", url]) == 0
        assert cli_main(["verify", url]) == 0
    assert "checkpoint_ts10" in out.getvalue() and "verified" in out.getvalue()


# --- retries and failed uploads (fsspec's memory filesystem with injected faults) ------------


class FlakyMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem whose whole-object writes fail the first ``failures`` times,
    and whose streamed uploads can be cut off after ``cut_after`` bytes."""

    protocol = "flakymem"
    failures = 0
    cut_after: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flakymem://", "memory://", 1))

    def pipe_file(self, path, value, **kwargs):
        if FlakyMemoryFileSystem.failures > 0:
            FlakyMemoryFileSystem.failures -= 1
            raise ConnectionResetError(104, "connection reset by peer")
        return super().pipe_file(path, value, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        if "w" in mode and FlakyMemoryFileSystem.cut_after is not None:
            limit, write = FlakyMemoryFileSystem.cut_after, file.write

            def cut_write(data):
                if file.tell() + len(data) > limit:
                    raise ConnectionResetError(104, "connection reset mid-upload")
                return write(data)

            file.write = cut_write
        return file


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    upath.registry.register_implementation("flakymem", MemoryPath, clobber=True)
    monkeypatch.setattr(_fs, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(FlakyMemoryFileSystem, "failures", 0)
    monkeypatch.setattr(FlakyMemoryFileSystem, "cut_after", None)
    root = f"flaky/{uuid.uuid4().hex}"
    yield f"flakymem://{root}"
    fs = MemoryFileSystem()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_transient_errors_are_retried(flaky: str) -> None:
    FlakyMemoryFileSystem.failures = len(_fs.RETRY_DELAYS)  # the sidecar upload fails twice
    meta = save_state(trained_state(10), flaky)
    assert FlakyMemoryFileSystem.failures == 0
    assert verify_checkpoint(meta.path) == meta


def test_persistent_errors_surface_and_commit_nothing(flaky: str) -> None:
    meta = save_state(trained_state(10), flaky)
    FlakyMemoryFileSystem.failures = len(_fs.RETRY_DELAYS) + 1
    with pytest.raises(ConnectionResetError):
        save_state(trained_state(20, seed=1), flaky)
    assert [m.step for m in list_checkpoints(flaky)] == [10]
    assert objects(flaky) == sorted(["checkpoint_ts10.json", meta.weights_file])


def test_an_upload_cut_off_midway_commits_nothing(flaky: str) -> None:
    meta = save_state(trained_state(10), flaky)
    FlakyMemoryFileSystem.cut_after = 5 << 20
    with pytest.raises(ConnectionResetError, match="mid-upload"):
        save_state(trained_state(20, seed=1), flaky)
    FlakyMemoryFileSystem.cut_after = None
    assert latest_checkpoint(flaky).name == meta.weights_file
    assert load_state(flaky).step == 10


# --- S3 only: real processes --------------------------------------------------------------


def killed_saver(url: str, log_path: str, environ: dict[str, str]) -> None:
    """A victim (forked by the ``saver_zygote``) in the test's environment, as a fresh process
    started by the test would be: saves 16 MiB states (a multipart upload each), step after
    step, logging each save that returned, until it is killed."""
    os.environ.clear()
    os.environ.update(environ)
    fsspec.config.conf.pop("s3", None)  # read from FSSPEC_S3_* at import, as s3_url clears it
    log = Log(log_path)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 1000):
        big = torch.randn(4 << 20, generator=gen)  # 16 MiB: a multipart upload each time
        save_state(TrainState(spec=None, step=step, model={"w": big}), url)
        log("saved", step, 0)


@pytest.fixture(scope="module")
def saver_zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One zygote (torch, keisei_fn and s3fs imported once) forks every ``killed_saver``."""
    stderr_path = tmp_path_factory.mktemp("zygote") / "stderr"
    with (
        open(stderr_path, "w") as stderr,
        Zygote("test_object_store:killed_saver", stderr=stderr, preload=("s3fs",)) as zygote,
    ):
        yield zygote


@pytest.mark.parametrize("kill_after_saves", [1, 2, 3])
def test_s3_process_killed_during_upload_leaves_no_bad_latest(
    s3_url: str,
    kill_after_saves: int,
    monkeypatch: pytest.MonkeyPatch,
    saver_zygote: Zygote,
    tmp_path,
) -> None:
    """SIGKILL a process in the middle of an upload: whatever latest_checkpoint returns loads."""
    log = tmp_path / "log"
    pid = saver_zygote.fork(s3_url, str(log), dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while len(read_log(log)) < kill_after_saves:
            assert time.monotonic() < deadline, f"{read_log(log)} after 120 s"
            time.sleep(0.005)
        time.sleep(0.05 * kill_after_saves)  # somewhere inside the next upload
    finally:
        status = saver_zygote.kill(pid)
    assert sigkilled(status), f"the saver ended by itself (wait status {status})"
    latest = latest_checkpoint(s3_url)
    assert latest is not None
    state = load_state(latest)
    assert state.step >= kill_after_saves
    listed = [m.step for m in list_checkpoints(s3_url)]
    assert listed == list(range(1, len(listed) + 1)) and state.step == listed[-1]
    # the killed save's weights, if uploaded whole, are a leftover once abandoned (0 s here)
    monkeypatch.setattr(retention, "ABANDONED_AFTER_SECONDS", 0.0)
    prune(s3_url, RetentionPolicy(keep_last=1))
    assert objects(s3_url) == sorted([f"checkpoint_ts{state.step}.json", latest.name])


def test_s3_cli_in_a_fresh_process(s3_url: str, tmp_path) -> None:
    """The command line reaches S3 from the standard AWS environment variables alone: ls in a
    fresh ``python -m keisei_fn`` process (nothing configured but its environment), then
    verify, prune, info and publish (W&B offline) on the s3:// run directory, run in this
    process (``cli_inprocess``; s3fs's cached clients are dropped first)."""
    import s3fs

    save_state(trained_state(10), s3_url)
    save_state(trained_state(20, seed=1), s3_url)
    fresh = subprocess.run(
        [sys.executable, "-m", "keisei_fn", "ls", "--verify", s3_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert "verified" in fresh.stdout and "checkpoint_ts20" in fresh.stdout, fresh.stdout
    s3fs.S3FileSystem.clear_instance_cache()
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    for args, expected in (
        (["verify", s3_url], "ok       checkpoint_ts20"),
        (["prune", s3_url, "--keep-last", "1"], "checkpoint_ts10"),
        (["info", f"{s3_url}/checkpoint_ts20"], "checkpoint_ts20"),
        (["publish", f"{s3_url}/checkpoint_ts20", "--run-name", "r"], "published"),
    ):
        done = run_cli(*args, env=wandb)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout
    assert [m.step for m in list_checkpoints(s3_url)] == [20]
    assert [r["event"] for r in read_ledger(s3_url)] == ["pending", "published"]


def test_s3_prune_aborts_abandoned_multipart_uploads(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload whose process died is invisible but holds storage: prune aborts it once it is
    older than ABANDONED_AFTER_SECONDS, and leaves younger ones (a save in progress) alone."""
    meta = save_state(trained_state(10), s3_url)
    directory = run_path(s3_url)
    fs, bucket = directory.fs, directory.path.strip("/").split("/", 1)[0]
    weights = "checkpoint_ts20.0123456789abcdef.safetensors"
    key = f"{directory.path.strip('/').split('/', 1)[1]}/{weights}"
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)  # its process died
    fs.call_s3(
        "upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x"
    )

    def open_uploads() -> list[str]:
        prefix = directory.path.strip("/").split("/", 1)[1] + "/"
        return [u["Key"] for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith(prefix)]

    assert len(open_uploads()) == 1
    assert str(latest_checkpoint(s3_url)).endswith(f"/{meta.weights_file}")
    assert prune(s3_url, RetentionPolicy(keep_last=1)).delete == ()  # young: left alone
    assert len(open_uploads()) == 1
    monkeypatch.setattr(_fs, "ABANDONED_AFTER_SECONDS", 0.0)
    plan = prune(s3_url, RetentionPolicy(keep_last=1))
    assert plan.delete == (f"{weights} (incomplete upload)",)
    assert open_uploads() == []
    assert objects(s3_url) == sorted(["checkpoint_ts10.json", meta.weights_file])


def test_s3_an_interrupted_multipart_upload_is_aborted(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of a multipart upload: aborted, never completed, nothing visible."""
    from keisei_fn.store import weights

    meta = save_state(TrainState(spec=None, step=1, model={"w": torch.zeros(4)}), s3_url)
    pieces = weights._pieces

    def interrupted(chunks):
        for number, piece in enumerate(pieces(chunks)):
            if number == 8:  # 64 MiB in: s3fs has started a multipart upload (50 MiB blocks)
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(weights, "_pieces", interrupted)
    big = TrainState(spec=None, step=2, model={"w": torch.ones(20 << 20)})  # 80 MiB
    with pytest.raises(KeyboardInterrupt):
        save_state(big, s3_url)
    directory = run_path(s3_url)
    bucket, prefix = directory.path.strip("/").split("/", 1)
    uploads = directory.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    assert not uploads.get("Uploads")
    assert objects(s3_url) == sorted(["checkpoint_ts1.json", meta.weights_file])
    gc.collect()  # the abandoned file object must not complete the upload when collected
    assert objects(s3_url) == sorted(["checkpoint_ts1.json", meta.weights_file])


def test_a_run_dir_emptied_of_every_object_lists_as_empty(url: str) -> None:
    """SeaweedFS keeps listing an emptied prefix as a directory (for about two minutes)."""
    save_state(trained_state(10), url)
    directory = run_path(url)
    _fs.remove_durably(*(directory / name for name in objects(url)))
    assert objects(url) == [] and list_checkpoints(url) == [] and latest_checkpoint(url) is None
    assert save_state(trained_state(20), url).step == 20
