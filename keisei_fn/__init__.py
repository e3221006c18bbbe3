"""keisei_fn: a functional model-lifecycle library for Keisei's Shogi deep-RL networks.

Immutable values (``ModelSpec``, ``Precision``, ...) flow through functions (``build_model``,
``precision_policy``, ``model_info``, ...). wandb, cshogi and hypothesis are imported only by the
functions that need them.

Example:
    >>> import keisei_fn as kf
    >>> spec = kf.ModelSpec(model_type="testmodel")
    >>> model = kf.build_model(spec, seed=0)
    >>> kf.model_info(spec, model=model)["parameters"]
    2216516
"""

from keisei_fn import errors
from keisei_fn.features import FEATURE_SPECS, FeatureSpec, get_feature_spec, register_feature_set
from keisei_fn.info import model_info
from keisei_fn.nets import (
    ActorCriticResTower,
    build_model,
    canonical_state_dict,
    register_model,
    unwrap_model,
)
from keisei_fn.precision import Precision, make_scaler, precision_policy
from keisei_fn.spec import ModelSpec, model_types

__version__ = "0.1.0"

__all__ = [
    "FEATURE_SPECS",
    "ActorCriticResTower",
    "FeatureSpec",
    "ModelSpec",
    "Precision",
    "__version__",
    "build_model",
    "canonical_state_dict",
    "errors",
    "get_feature_spec",
    "make_scaler",
    "model_info",
    "model_types",
    "precision_policy",
    "register_feature_set",
    "register_model",
    "unwrap_model",
]
