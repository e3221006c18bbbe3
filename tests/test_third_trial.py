"""What a third new-user trial (of soups, growing, compat, export bundles and matches) found:
a bundle given where a checkpoint is needed, a test model that cannot grow, and ``prune`` on a
bundle that printed nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_inprocess import run

import keisei_fn as kf
from keisei_fn.errors import UnsupportedFormatError

SPEC = kf.ModelSpec(model_type="testmodel")


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with two checkpoints and a final model, and its float32 bundle."""
    root = tmp_path_factory.mktemp("trial")
    state = kf.capture(SPEC, kf.build_model(SPEC, seed=0), step=100)
    for step in (100, 200):
        kf.save_state(state.replace(step=step), root / "runs/demo")
    kf.save_final_model(state.replace(step=200), root / "runs/demo")
    kf.export_model(root / "runs/demo", root / "bundles/f32", dtype="float32")
    return root


@pytest.mark.parametrize(
    "verb",
    [
        ("compat", "{b}", "--model", "testmodel"),
        ("grow", "{b}", "{root}/grown", "--tower-depth", "2"),
        ("average", "{b}", "{b}", "{root}/soup"),
        ("diff", "{b}", "{root}/runs/demo"),
        ("publish", "{b}", "--run-name", "x"),
    ],
    ids=lambda verb: verb[0],
)
def test_a_bundle_where_a_checkpoint_is_needed_says_so(demo_like: Path, verb: tuple[str]) -> None:
    bundle = demo_like / "bundles/f32"
    args = [arg.format(b=bundle, root=demo_like) for arg in verb]
    result = run(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "is an export bundle" in line and "not a checkpoint" in line, line
    assert "keisei-fn info" in line, line  # where to find its source checkpoint
    assert "keisei_fn.checkpoint sidecar" not in line


def test_the_python_api_refuses_a_bundle_with_the_same_words(demo_like: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="is an export bundle"):
        kf.check_compatible(demo_like / "bundles/f32", SPEC)


def test_growing_a_test_model_says_it_cannot_grow(demo_like: Path) -> None:
    result = run("grow", demo_like / "runs/demo", demo_like / "big", "--tower-depth", "3")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "testmodel" in line and "cannot grow" in line and "resnet" in line, line
    assert "larger than now" not in line  # 3 > 1 is larger: the old advice was wrong here
    assert not (demo_like / "big").exists()


def test_prune_on_a_bundle_is_a_user_error(demo_like: Path) -> None:
    result = run("prune", demo_like / "bundles/f32", "--keep-last", "1", "--dry-run")
    assert result.returncode == 2
    assert "is an export bundle, not a run directory" in result.stderr
    assert kf.load_model(demo_like / "bundles/f32")[1].step == 200


def test_verify_names_an_unhealthy_checkpoint_that_is_intact(tmp_path: Path) -> None:
    state = kf.capture(SPEC, kf.build_model(SPEC, seed=0), step=1)
    kf.save_state(state, tmp_path, health=())
    kf.save_state(state.replace(step=2), tmp_path, health=("non_finite: model w has 1 NaN",))
    result = run("verify", tmp_path)
    assert result.returncode == 0, result.stdout  # its files are intact: verify is integrity
    assert result.stdout.splitlines() == [
        "ok       checkpoint_ts1",
        "ok       checkpoint_ts2  (UNHEALTHY: non_finite: never resumed or published)",
    ]


def test_an_ema_prints_one_line_in_a_repl() -> None:
    ema = kf.ema_init(kf.build_model(SPEC, seed=0), decay=0.99)
    text = repr(ema)
    assert "tensor(" not in text and len(text) < 200, text[:300]
    assert text == f"EMA(decay=0.99, updates=0, {len(ema.tensors)} tensors, 8.9 MB)"


def test_load_state_of_a_bundle_directory_says_it_is_a_bundle(demo_like: Path) -> None:
    for source in ("bundles/f32", "bundles/f32/bundle.json"):
        with pytest.raises(UnsupportedFormatError, match="is an export bundle"):
            kf.load_state(demo_like / source)  # was: "no checkpoint at bundles/f32"


def test_usi_on_a_path_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    # as every command: one line, exit 2, before any USI exchange (it waited for isready)
    result = run("usi", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"keisei-fn: error: no checkpoint at {tmp_path}/nope"]


def test_cli_errors_name_what_the_user_typed(demo_like: Path) -> None:
    demo = demo_like / "runs/demo"
    match = run("match", demo, demo, "--playouts", "-1", "--out", demo_like / "m")
    assert match.returncode == 2
    assert match.stderr.strip().endswith("playouts must be ints >= 0, got -1"), match.stderr
    one = run("average", demo / "checkpoint_ts100", demo_like / "one")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("averaged 1 checkpoint → "), one.stdout


def test_validate_names_a_few_broken_tensors_and_counts_the_rest() -> None:
    model = kf.build_model(SPEC, seed=0)
    for parameter in model.parameters():
        parameter.data.fill_(float("nan"))
    problems = kf.validate_model(model).problems
    assert len(problems) <= 8 and sum(len(p) for p in problems) < 600, problems
    assert problems[0] == "stem.weight has 6624 non-finite values of 6624"
    assert problems[5].startswith("and ") and problems[5].endswith(" more tensors are not finite")


def test_a_save_handle_says_what_it_saved(tmp_path: Path) -> None:
    model = kf.build_model(SPEC, seed=0)
    with kf.AsyncSaver(tmp_path, health=True) as saver:
        handle = saver.save(kf.capture(SPEC, model, step=1))
        handle.wait()
        for parameter in model.parameters():
            parameter.data.fill_(float("nan"))
        broken = saver.save(kf.capture(SPEC, model, step=2))
        broken.wait()
    assert repr(handle) == "SaveHandle(step=1, saved checkpoint_ts1)"
    assert repr(broken) == "SaveHandle(step=2, saved checkpoint_ts2, UNHEALTHY: non_finite)"
