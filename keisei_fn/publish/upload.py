"""Publishing checkpoints to Weights & Biases: retries, a durable outbox, training never stops.

``publish`` logs a checkpoint's two files (weights and sidecar) as one W&B artifact.
Every publication goes through the run directory's publication ledger (owned by the store):
``pending`` is appended before the upload, ``published`` or ``failed`` after. A transient
failure (network, W&B unreachable) is retried with exponential backoff and then left pending:
``flush_outbox`` publishes it later, from this or another machine that has the run directory.
W&B's ``log_artifact`` returns before anything is confirmed, so the promise is *at least once,
idempotent by (artifact name, weights digest)*: nothing the ledger marks published is logged
again. (Two processes flushing the same run directory at the same instant may both log a
version; W&B makes no second version of unchanged contents.)

Nothing but ``KeyboardInterrupt`` and ``SystemExit`` leaves these functions (those always do,
during backoff sleeps too) — and ``SpecError`` for a malformed argument of :func:`publish`,
before anything is done; everything else becomes a :class:`PublishResult`. wandb is imported
only when something is published: training, saving and loading never need it.

Evaluation results, registry links, ``best``, references: the artifact's ``"metrics"`` hold the
checkpoint's stats, the numbers at the top of its ``extra`` and ``metrics=`` (e.g. match
results). ``link_to=`` links the logged artifact to a W&B Registry collection; ``best=``
(:class:`~keisei_fn.publish.registry.BestBy`) also logs the checkpoint as a version of
``{run_name}-best-checkpoint`` with the alias ``best`` when it beats the best published so far
(the ledger remembers which that is; retention never prunes it), and links that version to
``best.link_to``. All of it is part of one publication: a transient failure of any step queues
the whole, and a flush redoes it (W&B makes no second version of unchanged contents). **Offline
runs cannot link**: wandb 0.31's ``Run.link_artifact`` raises ``NotImplementedError`` in offline
mode (after logging the artifact a second time), so an offline run is never asked to link; the
publication is ``published`` with the target left unlinked (said in the result's reason and the
ledger's ``unlinked`` field): after ``wandb sync``, link it in the W&B UI or with W&B's API
(``wandb.Api().artifact(name).link(target)``). A version the ledger already marks published
is not logged, linked or ranked again: give ``link_to``/``best`` the first time. A checkpoint on
``s3://`` is logged as W&B *references* to its objects (``Artifact.add_reference``, which
needs ``boto3`` — the ``s3`` extra — and reads each object's ETag and size with the standard
AWS settings: ``AWS_ENDPOINT_URL`` or W&B's ``AWS_S3_ENDPOINT_URL``, credentials from the
environment; a run directory's fsspec ``storage_options`` are not seen by W&B): no byte is
uploaded or staged. The artifact then holds
only pointers: a referenced checkpoint that retention prunes can no longer be downloaded from
W&B (unless the bucket keeps object versions, which W&B records), so keep what you publish
(``keep_every``, ``keep_best``) or pass ``reference=False`` to upload copies.

Disk: files are added with W&B's default ``"mutable"`` policy, so W&B copies each into its
staging directory (``$WANDB_DATA_DIR/artifacts/staging``) and uploads the copy. The run
directory stays ours: retention may prune a published checkpoint and a final save may replace a
sidecar at any time without corrupting an upload. The price is a second copy of each version
until W&B has uploaded it (offline: until ``wandb sync``). The copies of an attempt that does not
end published are removed.

Example:
    >>> publish("runs/none/checkpoint_ts1", run_name="r", enabled=False).status
    'skipped'
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from keisei_fn.errors import (
    IntegrityError,
    SpecError,
    UnhealthyCheckpointError,
    UnsupportedFormatError,
)
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.publish.plan import (
    Publication,
    best_publication,
    check_metrics,
    evaluation_metrics,
    plan_publication,
)
from keisei_fn.publish.registry import BestBy, is_new_best, registry_target
from keisei_fn.state import thaw
from keisei_fn.store import local_checkpoint_files
from keisei_fn.store.ledger import (
    append_ledger,
    best_publications,
    pending_publications,
    read_ledger,
)
from keisei_fn.store.listing import read_listed
from keisei_fn.store.locate import resolve_stem
from keisei_fn.store.names import parse_stem
from keisei_fn.store.retention import metric_value

__all__ = [
    "PUBLISH_ENV",
    "PublishResult",
    "flush_outbox",
    "publish",
    "publishable",
    "publishing_enabled",
]

log = logging.getLogger("keisei_fn.publish")

#: Set to ``0`` (or ``false``, ``no``, ``off``) to switch publishing off.
PUBLISH_ENV = "KEISEI_FN_PUBLISH"
_OFF = frozenset({"0", "false", "no", "off"})
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ETIMEDOUT",
        "EPIPE",
    )
    if hasattr(errno, name)
)

Status = Literal["published", "skipped", "queued", "failed"]
Sleep = Callable[[float], object]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishResult:
    """What a publication did; the training loop decides what to do about it.

    Attributes:
        status: ``"published"`` (logged to the run), ``"skipped"`` (publishing off, no or a
            disabled run, wandb not installed: nothing recorded), ``"queued"`` (a transient
            failure outlasted the retries; pending in the ledger for :func:`flush_outbox`) or
            ``"failed"`` (permanent; recorded, never retried by a flush).
        reason: a short human explanation.
        artifact_name: the artifact's name, once known.
        aliases: the aliases applied (W&B adds ``latest`` itself).
        checkpoint: the checkpoint's name (``checkpoint_ts100``, ``final_model``), or the path
            it was given as when it could not be read.
        linked: the W&B Registry collections the artifacts were linked to (an offline run
            links nothing: see the module docstring).
        best: whether this publication moved the run's ``best`` alias to its checkpoint.

    ``str()`` is one line for people: ``published checkpoint_ts100 as ppo-1-checkpoint-ts100
    (aliases ts-100): logged to W&B run 1a2b3c``, ``failed checkpoint_ts200: IntegrityError:
    ...``.

    Example:
        >>> str(PublishResult(status="skipped", reason="wandb not installed",
        ...                   checkpoint="final_model"))
        'skipped final_model: wandb not installed'
    """

    status: Status
    reason: str
    artifact_name: str | None = None
    aliases: tuple[str, ...] = ()
    checkpoint: str | None = None
    linked: tuple[str, ...] = ()
    best: bool = False

    def replace(self, **changes: Any) -> PublishResult:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def __str__(self) -> str:
        what = self.checkpoint or self.artifact_name or "checkpoint"
        if self.artifact_name and self.artifact_name != what:
            what += f" as {self.artifact_name}"
        if self.aliases and self.status != "failed":
            what += f" (aliases {', '.join(self.aliases)})"
        return f"{self.status} {what}" + (f": {self.reason}" if self.reason else "")


def publishing_enabled(enabled: bool | None = None) -> bool:
    """The switch: ``enabled`` when given, else the ``KEISEI_FN_PUBLISH`` environment variable.

    Args:
        enabled: an explicit choice, which wins over the environment.

    Returns:
        False when ``enabled`` is False, or it is None and ``KEISEI_FN_PUBLISH`` is ``0``,
        ``false``, ``no`` or ``off``; True otherwise.

    Example:
        >>> publishing_enabled(False)
        False
    """
    if enabled is not None:
        return bool(enabled)
    return os.environ.get(PUBLISH_ENV, "1").strip().lower() not in _OFF


def _connect(enabled: bool | None, run: Any) -> tuple[Any, Any] | str:
    """``(wandb, run)`` to publish with, or why not (the reason for ``"skipped"``)."""
    if not publishing_enabled(enabled):
        return f"publishing is switched off (enabled=False or {PUBLISH_ENV}=0)"
    try:
        import wandb
    except ModuleNotFoundError as exc:
        if exc.name != "wandb":
            return f"wandb cannot be imported: {exc}"
        return "wandb not installed"
    except Exception as exc:  # a broken installation must not stop training
        return f"wandb cannot be imported: {exc!r}"
    run = run if run is not None else wandb.run
    if run is None:
        return "no active W&B run (call wandb.init() or pass run=)"
    if getattr(run, "disabled", False):
        return "the W&B run is disabled (mode='disabled'): it would only pretend to publish"
    return wandb, run


def _is_transient(wandb: Any, exc: Exception) -> bool:
    """Whether retrying later may succeed: W&B communication and network errors."""
    if isinstance(exc, wandb.errors.CommError | ConnectionError | TimeoutError | socket.gaierror):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    requests = sys.modules.get("requests")
    return requests is not None and isinstance(exc, requests.ConnectionError | requests.Timeout)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__qualname__}: {exc}"


def _label(checkpoint: CheckpointMeta | PathArg) -> str:
    """A checkpoint's name for a result: the meta's, or the path as given."""
    return checkpoint.name if isinstance(checkpoint, CheckpointMeta) else str(checkpoint)


def publishable(checkpoint: CheckpointMeta | PathArg) -> CheckpointMeta:
    """The checkpoint :func:`publish` would publish, as it is on disk now (checked at the
    listed level) — to find out before starting a W&B run whether there is anything to publish.

    Args:
        checkpoint: as for :func:`publish`.

    Returns:
        Its current meta.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError: no such checkpoint,
            or not a valid one (a meta that no longer matches the weights on disk included).
        UnsupportedFormatError: a sharded checkpoint (consolidate it first) or a legacy file.
        UnhealthyCheckpointError: the health gate marked it unhealthy (``keisei_fn.health``):
            it is never published.

    Example:
        >>> publishable("runs/none/checkpoint_ts1")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none/checkpoint_ts1
    """
    path = checkpoint.path if isinstance(checkpoint, CheckpointMeta) else resolve_stem(checkpoint)
    current = read_listed(path)[0]
    _refuse_unhealthy(current)
    if current.sharded:
        raise UnsupportedFormatError(
            f"{current.sidecar_path} is a sharded checkpoint: consolidate it into a single file "
            "first (keisei_fn.consolidate, or `keisei-fn consolidate`), then publish that"
        )
    if not isinstance(checkpoint, CheckpointMeta):
        return current
    if current.weights_digest != checkpoint.weights_digest:
        raise IntegrityError(
            f"{checkpoint.weights_path}: weights digest is {current.weights_digest}, the meta "
            f"says {checkpoint.weights_digest}; the checkpoint was replaced since"
        )
    return current


def _refuse_unhealthy(meta: CheckpointMeta) -> None:
    """Raise :class:`UnhealthyCheckpointError` for a checkpoint marked unhealthy."""
    if not meta.healthy:
        raise UnhealthyCheckpointError(
            f"{meta.sidecar_path} is marked unhealthy by the health gate and is never "
            f"published: {meta.health_summary}"
        )


def _build_artifact(wandb: Any, run_dir: RunPath, plan: Publication) -> Any:
    artifact = wandb.Artifact(
        plan.artifact,
        type=plan.type,
        description=plan.description,
        metadata=thaw(plan.metadata),
    )
    meta = _planned_meta(run_dir, plan)
    if plan.reference and str(run_dir).startswith("s3://"):  # W&B reads each object's ETag
        for path in (meta.weights_path, meta.sidecar_path):
            artifact.add_reference(str(path), name=path.name)
        return artifact
    # W&B adds local files: a remote checkpoint's are fetched (and W&B copies them again)
    with tempfile.TemporaryDirectory(prefix="keisei-fn-publish-") as staging:
        for local in local_checkpoint_files(meta, Path(staging)):
            artifact.add_file(str(local), name=local.name)
    return artifact


def _link(wandb: Any, run: Any, artifact: Any, target: str) -> str | None:
    """Link a logged artifact to a registry collection: None when linked, else why not (an
    offline run, a permanent error); a transient error is raised, to be retried."""
    if getattr(run, "offline", False):
        return "W&B offline runs cannot link (link after `wandb sync`)"
    try:
        run.link_artifact(artifact, target)
    except Exception as exc:
        if _is_transient(wandb, exc):
            raise
        return _describe(exc)
    return None


def _discard_staged(artifact: Any | None, run_dir: RunPath, plan: Publication) -> None:
    """Remove W&B's staged copies of an artifact that was not logged."""
    if artifact is None:
        return
    ours = {str(run_dir / name) for name in artifact.manifest.entries}
    for entry in artifact.manifest.entries.values():
        if entry.local_path and str(entry.local_path) not in ours:
            with contextlib.suppress(OSError):
                os.unlink(entry.local_path)


