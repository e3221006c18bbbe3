"""Real processes for the crash, kill and race tests: a zygote that forks victims to SIGKILL,
their event log, and concurrent workers forked from one interpreter.

**Kills** (``test_crash``, ``test_kill_loop``, ``test_object_store_kill``). Starting a fresh
Python per kill would cost an interpreter and a torch import each time; instead a ``Zygote``
process imports the victim's module once and forks one victim per ``fork(*args)``, which runs
``module.function(*args)`` until ``kill(pid)`` SIGKILLs it. The victims are real processes doing
real saves, and the kill is a real SIGKILL. A victim that returns or raises exits with status 3
(its traceback on the zygote's stderr), which ``sigkilled`` tells from a kill. Victims record
what they began and what returned in a ``Log``, which ``read_log`` reads back after the kill.

**Workers** (``test_commit_protocol``, ``test_protocol_review``). ``run_workers`` asks a zygote
(one per test process, started on first use; it has imported torch and keisei_fn) to fork a
coordinator, which imports the test module and forks the workers (``multiprocessing`` "fork"
context, before any torch work in that process), so a test costs no interpreter start. Each
worker waits for the others, then runs a function of the test module; workers write what they
saw as JSON lines (``Recorder``), which the test reads back (``read_records``, ``read_race``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

#: This folder: the zygote's and the workers' interpreters import the test modules from it.
TESTS_DIR = str(Path(__file__).parent)

# --- the zygote -------------------------------------------------------------------------------

_ZYGOTE = r"""
import importlib, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
for name in json.loads(sys.argv[3]):  # e.g. s3fs: imported before any victim connects
    importlib.import_module(name)
