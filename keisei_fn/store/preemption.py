"""Preemption: turn a scheduler's "you will be killed soon" signal into a checkpoint and a clean
exit.

SLURM (``--signal``, preemption, ``scancel``), Kubernetes and most cluster schedulers send
SIGTERM (or a signal of your choice, e.g. SIGUSR1) some seconds before they kill a job. Inside
``with Preemption():`` such a signal only sets a flag; the training loop goes on to the end of
its step, and the next ``Checkpointer.maybe_save`` (or ``AsyncSaver.save``) saves at once, waits
until the checkpoint is committed, and exits the process with ``exit_code``. A second signal
while that save runs changes nothing: the save finishes (and SIGKILL at any instant still leaves
the last committed checkpoint, by the commit protocol).

The default exit code is 128 + the number of the first of ``signals`` (143 for SIGTERM),
whichever of them arrived: what a process killed by that signal reports, so job scripts, SLURM's
accounting and torchrun's agent see "stopped by the scheduler" — unlike 0 ("finished": nothing
requeues it) or 1 ("crashed"). A job script that requeues itself tests for it, e.g.
``srun python train.py; [ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID``.

Under ``torch.distributed`` the scheduler signals each rank's process at its own moment, so the
ranks decide together: ``Checkpointer.maybe_save`` (and :meth:`Preemption.requested_anywhere`,
for loops driving an ``AsyncSaver``) ask every rank once per call, and when any rank got the
signal, all of them save at the same step and exit. After ``exit``, the signals are ignored
until the process is gone, so a second one cannot cut its teardown short (Python's own handlers
would not do: the interpreter resets them to the default, which kills, before it tears down
its modules).

Example:
    >>> import os, signal
    >>> with Preemption(signals=(signal.SIGUSR1,)) as preemption:
    ...     os.kill(os.getpid(), signal.SIGUSR1)  # what the scheduler does
    ...     preemption.requested, preemption.exit_code
    (True, 138)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import NoReturn

from keisei_fn.distributed import gathered, rank_and_world
from keisei_fn.errors import SpecError

__all__ = ["Preemption"]

log = logging.getLogger("keisei_fn.store")

_Handler = Callable[[int, FrameType | None], object] | int | None


class Preemption:
    """A context manager that turns signals into a request to checkpoint and exit.

    Args:
        signals: the signals to catch (default SIGTERM).
        exit_code: the process's exit status after the preemption checkpoint (default: 128 +
            the first signal's number, 143 for SIGTERM; see the module's docs for why).

    Attributes:
        requested: whether one of the signals arrived (set by the handler, nothing else).
        received: the number of the first signal that arrived, or None.

    Raises:
        SpecError: for no signals, an unknown signal, SIGKILL/SIGSTOP (which cannot be
            caught) or a bad code.
    """

    def __init__(
        self, signals: Sequence[int] = (signal.SIGTERM,), *, exit_code: int | None = None
    ) -> None:
        try:
            self.signals = tuple(signal.Signals(s) for s in signals)
        except ValueError as exc:
            raise SpecError(f"Preemption: {exc}") from None
        if not self.signals:
            raise SpecError("Preemption needs at least one signal")
        uncatchable = {signal.SIGKILL, signal.SIGSTOP} & set(self.signals)
        if uncatchable:
            raise SpecError(f"{sorted(s.name for s in uncatchable)} cannot be caught")
        code = 128 + self.signals[0] if exit_code is None else exit_code
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise SpecError(f"Preemption.exit_code must be an int in 0..255, got {exit_code!r}")
        self.exit_code = code
        self.requested = False
        self.received: int | None = None
        self._previous: dict[signal.Signals, _Handler] | None = None
        self._exiting = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the save happens on the loop's thread, between steps.
        if self.received is None:
            self.received = signum
        self.requested = True

    def requested_anywhere(self) -> bool:
        """Whether the signal arrived on this rank or any other — a collective under
        ``torch.distributed`` with several ranks (call it on every rank at the same point of
        the loop); :attr:`requested` alone otherwise.

        Example:
            >>> Preemption().requested_anywhere()
            False
        """
        _, world = rank_and_world()
        if world == 1:
            return self.requested
        return any(gathered(lambda: self.requested))

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            raise SpecError("Preemption must be entered on the main thread (signals go there)")
        if self._previous is not None:
            raise SpecError("this Preemption is already entered")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        previous, self._previous = self._previous, None
        if previous is not None and not self._exiting:  # exiting: keep them ignored
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def exit(self, saved: str) -> NoReturn:
        """Leave the process with ``exit_code``, after the preemption checkpoint was dealt
        with: on the main thread by ``SystemExit`` (``finally`` blocks, context managers and
        ``atexit`` still run); on another thread, where ``SystemExit`` would end only that
        thread, by ``os._exit`` after flushing the logs and standard streams.

        Args:
            saved: what happened to the checkpoint, for the log.
        """
        self._exiting = True
        name = signal.Signals(self.received).name if self.received is not None else "a signal"
        log.warning("preempted by %s: %s; exiting with %d", name, saved, self.exit_code)
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
            raise SystemExit(self.exit_code)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)