@dataclass(slots=True)
class _Uploaded:
    """What an upload did: its status and reason, and the links made or left unmade."""

    status: Status = "queued"
    reason: str = ""
    linked: list[str] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # ledger fields: the best alias moved
    unranked: str = ""  # why a publication with ``best`` could not be ranked


def _with_best(
    run_dir: RunPath, plan: Publication
) -> tuple[list[Publication], dict[str, Any], str]:
    """``plan``, and the version of the run's best artifact when its checkpoint beats the best
    the ledger knows; with the ledger fields that say the best alias moved (empty if not), and
    why the checkpoint could not be ranked (its metric missing or not finite; else "")."""
    if plan.best is None or plan.best_artifact is None:
        return [plan], {}, ""
    meta = _planned_meta(run_dir, plan)
    found = evaluation_metrics(meta, plan.metrics).get(plan.best.metric)
    value = metric_value(found)
    if value is None:
        why = "missing" if found is None else f"{found!r}, not a finite number"
        return [plan], {}, f"not ranked for best: {plan.best.metric} {why}"
    current = best_publications(run_dir).get(plan.best_artifact)
    if not is_new_best(value, meta.step, current, plan.best):
        return [plan], {}, ""
    moved = {
        "best_artifact": plan.best_artifact,
        "best_metric": plan.best.metric,
        "best_mode": plan.best.mode,
        "best_value": value,
        "best_step": meta.step,
    }
    return [plan, best_publication(plan, meta, value)], moved, ""


