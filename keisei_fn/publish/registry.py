"""W&B Registry links and the ``best`` alias: valid link targets, and when a checkpoint is best.
Pure.

A published artifact can be linked to a W&B Registry collection, named
``wandb-registry-{REGISTRY}/{COLLECTION}`` (optionally after the organisation:
``{ORG}/wandb-registry-{REGISTRY}/{COLLECTION}``), as W&B's ``Run.link_artifact`` takes it.

"Best by a metric" (:class:`BestBy`) follows retention's ``keep_best``: a finite number
(``keisei_fn.store.retention.metric_value``), ranked by value and then the later step
(``ranking_key``). A checkpoint published with ``best=`` becomes best when it beats the
checkpoint that the run's best artifact (``{run_name}-best-checkpoint``) names now, according to
the publication ledger; it is then logged again as a version of that artifact with the alias
``best``, which W&B moves from the previous version.

Example:
    >>> registry_target("wandb-registry-model/shogi-best")
    'wandb-registry-model/shogi-best'
    >>> BestBy("win_rate", "max").mode
    'max'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keisei_fn.errors import SpecError
from keisei_fn.store.retention import metric_value, ranking_key

__all__ = [
    "BEST_ALIAS",
    "BEST_SUFFIX",
    "BestBy",
    "is_new_best",
    "registry_target",
]

#: The alias W&B moves to the best checkpoint's version.
BEST_ALIAS = "best"
#: The best artifact's name after the run name: ``{run_name}-best-checkpoint``.
BEST_SUFFIX = "best-checkpoint"
_PART = r"[A-Za-z0-9_.-]{1,128}"
_TARGET = re.compile(rf"(?:{_PART}/)?wandb-registry-{_PART}/{_PART}")


def registry_target(text: str) -> str:
    """Check a W&B Registry collection to link to: ``[ORG/]wandb-registry-REGISTRY/COLLECTION``.

    Every part is 1 to 128 of ``[A-Za-z0-9_.-]`` without ``..``; no ``:alias`` (the link's
    aliases are W&B's ``latest``).

    Args:
        text: the target, e.g. ``"wandb-registry-model/shogi"``.

    Returns:
        ``text`` unchanged.

    Raises:
        SpecError: for anything else (before anything is published).

    Example:
        >>> registry_target("my-project/models")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.SpecError: link_to must be a W&B Registry collection, \
[ORG/]wandb-registry-REGISTRY/COLLECTION (e.g. wandb-registry-model/shogi), got 'my-project/models'
    """
    if not isinstance(text, str) or not _TARGET.fullmatch(text) or ".." in text:
        raise SpecError(
            "link_to must be a W&B Registry collection, [ORG/]wandb-registry-REGISTRY/COLLECTION "
            f"(e.g. wandb-registry-model/shogi), got {text!r}"
        )
    return text


@dataclass(frozen=True, slots=True)
class BestBy:
    """Which published checkpoint W&B's ``best`` alias names: the best by ``metric``.

    Args:
        metric: a key of the checkpoint's evaluation metrics (its stats, the numbers at the top
            of its ``extra``, and ``publish``'s ``metrics=``); for ``keep_best``'s metric, a
            number at the top of ``extra``.
        mode: ``"max"`` or ``"min"``.
        link_to: a W&B Registry collection to link each new best to (see
            :func:`registry_target`), or None.

    Raises:
        SpecError: for an empty metric, another mode or a malformed ``link_to``.

    Example:
        >>> policy_keep_best = ("win_rate", "max", 3)  # RetentionPolicy.keep_best
        >>> BestBy(*policy_keep_best[:2], link_to="wandb-registry-model/shogi").metric
        'win_rate'
    """

    metric: str
    mode: str = "max"
    link_to: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise SpecError(f"BestBy.metric must be a non-empty string, got {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise SpecError(f"BestBy.mode must be 'max' or 'min', got {self.mode!r}")
        if self.link_to is not None:
            registry_target(self.link_to)


def is_new_best(
    value: float | None, step: int, current: Mapping[str, Any] | None, best: BestBy
) -> bool:
    """Whether a checkpoint of ``step`` whose metric is ``value`` beats the current best.

    Args:
        value: the checkpoint's metric (not rankable: never best).
        step: its step.
        current: the ledger record that last moved the best alias (its ``best_metric``,
            ``best_mode``, ``best_value``, ``best_step``), or None when there is none yet.
        best: the rule.

    Returns:
        True when ``value`` is rankable and there is no current best, the current best was
        chosen by another metric or mode, or ``value`` ranks above it (:func:`ranking_key`).

    Example:
        >>> current = {"best_metric": "win_rate", "best_mode": "max", "best_value": 0.6,
        ...            "best_step": 100}
        >>> is_new_best(0.6, 200, current, BestBy("win_rate")), is_new_best(0.5, 300, current,
        ...     BestBy("win_rate"))
        (True, False)
    """
    ranked = metric_value(value)
    if ranked is None:
        return False
    if current is None or (current.get("best_metric"), current.get("best_mode")) != (
        best.metric,
        best.mode,
    ):
        return True
    held = metric_value(current.get("best_value"))
    held_step = current.get("best_step")
    if held is None or not isinstance(held_step, int):
        return True  # an unreadable record names no rankable best
    return ranking_key(ranked, step, best.mode) > ranking_key(held, held_step, best.mode)
