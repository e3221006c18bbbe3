"""Exact-resume equivalence: a resumed run must match the straight run, bit for bit.

:func:`assert_resume_equivalent` trains a loop straight through, trains it again to the resume
point, saves a checkpoint, restores it into freshly built objects (optionally in a new process)
and finishes the run; it fails naming the first step at which the runs diverged and the first
entries (tensors, hyper-parameters, RNG states) that differ.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keisei_fn.capture import Scheduler, capture, restore_
from keisei_fn.errors import SpecError
from keisei_fn.paths import PathArg, RunPath
from keisei_fn.rng import capture_rng, restore_rng_
from keisei_fn.state import TrainState
from keisei_fn.store import load_state, save_state
from keisei_fn.testing.assertions import assert_states_equal

__all__ = ["Loop", "Setup", "StepFn", "assert_resume_equivalent"]

#: What ``setup()`` returns: ``(model, optimizer, scheduler or None, scaler or None)``.
Loop = tuple[nn.Module, torch.optim.Optimizer, Scheduler | None, torch.amp.GradScaler | None]
#: Builds a loop's objects from nothing.
Setup = Callable[[], Loop]
#: Runs one training step: ``step_fn(model, optimizer, scheduler, scaler, step)``.
StepFn = Callable[
    [nn.Module, torch.optim.Optimizer, Scheduler | None, torch.amp.GradScaler | None, int], object
]
#: Entry path (e.g. ``model['stem.weight']``) → a description that differs iff the entry does.
Fingerprint = dict[str, str]

_SHOWN = 8  # differing entries listed per section
_FINAL_LINES = 6  # lines of assert_states_equal's message quoted
_RESUMED_PREFIX = "resumed_ts"
_TENSOR = "tensor "  # how a tensor's description starts


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class _Resumed:
    """The resumed half of a run: per-step fingerprints, the final state and, if a step wrote
    into the TrainState the run was restored from, that step and what changed."""

    fingerprints: list[Fingerprint]
    final: TrainState
    wrote_into: tuple[int, list[str]] | None


def assert_resume_equivalent(
    setup: Setup,
    step_fn: StepFn,
    *,
    total_steps: int,
    resume_at: int,
    run_dir: str | os.PathLike[str],
    fresh_process: bool = False,
    seed: int = 0,
) -> None:
    """Assert that resuming a training loop from a checkpoint changes nothing, bit for bit.

    Seeds Python's, NumPy's and torch's global RNGs with ``seed``, builds the loop with
    ``setup()`` and runs ``step_fn`` for steps ``0 .. total_steps - 1`` (the straight run). Then,
    from the same seed, runs steps ``0 .. resume_at - 1``, captures the state (RNGs included) at
    step ``resume_at``, saves it to ``run_dir``, loads it, re-seeds, restores it into a fresh
    ``setup()`` (in a new process when ``fresh_process``) and runs the remaining steps. After
    every step both runs take a fingerprint of the model, optimizer, scheduler, scaler and RNG
    states; the final states must be bit-identical (dtype, shape and bytes of every tensor),
    and no step of the resumed run may write into the TrainState it was restored from.

    torch runs single-threaded throughout (CPU reductions are not bit-stable across processes
    with several threads); the caller's thread count and global RNG states are restored after.

    Args:
        setup: builds ``(model, optimizer, scheduler, scaler)`` from nothing (scheduler and
            scaler may be None). Everything a step depends on must come from here or from the
            global RNGs: that is all a checkpoint holds.
        step_fn: runs one training step, ``step_fn(model, optimizer, scheduler, scaler, step)``
            with the 0-based step index; it may use the global RNGs, dropout, autocast.
        total_steps: steps of the whole run.
        resume_at: steps completed at the checkpoint, ``0 < resume_at < total_steps``.
        run_dir: where the checkpoint ``checkpoint_ts<resume_at>`` is written (replacing one of
            that name).
        fresh_process: resume in a new Python process, like a real restart; ``setup`` and
            ``step_fn`` must then be module-level functions of an importable module.
        seed: the global RNG seed (``0 <= seed < 2**32``).

    Raises:
        AssertionError: when the runs diverge (naming the first step and the entries that
            differ), when a resumed step wrote into the restored TrainState, or when the
            resumed run failed in the fresh process.
        SpecError: for ``resume_at`` out of range, a ``setup`` that does not return four
            objects, or (with ``fresh_process``) a callable a new process cannot import.

    Example:
        >>> import tempfile, torch
        >>> def setup():
        ...     model = torch.nn.Linear(3, 1)
        ...     return model, torch.optim.Adam(model.parameters()), None, None
        >>> def step_fn(model, optimizer, scheduler, scaler, step):
        ...     optimizer.zero_grad()
        ...     model(torch.randn(4, 3)).sum().backward()
        ...     optimizer.step()
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     assert_resume_equivalent(
        ...         setup, step_fn, total_steps=3, resume_at=1, run_dir=run_dir
        ...     )
    """
    if not 0 < resume_at < total_steps:
        raise SpecError(
            f"assert_resume_equivalent needs 0 < resume_at < total_steps, got "
            f"resume_at={resume_at}, total_steps={total_steps}"
        )
    names = (
        (_import_name(setup, "setup"), _import_name(step_fn, "step_fn")) if fresh_process else None
    )
    threads = torch.get_num_threads()
    caller_rng = capture_rng()
    torch.set_num_threads(1)
    try:
        loop = _fresh_loop(setup, seed)
        straight, _ = _run_steps(loop, step_fn, range(total_steps))
        straight_final = _snapshot(loop, total_steps)
        loop = _fresh_loop(setup, seed)
        again, _ = _run_steps(loop, step_fn, range(resume_at))
        diverged = _first_divergence(straight, again, start=0, labels=("first", "second"))
        if diverged is not None:
            raise AssertionError(_not_reproducible(diverged, seed=seed, resume_at=resume_at))
        checkpoint = save_state(_snapshot(loop, resume_at), run_dir, overwrite=True).path
        del loop  # free it before the resumed run builds its own
        if names is None:
            resumed = _resume(setup, step_fn, checkpoint, stop=total_steps, seed=seed)
        else:
            resumed = _resume_in_fresh_process(*names, checkpoint, stop=total_steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
        restore_rng_(caller_rng)
    problems = _problems(straight, straight_final, resumed, resume_at=resume_at)
    if problems:
        where = "in a fresh process" if fresh_process else "in this process"
        raise AssertionError(
            f"resuming at step {resume_at} of {total_steps} ({where}) is not exact:\n"
            + "\n".join(problems)
        )


# --- running a loop ---------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fresh_loop(setup: Setup, seed: int) -> Loop:
    _seed_all(seed)
    loop = setup()
    if not isinstance(loop, tuple) or len(loop) != 4:
        raise SpecError(
            f"setup() must return (model, optimizer, scheduler, scaler), got {loop!r:.100}"
        )
    return loop


def _snapshot(loop: Loop, step: int) -> TrainState:
    model, optimizer, scheduler, scaler = loop
    return capture(None, model, optimizer, scheduler=scheduler, scaler=scaler, step=step)


def _run_steps(
    loop: Loop, step_fn: StepFn, steps: range, *, watch: TrainState | None = None
) -> tuple[list[Fingerprint], tuple[int, list[str]] | None]:
    """Run ``steps``, fingerprinting after each; report the first step that changed ``watch``."""
    untouched = _fingerprint(watch) if watch is not None else {}
    fingerprints = []
    wrote_into = None
    for step in steps:
        step_fn(*loop, step)
        fingerprints.append(_fingerprint(_snapshot(loop, step + 1)))
        if watch is not None and wrote_into is None:
            changed = _differences(untouched, _fingerprint(watch), ("loaded", "now"))
            if changed:
                wrote_into = (step, changed)
    return fingerprints, wrote_into


def _resume(
    setup: Setup, step_fn: StepFn, checkpoint: PathArg, *, stop: int, seed: int
) -> _Resumed:
    state = load_state(checkpoint)
    model, optimizer, scheduler, scaler = loop = _fresh_loop(setup, seed)
    restore_(state, model, optimizer, scheduler=scheduler, scaler=scaler)
    fingerprints, wrote_into = _run_steps(loop, step_fn, range(state.step, stop), watch=state)
    return _Resumed(fingerprints=fingerprints, final=_snapshot(loop, stop), wrote_into=wrote_into)


# --- the fresh process --------------------------------------------------------------------------


def _resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _import_name(fn: object, what: str) -> str:
    """``module:qualname`` of a module-level callable that a new process can import."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    problem = None
    if not isinstance(module, str) or not isinstance(qualname, str):
        problem = "it has no module and qualified name"
    elif "<" in qualname:
        problem = f"it is a lambda or a local function ({qualname})"
    elif module == "__main__":
        problem = "it is defined in __main__, which a new process does not re-run"
    else:
        try:
            if _resolve(f"{module}:{qualname}") is not fn:
                problem = f"{module}:{qualname} names another object"
        except (ImportError, AttributeError) as exc:
            problem = f"importing {module}:{qualname} failed ({exc!r})"
    if problem is not None:
        raise SpecError(
            f"fresh_process=True imports {what} by name in a new process, but {what}={fn!r} "
            f"cannot be imported: {problem}. Define it at the top level of an importable module "
            "(not a lambda, closure or functools.partial)"
        )
    return f"{module}:{qualname}"


