"""Publishing checkpoints to Weights & Biases (wandb is imported only when publishing).

Submodules: ``plan`` (pure: artifact names, aliases, metadata, evaluation metrics),
``registry`` (pure: W&B Registry link targets and the ``best`` alias rule), ``upload`` (the edge:
``publish``, ``flush_outbox``, retries and the durable outbox in the run directory's ledger) and
``session`` (``wandb_run``: a run to publish into).

Example:
    >>> from keisei_fn.publish import artifact_name
    >>> artifact_name("ppo-1", "checkpoint-ts10240")
    'ppo-1-checkpoint-ts10240'
"""

from keisei_fn.publish.plan import (
    Publication,
    artifact_metadata,
    artifact_name,
    evaluation_metrics,
    plan_publication,
    sanitize_metadata,
    sanitize_name,
)
from keisei_fn.publish.registry import BestBy, registry_target
from keisei_fn.publish.session import wandb_run
from keisei_fn.publish.upload import (
    PUBLISH_ENV,
    PublishResult,
    flush_outbox,
    publish,
    publishable,
    publishing_enabled,
)

__all__ = [
    "PUBLISH_ENV",
    "BestBy",
    "Publication",
    "PublishResult",
    "artifact_metadata",
    "artifact_name",
    "evaluation_metrics",
    "flush_outbox",
    "plan_publication",
    "publish",
    "publishable",
    "publishing_enabled",
    "registry_target",
    "sanitize_metadata",
    "sanitize_name",
    "wandb_run",
]
