"""Background saves: snapshot on the caller's thread, write on a worker thread.

``AsyncSaver(run_dir, **save_options).save(state)`` returns a :class:`SaveHandle` at once; the
durable write (the same ``save_state`` protocol: a crash mid-write leaves nothing visible) runs
in one worker thread. At most one write is in flight: a new ``save`` first waits for the previous
one (back-pressure, bounded memory) and raises its error if it failed — an error surfaces on
``wait()`` or on the next ``save``, never silently.

Pass a snapshot: a ``TrainState`` from ``keisei_fn.capture`` holds clones, so training steps
taken after ``save`` returns do not change what is written. On CUDA, capture into the saver's
page-locked buffers, ``saver.save(capture(..., staging=saver.staging))``: they are allocated
once (grown when the state grows) and written from directly; a buffer is refilled only once
the write that reads it is done and no tensor of its snapshot is left (see
``keisei_fn.staging``).

Example:
    >>> import tempfile
    >>> from keisei_fn import ModelSpec, build_model, capture
    >>> spec = ModelSpec(model_type="testmodel")
    >>> with tempfile.TemporaryDirectory() as run_dir, AsyncSaver(run_dir) as saver:
    ...     handle = saver.save(capture(spec, build_model(spec, seed=0), step=1))
    ...     handle.wait().name
    'checkpoint_ts1'
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, NoReturn

from keisei_fn.health import HealthPolicy
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, run_path
from keisei_fn.staging import PinnedBuffers
from keisei_fn.state import TrainState
from keisei_fn.store.checkpoints import save_state
from keisei_fn.store.gate import HealthGate, health_policy
from keisei_fn.store.preemption import Preemption

__all__ = ["AsyncSaver", "SaveHandle"]

log = logging.getLogger("keisei_fn.store")


class SaveHandle:
    """One background save: ``done()`` polls, ``wait()`` blocks and returns the meta."""

    __slots__ = ("_future", "step")

    def __init__(self, future: Future[CheckpointMeta], step: int) -> None:
        self._future = future
        self.step = step

    def __repr__(self) -> str:
        """The step and how the write stands: pending, saved (and the health mark when the
        gate found a problem) or failed."""
        if not self._future.done():
            return f"SaveHandle(step={self.step}, pending)"
        if (error := self._future.exception()) is not None:
            return f"SaveHandle(step={self.step}, failed: {type(error).__name__}: {error})"
        meta = self._future.result()
        mark = "" if meta.healthy else f", {meta.health_mark}"
        return f"SaveHandle(step={self.step}, saved {meta.name}{mark})"

    def done(self) -> bool:
        """Whether the write has finished (successfully or not)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointMeta:
        """Block until the checkpoint is committed.

        Returns:
            The committed checkpoint's meta.

        Raises:
            TimeoutError: when ``timeout`` passes first.
            Exception: whatever ``save_state`` raised in the worker.
        """
        return self._future.result(timeout)


class AsyncSaver:
    """Durable checkpoint writes on a worker thread, one at a time.

    Args:
        run_dir: the run directory.
        preemption: an entered :class:`~keisei_fn.store.preemption.Preemption`: once its signal
            arrived, the next ``save`` finishes the write in flight, writes its state before
            returning, and exits the process with the preemption's exit code. (Call ``save``
            at once when ``preemption.requested_anywhere()``, asked on every step: on every
            rank alike under ``torch.distributed``.)
        health: the health gate, as for ``Checkpointer``: a ``HealthPolicy`` or True for its
            defaults (None: no check). The check runs on the worker thread, before the write,
            and its outcome is in the committed sidecar: ``handle.wait().healthy`` and
            ``.health`` (an unhealthy state is saved all the same, marked).
        save_options: keyword options of ``save_state`` (``kind``, ``prefix``, ``overwrite``).

    Attributes:
        staging: the saver's reusable page-locked host buffers, for ``capture(...,
            staging=saver.staging)``: two of them in steady state, one the write in flight
            reads and one the next snapshot fills.

    Raises:
        SpecError: for a ``health`` that is not a policy, a bool or None.
    """

    def __init__(
        self,
        run_dir: PathArg,
        *,
        preemption: Preemption | None = None,
        health: HealthPolicy | bool | None = None,
        **save_options: Any,
    ) -> None:
        self.run_dir = run_path(run_dir)
        self.preemption = preemption
        policy = health_policy(health)
        self._gate = HealthGate(policy) if policy is not None else None
        self._options = save_options
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keisei-fn-save")
        self._last: SaveHandle | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.staging = PinnedBuffers()

    def save(self, state: TrainState) -> SaveHandle:
        """Start writing ``state``; first waits for (and re-raises the error of) the previous
        save.

        Raises:
            Exception: the previous background save's error, if it failed (this state is then
                not submitted: call ``save`` again to retry).
            RuntimeError: after ``close()``.
            SystemExit: once ``preemption`` was requested, after this state is committed (or
                failed to save: the last committed checkpoint stays).
        """
        if self._pool._shutdown:
            raise RuntimeError("AsyncSaver is closed")
        if self.preemption is not None and self.preemption.requested_anywhere():
            self._save_and_exit(self.preemption, state)
        with self._lock:
            if self._last is not None:
                previous, self._last = self._last, None
                previous.wait()
            future = self._pool.submit(self._write, state)
            self._last = SaveHandle(future, state.step)
            return self._last

    def _save_and_exit(self, preemption: Preemption, state: TrainState) -> NoReturn:
        """Finish the write in flight, write ``state`` on this thread, exit."""
        try:
            self.wait()
        except Exception as exc:  # that checkpoint is lost; this one is written next
            log.error("background save failed before the preemption checkpoint: %s", exc)
        try:
            meta = self._write(state)
        except Exception as exc:
            log.error("preemption checkpoint at step %d failed: %s", state.step, exc)
            preemption.exit(f"save failed: {exc}")
        preemption.exit(f"saved {meta.name}")

    def _write(self, state: TrainState) -> CheckpointMeta:
        """Check (with a health gate) and save one state: on the worker thread, in order."""
        if self._gate is None:
            return save_state(state, self.run_dir, **self._options)
        return save_state(state, self.run_dir, health=self._gate.check(state), **self._options)

    def wait(self) -> CheckpointMeta | None:
        """Wait for the write in flight, if any; returns its meta (raises its error)."""
        with self._lock:
            last, self._last = self._last, None
        return last.wait() if last is not None else None

    def close(self) -> None:
        """Wait for the write in flight and stop the worker (raises a pending error)."""
        self._closed = True
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original error; still finish the write in flight
            self._closed = True
            self._pool.shutdown(wait=True)