def _resume_in_fresh_process(
    setup: str, step_fn: str, checkpoint: RunPath, *, stop: int, seed: int
) -> _Resumed:
    with tempfile.TemporaryDirectory(prefix="keisei-resume-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps(
                {
                    "setup": setup,
                    "step_fn": step_fn,
                    "checkpoint": str(checkpoint),
                    "stop": stop,
                    "seed": seed,
                    "sys_path": [p for p in sys.path if isinstance(p, str)],
                    "out_dir": tmp,
                }
            )
        )
        code = (
            "import sys; from keisei_fn.testing.resume import _child_main; _child_main(sys.argv[1])"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(job)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-30:])
            raise AssertionError(
                f"the resumed run failed in the fresh process (exit code {done.returncode}):\n"
                f"{tail}"
            )
        result = json.loads((Path(tmp) / "result.json").read_text())
        wrote_into = result["wrote_into"]
        return _Resumed(
            fingerprints=result["fingerprints"],
            final=load_state(result["final"]),
            wrote_into=(wrote_into[0], wrote_into[1]) if wrote_into is not None else None,
        )


def _child_main(job_path: str) -> None:
    """The fresh process's side: resume the job's run and write ``result.json`` beside it."""
    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    sys.path[:0] = [p for p in job["sys_path"] if p not in sys.path]
    resumed = _resume(
        _resolve(job["setup"]),
        _resolve(job["step_fn"]),
        job["checkpoint"],
        stop=job["stop"],
        seed=job["seed"],
    )
    final = save_state(resumed.final, job["out_dir"], prefix=_RESUMED_PREFIX)
    result = {
        "fingerprints": resumed.fingerprints,
        "final": str(final.path),
        "wrote_into": resumed.wrote_into,
    }
    (Path(job["out_dir"]) / "result.json").write_text(json.dumps(result))


