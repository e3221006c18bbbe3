"""What a second new-user trial found: values that print a screenful, object-store client
errors as tracebacks, USI's ``startpos``, and retention flags that silently do nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import keisei_fn as kf
from keisei_fn.cli import main

SPEC = kf.ModelSpec(model_type="testmodel")


def saved_run(run_dir: Path, steps: tuple[int, ...] = (100, 200)) -> kf.TrainState:
    model = kf.build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters())
    state = kf.capture(SPEC, model, optimizer, step=steps[0], extra={"elo": 1500.0})
    for step in steps:
        kf.save_state(state.replace(step=step), run_dir)
    return state


def test_values_print_one_line_in_a_repl(tmp_path: Path) -> None:
    state = saved_run(tmp_path / "run")
    for value in (state, kf.list_checkpoints(tmp_path / "run"), kf.load_state(tmp_path / "run")):
        text = repr(value)
        assert "tensor(" not in text and len(text) < 1000, text[:300]
    assert repr(state).startswith("TrainState(step=100, spec=ModelSpec(")
    assert "extra keys=['elo']" in repr(state)
    (first, _) = kf.list_checkpoints(tmp_path / "run")
    assert repr(first).startswith("CheckpointMeta(name='checkpoint_ts100', kind='periodic'")


def test_a_resume_says_where_it_came_from(tmp_path: Path) -> None:
    saved_run(tmp_path)
    adopted = kf.resume(tmp_path / "child")
    assert adopted is not None
    text = str(adopted)
    assert text.startswith("resumed at step 200 from ") and "parent directory's" in text
    assert "<p>resumed at step 200" in adopted._repr_html_()
    assert len(repr(adopted)) < 1500


def test_object_store_client_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s3fs = pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["ls", "s3://my-bucket/runs/x"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err
    assert err.startswith("keisei-fn: error: NoCredentialsError") and err.count("\n") == 1, err


def test_analyze_takes_usis_startpos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved_run(tmp_path)
    assert main(["analyze", str(tmp_path), "startpos", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1" in out
    assert "black to move" in out


def test_prune_flags_that_would_do_nothing_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved_run(tmp_path)
    assert main(["prune", str(tmp_path), "--keep-daily", "1", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "add --keep-last 0" in captured.err and "UserWarning" not in captured.err
    assert "would delete" not in captured.out
    with pytest.raises(SystemExit) as exited:
        main(["prune", str(tmp_path), "--keep-last", "0", "--keep-within", "6"])
    assert exited.value.code == 2 and "a number and a unit" in capsys.readouterr().err
