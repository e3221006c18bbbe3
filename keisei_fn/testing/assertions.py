"""Bit-exact equality of TrainStates, with one readable report of every difference.

Tensors are equal when dtype, shape, device and raw bytes are (``==`` would call NaN unequal
to itself and ``0.0`` equal to ``-0.0``). JSON parts are equal when types and values are:
floats by their 64 bits (NaN payloads and the sign of zero count), ``1``, ``1.0`` and ``True``
differ, a tuple is not a list. Tensors shared by several keys (tied weights: the same view of
the same memory) must be shared in both states.

Example:
    >>> import torch
    >>> from keisei_fn import TrainState
    >>> a = TrainState(spec=None, step=1, model={"w": torch.tensor([0.0])})
    >>> assert_states_equal(a, a.replace(model={"w": torch.tensor([-0.0])}))
    Traceback (most recent call last):
    ...
    AssertionError: TrainStates differ in 1 place:
      model['w']: 1 of 1 elements differ; first at index (0,): 0.0 (0x00000000) vs -0.0 (0x80000000)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from keisei_fn.state import FrozenList, TrainState, iter_tensors, view_key
from keisei_fn.store.checkpoints import load_state, save_state

__all__ = ["assert_roundtrip", "assert_states_equal"]

_PARTS = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")


def assert_states_equal(a: TrainState, b: TrainState) -> None:
    """Assert that two TrainStates are bit-identical, listing every difference at once.

    Args:
        a: the expected state (e.g. what was saved).
        b: the actual state (e.g. what was loaded).

    Raises:
        AssertionError: one error naming each differing key path (``model['w']``,
            ``optimizer['state'][0]['exp_avg']``, ``extra['elo_state']['k_factor']``) with
            what differs: type, dtype, shape, the first differing element and its bits, a
            missing key, or tensors tied in one state and separate in the other.

    Example:
        >>> import torch
        >>> from keisei_fn import TrainState
        >>> a = TrainState(spec=None, step=1, model={}, extra={"lr": (1, 2)})
        >>> assert_states_equal(a, a.replace(extra={"lr": [1, 2]}))
        Traceback (most recent call last):
        ...
        AssertionError: TrainStates differ in 1 place:
          extra['lr']: tuple (1, 2) vs list [1, 2]
    """
    diffs: list[str] = []
    _compare(
        a.spec.to_json() if a.spec else None, b.spec.to_json() if b.spec else None, "spec", diffs
    )
    for name in ("step", "episodes"):
        _compare(getattr(a, name), getattr(b, name), name, diffs)
    _compare(a.stats.to_json(), b.stats.to_json(), "stats", diffs)
    if list(a.model) != list(b.model) and set(a.model) == set(b.model):
        diffs.append(f"model: key order {list(a.model)} vs {list(b.model)}")
    for name in _PARTS:
        _compare(getattr(a, name), getattr(b, name), name, diffs)
    diffs += _tie_differences(a, b)
    if diffs:
        places = "place" if len(diffs) == 1 else "places"
        raise AssertionError(
            f"TrainStates differ in {len(diffs)} {places}:\n  " + "\n  ".join(diffs)
        )


def assert_roundtrip(state: TrainState, *, run_dir: str | os.PathLike[str]) -> TrainState:
    """Save ``state`` into ``run_dir``, load it back and assert the two are bit-identical.

    Args:
        state: the state to save (``step`` > 0).
        run_dir: the run directory (use :func:`~keisei_fn.testing.fresh_run_dir` per example).

    Returns:
        The loaded state.

    Raises:
        AssertionError: listing every difference (see :func:`assert_states_equal`).
        and every error of ``save_state``/``load_state``.

    Example:
        >>> import torch
        >>> from keisei_fn import TrainState
        >>> from keisei_fn.testing import fresh_run_dir
        >>> with fresh_run_dir() as run_dir:
        ...     loaded = assert_roundtrip(
        ...         TrainState(spec=None, step=7, model={"w": torch.ones(2)}), run_dir=run_dir
        ...     )
        >>> loaded.step
        7
    """
    meta = save_state(state, run_dir)
    loaded = load_state(meta.weights_path)
    assert_states_equal(state, loaded)
    return loaded


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, list | FrozenList):
        return "list"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(list(value) if isinstance(value, FrozenList) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _float_bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


def _key_token(key: Any) -> tuple[str, str]:
    """Dict keys match when type and repr do (so ``1``, ``1.0`` and ``True`` stay apart)."""
    return type(key).__name__, repr(key)


def _compare(a: Any, b: Any, path: str, diffs: list[str]) -> None:
    kind = _kind(a)
    if kind != _kind(b):
        diffs.append(f"{path}: {kind} {_short(a)} vs {_kind(b)} {_short(b)}")
    elif kind == "tensor":
        diffs += [f"{path}: {d}" for d in _tensor_differences(a, b)]
    elif kind == "dict":
        keys_a = {_key_token(k): k for k in a}
        keys_b = {_key_token(k): k for k in b}
        for token, key in keys_a.items():
            if token not in keys_b:
                diffs.append(f"{path}: key {key!r} only in the first state")
            else:
                _compare(a[key], b[keys_b[token]], f"{path}[{key!r}]", diffs)
        diffs += [
            f"{path}: key {key!r} only in the second state"
            for token, key in keys_b.items()
            if token not in keys_a
        ]
    elif kind in ("list", "tuple"):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _compare(x, y, f"{path}[{i}]", diffs)
    elif kind == "float":
        if _float_bits(a) != _float_bits(b):
            diffs.append(
                f"{path}: {a!r} (0x{_float_bits(a):016x}) vs {b!r} (0x{_float_bits(b):016x})"
            )
    elif a != b:
        diffs.append(f"{path}: {_short(a)} vs {_short(b)}")


def _raw(t: torch.Tensor) -> torch.Tensor:
    # not .contiguous(): a 1-element or empty view counts as contiguous yet may keep a stride
    # that .view(uint8) refuses
    t = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    return t.reshape(-1).view(torch.uint8)


def _element(t: torch.Tensor, index: int) -> str:
    size = t.dtype.itemsize
    raw = bytes(_raw(t)[index * size : (index + 1) * size].tolist())
    bits = f"0x{int.from_bytes(raw, 'little'):0{2 * size}x}"
    try:
        value = t.detach().cpu().reshape(-1)[index]
        if value.dtype.is_floating_point and value.dtype.itemsize == 1:  # float8
            value = value.float()
        shown = repr(value.item())
    except (RuntimeError, TypeError):  # a dtype without .item() on this torch
        shown = "?"
    return f"{shown} ({bits})"


def _tensor_differences(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    if a.dtype != b.dtype:
        return [f"dtype {a.dtype} vs {b.dtype}"]
    if a.shape != b.shape:
        return [f"shape {tuple(a.shape)} vs {tuple(b.shape)}"]
    found = []
    if a.device != b.device:
        found.append(f"device {a.device} vs {b.device}")
    raw_a, raw_b = _raw(a), _raw(b)
    if not torch.equal(raw_a, raw_b):
        per_element = (raw_a != raw_b).reshape(-1, a.dtype.itemsize).any(dim=1)
        wrong = per_element.nonzero().reshape(-1)
        first = int(wrong[0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), a.shape))
        found.append(
            f"{len(wrong)} of {a.numel()} elements differ; first at index {where}: "
            f"{_element(a, first)} vs {_element(b, first)}"
        )
    return found


def _show_path(path: tuple[Any, ...]) -> str:
    return str(path[0]) + "".join(f"[{p!r}]" for p in path[1:])


def _tied_groups(state: TrainState) -> set[frozenset[str]]:
    """Key paths that hold the same view of the same memory, for every such group of 2+."""
    groups: dict[tuple[Any, ...], set[str]] = {}
    parts = {name: getattr(state, name) for name in _PARTS}
    for path, tensor in iter_tensors(parts):
        if (view := view_key(tensor)) is not None:
            groups.setdefault(view, set()).add(_show_path(path))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _tie_differences(a: TrainState, b: TrainState) -> list[str]:
    ties_a, ties_b = _tied_groups(a), _tied_groups(b)
    found = [
        f"{', '.join(sorted(g))}: one shared tensor in the first state, not in the second"
        for g in sorted(ties_a - ties_b, key=sorted)
    ]
    found += [
        f"{', '.join(sorted(g))}: one shared tensor in the second state, not in the first"
        for g in sorted(ties_b - ties_a, key=sorted)
    ]
    return found