# --- fingerprints and the report ----------------------------------------------------------------


def _fingerprint(state: TrainState) -> Fingerprint:
    """Every entry of the state; non-tensor entries (learning rates, counters) first, as a
    differing hyper-parameter usually explains the differing tensors."""
    entries: Fingerprint = {}
    for part in ("model", "optimizer", "scheduler", "scaler", "rng", "extra"):
        _describe(getattr(state, part), part, entries)
    return dict(sorted(entries.items(), key=lambda item: item[1].startswith(_TENSOR)))


def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping | list | tuple | torch.Tensor)


def _describe(value: Any, path: str, out: Fingerprint) -> None:
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.blake2b(raw.tobytes(), digest_size=8).hexdigest()
        dtype = str(value.dtype).removeprefix("torch.")
        out[path] = f"{_TENSOR}{dtype}{list(value.shape)} #{digest}"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _describe(item, f"{path}[{key!r}]", out)
    elif isinstance(value, list | tuple) and any(_is_container(v) for v in value):
        for i, item in enumerate(value):
            _describe(item, f"{path}[{i}]", out)
    else:  # a scalar, or a sequence of scalars (e.g. Python's RNG state): one entry
        text = repr(value)
        if len(text) > 60:
            digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
            text = f"{text[:40]}... #{digest}"
        out[path] = text


