"""How the torchrun test scripts end: without interpreter finalization.

A gloo process group's C++ worker threads can still hold tensors with Python references while
the interpreter is torn down; destroying them then calls ``std::terminate`` ("terminate called
without an active exception", SIGABRT) even after ``destroy_process_group`` — seen here about
once in ten 2-process runs (pytorch/pytorch#190489, #179291). The scripts flush their output
and leave with ``os._exit``: the exit code says whether ``main`` succeeded.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def run_then_exit(main: Callable[[], None]) -> None:
    """Run ``main``; exit 0 if it returned, 1 (after printing the traceback) if it raised."""
    code = 0
    try:
        main()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
