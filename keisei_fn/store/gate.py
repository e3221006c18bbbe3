"""The health gate of the savers: check each state before it is saved, and remember the last
healthy one's parameter norm for the next check's norm jump.

``Checkpointer(health=...)`` and ``AsyncSaver(health=...)`` hold one :class:`HealthGate`. The
state is saved whatever the outcome (data is never dropped); the outcome goes into its sidecar
(``save_state(..., health=...)``), in the same commit.

The norm jump is measured against the last *healthy* state this gate passed (in this process),
not the last one saved: after a blow-up, every later checkpoint is compared with the state
before it, so a diverged run stays marked until it is back within ``max_norm_ratio`` of it.

Example:
    >>> import torch
    >>> from keisei_fn.state import TrainState
    >>> gate = HealthGate(HealthPolicy(positions=()))
    >>> gate.check(TrainState(spec=None, step=1, model={"w": torch.ones(4)}))
    ()
    >>> [p.check for p in gate.check(TrainState(spec=None, step=2, model={"w": torch.ones(4) * 9}))]
    ['norm_jump']
"""

from __future__ import annotations

import logging
import math

from keisei_fn.errors import SpecError
from keisei_fn.health import HealthPolicy, HealthProblem, check_health, parameter_norm
from keisei_fn.state import TrainState

__all__ = ["HealthGate", "health_policy"]

log = logging.getLogger("keisei_fn.store")


def health_policy(health: HealthPolicy | bool | None) -> HealthPolicy | None:
    """The policy a saver's ``health=`` argument asks for: True → the defaults, False/None →
    no check.

    Raises:
        SpecError: for anything else.

    Example:
        >>> health_policy(True) == HealthPolicy(), health_policy(None)
        (True, None)
    """
    if health is True:
        return HealthPolicy()
    if health is None or health is False:
        return None
    if not isinstance(health, HealthPolicy):
        raise SpecError(f"health must be a HealthPolicy, True or None, got {health!r}")
    return health


class HealthGate:
    """Checks states in the order they are saved; not thread-safe (one saver thread uses it).

    Args:
        policy: what counts as unhealthy.
    """

    __slots__ = ("_previous", "policy")

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self._previous: float | None = None

    def check(self, state: TrainState) -> tuple[HealthProblem, ...]:
        """The problems of ``state`` (logged as a warning when there are any); a healthy state
        becomes the baseline of the next norm-jump check. Never raises for the state's sake: a
        check that fails is itself recorded as a ``check_failed`` problem (the state is saved,
        but not trusted)."""
        try:
            problems = check_health(state, self._previous, self.policy)
            norm = parameter_norm(state) if not problems else math.nan
        except Exception as exc:
            log.error("health check of step %d failed: %r", state.step, exc)
            return (HealthProblem("check_failed", f"{type(exc).__name__}: {exc}"),)
        if problems:
            log.warning(
                "step %d is unhealthy (saved, but never the latest or published): %s",
                state.step,
                "; ".join(map(str, problems)),
            )
        else:
            self._previous = norm
        return problems
