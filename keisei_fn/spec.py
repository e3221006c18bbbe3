"""ModelSpec: what network to build, resolved from a Keisei config plus CLI overrides.

A spec is an immutable, hashable value. It normalises what Keisei did implicitly so that what a
spec says is exactly what gets built:

- ``se_ratio <= 0`` means "no squeeze-excitation" and is stored as ``0.0``;
- the test model types (``"dummy"``, ``"testmodel"``, ``"resumemodel"``) always build depth 1,
  width 16, no SE, so the spec records exactly that.

Overrides win whenever they are not ``None``: ``0``, ``0.0``, ``""`` and ``False`` are values,
as in Keisei since February 2026 (older Keisei versions resolved overrides with ``or``, so an
explicit ``se_ratio=0`` silently became 0.25 there).

This module imports neither torch nor cshogi.

Example:
    >>> spec = ModelSpec.from_config({"training": {"tower_depth": 4}}, {"se_ratio": 0})
    >>> spec.tower_depth, spec.se_ratio, spec.obs_shape
    (4, 0.0, (46, 9, 9))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from keisei_fn.errors import SpecError
from keisei_fn.features import FeatureSpec, get_feature_spec

__all__ = [
    "TEST_MODEL_TYPES",
    "ModelSpec",
    "SpecDifference",
    "describe_spec_differences",
    "model_types",
    "spec_differences",
]

#: Keisei's tiny test networks: tower arguments are ignored, they build depth 1, width 16, no SE.
TEST_MODEL_TYPES: frozenset[str] = frozenset({"dummy", "testmodel", "resumemodel"})

# Names of the model types ``build_model`` can build; ``keisei_fn.nets.register_model`` adds to it.
_model_types: set[str] = {"resnet", *TEST_MODEL_TYPES}

_TEST_TOWER = {"tower_depth": 1, "tower_width": 16, "se_ratio": 0.0}

# Keisei's config layout: section -> {config key: spec field}.
_NESTED_KEYS: dict[str, dict[str, str]] = {
    "training": {
        "model_type": "model_type",
        "input_features": "input_features",
        "tower_depth": "tower_depth",
        "tower_width": "tower_width",
        "se_ratio": "se_ratio",
    },
    "env": {"num_actions_total": "num_actions"},
}

# Keisei's CLI argument names (and our own field names) -> spec field.
_OVERRIDE_KEYS: dict[str, str] = {
    "model": "model_type",
    "model_type": "model_type",
    "input_features": "input_features",
    "tower_depth": "tower_depth",
    "tower_width": "tower_width",
    "se_ratio": "se_ratio",
    "num_actions": "num_actions",
    "num_actions_total": "num_actions",
}


def model_types() -> frozenset[str]:
    """The model types a spec may name (extend with ``keisei_fn.register_model``).

    Example:
        >>> "resnet" in model_types()
        True
    """
    return frozenset(_model_types)


def _declare_model_type(name: str) -> None:
    """Record that ``name`` can be built (called by ``keisei_fn.nets.register_model``)."""
    _model_types.add(name)


def _lookup(source: Any, key: str) -> Any:
    """``source[key]`` for mappings, ``getattr(source, key)`` otherwise; ``None`` when absent."""
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"ModelSpec.{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise SpecError(f"ModelSpec.{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_se_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"ModelSpec.se_ratio must be a number (<= 0 disables SE), got {value!r}")
    ratio = float(value)
    if not math.isfinite(ratio):
        raise SpecError(f"ModelSpec.se_ratio must be finite, got {value!r}")
    return ratio if ratio > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """The architecture of a Keisei actor-critic network. Defaults are Keisei's.

    Args:
        model_type: ``"resnet"``, a test type (``"dummy"``, ``"testmodel"``, ``"resumemodel"``)
            or a type added with ``keisei_fn.register_model``.
        input_features: a registered feature set (see ``keisei_fn.FEATURE_SPECS``).
        tower_depth: residual blocks (>= 1).
        tower_width: channels (>= 1).
        se_ratio: squeeze-excitation ratio; ``<= 0`` disables SE and is stored as ``0.0``.
        num_actions: size of the policy output (>= 1).

    Raises:
        SpecError: naming the field, the value and what is allowed.

    Example:
        >>> ModelSpec(model_type="testmodel", tower_depth=7).tower_depth
        1
    """

    model_type: str = "resnet"
    input_features: str = "core46"
    tower_depth: int = 9
    tower_width: int = 256
    se_ratio: float = 0.25
    num_actions: int = 13527

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type not in _model_types:
            raise SpecError(
                f"ModelSpec.model_type {self.model_type!r} is unknown; known types: "
                f"{', '.join(sorted(_model_types))} (add one with keisei_fn.register_model)"
            )
        get_feature_spec(self.input_features)  # raises SpecError for an unknown name
        values = {
            "tower_depth": _check_int("tower_depth", self.tower_depth, 1),
            "tower_width": _check_int("tower_width", self.tower_width, 1),
            "se_ratio": _check_se_ratio(self.se_ratio),
            "num_actions": _check_int("num_actions", self.num_actions, 1),
        }
        if self.model_type in TEST_MODEL_TYPES:
            values.update(_TEST_TOWER)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def feature_spec(self) -> FeatureSpec:
        """The registered :class:`FeatureSpec` of ``input_features``."""
        return get_feature_spec(self.input_features)

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        """Observation shape ``(planes, 9, 9)``."""
        return (self.feature_spec.num_planes, 9, 9)

    def replace(self, **changes: Any) -> ModelSpec:
        """Return a copy with ``changes`` applied and validated.

        Example:
            >>> ModelSpec().replace(se_ratio=0).se_ratio
            0.0
        """
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict of its fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from :meth:`to_json` output.

        Raises:
            SpecError: on unknown or invalid fields.
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a ModelSpec JSON must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown ModelSpec fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_config(cls, config: Any = None, overrides: Any = None) -> ModelSpec:
        """Resolve a spec from a Keisei config and CLI overrides.

        Args:
            config: a Keisei-style nested config (``{"training": {...}, "env":
                {"num_actions_total": ...}}``, a mapping or an object with attributes, e.g. a
                pydantic ``AppConfig``), or a flat mapping of this class's field names, or None.
            overrides: a mapping or an object with attributes (e.g. an ``argparse.Namespace``)
                using Keisei's CLI names (``model``, ``input_features``, ``tower_depth``,
                ``tower_width``, ``se_ratio``) or the field names. A value wins whenever it is
                not None.

        Returns:
            The validated spec.

        Raises:
            SpecError: for unknown keys in a flat config or invalid values.

        Example:
            >>> import argparse
            >>> args = argparse.Namespace(model="resnet", se_ratio=0.0)
            >>> ModelSpec.from_config({"training": {"se_ratio": 0.25}}, args).se_ratio
            0.0
        """
        resolved: dict[str, Any] = {}
        if config is not None:
            resolved.update(_from_config(config))
        if overrides is not None:
            for key, field_name in _OVERRIDE_KEYS.items():
                value = _lookup(overrides, key)
                if value is not None:
                    resolved[field_name] = value
        return cls(**resolved)


#: One field in which two specs differ: ``(field, before, after)``.
SpecDifference = tuple[str, Any, Any]


def spec_differences(before: ModelSpec, after: ModelSpec) -> tuple[SpecDifference, ...]:
    """Every field in which two specs differ, in the fields' order.

    Args:
        before: one spec (e.g. the checkpoint's, or the older one).
        after: the other (e.g. the one wanted, or the newer one).

    Returns:
        ``(field, before's value, after's value)`` per differing field; empty when equal.

    Example:
        >>> spec_differences(ModelSpec(), ModelSpec(tower_width=128, se_ratio=0))
        (('tower_width', 256, 128), ('se_ratio', 0.25, 0.0))
    """
    return tuple(
        (f.name, getattr(before, f.name), getattr(after, f.name))
        for f in fields(ModelSpec)
        if getattr(before, f.name) != getattr(after, f.name)
    )


def describe_spec_differences(before: ModelSpec, after: ModelSpec) -> str:
    """:func:`spec_differences` as one line for messages (``before``'s value first), or ``""``.

    Example:
        >>> describe_spec_differences(ModelSpec(), ModelSpec(se_ratio=0))
        'se_ratio 0.25 vs 0.0'
        >>> describe_spec_differences(ModelSpec(), ModelSpec(tower_depth=4, num_actions=8))
        'tower_depth 9 vs 4, num_actions 13527 vs 8'
    """
    return ", ".join(f"{name} {a!r} vs {b!r}" for name, a, b in spec_differences(before, after))


def _from_config(config: Any) -> dict[str, Any]:
    """Spec fields found in a nested Keisei config or a flat mapping of field names."""
    is_nested = any(_lookup(config, section) is not None for section in _NESTED_KEYS)
    if not is_nested:
        if not isinstance(config, Mapping):
            raise SpecError(
                f"config must be a mapping or have 'training'/'env' sections, "
                f"got {type(config).__name__}"
            )
        known = {f.name for f in fields(ModelSpec)}
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise SpecError(
                f"unknown ModelSpec fields {unknown} in flat config; known: {sorted(known)} "
                f"(or pass Keisei's nested {{'training': ..., 'env': ...}} layout)"
            )
        return {k: v for k, v in config.items() if v is not None}
    found: dict[str, Any] = {}
    for section, keys in _NESTED_KEYS.items():
        values = _lookup(config, section)
        if values is None:
            continue
        for key, field_name in keys.items():
            value = _lookup(values, key)
            if value is not None:
                found[field_name] = value
    return found
