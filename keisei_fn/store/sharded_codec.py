"""Encoding a training state for a sharded checkpoint, and decoding one back in full: pure,
through ``keisei_fn.codec``, with every tensor under its stored name (``model/<key>``,
``optimizer/state/<fqn>/<name>``, ``rng/...``) and filed where ``sharded_layout`` puts it.

The model and optimizer state is ``torch.distributed.checkpoint.state_dict``'s: keyed by fully
qualified parameter names (FQNs), DTensor shards under FSDP2. A full decode gives the optimizer
state in ``optimizer.state_dict()``'s layout instead (parameters numbered through the groups),
like a single-file checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from keisei_fn.codec import Store, check_storable, decode_state, dumps, encode_header, loads
from keisei_fn.errors import IntegrityError, UnsupportedValueError
from keisei_fn.state import TrainState
from keisei_fn.store.sharded_layout import in_shards


@dataclass(frozen=True, slots=True)
class Encoded:
    """A rank's training state as stored: the sidecar's JSON part, the tensors that go through
    DCP (under their stored names) and rank 0's small-file tensors."""

    header: dict[str, Any]
    sharded: dict[str, torch.Tensor]
    small: dict[str, torch.Tensor]

    def for_dcp(self, rank: int) -> dict[str, torch.Tensor]:
        """What this rank hands DCP: its DTensor shards; plain tensors only from rank 0."""
        from torch.distributed.tensor import DTensor

        return {k: t for k, t in self.sharded.items() if rank == 0 or isinstance(t, DTensor)}


def _storing(sharded: dict[str, torch.Tensor], small: dict[str, torch.Tensor]) -> Store:
    """A ``store`` for ``codec.encode_header`` that files each tensor under its stored name:
    model and optimizer tensors in ``sharded`` (they go through DCP), the rest in ``small``."""

    def store(name: str, tensor: torch.Tensor) -> str:
        check_storable(name, tensor)
        table = sharded if in_shards(name) else small
        if name in table:
            raise UnsupportedValueError(f"two entries would both be stored as {name!r}")
        table[name] = tensor
        return name

    return store


def encode(state: TrainState) -> Encoded:
    """A rank's training state as stored.

    Args:
        state: ``model``/``optimizer`` as ``get_state_dict`` gives them on this rank.

    Returns:
        The sidecar's JSON part (exactly as it will be read back), the tensors for DCP and rank
        0's small-file tensors.

    Raises:
        UnsupportedDtypeError, UnsupportedValueError: the state cannot be stored exactly.
    """
    sharded: dict[str, torch.Tensor] = {}
    small: dict[str, torch.Tensor] = {}
    header = encode_header(state, _storing(sharded, small))
    return Encoded(loads(dumps(header)), sharded, small)


def flatten(
    model_state: Mapping[str, Any], optim_state: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of ``get_state_dict``'s result under their stored names, and the optimizer's
    JSON (tensors as references).

    Args:
        model_state: the model's state dict.
        optim_state: the optimizer's FQN-keyed state dict, or None.

    Returns:
        ``(stored name → tensor, the optimizer's JSON or None)``.

    Raises:
        UnsupportedDtypeError, UnsupportedValueError: a tensor that cannot be stored.
    """
    tensors: dict[str, torch.Tensor] = {}
    state = TrainState(spec=None, step=0, model=model_state, optimizer=optim_state, rng=None)
    header = encode_header(state, _storing(tensors, tensors))
    return tensors, header["optimizer"]


def _by_index(optim_state: Mapping[str, Any]) -> dict[str, Any]:
    """An FQN-keyed optimizer state (``get_state_dict``'s) in ``optimizer.state_dict()``'s
    layout: params numbered consecutively through the param groups, state keyed by number."""
    ids: dict[str, int] = {}
    groups = []
    for group in optim_state["param_groups"]:
        params = []
        for fqn in group["params"]:
            if fqn in ids:
                raise IntegrityError(f"optimizer param {fqn!r} is in two param groups")
            ids[fqn] = len(ids)
            params.append(ids[fqn])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    state = {}
    for fqn, entry in optim_state["state"].items():
        if fqn not in ids:
            raise IntegrityError(f"optimizer state for {fqn!r}, which no param group lists")
        state[ids[fqn]] = entry
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def decode_full(sidecar: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TrainState:
    """The full TrainState of a sharded checkpoint.

    Args:
        sidecar: its checked sidecar.
        tensors: every stored tensor, in full, by stored name.

    Returns:
        The state, with the optimizer state in ``optimizer.state_dict()``'s layout.

    Raises:
        IntegrityError: the optimizer's param groups and state do not match.
    """
    state = decode_state(tensors, {}, sidecar["state"])
    if state.optimizer is None:
        return state
    return state.replace(optimizer=_by_index(state.optimizer))
