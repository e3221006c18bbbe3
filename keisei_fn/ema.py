"""An exponential moving average of a model's weights, as a value: ``EMA``, ``ema_init``,
``ema_update``.

``ema_update(ema, model)`` returns a new :class:`EMA` whose floating tensors are
``avg + (1 - decay) * (current - avg)`` (``torch.lerp``, in the tensors' dtype); integer and bool
tensors (BatchNorm's ``num_batches_tracked``) are the current model's. The old value is never
changed, so a training loop keeps it, compares it or drops it as it likes.

It is captured and resumed like everything else: put ``ema.to_extra()`` into ``capture``'s
``extra`` (its tensors are stored in the weights file, bit-exact; decay and update count in the
sidecar) and take it back with ``EMA.from_extra(state.extra["ema"])``.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> ema = ema_init(net, decay=0.9)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> later = ema_update(ema, net)
    >>> later.updates, bool(torch.equal(ema.tensors["weight"] + 0.1, later.tensors["weight"]))
    (1, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from keisei_fn.display import human_bytes
from keisei_fn.errors import StateMismatchError
from keisei_fn.nets import build_model, canonical_state_dict, unwrap_model
from keisei_fn.spec import ModelSpec
from keisei_fn.state import TrainState, layout_problems

__all__ = ["EMA", "ema_init", "ema_model", "ema_update"]

#: What an EMA follows: a live model (wrappers stripped), a state's model, or tensors by key.
Source = nn.Module | TrainState | Mapping[str, torch.Tensor]


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise StateMismatchError(f"EMA decay must be a number in [0, 1), got {decay!r}")
    if not (math.isfinite(decay) and 0 <= decay < 1):
        raise StateMismatchError(f"EMA decay must be in [0, 1), got {decay!r}")
    return float(decay)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class EMA:
    """An exponential moving average of model tensors: an immutable value.

    Args:
        decay: the weight of the average at each update, in ``[0, 1)``.
        updates: how many updates made it.
        tensors: the averaged tensors by ``state_dict`` key (owned: never mutate them).

    Raises:
        StateMismatchError: a decay outside ``[0, 1)``, a negative count, or non-tensor entries.
    """

    decay: float
    updates: int = 0
    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))
        if isinstance(self.updates, bool) or not isinstance(self.updates, int) or self.updates < 0:
            raise StateMismatchError(f"EMA updates must be an int >= 0, got {self.updates!r}")
        if not isinstance(self.tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.tensors.items()
        ):
            raise StateMismatchError("EMA tensors must map str keys to tensors")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __repr__(self) -> str:
        """One line: the decay, the updates and how much there is, not the tensors themselves.

        Example:
            >>> ema_init({"w": torch.zeros(2)}, decay=0.5)
            EMA(decay=0.5, updates=0, 1 tensors, 8 B)
        """
        nbytes = sum(t.nelement() * t.element_size() for t in self.tensors.values())
        return (
            f"EMA(decay={self.decay}, updates={self.updates}, {len(self.tensors)} tensors, "
            f"{human_bytes(nbytes)})"
        )

    def to_extra(self) -> dict[str, Any]:
        """The EMA as a value for ``TrainState.extra`` (``capture(..., extra={"ema": ...})``).

        Example:
            >>> ema = ema_init({"w": torch.zeros(2)}, decay=0.5)
            >>> sorted(ema.to_extra())
            ['decay', 'tensors', 'updates']
        """
        return {"decay": self.decay, "updates": self.updates, "tensors": dict(self.tensors)}

    @classmethod
    def from_extra(cls, data: Mapping[str, Any]) -> EMA:
        """Inverse of :meth:`to_extra`: the EMA a checkpoint's ``extra`` holds (its tensors are
        the loaded ones, on the CPU; ``ema_update`` follows a model on another device).

        Raises:
            StateMismatchError: ``data`` is not what :meth:`to_extra` wrote.

        Example:
            >>> ema = ema_init({"w": torch.zeros(2)}, decay=0.5)
            >>> EMA.from_extra(ema.to_extra()).decay
            0.5
        """
        if not isinstance(data, Mapping) or set(data) != {"decay", "updates", "tensors"}:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise StateMismatchError(
                f"not an EMA: expected the keys decay, tensors, updates, got {keys}"
            )
        return cls(decay=data["decay"], updates=data["updates"], tensors=data["tensors"])


def _tensors(source: Source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return canonical_state_dict(unwrap_model(source).state_dict())
    if isinstance(source, TrainState):
        return source.model
    return source


def ema_init(source: Source, *, decay: float = 0.999) -> EMA:
    """Start an EMA at a model's current weights.

    Args:
        source: a live model (torch.compile and DDP wrappers stripped), a ``TrainState`` or a
            mapping of tensors.
        decay: in ``[0, 1)``; the average's half-life is ``log(0.5) / log(decay)`` updates.

    Returns:
        An EMA with 0 updates and detached copies of every tensor.

    Raises:
        StateMismatchError: a bad decay.
    """
    tensors = {k: t.detach().clone() for k, t in _tensors(source).items()}
    return EMA(decay=decay, updates=0, tensors=tensors)


def ema_update(ema: EMA, source: Source) -> EMA:
    """One EMA step towards a model's current weights; ``ema`` is not changed.

    Args:
        ema: the average so far.
        source: as for :func:`ema_init`, with the same keys, shapes and dtypes.

    Returns:
        A new EMA on the model's device: floating tensors ``torch.lerp(avg, current,
        1 - decay)``, the others copied from ``source``; ``updates + 1``.

    Raises:
        StateMismatchError: keys, shapes or dtypes differ (a line per kind of difference: how
            many, the first few named).
    """
    current = _tensors(source)
    problems = layout_problems(
        current, ema.tensors, found_name="the model", expected_name="the EMA"
    )
    if problems:
        raise StateMismatchError.listing("the model does not fit the EMA", problems)
    weight = 1.0 - ema.decay
    tensors = {}
    with torch.no_grad():
        for key, average in ema.tensors.items():
            now = current[key].detach()
            if now.is_floating_point():
                tensors[key] = torch.lerp(average.to(now.device), now, weight)
            else:
                tensors[key] = now.clone()
    return EMA(decay=ema.decay, updates=ema.updates + 1, tensors=tensors)


def ema_model(ema: EMA, spec: ModelSpec, *, device: str | torch.device = "cpu") -> nn.Module:
    """The network ``spec`` describes with the EMA's weights, in eval mode.

    (For a model without a spec: ``model.load_state_dict(dict(ema.tensors))``; to save or
    average the EMA weights: ``state.replace(model=ema.tensors)``.)

    Raises:
        StateMismatchError: the EMA's tensors do not fit the network.

    Example:
        >>> spec = ModelSpec(model_type="testmodel", num_actions=8)
        >>> ema = ema_init(build_model(spec, seed=0), decay=0.99)
        >>> ema_model(ema, spec).training
        False
    """
    from keisei_fn.capture import restore_

    dtypes = [t.dtype for t in ema.tensors.values() if t.is_floating_point()]
    model = build_model(spec, seed=0, dtype=dtypes[0] if dtypes else None)
    restore_(TrainState(spec=spec, step=ema.updates, model=ema.tensors), model, rng=False)
    return model.to(device).eval()