module_name, function_name = sys.argv[2].split(":")
# torch and keisei_fn are imported once; every forked victim shares them
function = getattr(importlib.import_module(module_name), function_name)

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            function(*json.loads(line))
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(3)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Zygote:
    """A process that imports ``target``'s module once and forks victims that run it.

    Args:
        target: ``"module:function"``, the module a file of this folder.
        stderr: where the zygote's and its victims' stderr goes (a file, so that victims'
            warnings never fill a pipe, or ``subprocess.PIPE`` to read it after a failure).
        preload: modules to import before ``target``'s.

    The zygote inherits ``os.environ`` (e.g. a fixture's AWS settings). Use it as a context
    manager: on exit the zygote is killed.
    """

    def __init__(
        self, target: str, *, stderr: int | IO[str], preload: tuple[str, ...] = ()
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, TESTS_DIR, target, json.dumps(list(preload))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def fork(self, *args: Any) -> int:
        """Fork a victim running ``function(*args)`` (JSON values); returns its pid."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(args) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def kill(self, pid: int) -> int:
        """SIGKILL the victim ``pid``; returns its wait status once it is gone (its own, if it
        had already ended: ``sigkilled`` tells)."""
        with contextlib.suppress(ProcessLookupError):  # ended and reaped by the zygote
            os.kill(pid, signal.SIGKILL)
        return self.wait()

    def wait(self) -> int:
        """Wait for the victim forked last to end; returns its wait status (a victim that
        returns or raises exits with status 3)."""
        assert self.process.stdout is not None
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sigkilled(status: int) -> bool:
    """Whether a victim's wait status says SIGKILL ended it (not an exit of its own)."""
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


class Log:
    """A victim's log: one ``<word> <step> <variant>`` line per event, appended with one
    ``write`` (a killed process loses nothing it wrote); ``returned`` lines are fsynced."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, word: str, step: int, variant: int) -> None:
        os.write(self.fd, f"{word} {step} {variant}\n".encode())
        if word == "returned":
            os.fsync(self.fd)


def read_log(path: Path) -> list[tuple[str, int, int]]:
    """The events a ``Log`` at ``path`` holds (none if there is no file)."""
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(word, int(step), int(variant)) for word, step, variant in lines]


# --- concurrent workers -----------------------------------------------------------------------


def run_jobs(module: str, jobs: list[dict[str, Any]], result: str, environ: dict[str, str]) -> None:
    """The coordinator, forked by the workers' zygote: take the calling test's environment
    (e.g. the S3 fixture's settings, set after the zygote started), import ``module``, fork one
    worker per job (before any torch work here), wait for them all, and write their exit codes
    to ``result``. It leads its own process group, so that a timeout kills it and its workers
    together, and its stdout (and the workers') goes to stderr: the zygote's stdout is its
    protocol."""
    os.setpgid(0, 0)
    os.dup2(2, 1)
    os.environ.clear()
    os.environ.update(environ)
    importlib.import_module(module)
    ctx = multiprocessing.get_context("fork")
    barrier, stop = ctx.Barrier(len(jobs)), ctx.Event()
    workers = [ctx.Process(target=worker_main, args=(module, job, barrier, stop)) for job in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    Path(result).write_text(json.dumps([worker.exitcode for worker in workers]))


def worker_main(module: str, job: dict[str, Any], barrier: Any, stop: Any) -> None:
    """Runs in a forked worker: one thread of torch, wait for the others, run the job."""
    torch.set_num_threads(1)
    barrier.wait(timeout=120)
    getattr(sys.modules[module], job.pop("fn"))(barrier=barrier, stop=stop, **job)


@dataclass
class _Workers:
    """The zygote that forks ``run_workers``' coordinators, its stderr file and its folder."""

    zygote: Zygote
    folder: Path
    stderr: Path
    calls: int = 0


_workers: _Workers | None = None


def _workers_zygote() -> _Workers:
    """This process's zygote for ``run_workers``, started on first use, killed at exit."""
    global _workers
    if _workers is None or _workers.zygote.process.poll() is not None:
        folder = Path(tempfile.mkdtemp(prefix="keisei-workers-"))
        stderr = folder / "stderr"
        with open(stderr, "a") as file:  # O_APPEND: the zygote's writes always land at the end
            zygote = Zygote("kill_harness:run_jobs", stderr=file)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(zygote.close)
        _workers = _Workers(zygote, folder, stderr)
    return _workers


def run_workers(module: str, jobs: list[dict[str, Any]], *, timeout: float) -> None:
    """Run the jobs (``{"fn": name of a function of ``module``, **its keyword arguments}``) in
    concurrent processes started together; fail if any of them crashed.

    Each function is also given ``barrier`` (a ``multiprocessing.Barrier`` of all the workers)
    and ``stop`` (a ``multiprocessing.Event``) as keyword arguments.
    """
    workers = _workers_zygote()
    workers.calls += 1
    result = workers.folder / f"result{workers.calls}.json"
    logged = workers.stderr.stat().st_size

    def stderr() -> str:  # what the zygote's children wrote during this call
        with open(workers.stderr, "rb") as file:
            file.seek(logged)
            return file.read()[-4000:].decode(errors="replace")

    pid = workers.zygote.fork(module, jobs, str(result), dict(os.environ))
    status: list[int] = []
    waiter = threading.Thread(target=lambda: status.append(workers.zygote.wait()), daemon=True)
    waiter.start()
    waiter.join(timeout)
    if waiter.is_alive():  # the coordinator and its workers
        os.killpg(pid, signal.SIGKILL)
        waiter.join()
        raise AssertionError(f"the workers did not finish in {timeout} s:\n{stderr()}")
    assert result.exists(), f"the coordinator failed (wait status {status}):\n{stderr()}"
    codes = json.loads(result.read_text())
    assert codes == [0] * len(jobs), f"worker exit codes {codes}:\n{stderr()}"


class Recorder:
    """A worker's JSON-lines output file."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a")  # noqa: SIM115 - closed by the worker's exit

    def __call__(self, *record: Any) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def read_records(path: Path) -> list[Any]:
    """The records a ``Recorder`` wrote to ``path``."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Race:
    """What a writer and its readers recorded in a race (see ``read_race``)."""

    problems: list[str] = field(default_factory=list)  # the writer's and the readers' failures
    saves: int = 0
    reads: Counter[str] = field(default_factory=Counter)  # successful reads, by kind
    failures: Counter[str] = field(default_factory=Counter)  # failed reads, by what went wrong


def read_race(writer: Path, readers: list[Path]) -> Race:
    """Tally a race: the writer records ``("saves", n)`` and any failure as another record; each
    reader records ``("reads", {kind: count})`` and each failure as ``(what, details)``."""
    race = Race()
    written = read_records(writer)
    race.problems = [f"writer: {r}" for r in written if r[0] != "saves"]
    race.saves = next(r[1] for r in written if r[0] == "saves")
    example: dict[str, str] = {}
    for out in readers:
        for what, detail in read_records(out):
            if what == "reads":
                race.reads.update(detail)
            else:
                race.failures[what] += 1
                example.setdefault(what, detail)
    race.problems += [
        f"readers: {what} (x{n}), e.g. {example[what]}" for what, n in race.failures.most_common()
    ]
    return race
