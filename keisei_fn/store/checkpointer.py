"""The loop-facing helper: save on an interval, apply retention, log and keep training.

``checkpoint_due`` fixes Keisei's off-by-one (``(ts + 1) % interval == 0`` never fired when
steps advance in chunks): a save is due whenever the completed-step counter crosses a multiple
of the interval.

Example:
    >>> checkpoint_due(10240, interval=10240, last_saved=0)
    True
    >>> checkpoint_due(12288, interval=10240, last_saved=10240)
    False
    >>> round_interval(10000, 2048)
    10240
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from keisei_fn.distributed import gathered, rank_and_world
from keisei_fn.errors import SpecError
from keisei_fn.health import HealthPolicy, HealthProblem
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import RunPath, run_path
from keisei_fn.state import TrainState
from keisei_fn.store.checkpoints import save_state
from keisei_fn.store.gate import HealthGate, health_policy
from keisei_fn.store.names import RESUME_PREFIX
from keisei_fn.store.preemption import Preemption
from keisei_fn.store.retention import RetentionPolicy, prune

__all__ = ["Checkpointer", "SaveResult", "checkpoint_due", "round_interval"]

log = logging.getLogger("keisei_fn.store")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{name} must be a positive int, got {value!r}")
    return value


def checkpoint_due(step: int, *, interval: int, last_saved: int) -> bool:
    """Whether a save is due: ``step // interval > last_saved // interval``.

    Args:
        step: completed timesteps now.
        interval: save every this many timesteps.
        last_saved: completed timesteps at the last save (0 for none).

    Raises:
        SpecError: for a non-positive interval.
    """
    _positive("interval", interval)
    return step // interval > last_saved // interval


def round_interval(interval: int, steps_per_epoch: int) -> int:
    """Keisei's rounding of the checkpoint interval up to a multiple of the epoch length.

    Raises:
        SpecError: for non-positive arguments.
    """
    _positive("interval", interval)
    _positive("steps_per_epoch", steps_per_epoch)
    return -(-interval // steps_per_epoch) * steps_per_epoch


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SaveResult:
    """What :meth:`Checkpointer.maybe_save` did.

    Attributes:
        status: ``"saved"``, ``"skipped"`` (not due) or ``"failed"`` (logged; training goes on).
        last_saved: the step of the last successful save, to pass to the next call.
        meta: the saved checkpoint (when saved).
        error: the exception (when failed).
        reason: a short human explanation.
        health: the problems the health gate found in the saved state (``health=`` of the
            Checkpointer; empty when healthy or not checked). An unhealthy state is saved all
            the same (``status`` is ``"saved"``) and marked so in its sidecar.
    """

    status: Literal["saved", "skipped", "failed"]
    last_saved: int
    meta: CheckpointMeta | None = None
    error: Exception | None = None
    reason: str = ""
    health: tuple[HealthProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """False only for a failed save."""
        return self.status != "failed"

    @property
    def healthy(self) -> bool:
        """False when the health gate found a problem in the saved state (see ``health``)."""
        return not self.health


@dataclass(slots=True)
class _Timer:
    """When the last save happened (or the timer started), by the Checkpointer's clock."""

    since: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpointer:
    """Periodic saving for a training loop: due check, durable save, retention, no raising on
    I/O failure (a failed save is logged and returned; ``KeyboardInterrupt`` still propagates).

    A save is due when the step crosses a multiple of ``interval``, or when ``every_seconds``
    have passed since the last successful save (or since the Checkpointer was made: make it
    after resuming), whichever comes first.

    Args:
        run_dir: the run directory.
        interval: save every this many completed timesteps (None: by time only).
        every_seconds: also save when this much time has passed (None: by steps only).
        clock: the time source for ``every_seconds``, in seconds (monotonic by default; tests
            pass their own).
        retention: applied after each successful save (None keeps everything).
        prefix: checkpoint name prefix.
        preemption: an entered :class:`~keisei_fn.store.preemption.Preemption`: once its
            signal arrived (on any rank), the next ``maybe_save`` saves whether due or not,
            then exits the process with its exit code.
        health: the health gate (``keisei_fn.health``): a :class:`HealthPolicy`, or True for
            its defaults (None: no check). Each state is checked before it is saved (the
            norm jump against the last healthy state this Checkpointer saved); an unhealthy
            one is still saved, marked unhealthy in its sidecar, so that ``resume``,
            ``latest_checkpoint`` and ``load_state(run_dir)`` skip it, retention keeps the
            newest healthy checkpoint, and ``publish`` refuses it. The result's ``health``
            says what was found.

    The timer (and the health gate's baseline) restarts with :meth:`replace`. Retention's time
    rules use the wall clock (the sidecars' creation times), not ``clock``.

    Raises:
        SpecError: for a non-positive interval or duration, or neither given.

    Example:
        >>> ckpt = Checkpointer(run_dir="models/run", interval=10240, every_seconds=1800)
        >>> ckpt.maybe_save(lambda: None, step=2048, last_saved=0).status
        'skipped'
    """

    run_dir: RunPath
    interval: int | None = None
    every_seconds: float | None = None
    clock: Callable[[], float] = time.monotonic
    retention: RetentionPolicy | None = None
    prefix: str = RESUME_PREFIX
    preemption: Preemption | None = None
    health: HealthPolicy | bool | None = None
    _timer: _Timer = field(init=False, repr=False, compare=False)
    _gate: HealthGate | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", run_path(self.run_dir))
        if self.interval is None and self.every_seconds is None:
            raise SpecError("Checkpointer needs an interval (steps), every_seconds, or both")
        if self.interval is not None:
            _positive("Checkpointer.interval", self.interval)
        if self.every_seconds is not None and (
            isinstance(self.every_seconds, bool)
            or not isinstance(self.every_seconds, int | float)
            or not math.isfinite(self.every_seconds)
            or self.every_seconds <= 0
        ):
            raise SpecError(
                f"Checkpointer.every_seconds must be a positive number, got {self.every_seconds!r}"
            )
        object.__setattr__(self, "_timer", _Timer(since=self.clock()))
        policy = health_policy(self.health)
        object.__setattr__(self, "health", policy)
        object.__setattr__(self, "_gate", HealthGate(policy) if policy is not None else None)

    def due(self, step: int, *, last_saved: int) -> bool:
        """Whether a save is due now: by steps (:func:`checkpoint_due`) or by time.

        Under ``torch.distributed`` with several ranks and ``every_seconds`` set, this is a
        collective (rank 0's clock decides for all), like :meth:`maybe_save`.

        Args:
            step: completed timesteps now.
            last_saved: completed timesteps at the last save.

        Returns:
            True when either rule says so.
        """
        return self._decide(step, last_saved)[1]

    def _decide(self, step: int, last_saved: int) -> tuple[bool, bool]:
        """``(preempted, due)``, agreed between the ranks: a signal on any rank preempts
        them all, and rank 0's clock decides a time-based save (one small message per call,
        only with a preemption or ``every_seconds``)."""
        preempted = self.preemption is not None and self.preemption.requested
        by_time = (
            self.every_seconds is not None
            and self.clock() - self._timer.since >= self.every_seconds
        )
        if (self.preemption is not None or self.every_seconds is not None) and (
            rank_and_world()[1] > 1
        ):
            votes = gathered(lambda: (preempted, by_time))
            preempted, by_time = any(p for p, _ in votes), votes[0][1]
        by_steps = self.interval is not None and checkpoint_due(
            step, interval=self.interval, last_saved=last_saved
        )
        return preempted, by_steps or by_time

    def replace(self, **changes: Any) -> Checkpointer:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def maybe_save(
        self,
        snapshot: Callable[[], TrainState] | TrainState,
        *,
        step: int,
        last_saved: int,
        force: bool = False,
    ) -> SaveResult:
        """Save when due (or ``force``; see :meth:`due`), then apply retention.

        Args:
            snapshot: the state, or a function making it — called only when a save is due,
                so the capture costs nothing on other steps.
            step: completed timesteps now (must equal the state's step).
            last_saved: ``last_saved`` of the previous result (0 at the start, or the resumed
                step).
            force: save even when not due (e.g. on Ctrl-C or at the end).

        Returns:
            The outcome; never raises for I/O or store errors.

        Raises:
            SystemExit: after the save (or its failure: the last committed checkpoint stays)
                once ``preemption`` was requested.
        """
        preempted, due = self._decide(step, last_saved)
        if preempted and self.preemption is not None:
            if last_saved == step and step > 0:
                self.preemption.exit(f"step {step} is saved already")
            result = self._save(snapshot, step=step, last_saved=last_saved)
            self.preemption.exit(result.reason)
        if not force and not due:
            return SaveResult(status="skipped", last_saved=last_saved, reason="not due")
        return self._save(snapshot, step=step, last_saved=last_saved)

    def _save(
        self, snapshot: Callable[[], TrainState] | TrainState, *, step: int, last_saved: int
    ) -> SaveResult:
        try:
            state = snapshot() if callable(snapshot) else snapshot
            if state.step != step:
                raise SpecError(f"snapshot is at step {state.step}, the loop says {step}")
            problems = self._gate.check(state) if self._gate is not None else ()
            meta = save_state(
                state,
                self.run_dir,
                prefix=self.prefix,
                health=None if self._gate is None else problems,
            )
        except Exception as exc:  # log and keep training: the loop decides
            log.error("checkpoint at step %d failed: %s", step, exc)
            return SaveResult(
                status="failed", last_saved=last_saved, error=exc, reason=f"save failed: {exc}"
            )
        self._timer.since = self.clock()
        if self.retention is not None:
            try:
                prune(self.run_dir, self.retention, prefix=self.prefix)
            except Exception as exc:
                log.warning("retention after step %d failed: %s", step, exc)
        marked = f", marked unhealthy: {'; '.join(map(str, problems))}" if problems else ""
        return SaveResult(
            status="saved",
            last_saved=step,
            meta=meta,
            reason=f"saved {meta.name}{marked}",
            health=problems,
        )