def _differences(a: Fingerprint, b: Fingerprint, labels: tuple[str, str]) -> list[str]:
    """``path: what differs`` for every entry that differs, in ``a``'s order."""
    found = []
    for path in list(a) + [p for p in b if p not in a]:
        x, y = a.get(path, "<absent>"), b.get(path, "<absent>")
        if x == y:
            continue
        kind = x.partition(" #")[0]
        if x.startswith(_TENSOR) and kind == y.partition(" #")[0]:
            found.append(f"{path}: {kind}, the bytes differ")
        else:
            found.append(f"{path}: {labels[0]} {x}, {labels[1]} {y}")
    return found


def _first_divergence(
    straight: list[Fingerprint],
    other: list[Fingerprint],
    *,
    start: int,
    labels: tuple[str, str] = ("straight", "resumed"),
) -> tuple[int, list[str]] | None:
    """The first step (from ``start``) whose fingerprints differ, with the differing entries."""
    for i, (a, b) in enumerate(zip(straight[start:], other, strict=False)):
        changed = _differences(a, b, labels)
        if changed:
            return start + i, changed
    return None


def _listing(entries: list[str]) -> str:
    shown = [f"      {e}" for e in entries[:_SHOWN]]
    if len(entries) > _SHOWN:
        shown.append(f"      ... and {len(entries) - _SHOWN} more")
    return "\n".join(shown)


def _not_reproducible(diverged: tuple[int, list[str]], *, seed: int, resume_at: int) -> str:
    step, entries = diverged
    return (
        f"the loop is not reproducible: two runs from seed {seed} diverged at step {step}, "
        f"before the resume point (step {resume_at}). Some state outside setup()'s objects and "
        "the global RNGs carries over from one run to the next (a module-level generator, a "
        "cache, a closure), and a resume would lose it too. First differences after step "
        f"{step} ({len(entries)} entries):\n{_listing(entries)}"
    )


def _problems(
    straight: list[Fingerprint], straight_final: TrainState, resumed: _Resumed, *, resume_at: int
) -> list[str]:
    problems = []
    if resumed.wrote_into is not None:
        step, entries = resumed.wrote_into
        problems.append(
            f"  - step {step} of the resumed run wrote into the TrainState it was restored "
            "from: restore_ hands torch copies, so something in the loop kept a reference to "
            "a snapshot tensor (e.g. a module whose load adopts the given tensors instead of "
            f"copying them). Changed entries:\n{_listing(entries)}"
        )
    diverged = _first_divergence(straight, resumed.fingerprints, start=resume_at)
    if diverged is not None:
        step, entries = diverged
        first = " (the first step after the resume)" if step == resume_at else ""
        problems.append(
            f"  - the resumed run diverged from the straight run at step {step}{first}: some "
            "state the step depends on is not in the checkpoint (everything must come from "
            "setup()'s objects or the global RNGs) or is restored wrongly. Entries that differ "
            f"after step {step} ({len(entries)}):\n{_listing(entries)}"
        )
    try:
        assert_states_equal(straight_final, resumed.final)
    except AssertionError as exc:
        lines = str(exc).splitlines()
        quoted = [f"      {line}" for line in lines[:_FINAL_LINES]]
        if len(lines) > _FINAL_LINES:
            quoted.append(f"      ... ({len(lines) - _FINAL_LINES} more lines)")
        problems.append("  - the final states differ (straight vs resumed):\n" + "\n".join(quoted))
    return problems
