"""``keisei_fn.testing.assert_resume_equivalent`` and the ``keisei_fn`` pytest plugin.

The resume check must pass on a correct loop (in this process and in a fresh one) and catch
real resume bugs, each failure naming the step and the entries that differ. The loops live in
``resume_loops`` so a fresh process can import them.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import resume_loops as loops
import torch
from hypothesis import settings

from keisei_fn import list_checkpoints
from keisei_fn.errors import SpecError
from keisei_fn.testing import assert_resume_equivalent, plugin

STEPS, RESUME_AT = 6, 3


def check(setup: Any, step_fn: Any, run_dir: Path, *, fresh: bool = False) -> None:
    assert_resume_equivalent(
        setup,
        step_fn,
        total_steps=STEPS,
        resume_at=RESUME_AT,
        run_dir=run_dir,
        fresh_process=fresh,
    )


# --- a correct loop passes ------------------------------------------------------------------


@pytest.mark.parametrize("setup", [loops.setup_adam, loops.setup_sgd, loops.setup_plain])
def test_a_correct_loop_passes_in_process(setup: Any, tmp_path: Path) -> None:
    check(setup, loops.train_step, tmp_path)
    (meta,) = [m for m in list_checkpoints(tmp_path) if m.name == f"checkpoint_ts{RESUME_AT}"]
    assert meta.weights_path.exists()


def test_a_correct_loop_passes_in_a_fresh_process(tmp_path: Path) -> None:
    check(loops.setup_adam, loops.train_step, tmp_path, fresh=True)


def test_the_callers_threads_and_rngs_are_left_alone(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    random.seed(7)
    expected = random.random()
    random.seed(7)
    torch.set_num_threads(2)
    try:
        check(loops.setup_plain, loops.train_step, tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert random.random() == expected


# --- real bugs are caught, naming the step and the entries --------------------------------


def test_catches_a_scheduler_built_in_the_step_closure(tmp_path: Path) -> None:
    scheduler: Any = None

    def step_fn(model: Any, optimizer: Any, _scheduler: Any, scaler: Any, step: int) -> None:
        nonlocal scheduler  # bug: setup() does not return it, so no checkpoint holds it
        if scheduler is None or scheduler.optimizer is not optimizer:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5**e)
        loops.train_step(model, optimizer, scheduler, scaler, step)

    with pytest.raises(AssertionError) as failure:
        check(loops.setup_plain, step_fn, tmp_path)
    message = str(failure.value)
    assert "diverged from the straight run at step 3 (the first step after the resume)" in message
    assert "optimizer['param_groups'][0]['lr']: straight 6.25e-05, resumed 0.0005" in message
    assert "model['stem.weight']: tensor float32[16, 46, 3, 3], the bytes differ" in message
    assert "the final states differ" in message


def test_catches_a_lazily_built_scheduler_in_a_fresh_process(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        check(loops.setup_plain, loops.lazy_scheduler_step, tmp_path, fresh=True)
    message = str(failure.value)
    assert "(in a fresh process) is not exact" in message
    assert "diverged from the straight run at step 3" in message
    assert "optimizer['param_groups'][0]['lr']" in message
    assert "model['stem.weight']" in message


@pytest.mark.parametrize("fresh", [False, True])
def test_catches_noise_from_a_module_level_generator(fresh: bool, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        check(loops.setup_adam, loops.module_rng_step, tmp_path, fresh=fresh)
    message = str(failure.value)
    assert "not reproducible: two runs from seed 0 diverged at step 0" in message
    assert "model['stem.weight']: tensor float32[16, 46, 3, 3], the bytes differ" in message


@pytest.mark.parametrize("fresh", [False, True])
def test_catches_a_step_writing_into_the_restored_state(fresh: bool, tmp_path: Path) -> None:
    # VisitCounts adopts the loaded tensor, so its in-place update writes into the snapshot;
    # the runs stay equivalent, only the snapshot check can see it.
    with pytest.raises(AssertionError) as failure:
        check(loops.setup_counting, loops.train_step, tmp_path, fresh=fresh)
    message = str(failure.value)
    assert "step 3 of the resumed run wrote into the TrainState it was restored from" in message
    assert "model['visits.counts']: tensor float32[32], the bytes differ" in message
    assert "diverged" not in message


def test_a_failure_in_the_fresh_process_is_reported(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"(?s)failed in the fresh process.*needs pytest"):
        check(loops.setup_under_pytest_only, loops.train_step, tmp_path, fresh=True)


# --- misuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda: loops.setup_plain(), "a lambda or a local function"),
        (functools.partial(loops.setup_plain), "it has no module and qualified name"),
    ],
)
def test_fresh_process_needs_importable_functions(setup: Any, problem: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=problem):
        check(setup, loops.train_step, tmp_path, fresh=True)
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize(("total", "resume_at"), [(3, 0), (3, 3), (3, 4)])
def test_resume_at_must_lie_inside_the_run(total: int, resume_at: int, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="0 < resume_at < total_steps"):
        assert_resume_equivalent(
            loops.setup_plain,
            loops.train_step,
            total_steps=total,
            resume_at=resume_at,
            run_dir=tmp_path,
        )


def test_setup_must_return_four_objects(tmp_path: Path) -> None:
    def setup() -> Any:
        return loops.setup_plain()[:2]

    with pytest.raises(SpecError, match=r"must return \(model, optimizer, scheduler, scaler\)"):
        check(setup, loops.train_step, tmp_path)


# --- the pytest plugin ----------------------------------------------------------------------


@pytest.fixture
def restore_hypothesis_profile() -> Any:
    previous = settings.get_current_profile_name()
    yield
    settings.load_profile(previous)


@pytest.mark.usefixtures("restore_hypothesis_profile")
def test_plugin_loads_the_profile_the_environment_names(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugin.PROFILE_ENV, "keisei-ci")
    plugin.pytest_configure(request.config)
    assert settings.get_current_profile_name() == "keisei-ci"
    assert settings().max_examples == 40
    assert settings().derandomize


@pytest.mark.usefixtures("restore_hypothesis_profile")
@pytest.mark.parametrize("value", [None, "dev", "keisei-nope"])
def test_plugin_leaves_other_profiles_alone(
    value: str | None, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv(plugin.PROFILE_ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.PROFILE_ENV, value)
    before = settings.get_current_profile_name()
    plugin.pytest_configure(request.config)
    assert settings.get_current_profile_name() == before
    assert settings.get_profile("keisei-dev").max_examples == 25  # registered all the same


def _run_pytest(tmp_path: Path, test: str, *args: str, env: dict[str, str], code: str) -> str:
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(test))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **env}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-c", code, "-p", "keisei_fn.testing.plugin", *args, "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


_PYTEST = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"

_WITHOUT_HYPOTHESIS = """
import sys

class BlockHypothesis:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hypothesis", "_hypothesis_pytestplugin"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockHypothesis())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_plugin_works_without_hypothesis(tmp_path: Path) -> None:
    test = """
        import pytest

        def test_probe(request):
            assert request.config.pluginmanager.has_plugin("keisei_fn.testing.plugin")
            with pytest.raises(ImportError):
                import hypothesis
    """
    out = _run_pytest(
        tmp_path,
        test,
        "-p",
        "no:cacheprovider",
        env={plugin.PROFILE_ENV: "keisei-ci"},
        code=_WITHOUT_HYPOTHESIS,
    )
    assert "1 passed" in out


def test_an_explicit_hypothesis_profile_option_wins(tmp_path: Path) -> None:
    test = """
        from hypothesis import settings

        def test_probe():
            assert settings.get_current_profile_name() == "keisei-dev"
    """
    out = _run_pytest(
        tmp_path,
        test,
        "-p",
        "no:cacheprovider",
        "-p",
        "_hypothesis_pytestplugin",
        "--hypothesis-profile=keisei-dev",
        env={plugin.PROFILE_ENV: "keisei-ci"},
        code=_PYTEST,
    )
    assert "1 passed" in out
