"""The ``keisei-fn`` command line run inside the test process, as a subprocess would see it.

A subprocess pays an interpreter start and a torch import (1-4 s on two cores) for each command;
``run`` calls ``keisei_fn.cli.main`` directly and returns the same exit code, stdout and stderr:

* stdout and stderr are captured (not a terminal, as with a pipe: no progress bars);
* ``SystemExit`` (``--help``, argparse's usage errors) becomes the exit code, as at exit;
* log records of WARNING and above go to the captured stderr as the message alone, and Python
  warnings are shown there under Python's default filters, as a fresh interpreter would show
  them (pytest's logging and warnings capture would otherwise swallow both, and a test that
  expects one line of stderr would miss a stray warning);
* what a command may change in the process is put back afterwards: ``os.environ``, the working
  directory, torch's thread count and the global RNGs (the demo seeds torch's; ``restore_``
  restores Python's, NumPy's and torch's).

What a C extension writes straight to file descriptor 1 or 2 is not in ``stdout``/``stderr``
(pytest's own capture gets it), and nothing here isolates module-level caches: a test whose
point is a fresh interpreter starts one.

The real entry points stay covered by a few tests that start them: ``tests/test_cli.py`` runs
the installed ``keisei-fn`` script and ``python -m keisei_fn``, and kills a real demo process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keisei_fn.cli import main

# A fresh interpreter's warning filters (``python -W`` not given, not in __main__), first match
# wins: see the "Default Warning Filter" section of the ``warnings`` documentation.
_DEFAULT_FILTERS: tuple[tuple[str, type[Warning]], ...] = (
    ("ignore", DeprecationWarning),
    ("ignore", PendingDeprecationWarning),
    ("ignore", ImportWarning),
    ("ignore", ResourceWarning),
    ("default", Warning),
)


@dataclass(frozen=True)
class Result:
    """What the command did (the fields of ``subprocess.CompletedProcess`` the tests read)."""

    returncode: int
    stdout: str
    stderr: str


def _exit_code(exit: SystemExit, stderr: io.StringIO) -> int:
    """The status an interpreter would exit with after ``raise exit``."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=stderr)
    return 1


def run(*args: str | Path, env: dict[str, str] | None = None, threads: int | None = None) -> Result:
    """``keisei-fn *args`` in this process, with ``env`` added to the environment and, if given,
    torch limited to ``threads`` intra-op threads (what ``OMP_NUM_THREADS`` does to a fresh
    process)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        os.environ.update(env or {})
        if threads is not None:
            torch.set_num_threads(threads)
        root.addHandler(handler)
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.resetwarnings()
            for action, category in reversed(_DEFAULT_FILTERS):
                warnings.simplefilter(action, category)  # type: ignore[arg-type]
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exit:
                code = _exit_code(exit, stderr)
        for warning in caught:
            stderr.write(
                warnings.formatwarning(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
            )
    finally:
        root.removeHandler(handler)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        random.setstate(saved_rngs[0])
        np.random.set_state(saved_rngs[1])
        torch.set_rng_state(saved_rngs[2])
    return Result(code, stdout.getvalue(), stderr.getvalue())