def _upload(
    wandb: Any,
    run: Any,
    run_dir: RunPath,
    main: Publication,
    tries: int,
    backoff: float,
    sleep: Sleep,
) -> _Uploaded:
    """Log the planned artifact (and the best version, when it is the best) and make their
    links, in order, retrying transient errors from the step that failed (an artifact logged
    is never logged again)."""
    done = _Uploaded()
    plans: list[Publication] = []
    built: dict[str, Any] = {}
    logged: set[str] = set()
    link_tried: set[str] = set()

    def discard_unlogged() -> None:
        for plan in plans:
            if plan.artifact not in logged:
                _discard_staged(built.get(plan.artifact), run_dir, plan)

    for attempt in range(1, tries + 1):
        try:
            if not plans:
                plans, done.best, done.unranked = _with_best(run_dir, main)
            for plan in plans:
                if plan.artifact not in built:
                    built[plan.artifact] = _build_artifact(wandb, run_dir, plan)
                if plan.artifact not in logged:
                    run.log_artifact(built[plan.artifact], aliases=list(plan.aliases))
                    logged.add(plan.artifact)
                if plan.link_to is not None and plan.artifact not in link_tried:
                    why = _link(wandb, run, built[plan.artifact], plan.link_to)
                    link_tried.add(plan.artifact)
                    if why is None:
                        done.linked.append(plan.link_to)
                    else:
                        done.unlinked.append(f"{plan.link_to}: {why}")
            done.status = "published"
            done.reason = f"logged to W&B run {getattr(run, 'id', '?')}"
            break
        except Exception as exc:  # classified below; KeyboardInterrupt/SystemExit pass through
            done.reason = _describe(exc)
            if not _is_transient(wandb, exc):
                done.status = "failed"
                break
            if attempt < tries:
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "publishing %s failed (try %d of %d), retrying in %.1f s: %s",
                    main.artifact,
                    attempt,
                    tries,
                    delay,
                    done.reason,
                )
                try:
                    sleep(delay)
                except BaseException:  # Ctrl-C while waiting: then re-raise
                    discard_unlogged()
                    raise
    if done.status == "queued":
        done.reason += f" (after {tries} tries; pending in the outbox for flush_outbox)"
    if done.status != "published":
        discard_unlogged()
    return done


