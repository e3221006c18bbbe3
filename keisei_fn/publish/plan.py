"""What to publish: W&B artifact names, aliases and metadata for a checkpoint. Pure.

Names follow Keisei: ``{run_name}-checkpoint-ts{N}`` (alias ``ts-{N}``) for a periodic
checkpoint, ``{run_name}-final-model`` (aliases ``latest``, ``final``) for the final model and
``{run_name}-final-checkpoint`` (alias ``latest-checkpoint``) for a final checkpoint; all of
type ``"model"``. Every name is made safe for W&B: only ``[A-Za-z0-9_.-]``, at most 128
characters, no ``..``; a long run name is shortened, never the suffix that names the step.

Metadata carries Keisei's keys (``training_timesteps``, ``total_episodes``, ``black_wins``,
``white_wins``, ``draws``, ``checkpoint_type``, ``model_type``, ``feature_set`` — the spec's
real feature set, ``training_completed`` for finals; and for periodic checkpoints, whose
metadata Keisei merged with its trainer's stats, :data:`PERIODIC_KEYS`: ``global_timestep``,
``total_episodes_completed`` and, from the state's ``extra`` when there, ``elo_state`` and
``metrics_history``) plus the sidecar's digests and spec, and ``"metrics"``: the checkpoint's
evaluation results (:func:`evaluation_metrics`: its game stats, every number at the top of its
``extra``, and the caller's ``metrics``, e.g. match results). It is
made JSON-safe for W&B before an artifact is built: non-finite floats become strings (W&B
raises on ±inf and turns NaN into null), the user's ``extra`` state (e.g. ``metrics_history``)
is nested under one key, and at most 100 top-level keys are kept (the rest go under
``"overflow"``).

Example:
    >>> artifact_name("my run/1", "checkpoint-ts10240")
    'my-run-1-checkpoint-ts10240'
    >>> sanitize_metadata({"loss": float("inf"), "lr": 0.1})
    {'loss': 'inf', 'lr': 0.1}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keisei_fn.errors import SpecError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.publish.registry import BEST_ALIAS, BEST_SUFFIX, BestBy, registry_target
from keisei_fn.state import freeze, thaw

__all__ = [
    "MAX_METADATA_KEYS",
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "PERIODIC_KEYS",
    "Publication",
    "artifact_metadata",
    "artifact_name",
    "best_publication",
    "check_metrics",
    "default_aliases",
    "default_suffix",
    "evaluation_metrics",
    "plan_publication",
    "sanitize_metadata",
    "sanitize_name",
]

MAX_NAME_LENGTH = 128
MAX_METADATA_KEYS = 100
#: At most this many caller's metrics (they travel in the publication ledger's records).
MAX_METRICS = 64
#: Every artifact name and alias this module produces fullmatches this.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
OVERFLOW_KEY = "overflow"
#: Top-level keys of Keisei's periodic-checkpoint artifacts (its trainer's stats), beyond those
#: of every artifact; the last two come from the state's ``extra``.
PERIODIC_KEYS = ("global_timestep", "total_episodes_completed", "elo_state", "metrics_history")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_DOTS = re.compile(r"\.{2,}")
_INT64 = 2**63


def sanitize_name(text: str, *, fallback: str = "run") -> str:
    """Make ``text`` a W&B-safe name part: unsafe runs become ``-``, ``..`` becomes ``.``.

    Leading/trailing ``-`` and ``.`` are dropped; the result is at most 128 characters and
    never empty (``fallback`` when nothing usable is left).

    Args:
        text: any string (a run name, a user's artifact name or alias).
        fallback: used when ``text`` has no usable character.

    Returns:
        A string that fullmatches :data:`NAME_PATTERN` and contains no ``..`` or ``/``.

    Example:
        >>> sanitize_name("../ètude run\\n")
        'tude-run'
    """
    cleaned = _DOTS.sub(".", _UNSAFE.sub("-", text)).strip("-.")
    return cleaned[:MAX_NAME_LENGTH].rstrip("-.") or fallback


def artifact_name(run_name: str, suffix: str) -> str:
    """``{run_name}-{suffix}``, sanitised, shortening the run name (never the suffix) to fit.

    Args:
        run_name: the training run's name (any string).
        suffix: what follows it, e.g. ``"checkpoint-ts10240"`` (Keisei's ``artifact_name``).

    Returns:
        At most 128 characters of ``[A-Za-z0-9_.-]``, ending with the sanitised suffix (or, for
        an absurdly long suffix, with its last 126 characters, which hold the step).

    Example:
        >>> len(artifact_name("x" * 300, "checkpoint-ts10240"))
        128
    """
    tail = sanitize_name(suffix, fallback="checkpoint")
    tail = tail[-(MAX_NAME_LENGTH - 2) :].lstrip("-.")
    room = MAX_NAME_LENGTH - len(tail) - 1
    head = sanitize_name(run_name)[:room].rstrip("-.") or "r"
    return f"{head}-{tail}"


def default_suffix(meta: CheckpointMeta) -> str:
    """Keisei's artifact name after the run name: ``checkpoint-ts{N}``, ``final-checkpoint``,
    ``final-model`` (a periodic checkpoint of another prefix keeps it: ``a-b-ts{N}``)."""
    if meta.kind == "final_model":
        return "final-model"
    if meta.kind == "final":
        return "final-checkpoint"
    return meta.name.replace("_", "-")


def default_aliases(meta: CheckpointMeta) -> tuple[str, ...]:
    """Keisei's aliases: ``ts-{N}``; ``latest``, ``final``; or ``latest-checkpoint``."""
    if meta.kind == "final_model":
        return ("latest", "final")
    if meta.kind == "final":
        return ("latest-checkpoint",)
    return (f"ts-{meta.step}",)


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value) if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_json_safe(v) for v in value]
    item = getattr(value, "item", None)  # NumPy and torch scalars
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def sanitize_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe artifact metadata that W&B accepts unchanged.

    Non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``; integers beyond 64 bits and
    other objects become strings; mappings become dicts with string keys and sequences lists.
    Beyond 100 top-level keys, the first 99 are kept and the rest are nested under
    ``"overflow"``.

    Args:
        metadata: any mapping (frozen ones included).

    Returns:
        A fresh dict.

    Example:
        >>> sanitize_metadata({"h": (1.0, float("nan"))})
        {'h': [1.0, 'nan']}
    """
    safe: dict[str, Any] = _json_safe(metadata)
    if len(safe) <= MAX_METADATA_KEYS:
        return safe
    items = list(safe.items())
    kept, rest = dict(items[: MAX_METADATA_KEYS - 1]), dict(items[MAX_METADATA_KEYS - 1 :])
    if OVERFLOW_KEY in kept:
        rest[OVERFLOW_KEY] = kept.pop(OVERFLOW_KEY)
    kept[OVERFLOW_KEY] = rest
    return kept


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The caller's evaluation metrics, checked: string keys, real numbers (not bools).

    Args:
        metrics: e.g. ``{"win_rate_vs_previous": 0.62, "elo": 1510.0}``, or None.

    Returns:
        A fresh dict (empty for None).

    Raises:
        SpecError: not a mapping, a key that is not a non-empty string, a value that is not an
            int or float, or more than :data:`MAX_METRICS` entries.

    Example:
        >>> check_metrics({"elo": 1510})
        {'elo': 1510}
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS:
        raise SpecError(f"metrics must be a mapping of at most {MAX_METRICS} numbers")
    checked = dict(metrics)
    for key, value in checked.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"a metric's name must be a non-empty string, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"metric {key!r} must be an int or float, got {value!r}")
    return checked


def evaluation_metrics(
    meta: CheckpointMeta, metrics: Mapping[str, float] | None = None
) -> dict[str, float]:
    """A checkpoint's evaluation results, for its artifact's ``"metrics"``.

    The rule: the game stats (``black_wins``, ``white_wins``, ``draws``), then every int or
    float (not bool) at the top of the checkpoint's ``extra`` (where retention's ``keep_best``
    reads its metric), then ``metrics`` (e.g. match results computed after the save), each
    later source winning on a name clash.

    Args:
        meta: the checkpoint.
        metrics: the caller's metrics (see :func:`check_metrics`).

    Returns:
        Name → number (not yet sanitised: NaN stays NaN).

    Example:
        >>> from keisei_fn import GameStats
        >>> meta = CheckpointMeta(path="r/checkpoint_ts5", name="checkpoint_ts5",
        ...     format_version=1, kind="periodic", step=5, episodes=2, spec=None,
        ...     stats=GameStats(black_wins=3), weights_size=1, weights_digest="blake3:00",
        ...     digest="blake3:11", created="2025-01-01T00:00:00+00:00",
        ...     extra={"win_rate": 0.5, "history": [1.0], "ok": True})
        >>> evaluation_metrics(meta, {"elo": 1510.0})
        {'black_wins': 3, 'white_wins': 0, 'draws': 0, 'win_rate': 0.5, 'elo': 1510.0}
    """
    stats = meta.stats
    found: dict[str, float] = {
        "black_wins": stats.black_wins,
        "white_wins": stats.white_wins,
        "draws": stats.draws,
    }
    for key, value in meta.extra.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = value
    return found | check_metrics(metrics)


def artifact_metadata(
    meta: CheckpointMeta,
    extra: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Keisei's metadata keys, the sidecar's digests and spec, the evaluation metrics, then
    ``extra``; sanitised.

    A periodic checkpoint's metadata also has Keisei's :data:`PERIODIC_KEYS` at the top level
    (``elo_state`` and ``metrics_history`` when the state's ``extra`` holds them; they stay
    under ``"extra"`` too), so dashboards and scripts written for Keisei's artifacts keep
    working.

    Args:
        meta: the checkpoint.
        extra: the caller's metadata; it is added last and wins on a key clash.
        metrics: the caller's evaluation metrics, under ``"metrics"`` with the checkpoint's
            own (:func:`evaluation_metrics`).

    Returns:
        The artifact's metadata (see :func:`sanitize_metadata`).

    Example:
        >>> from keisei_fn import GameStats, ModelSpec
        >>> meta = CheckpointMeta(path="r/final_model", name="final_model", format_version=1,
        ...     kind="final_model", step=5, episodes=2, stats=GameStats(), weights_size=1,
        ...     weights_digest="blake3:00", digest="blake3:11", created="2025-01-01T00:00:00",
        ...     spec=ModelSpec(model_type="testmodel", input_features="testfeats"))
        >>> md = artifact_metadata(meta)
        >>> md["feature_set"], md["checkpoint_type"], md["training_completed"]
        ('testfeats', 'final', True)
        >>> periodic = meta.replace(kind="periodic", extra={"elo_state": {"k_factor": 32.0}})
        >>> md = artifact_metadata(periodic)
        >>> md["global_timestep"], md["total_episodes_completed"], md["elo_state"]
        (5, 2, {'k_factor': 32.0})
    """
    spec = meta.spec
    metadata: dict[str, Any] = {
        "training_timesteps": meta.step,
        "total_episodes": meta.episodes,
        "black_wins": meta.stats.black_wins,
        "white_wins": meta.stats.white_wins,
        "draws": meta.stats.draws,
        "checkpoint_type": "periodic" if meta.kind == "periodic" else "final",
        "model_type": spec.model_type if spec is not None else None,
        "feature_set": spec.input_features if spec is not None else None,
    }
    if meta.training_completed:
        metadata["training_completed"] = True
    if meta.kind == "periodic":  # Keisei merged its trainer's stats into these at the top
        trainer_stats = {"global_timestep": meta.step, "total_episodes_completed": meta.episodes}
        trainer_stats |= {k: meta.extra[k] for k in PERIODIC_KEYS[2:] if k in meta.extra}
        metadata |= trainer_stats
    metadata |= {
        "checkpoint": meta.name,
        "kind": meta.kind,
        "format_version": meta.format_version,
        "weights_size": meta.weights_size,
        "weights_digest": meta.weights_digest,
        "sidecar_digest": meta.digest,
        "created": meta.created,
        "spec": spec.to_json() if spec is not None else None,
        "metrics": evaluation_metrics(meta, metrics),
    }
    if meta.extra:
        metadata["extra"] = meta.extra  # bulky history (metrics_history, elo_state) nested
    metadata |= dict(extra or {})
    return sanitize_metadata(metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """One artifact version to log, as the publication ledger records it.

    The ledger records the caller's metadata only: the rest is rebuilt from the checkpoint
    (:func:`artifact_metadata`) when a pending publication is flushed, so a record stays small
    whatever the checkpoint's ``extra`` holds (a Keisei ``metrics_history`` has thousands of
    values, and the ledger refuses to parse a line with more than a few hundred).

    Attributes:
        artifact: the artifact name.
        type: the artifact type.
        aliases: aliases to apply (W&B adds ``latest`` itself).
        metadata: sanitised metadata (read-only).
        description: the artifact's description.
        checkpoint: the checkpoint's file stem in the run directory.
        digest: the weights digest; ``(artifact, digest)`` is the publication's key.
        user_metadata: the caller's part of ``metadata``, JSON-safe (what the ledger records).
        metrics: the caller's evaluation metrics (see :func:`check_metrics`; the ledger
            records them, the checkpoint's own are rebuilt like the metadata).
        link_to: a W&B Registry collection to link the artifact to, or None.
        best: move the run's ``best`` alias here when this checkpoint is the best, or None.
        best_artifact: the run's best artifact (``{run_name}-best-checkpoint``) when ``best``.
        reference: log an ``s3://`` checkpoint's files as W&B references to its objects
            (False: upload copies of the bytes); ignored for other run directories.
    """

    artifact: str
    type: str
    aliases: tuple[str, ...]
    metadata: Mapping[str, Any]
    description: str | None
    checkpoint: str
    digest: str
    user_metadata: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    link_to: str | None = None
    best: BestBy | None = None
    best_artifact: str | None = None
    reference: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "metadata", freeze(dict(self.metadata)))
        object.__setattr__(self, "user_metadata", freeze(dict(self.user_metadata)))
        object.__setattr__(self, "metrics", freeze(check_metrics(self.metrics)))
        if self.link_to is not None:
            registry_target(self.link_to)
        if (self.best is None) != (self.best_artifact is None):
            raise SpecError("a Publication needs both best and best_artifact, or neither")

    @property
    def key(self) -> tuple[str, str]:
        """``(artifact, digest)``."""
        return (self.artifact, self.digest)

    def replace(self, **changes: Any) -> Publication:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def record(self, event: str) -> dict[str, Any]:
        """A ledger record for ``event`` with everything needed to republish (the metadata:
        the caller's part; see the class docstring). Fields of links, metrics and ``best``
        appear only when set (a record stays flat: the ledger caps its JSON containers)."""
        record = {
            "event": event,
            "artifact": self.artifact,
            "digest": self.digest,
            "checkpoint": self.checkpoint,
            "type": self.type,
            "aliases": list(self.aliases),
            "metadata": thaw(self.user_metadata),
            "description": self.description,
        }
        if self.metrics:
            record["metrics"] = _json_safe(self.metrics)
        if self.link_to is not None:
            record["link_to"] = self.link_to
        if not self.reference:
            record["reference"] = False
        if self.best is not None:
            record |= {
                "best_artifact": self.best_artifact,
                "best_metric": self.best.metric,
                "best_mode": self.best.mode,
                "best_link_to": self.best.link_to,
            }
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Publication:
        """Rebuild from a ledger record written by :meth:`record`; its ``metadata`` is the
        caller's part only, until :meth:`for_checkpoint` adds the checkpoint's (a record of an
        earlier keisei_fn holds the whole metadata, which wins over the rebuilt keys).

        Raises:
            KeyError, TypeError: for a record that lacks a field or has a mistyped one.
            SpecError: for malformed metrics, link target or best rule.
        """
        best = None
        if record.get("best_metric") is not None:
            best = BestBy(
                str(record["best_metric"]), str(record["best_mode"]), record.get("best_link_to")
            )
        return cls(
            artifact=str(record["artifact"]),
            type=str(record["type"]),
            aliases=tuple(str(a) for a in record["aliases"]),
            metadata=dict(record["metadata"]),
            description=record.get("description"),
            checkpoint=str(record["checkpoint"]),
            digest=str(record["digest"]),
            user_metadata=dict(record["metadata"]),
            metrics=_parsed_metrics(record.get("metrics") or {}),
            link_to=record.get("link_to"),
            best=best,
            best_artifact=str(record["best_artifact"]) if best is not None else None,
            reference=record.get("reference", True) is not False,
        )

    def for_checkpoint(self, meta: CheckpointMeta) -> Publication:
        """This publication with its whole metadata: ``meta``'s (:func:`artifact_metadata`)
        and then the caller's part.

        Args:
            meta: the checkpoint this publication is of.

        Returns:
            A copy whose ``metadata`` is what :func:`plan_publication` gave it.
        """
        return self.replace(metadata=artifact_metadata(meta, self.user_metadata, self.metrics))


