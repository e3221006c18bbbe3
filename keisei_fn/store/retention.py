"""Retention: which checkpoints to keep. ``plan_prune`` is pure; ``prune`` applies a plan.

Never deleted, whatever the policy: the newest valid checkpoint, the newest one the health gate
did not mark unhealthy (so that unhealthy saves filling ``keep_last`` never prune the run's
only good resume point), final checkpoints, the final model, checkpoints whose publication is
still pending in the run directory's ledger, and the checkpoint a W&B ``best`` alias names
(``keisei_fn.publish`` with ``best=``), so that alias never points at a checkpoint the run
directory no longer has.
Incomplete leftovers (temp files, payloads no sidecar names, sidecars that fail the listed
check, and, once abandoned for an hour, shards directories no sidecar refers to and open S3
multipart uploads) are always removed by ``prune``, which holds the run directory's lock (see
``keisei_fn.store.commit``) so that it never takes what a save in flight still needs.

Time rules (``keep_within``, ``keep_hourly``, ``keep_daily``) are those restic's ``forget``
made familiar, over each sidecar's UTC creation time and a clock the caller passes in.

Example:
    >>> from datetime import timedelta
    >>> policy = RetentionPolicy(keep_last=2, keep_within=timedelta(hours=6), keep_daily=7)
    >>> policy.keep_daily
    7
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from keisei_fn.display import parse_utc
from keisei_fn.distributed import on_rank_zero
from keisei_fn.errors import CheckpointNotFoundError, KeiseiFnError, SpecError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, RunPath, is_remote, run_path
from keisei_fn.store._fs import (
    ABANDONED_AFTER_SECONDS,
    abort_stale_uploads,
    entry_exists,
    is_directory,
    modified_age,
    remove_durably,
)
from keisei_fn.store.commit import locked
from keisei_fn.store.ledger import best_publications, pending_publications
from keisei_fn.store.listing import RunDirScan, scan_run_dir
from keisei_fn.store.names import RESUME_PREFIX, parse_stem, sidecar_path

__all__ = ["PrunePlan", "RetentionPolicy", "metric_value", "plan_prune", "prune", "ranking_key"]

log = logging.getLogger("keisei_fn.store")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """Which periodic checkpoints to keep; a checkpoint kept by any rule is kept.

    Args:
        keep_last: the newest N; None (the default) keeps every periodic checkpoint, whatever
            the other rules say (so ``keep_last=0`` lets the other rules alone decide, e.g.
            ``RetentionPolicy(keep_last=0, keep_daily=7)``: one per day for a week, and the
            newest resume point). A policy with other keep rules and ``keep_last=None`` warns.
        keep_every: also keep every checkpoint whose step is a multiple of this.
        keep_best: ``(metric, mode, k)``: the k best by ``extra[metric]`` (a finite number,
            see :func:`metric_value`), ``mode`` "max" or "min"; ties go to the later step
            (:func:`ranking_key`, the order W&B's ``best`` alias follows too).
        keep_within: also keep every checkpoint created within this duration before ``now``
            (restic measures from the newest snapshot instead; a training run wants the clock).
            A creation time unreadable, or more than :data:`FUTURE_TOLERANCE` ahead of ``now``,
            counts for no time rule.
        keep_hourly: also keep the newest checkpoint of each of the last N UTC hours that have
            one (as restic's ``--keep-hourly``: hours without a checkpoint do not count).
        keep_daily: the same per UTC day.
        max_bytes: after the rules above, delete the oldest not-protected checkpoints until
            the total size fits (protected ones are never deleted to fit).

    Raises:
        SpecError: for non-positive counts or durations, or a bad mode.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: tuple[str, str, int] | None = None
    keep_within: timedelta | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_within is not None and (
            not isinstance(self.keep_within, timedelta) or self.keep_within <= timedelta(0)
        ):
            raise SpecError(
                f"RetentionPolicy.keep_within must be a positive timedelta, got "
                f"{self.keep_within!r}"
            )
        for name in ("keep_last", "keep_every", "keep_hourly", "keep_daily", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "keep_last" else 1)
            ):
                raise SpecError(f"RetentionPolicy.{name} must be a positive int, got {value!r}")
        if self.keep_best is not None:
            metric, mode, k = self.keep_best
            if (
                not isinstance(metric, str)
                or mode not in ("max", "min")
                or not (isinstance(k, int) and k >= 1)
            ):
                raise SpecError(
                    "RetentionPolicy.keep_best must be (metric, 'max'|'min', k >= 1), "
                    f"got {self.keep_best!r}"
                )
            object.__setattr__(self, "keep_best", (metric, mode, k))
        rules = (self.keep_every, self.keep_best, self.keep_within, self.keep_hourly)
        if self.keep_last is None and any(r is not None for r in (*rules, self.keep_daily)):
            warnings.warn(
                "RetentionPolicy: keep_last=None keeps every periodic checkpoint, so the other "
                "keep rules change nothing; set keep_last (0: let them alone decide)",
                UserWarning,
                stacklevel=3,
            )

    def replace(self, **changes: Any) -> RetentionPolicy:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """The outcome of :func:`plan_prune`: checkpoint names to keep and to delete, with why."""

    keep: Mapping[str, str]
    delete: tuple[str, ...]


def metric_value(value: object) -> float | None:
    """``value`` as a metric to rank checkpoints by (``keep_best``, W&B's ``best`` alias): a
    finite int or float (not a bool), as a float; None for anything else (NaN and infinities
    included: a broken evaluation never ranks first).

    Example:
        >>> metric_value(3), metric_value(float("nan")), metric_value(True)
        (3.0, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return as_float if math.isfinite(as_float) else None


def ranking_key(value: float, step: int, mode: str) -> tuple[float, int]:
    """The order of "best by a metric": a larger key is better — the value (negated for
    ``mode`` "min"), then the later step.

    Example:
        >>> ranking_key(0.5, 10, "min") > ranking_key(0.7, 20, "min")
        True
    """
    return (value if mode == "max" else -value, step)


def _created(meta: CheckpointMeta, now: datetime) -> datetime | None:
    """The sidecar's creation time in UTC, or None (kept by no time rule) when it cannot be
    read or lies more than :data:`FUTURE_TOLERANCE` ahead of ``now``."""
    created = parse_utc(meta.created)
    return created if created is not None and created - now <= FUTURE_TOLERANCE else None


#: How far ahead of the pruner's clock a creation time may be (another machine's clock) and
#: still count for the time rules; a time further ahead would keep its checkpoint forever.
FUTURE_TOLERANCE = timedelta(minutes=5)


def _newest_per_period(
    timed: Sequence[tuple[datetime, CheckpointMeta]],
    period: Callable[[datetime], tuple[int, ...]],
    count: int,
) -> list[CheckpointMeta]:
    """The newest checkpoint of each of the ``count`` newest periods that hold one."""
    newest: dict[tuple[int, ...], tuple[datetime, CheckpointMeta]] = {}
    for created, meta in timed:
        key = period(created)
        if key not in newest or (created, meta.step) > (newest[key][0], newest[key][1].step):
            newest[key] = (created, meta)
    return [newest[key][1] for key in sorted(newest, reverse=True)[:count]]


def _prefix(name: str) -> str | None:
    parsed = parse_stem(name)
    return parsed.prefix if parsed is not None else None


def plan_prune(
    metas: Sequence[CheckpointMeta],
    policy: RetentionPolicy,
    *,
    protected: Collection[str] = (),
    prefix: str = RESUME_PREFIX,
    now: datetime | None = None,
) -> PrunePlan:
    """Decide which of ``metas`` (valid checkpoints) to delete. Pure, given ``now``.

    Args:
        metas: the valid checkpoints of one run directory.
        policy: the retention rules.
        protected: names that must be kept (e.g. pending publications); a mapping gives
            each one's reason.
        prefix: the resume prefix; the newest checkpoint with it is always kept, and so is the
            newest healthy one (``CheckpointMeta.healthy``).
        now: the current time for ``keep_within`` (timezone-aware; default: the system clock).
            A checkpoint whose creation time cannot be read is kept by no time rule.

    Returns:
        The plan; every meta is in exactly one of ``keep`` (with a reason) or ``delete``.

    Example:
        >>> plan_prune([], RetentionPolicy(keep_last=1)).delete
        ()
    """
    ordered = sorted(metas, key=lambda m: (m.step, m.name))
    always: dict[str, str] = {}  # never deleted, not even to fit max_bytes
    resumable = [m for m in ordered if m.kind != "final_model" and _prefix(m.name) == prefix]
    if resumable:
        newest = resumable[-1]
        always[newest.name] = (
            "newest resume point"
            if newest.healthy
            else "newest checkpoint (unhealthy: kept, never resumed)"
        )
    if healthy := [m for m in resumable if m.healthy]:
        always.setdefault(healthy[-1].name, "newest healthy resume point")
    for meta in ordered:
        if meta.kind != "periodic":
            always.setdefault(meta.name, meta.kind.replace("_", " "))
        if meta.name in protected:
            why = protected[meta.name] if isinstance(protected, Mapping) else "pending publication"
            always.setdefault(meta.name, why)

    if now is not None and now.tzinfo is None:
        raise SpecError(f"plan_prune's now must be timezone-aware, got {now!r}")
    by_policy: dict[str, str] = {}
    periodic = [m for m in ordered if m.kind == "periodic"]
    if policy.keep_last is None:
        by_policy.update((m.name, "no keep_last limit") for m in periodic)
    elif policy.keep_last:
        by_policy.update(
            (m.name, f"among the last {policy.keep_last}") for m in periodic[-policy.keep_last :]
        )
    if policy.keep_every:
        for meta in periodic:
            if meta.step % policy.keep_every == 0:
                by_policy.setdefault(meta.name, f"step is a multiple of {policy.keep_every}")
    if policy.keep_best is not None:
        metric, mode, k = policy.keep_best
        scored = [(v, m) for m in periodic if (v := metric_value(m.extra.get(metric))) is not None]
        scored.sort(key=lambda vm: ranking_key(vm[0], vm[1].step, mode), reverse=True)
        for _, meta in scored[:k]:
            by_policy.setdefault(meta.name, f"best {k} by {metric} ({mode})")
    clock = now or datetime.now(UTC)
    timed = [(created, m) for m in periodic if (created := _created(m, clock)) is not None]
    if policy.keep_within is not None:
        for created, meta in timed:
            if clock - created <= policy.keep_within:
                by_policy.setdefault(meta.name, f"created within {policy.keep_within}")
    for count, unit, period in (
        (policy.keep_hourly, "hour", lambda t: t.timetuple()[:4]),
        (policy.keep_daily, "day", lambda t: t.timetuple()[:3]),
    ):
        if count:
            for meta in _newest_per_period(timed, period, count):
                by_policy.setdefault(meta.name, f"newest of its {unit} (last {count} {unit}s)")
    if policy.max_bytes is not None:
        kept = [m for m in ordered if m.name in always or m.name in by_policy]
        total = sum(m.total_bytes for m in kept)
        for meta in kept:  # oldest first
            if total <= policy.max_bytes:
                break
            if meta.name not in always:
                del by_policy[meta.name]
                total -= meta.total_bytes
    keep = {**by_policy, **always}
    delete = tuple(m.name for m in ordered if m.name not in keep)
    return PrunePlan(keep=keep, delete=delete)


def prune(
    run_dir: PathArg,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    prefix: str = RESUME_PREFIX,
    now: datetime | None = None,
) -> PrunePlan:
    """Apply a retention policy to a run directory and remove incomplete leftovers.

    Runs under the run directory's lock (``keisei_fn.store.commit``): a save in flight in any
    process finishes first, and no save starts until the prune is done, so every payload not
    named by a sidecar is a dead save's or a replaced checkpoint's and is removed. On an object
    store (or a file system without ``flock``: no lock) such a payload, and a sidecar that
    fails the listed check, is removed only once it is older than ``ABANDONED_AFTER_SECONDS``.
    A run directory that does not exist has nothing to prune. Deletion order per checkpoint:
    sidecar first (uncommit), then its payload, so a crash mid-prune never leaves a sidecar
    without weights. A checkpoint that cannot be read here (a newer format, an I/O error) is
    never deleted, nor its payloads.

    Args:
        run_dir: the run directory.
        policy: the retention rules.
        dry_run: only plan; delete nothing.
        prefix: the resume prefix.
        now: the current time for the time rules (default: the system clock).

    Returns:
        The plan; ``delete`` also lists removed leftovers (as file names).

    A publication ledger that cannot be read (over its caps, corrupt) makes every checkpoint
    protected, with a warning: which are still to be published is unknown. Never raises
    because of one bad file.

    Raises:
        CheckpointNotFoundError: when ``run_dir`` is a file.
    """
    return on_rank_zero(
        lambda: _prune(run_path(run_dir), policy, dry_run=dry_run, prefix=prefix, now=now)
    )


def _prune(
    run_dir: RunPath,
    policy: RetentionPolicy,
    *,
    dry_run: bool,
    prefix: str,
    now: datetime | None,
) -> PrunePlan:
    if not is_directory(run_dir):
        if entry_exists(run_dir):
            raise CheckpointNotFoundError(f"{run_dir} is not a directory")
        return PrunePlan(keep={}, delete=())  # nothing saved yet: nothing to prune
    lock = contextlib.nullcontext(not is_remote(run_dir)) if dry_run else locked(run_dir)
    with lock as held:
        scan = scan_run_dir(run_dir)
        protected = _protected(run_dir, scan)
        plan = plan_prune(scan.valid, policy, protected=protected, prefix=prefix, now=now)
        # Without the lock a save may be in flight: only what is old was abandoned.
        leftovers = [p for p in scan.leftovers if held or _abandoned(p)]
        broken = [stem.name for stem, _ in scan.invalid if held or _abandoned(sidecar_path(stem))]
        removed = [p.name for p in leftovers]
        if not dry_run:
            owned = {meta.name: meta.weights_path for meta in scan.valid}  # file or shards dir
            for name in plan.delete:
                remove_durably(sidecar_path(run_dir / name))  # uncommit first
                remove_durably(owned[name])
            remove_durably(*(sidecar_path(run_dir / name) for name in broken))
            remove_durably(*leftovers)  # the broken ones' payloads among them
            removed += [f"{name} (incomplete upload)" for name in abort_stale_uploads(run_dir)]
            if plan.delete or broken or removed:
                log.info(
                    "pruned %s: %d checkpoints, %d broken, %d leftovers",
                    run_dir,
                    len(plan.delete),
                    len(broken),
                    len(removed),
                )
    return PrunePlan(keep=plan.keep, delete=(*plan.delete, *broken, *removed))


def _protected(run_dir: RunPath, scan: RunDirScan) -> dict[str, str]:
    """The checkpoints whose publication is pending or that a W&B ``best`` alias names, with
    why; every valid one when the ledger cannot be read (which those are is unknown: none may
    be deleted)."""
    try:
        protected = {
            str(r.get("checkpoint", "")): f"W&B best of {artifact}"
            for artifact, r in best_publications(run_dir).items()
        }
        for record in pending_publications(run_dir).values():
            protected[str(record.get("checkpoint", ""))] = "pending publication"
        return protected
    except KeiseiFnError as exc:
        log.warning("%s; keeping every checkpoint of %s", exc, run_dir)
        return dict.fromkeys((meta.name for meta in scan.valid), "unreadable publication ledger")


def _abandoned(path: RunPath) -> bool:
    """Whether an unreferenced file is older than ``ABANDONED_AFTER_SECONDS`` (a save in flight
    is younger); False when it is gone or its age unknown."""
    age = modified_age(path)
    return age is not None and age >= ABANDONED_AFTER_SECONDS