def _latest_event(run_dir: RunPath, key: tuple[str, str]) -> str | None:
    records = read_ledger(run_dir)
    events = [r.get("event") for r in records if (r.get("artifact"), r.get("digest")) == key]
    return events[-1] if events else None


def _record_outcome(
    run_dir: RunPath,
    plan: Publication,
    status: Status,
    reason: str,
    fields: Mapping[str, Any] | None = None,
) -> None:
    try:
        append_ledger(
            run_dir,
            {
                "event": status,
                "artifact": plan.artifact,
                "digest": plan.digest,
                "checkpoint": plan.checkpoint,
                "reason": reason,
                **(fields or {}),
            },
        )
    except (OSError, ValueError) as exc:
        log.warning("could not record %s of %s in the ledger: %s", status, plan.artifact, exc)


def _deliver(
    wandb: Any,
    run: Any,
    run_dir: RunPath,
    plan: Publication,
    *,
    record_pending: bool,
    tries: int,
    backoff: float,
    sleep: Sleep,
) -> PublishResult:
    """Publish one planned artifact through the ledger."""
    done = PublishResult(
        status="published",
        reason="",
        artifact_name=plan.artifact,
        aliases=plan.aliases,
        checkpoint=plan.checkpoint,
    )
    try:
        if _latest_event(run_dir, plan.key) == "published":
            return done.replace(reason="already published (publication ledger)")
        if record_pending:
            append_ledger(run_dir, plan.record("pending"))
    except (OSError, ValueError) as exc:
        log.error("not publishing %s: the ledger in %s failed: %s", plan.artifact, run_dir, exc)
        return done.replace(status="failed", reason=f"publication ledger: {_describe(exc)}")
    up = _upload(wandb, run, run_dir, plan, max(1, tries), backoff, sleep)
    if up.status == "queued":
        log.warning("publishing %s queued: %s", plan.artifact, up.reason)
        return done.replace(status=up.status, reason=up.reason)
    if up.status == "failed":
        _record_outcome(run_dir, plan, up.status, up.reason)
        log.error("publishing %s failed permanently: %s", plan.artifact, up.reason)
        return done.replace(status=up.status, reason=up.reason)
    reason = up.reason
    if up.best:
        reason += (
            f"; best by {up.best['best_metric']} ({up.best['best_value']:g}): "
            f"{up.best['best_artifact']} (alias best)"
        )
    if up.unranked:
        reason += f"; {up.unranked}"
    reason += "".join(f"; linked to {target}" for target in up.linked)
    reason += "".join(f"; not linked to {note}" for note in up.unlinked)
    fields: dict[str, Any] = dict(up.best)
    if up.linked:
        fields["linked"] = up.linked
    if up.unlinked:
        fields["unlinked"] = up.unlinked
    _record_outcome(run_dir, plan, up.status, reason, fields)
    for note in up.unlinked:
        log.warning("published %s but not linked to %s", plan.artifact, note)
    log.info("published %s (%s)", plan.artifact, ", ".join(plan.aliases))
    return done.replace(
        status=up.status, reason=reason, linked=tuple(up.linked), best=bool(up.best)
    )