def _parsed_metrics(recorded: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as the ledger holds them (JSON: a non-finite float was written as a string)."""
    return {k: float(v) if isinstance(v, str) else v for k, v in dict(recorded).items()}


def plan_publication(
    meta: CheckpointMeta,
    *,
    run_name: str,
    suffix: str | None = None,
    aliases: Sequence[str] | None = None,
    artifact_type: str | None = None,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    link_to: str | None = None,
    best: BestBy | None = None,
    reference: bool = True,
) -> Publication:
    """Decide name, type, aliases, metadata and description of a checkpoint's artifact.

    Args:
        meta: the checkpoint.
        run_name: the training run's name (the artifact name's prefix).
        suffix: the part after the run name (Keisei's ``artifact_name``); by default
            from the kind: ``checkpoint-ts{N}``, ``final-checkpoint``, ``final-model``.
        aliases: replaces the default aliases (each sanitised like a name).
        artifact_type: default ``"model"``.
        description: default says kind, name and step.
        metadata: extra metadata, added after the defaults.
        metrics: the caller's evaluation metrics (:func:`check_metrics`), added to the
            artifact's ``"metrics"`` (:func:`evaluation_metrics`).
        link_to: a W&B Registry collection to link the artifact to (:func:`registry_target`).
        best: the rule for the run's ``best`` alias; its artifact is
            ``{run_name}-best-checkpoint``.
        reference: for a checkpoint on ``s3://``: W&B references to its objects (False:
            upload copies).

    Returns:
        The publication, with every name and alias fullmatching :data:`NAME_PATTERN`.

    Raises:
        SpecError: for malformed ``metrics`` or ``link_to``.

    Example:
        >>> from keisei_fn import GameStats
        >>> meta = CheckpointMeta(path="r/checkpoint_ts10240", name="checkpoint_ts10240",
        ...     format_version=1, kind="periodic", step=10240, episodes=0, stats=GameStats(),
        ...     spec=None, weights_size=1, weights_digest="blake3:00", digest="blake3:11",
        ...     created="2025-01-01T00:00:00+00:00")
        >>> plan = plan_publication(meta, run_name="ppo run")
        >>> plan.artifact, plan.aliases, plan.type
        ('ppo-run-checkpoint-ts10240', ('ts-10240',), 'model')
    """
    chosen = default_aliases(meta) if aliases is None else tuple(aliases)
    return Publication(
        artifact=artifact_name(run_name, suffix or default_suffix(meta)),
        type=sanitize_name(artifact_type or "model", fallback="model"),
        aliases=tuple(dict.fromkeys(sanitize_name(a, fallback="latest") for a in chosen)),
        metadata=artifact_metadata(meta, metadata, metrics),
        user_metadata=_json_safe(metadata or {}),
        description=description or f"{meta.kind} checkpoint {meta.name} at timestep {meta.step}",
        checkpoint=meta.name,
        digest=meta.weights_digest,
        metrics=check_metrics(metrics),
        link_to=link_to,
        best=best,
        best_artifact=artifact_name(run_name, BEST_SUFFIX) if best is not None else None,
        reference=reference,
    )


def best_publication(plan: Publication, meta: CheckpointMeta, value: float) -> Publication:
    """The version of the run's best artifact that moves its ``best`` alias to ``plan``'s
    checkpoint: the same files and metadata, plus ``"best_by"`` (metric, mode, value).

    Args:
        plan: a publication with ``best`` (its checkpoint, now the best).
        meta: that checkpoint.
        value: its metric.

    Returns:
        A publication of ``plan.best_artifact`` with aliases ``best`` and ``ts-{step}``,
        linked to ``plan.best.link_to``; the ledger records it as part of ``plan``.

    Raises:
        SpecError: ``plan`` has no ``best``.
    """
    if plan.best is None or plan.best_artifact is None:
        raise SpecError(f"the publication of {plan.artifact} has no best rule")
    best_by = {"metric": plan.best.metric, "mode": plan.best.mode, "value": value}
    return Publication(
        artifact=plan.best_artifact,
        type=plan.type,
        aliases=(BEST_ALIAS, f"ts-{meta.step}"),
        metadata=sanitize_metadata({**thaw(plan.metadata), "best_by": best_by}),
        description=f"best by {plan.best.metric} ({plan.best.mode}): {meta.name} at timestep "
        f"{meta.step}",
        checkpoint=plan.checkpoint,
        digest=plan.digest,
        link_to=plan.best.link_to,
        reference=plan.reference,
    )
