"""keisei_fn: a functional model-lifecycle library for Keisei's Shogi deep-RL networks.

Immutable values (``ModelSpec``, ``TrainState``, ``CheckpointMeta``, ...) flow through functions
(``build_model``, ``capture``, ``save_state``, ``load_state``, ``resume``, ``publish``, ...); side
effects live only at the edges. wandb, cshogi and hypothesis are imported only by the functions
that need them.

Example:
    >>> import keisei_fn as kf
    >>> spec = kf.ModelSpec(model_type="testmodel")
    >>> model = kf.build_model(spec, seed=0)
    >>> kf.model_info(spec, model=model)["parameters"]
    2216516
"""

from typing import TYPE_CHECKING, Any

from keisei_fn import errors
from keisei_fn._version import __version__
from keisei_fn.average import (
    average_checkpoints,
    average_states,
    last_checkpoints,
    recompute_bn,
)
from keisei_fn.capture import capture, restore_
from keisei_fn.compat import check_compatible
from keisei_fn.diff import StateDiff, diff_checkpoints, diff_states
from keisei_fn.ema import EMA, ema_init, ema_model, ema_update
from keisei_fn.ensemble import Ensemble
from keisei_fn.features import FEATURE_SPECS, FeatureSpec, get_feature_spec, register_feature_set
from keisei_fn.grow import grow
from keisei_fn.health import HealthPolicy, HealthProblem, check_health
from keisei_fn.info import model_info
from keisei_fn.meta import CheckpointMeta
from keisei_fn.nets import (
    ActorCriticResTower,
    build_model,
    canonical_state_dict,
    register_model,
    unwrap_model,
)
from keisei_fn.precision import Precision, make_scaler, precision_policy
from keisei_fn.publish import PublishResult, flush_outbox, publish
from keisei_fn.serve import compare_models, export_model, validate_model
from keisei_fn.spec import ModelSpec, model_types
from keisei_fn.state import GameStats, TrainState, thaw
from keisei_fn.store import (
    AsyncSaver,
    Checkpointer,
    CheckpointList,
    Preemption,
    PrunePlan,
    Resumed,
    RetentionPolicy,
    SaveHandle,
    SaveResult,
    checkpoint_due,
    follow,
    import_legacy,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_state,
    migrate,
    plan_prune,
    prune,
    resume,
    round_interval,
    save_final_model,
    save_state,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from keisei_fn.match import play_match
    from keisei_fn.store.convert import consolidate
    from keisei_fn.store.sharded import load_sharded, load_sharded_, save_sharded
    from keisei_fn.usi import run_engine

#: Sharded (FSDP) checkpoint functions: imported on first use, as they load torch.distributed.
_SHARDED = frozenset({"load_sharded", "load_sharded_", "save_sharded"})


def __getattr__(name: str) -> Any:
    if name == "consolidate":
        from keisei_fn.store.convert import consolidate

        return consolidate
    if name in _SHARDED:
        from keisei_fn.store import sharded

        return getattr(sharded, name)
    if name == "play_match":  # matches and the USI engine import cshogi: on first use
        from keisei_fn.match import play_match

        return play_match
    if name == "run_engine":
        from keisei_fn.usi import run_engine

        return run_engine
    raise AttributeError(f"module 'keisei_fn' has no attribute {name!r}")


__all__ = [
    "EMA",
    "FEATURE_SPECS",
    "ActorCriticResTower",
    "AsyncSaver",
    "CheckpointList",
    "CheckpointMeta",
    "Checkpointer",
    "Ensemble",
    "FeatureSpec",
    "GameStats",
    "HealthPolicy",
    "HealthProblem",
    "ModelSpec",
    "Precision",
    "Preemption",
    "PrunePlan",
    "PublishResult",
    "Resumed",
    "RetentionPolicy",
    "SaveHandle",
    "SaveResult",
    "StateDiff",
    "TrainState",
    "__version__",
    "average_checkpoints",
    "average_states",
    "build_model",
    "canonical_state_dict",
    "capture",
    "check_compatible",
    "check_health",
    "checkpoint_due",
    "compare_models",
    "consolidate",
    "diff_checkpoints",
    "diff_states",
    "ema_init",
    "ema_model",
    "ema_update",
    "errors",
    "export_model",
    "flush_outbox",
    "follow",
    "get_feature_spec",
    "grow",
    "import_legacy",
    "last_checkpoints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_sharded",
    "load_sharded_",
    "load_state",
    "make_scaler",
    "migrate",
    "model_info",
    "model_types",
    "plan_prune",
    "play_match",
    "precision_policy",
    "prune",
    "publish",
    "recompute_bn",
    "register_feature_set",
    "register_model",
    "restore_",
    "resume",
    "round_interval",
    "run_engine",
    "save_final_model",
    "save_sharded",
    "save_state",
    "thaw",
    "unwrap_model",
    "validate_model",
    "verify_checkpoint",
]