def publish(
    checkpoint: CheckpointMeta | str | os.PathLike[str],
    *,
    run_name: str,
    run: Any = None,
    artifact_name: str | None = None,
    aliases: Sequence[str] | None = None,
    artifact_type: str | None = None,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    link_to: str | None = None,
    best: BestBy | None = None,
    reference: bool = True,
    enabled: bool | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    sleep: Sleep = time.sleep,
) -> PublishResult:
    """Log a checkpoint (weights and sidecar) as a W&B artifact, through the durable outbox.

    Args:
        checkpoint: a :class:`CheckpointMeta` or a path (either file of the pair or its stem);
            checked at the listed level (a meta must still match the weights on disk).
        run_name: the training run's name: the artifact name's prefix.
        run: the W&B run; ``wandb.run`` when None.
        artifact_name: the part after the run name (Keisei's ``artifact_name``); by default
            ``checkpoint-ts{N}``, ``final-checkpoint`` or ``final-model`` from the kind.
        aliases: replaces Keisei's aliases (``ts-{N}``; ``latest-checkpoint``; ``latest``,
            ``final``).
        artifact_type: default ``"model"``.
        description: the artifact's description.
        metadata: extra metadata, added after Keisei's keys (sanitised for W&B).
        metrics: evaluation results (name → number, e.g. match results), added to the
            artifact's ``"metrics"`` with the checkpoint's stats and the numbers at the top of
            its ``extra`` (this wins on a clash); ``best`` ranks by them too.
        link_to: a W&B Registry collection, ``[ORG/]wandb-registry-REGISTRY/COLLECTION``, to
            link the logged artifact to (e.g. the final model's); not done by an offline run.
        best: also move the run's ``best`` alias (artifact ``{run_name}-best-checkpoint``)
            to this checkpoint when it is the best published by ``best.metric``, and link it
            to ``best.link_to``; e.g. ``BestBy(*policy.keep_best[:2])``.
        reference: for a checkpoint on ``s3://``, log W&B references to its objects instead
            of uploading copies (see the module docstring); False uploads copies.
        enabled: False skips; None follows ``KEISEI_FN_PUBLISH``.
        retries: tries in all for transient errors (at least 1).
        backoff: seconds before the second try, doubling each time (0 in tests).
        sleep: the sleep function (injectable for tests).

    Returns:
        The outcome; see :class:`PublishResult`. Publishing a version the ledger already marks
        published returns ``"published"`` without logging it again.
        A checkpoint the health gate marked unhealthy (``keisei_fn.health``) is ``"failed"``
        with the reason (``UnhealthyCheckpointError: ...``) and nothing recorded: a NaN
        checkpoint never becomes a W&B version nor moves ``latest``, and a loop that publishes
        every save goes on.

    Raises:
        KeyboardInterrupt, SystemExit: always propagated (the publication stays pending).
        SpecError: malformed ``metrics``, ``link_to`` or ``best`` — the caller's mistake,
            raised before anything is done (it would fail every publication alike).

    Example:
        With a run from ``wandb.init(...)``, ``publish(meta, run_name="ppo-1")`` logs
        ``ppo-1-checkpoint-ts{N}``; switched off, nothing is touched:

        >>> publish("runs/ppo-1/checkpoint_ts10240", run_name="ppo-1", enabled=False).reason
        'publishing is switched off (enabled=False or KEISEI_FN_PUBLISH=0)'
    """
    _check_arguments(metrics, link_to, best)
    connected = _connect(enabled, run)
    if isinstance(connected, str):
        log.info("not publishing %s: %s", checkpoint, connected)
        return PublishResult(status="skipped", reason=connected, checkpoint=_label(checkpoint))
    wandb, run = connected
    try:
        meta = publishable(checkpoint)
        plan = plan_publication(
            meta,
            run_name=run_name,
            suffix=artifact_name,
            aliases=aliases,
            artifact_type=artifact_type,
            description=description,
            metadata=metadata,
            metrics=metrics,
            link_to=link_to,
            best=best,
            reference=reference,
        )
    except (OSError, ValueError, TypeError) as exc:
        log.error("cannot publish %s: %s", checkpoint, exc)
        return PublishResult(status="failed", reason=_describe(exc), checkpoint=_label(checkpoint))
    return _deliver(
        wandb,
        run,
        meta.run_dir,
        plan,
        record_pending=True,
        tries=retries,
        backoff=backoff,
        sleep=sleep,
    )


