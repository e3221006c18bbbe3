"""Input feature sets: how many planes an observation has, what each plane means, and which
function produces them.

A feature set is only registered when the library (or the user) actually produces its planes:
Keisei declared a 51-plane "core46+all" that its encoder never produced; we never promise planes
we do not make. The encoder is referenced by an import path (``"module:function"``) and resolved
lazily, so this module needs neither torch nor cshogi.

Example:
    >>> from keisei_fn.features import FEATURE_SPECS
    >>> FEATURE_SPECS["core46"].num_planes
    46
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from keisei_fn.errors import SpecError

__all__ = [
    "CORE46_PLANES",
    "FEATURE_SPECS",
    "FeatureSpec",
    "get_feature_spec",
    "register_feature_set",
]

_PIECES = ("pawn", "lance", "knight", "silver", "gold", "bishop", "rook", "king")
_PROMOTED = ("prom_pawn", "prom_lance", "prom_knight", "prom_silver", "horse", "dragon")
_HAND = ("pawn", "lance", "knight", "silver", "gold", "bishop", "rook")

#: The 46 planes of Keisei's "core46" observation, from the side to move's perspective.
CORE46_PLANES: tuple[str, ...] = (
    *(f"own_{p}" for p in _PIECES),
    *(f"own_{p}" for p in _PROMOTED),
    *(f"opp_{p}" for p in _PIECES),
    *(f"opp_{p}" for p in _PROMOTED),
    *(f"own_hand_{p}" for p in _HAND),
    *(f"opp_hand_{p}" for p in _HAND),
    "black_to_move",
    "move_count",
    "reserved_44",
    "reserved_45",
)
assert len(CORE46_PLANES) == 46


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureSpec:
    """A named input feature set.

    Args:
        name: registry name, e.g. ``"core46"``.
        num_planes: number of 9x9 planes the encoder produces.
        plane_names: one name per plane, in order.
        encoder: import path ``"package.module:function"`` of the encoder producing the planes
            (``None`` for a user feature set that is encoded outside this library).
        description: one line for humans.

    Raises:
        SpecError: when ``num_planes`` does not match ``plane_names``.
    """

    name: str
    num_planes: int
    plane_names: tuple[str, ...]
    encoder: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.num_planes, bool) or not isinstance(self.num_planes, int):
            raise SpecError(f"FeatureSpec {self.name!r}: num_planes must be an int")
        if self.num_planes < 1 or len(self.plane_names) != self.num_planes:
            raise SpecError(
                f"FeatureSpec {self.name!r}: num_planes={self.num_planes} but "
                f"{len(self.plane_names)} plane names were given; they must agree"
            )
        object.__setattr__(self, "plane_names", tuple(self.plane_names))

    def replace(self, **changes: Any) -> FeatureSpec:
        """Return a copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def load_encoder(self) -> Callable[..., Any]:
        """Import and return the encoder function.

        Raises:
            SpecError: when the feature set has no encoder or it cannot be imported.
        """
        if self.encoder is None:
            raise SpecError(f"feature set {self.name!r} has no encoder in keisei_fn")
        module_name, _, attr = self.encoder.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as exc:
            raise SpecError(
                f"feature set {self.name!r}: cannot import encoder {self.encoder!r}: {exc}"
            ) from exc


_CORE46 = FeatureSpec(
    name="core46",
    num_planes=46,
    plane_names=CORE46_PLANES,
    encoder="keisei_fn.shogi:encode_observation",
    description="Keisei's 46-plane board, hands, side-to-move and move-count encoding",
)

_registry: dict[str, FeatureSpec] = {
    "core46": _CORE46,
    # Keisei's test configs used these names for the same 46 planes.
    **{
        alias: _CORE46.replace(name=alias, description="alias of core46 (old Keisei configs)")
        for alias in ("dummyfeats", "testfeats", "resumefeats")
    },
}

#: Read-only view of every registered feature set, by name.
FEATURE_SPECS: Mapping[str, FeatureSpec] = MappingProxyType(_registry)


def register_feature_set(spec: FeatureSpec, *, overwrite: bool = False) -> FeatureSpec:
    """Register a user feature set so ``ModelSpec(input_features=spec.name)`` accepts it.

    Args:
        spec: the feature set.
        overwrite: replace an existing registration of the same name.

    Returns:
        The registered spec.

    Raises:
        SpecError: when the name is taken and ``overwrite`` is false.

    Example:
        >>> tiny = FeatureSpec(name="tiny2", num_planes=2, plane_names=("a", "b"))
        >>> register_feature_set(tiny).num_planes
        2
    """
    if spec.name in _registry and not overwrite and _registry[spec.name] != spec:
        raise SpecError(
            f"feature set {spec.name!r} is already registered; pass overwrite=True to replace it"
        )
    _registry[spec.name] = spec
    return spec


def get_feature_spec(name: str) -> FeatureSpec:
    """Look up a registered feature set.

    Raises:
        SpecError: for an unknown name, listing the known ones.
    """
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise SpecError(
            f"unknown input_features {name!r}; registered feature sets: "
            f"{', '.join(sorted(_registry))} (register your own with register_feature_set)"
        ) from None