def _check_arguments(
    metrics: Mapping[str, float] | None, link_to: str | None, best: BestBy | None
) -> None:
    """Raise SpecError for a malformed ``metrics``, ``link_to`` or ``best`` of :func:`publish`."""
    check_metrics(metrics)
    if link_to is not None:
        registry_target(link_to)
    if best is not None and not isinstance(best, BestBy):
        raise SpecError(f"best must be a BestBy, got {best!r}")


def _pending_plan(run_dir: RunPath, record: Mapping[str, Any]) -> Publication:
    """The publication a pending ledger record describes, its checkpoint still on disk."""
    plan = Publication.from_record(record)
    return plan.for_checkpoint(_planned_meta(run_dir, plan))


def _planned_meta(run_dir: RunPath, plan: Publication) -> CheckpointMeta:
    """The checkpoint a publication is of, as it is on disk now (its files by the names its
    sidecar gives).

    Raises:
        IntegrityError: the plan names no checkpoint, or the checkpoint was replaced since.
        UnhealthyCheckpointError: it is marked unhealthy now (an identical state re-saved
            with the health gate on).
    """
    parsed = parse_stem(plan.checkpoint)
    if parsed is None or parsed.stem != plan.checkpoint:
        raise IntegrityError(f"ledger names {plan.checkpoint!r}, not a checkpoint of {run_dir}")
    current = read_listed(run_dir / plan.checkpoint)[0]
    _refuse_unhealthy(current)
    if current.weights_digest != plan.digest:
        raise IntegrityError(
            f"{current.weights_path}: weights digest is {current.weights_digest}, the "
            f"publication is of {plan.digest}; the checkpoint was replaced since"
        )
    return current


def flush_outbox(
    run_dir: PathArg,
    *,
    run: Any = None,
    enabled: bool | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    sleep: Sleep = time.sleep,
) -> list[PublishResult]:
    """Publish every publication the run directory's ledger holds as pending.

    Later in the same run, or from another machine that has the run directory. A pending
    publication whose checkpoint is gone or was replaced ends ``"failed"`` (recorded, so it is
    not retried forever); a version already marked published is never logged again.

    Args:
        run_dir: the run directory (local or an fsspec URL).
        run: the W&B run; ``wandb.run`` when None.
        enabled, retries, backoff, sleep: as for :func:`publish`.

    Returns:
        One result per pending publication, in ledger order (``"skipped"`` ones when
        publishing is not possible now: they stay pending); empty when nothing is pending.

    Raises:
        KeyboardInterrupt, SystemExit: always propagated.

    Example:
        >>> flush_outbox("runs/does-not-exist")
        []
    """
    run_dir = run_path(run_dir)
    try:
        pending = pending_publications(run_dir)
    except OSError as exc:
        return [PublishResult(status="failed", reason=f"publication ledger: {_describe(exc)}")]
    if not pending:
        return []
    connected = _connect(enabled, run)
    if isinstance(connected, str):
        return [
            PublishResult(
                status="skipped",
                reason=connected,
                artifact_name=artifact,
                checkpoint=record.get("checkpoint"),
            )
            for (artifact, _), record in pending.items()
        ]
    wandb, run = connected
    results = []
    for record in pending.values():
        try:
            plan = _pending_plan(run_dir, record)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            failed = Publication(
                artifact=record["artifact"],
                type="",
                aliases=(),
                metadata={},
                description=None,
                checkpoint=str(record.get("checkpoint")),
                digest=record["digest"],
            )
            _record_outcome(run_dir, failed, "failed", _describe(exc))
            log.error("pending publication %s cannot be published: %s", failed.artifact, exc)
            results.append(
                PublishResult(
                    status="failed",
                    reason=_describe(exc),
                    artifact_name=failed.artifact,
                    checkpoint=failed.checkpoint,
                )
            )
            continue
        results.append(
            _deliver(
                wandb,
                run,
                run_dir,
                plan,
                record_pending=False,
                tries=retries,
                backoff=backoff,
                sleep=sleep,
            )
        )
    return results
