"""TrainState and GameStats: immutable snapshots of a training run.

A :class:`TrainState` is a *snapshot*: its tensors are detached clones (made by
``keisei_fn.capture``) that no later optimizer step can change, and its nested containers are
read-only (``MappingProxyType`` for dicts, :class:`FrozenList` for lists, tuples stay tuples), so
the snapshot stays what it was. ``thaw`` turns such a structure back into fresh dicts and lists.

Example:
    >>> import torch
    >>> state = TrainState(spec=None, step=3, model={"w": torch.zeros(2)})
    >>> state.model["w"].shape, state.stats.draws
    (torch.Size([2]), 0)
    >>> state.replace(step=4).step
    4
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from keisei_fn.display import extra_rows, fields_html, fields_text, human_bytes, spec_summary
from keisei_fn.errors import StateMismatchError
from keisei_fn.spec import ModelSpec

__all__ = [
    "SHOWN",
    "FrozenList",
    "GameStats",
    "Layout",
    "TrainState",
    "describe_layout",
    "describe_tensor",
    "dtype_name",
    "freeze",
    "iter_tensors",
    "layout_problems",
    "tensor_layout",
    "thaw",
    "view_key",
]


class FrozenList(tuple[Any, ...]):
    """A read-only list: a tuple that remembers it was a list, so ``thaw`` gives a list back."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"FrozenList({list(self)!r})"


def freeze(value: Any) -> Any:
    """Deep read-only copy of a nested structure: dicts become ``MappingProxyType``, lists
    :class:`FrozenList`, tuples stay tuples; tensors and scalars are kept as they are.

    Example:
        >>> frozen = freeze({"a": [1, (2, 3)]})
        >>> frozen["a"]
        FrozenList([1, (2, 3)])
    """
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, FrozenList):
        return value
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    if isinstance(value, tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any, *, on_tensor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Plain, mutable copies of what a :class:`TrainState` holds read-only (the inverse of
    :func:`freeze`): fresh dicts and lists all the way down (tuples stay tuples).

    Args:
        value: a frozen (or plain) structure, e.g. ``state.extra`` or one of its values.
        on_tensor: applied to every tensor, e.g. ``torch.Tensor.clone`` so the caller may
            mutate tensors too without touching the snapshot (by default they are shared).

    Returns:
        The copy.

    Example:
        >>> state = TrainState(spec=None, step=1, model={}, extra={"elo": {"games": 3}})
        >>> elo = thaw(state.extra["elo"])
        >>> elo["games"] += 1
        >>> elo, state.extra["elo"]["games"]
        ({'games': 4}, 3)
    """
    if isinstance(value, Mapping):
        return {k: thaw(v, on_tensor=on_tensor) for k, v in value.items()}
    if isinstance(value, list | FrozenList):
        return [thaw(v, on_tensor=on_tensor) for v in value]
    if isinstance(value, tuple):
        return tuple(thaw(v, on_tensor=on_tensor) for v in value)
    if on_tensor is not None and isinstance(value, torch.Tensor):
        return on_tensor(value)
    return value


def iter_tensors(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield ``(path, tensor)`` for every tensor in a nested structure, in traversal order."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from iter_tensors(v, (*path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from iter_tensors(v, (*path, i))


#: A tensor's layout: its dtype's name (``"float32"``, see :func:`dtype_name`) and its shape.
Layout = tuple[str, tuple[int, ...]]

#: How many keys a line of :func:`layout_problems` names before it says how many more there are.
SHOWN = 3


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name as layouts and error messages show it.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def tensor_layout(tensor: torch.Tensor) -> Layout:
    """A tensor's dtype name and shape.

    Example:
        >>> tensor_layout(torch.zeros(2, 3, dtype=torch.float16))
        ('float16', (2, 3))
    """
    return dtype_name(tensor.dtype), tuple(tensor.shape)


def describe_layout(layout: Layout) -> str:
    """A layout as error messages show it.

    Example:
        >>> describe_layout(("float16", (2, 3)))
        'float16[2, 3]'
    """
    return f"{layout[0]}{list(layout[1])}"


def describe_tensor(tensor: torch.Tensor) -> str:
    """A tensor's dtype and shape as error messages show them.

    Example:
        >>> describe_tensor(torch.zeros(2, 3, dtype=torch.float16))
        'float16[2, 3]'
    """
    return describe_layout(tensor_layout(tensor))


def layout_problems(
    found: Mapping[str, torch.Tensor | Layout],
    expected: Mapping[str, torch.Tensor | Layout],
    *,
    found_name: str = "the state",
    expected_name: str = "the model",
    shown: int = SHOWN,
) -> list[str]:
    """How the keys, shapes and dtypes of two state dicts differ, summarised: one line per kind
    of difference (missing keys, unexpected keys, other shapes, other dtypes) that says how
    many there are and names the first ``shown``, so a width change over a whole tower reads as
    one line, not 170. The one comparison behind ``restore_``, ``check_compatible``,
    ``average_states`` and ``ema_update``.

    Args:
        found: what is at hand (e.g. a saved state's model), as tensors or layouts by key.
        expected: what it must match (e.g. a live model's ``state_dict()``), likewise.
        found_name: what ``found`` is called in the lines, e.g. ``"the checkpoint"``.
        expected_name: what ``expected`` is called, e.g. ``"the model"``.
        shown: how many keys a line names at most.

    Returns:
        The lines, empty when every key is on both sides with the same shape and dtype (a key
        whose shape and dtype both differ counts in both lines).

    Example:
        >>> saved = {"w": torch.zeros(2), "b": torch.zeros(1), "old": torch.zeros(1)}
        >>> live = {"w": torch.zeros(3), "b": torch.zeros(1).double(), "new": ("int64", ())}
        >>> for line in layout_problems(saved, live):
        ...     print(line)
        1 tensor in the model is not in the state: 'new'
        1 tensor in the state is not in the model: 'old'
        1 tensor has another shape: 'w' (the state has float32[2], the model float32[3])
        1 tensor has another dtype: 'b' (the state has float32[1], the model float64[1])
    """
    have = {k: tensor_layout(v) if isinstance(v, torch.Tensor) else v for k, v in found.items()}
    want = {k: tensor_layout(v) if isinstance(v, torch.Tensor) else v for k, v in expected.items()}
    absent = (
        (expected_name, found_name, [k for k in want if k not in have]),
        (found_name, expected_name, [k for k in have if k not in want]),
    )
    problems = [
        f"{_count(len(keys))} in {inside} {'is' if len(keys) == 1 else 'are'} not in {outside}: "
        + _first(keys, shown, repr)
        for inside, outside, keys in absent
        if keys
    ]

    def both(key: str) -> str:
        return (
            f"{key!r} ({found_name} has {describe_layout(have[key])}, "
            f"{expected_name} {describe_layout(want[key])})"
        )

    common = [k for k in want if k in have]
    for what, part in (("shape", 1), ("dtype", 0)):
        keys = [k for k in common if have[k][part] != want[k][part]]
        if keys:
            other = f"another {what}" if len(keys) == 1 else f"other {what}s"
            verb = "has" if len(keys) == 1 else "have"
            problems.append(f"{_count(len(keys))} {verb} {other}: {_first(keys, shown, both)}")
    return problems


def _count(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _first(keys: list[str], shown: int, show: Callable[[str], str]) -> str:
    """The first ``shown`` keys, each as ``show`` writes it, and how many more there are."""
    listed = ", ".join(show(k) for k in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def view_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """Which view of which memory a tensor is: equal keys mean the same elements of the same
    storage, seen the same way (tied weights). None for a tensor with no storage to share.

    Example:
        >>> w = torch.zeros(2, 3)
        >>> view_key(w) == view_key(w.view(2, 3)), view_key(w) == view_key(w.t())
        (True, False)
    """
    if tensor.numel() == 0 or tensor.untyped_storage().data_ptr() == 0:
        return None
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


def _check_count(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateMismatchError(f"{owner}.{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GameStats:
    """Self-play results so far.

    Raises:
        StateMismatchError: for a negative or non-int count.

    Example:
        >>> GameStats(black_wins=3, draws=1).total
        4
    """

    black_wins: int = 0
    white_wins: int = 0
    draws: int = 0

    def __post_init__(self) -> None:
        for name in ("black_wins", "white_wins", "draws"):
            _check_count("GameStats", name, getattr(self, name))

    @property
    def total(self) -> int:
        """Games played."""
        return self.black_wins + self.white_wins + self.draws

    def __str__(self) -> str:
        """``3 black wins, 2 white wins, 1 draws``."""
        return f"{self.black_wins} black wins, {self.white_wins} white wins, {self.draws} draws"

    def replace(self, **changes: Any) -> GameStats:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, int]:
        """The counts as a JSON dict."""
        return {"black_wins": self.black_wins, "white_wins": self.white_wins, "draws": self.draws}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GameStats:
        """Inverse of :meth:`to_json`."""
        return cls(**dict(data))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TrainState:
    """An immutable snapshot of everything a training run needs to resume exactly.

    Build one with ``keisei_fn.capture`` (which clones every tensor) or ``keisei_fn.load_state``;
    constructing it directly takes ownership of the given tensors (do not mutate them after).
    Compare two states with ``keisei_fn.testing.assert_states_equal`` (``==`` is identity:
    tensors have no single truth value).

    Args:
        spec: the architecture, or None for an arbitrary user model.
        step: completed timesteps.
        episodes: completed episodes.
        stats: game results.
        model: canonical ``state_dict`` tensors (no ``_orig_mod.``/``module.`` prefixes).
        optimizer: the optimizer's ``state_dict`` (``state`` keyed by int, ``param_groups``), or
            None.
        scheduler: the LR scheduler's ``state_dict``, or None.
        scaler: the GradScaler's ``state_dict``, or None (absent or disabled).
        rng: RNG states (see ``keisei_fn.capture``), or None when not captured.
        extra: JSON-able user state, e.g. Keisei's ``elo_state`` and ``metrics_history``.

    Nested containers are stored read-only; ``keisei_fn.thaw`` gives plain, mutable copies
    (``thaw(state.extra)["elo_state"]``).

    Raises:
        StateMismatchError: for negative counters or non-tensor model entries.
    """

    spec: ModelSpec | None
    step: int
    episodes: int = 0
    stats: GameStats = field(default_factory=GameStats)
    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    scheduler: Mapping[str, Any] | None = None
    scaler: Mapping[str, Any] | None = None
    rng: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_count("TrainState", "step", self.step)
        _check_count("TrainState", "episodes", self.episodes)
        if self.spec is not None and not isinstance(self.spec, ModelSpec):
            raise StateMismatchError(f"TrainState.spec must be a ModelSpec or None: {self.spec!r}")
        if not isinstance(self.stats, GameStats):
            raise StateMismatchError(f"TrainState.stats must be GameStats, got {self.stats!r}")
        bad = [k for k, v in self.model.items() if not isinstance(v, torch.Tensor)]
        if bad or not all(isinstance(k, str) for k in self.model):
            raise StateMismatchError(
                f"TrainState.model must map str keys to tensors; offending keys: {bad[:5]}"
            )
        for name in ("model", "optimizer", "scheduler", "scaler", "rng", "extra"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, Mapping):
                    raise StateMismatchError(f"TrainState.{name} must be a mapping or None")
                object.__setattr__(self, name, freeze(value))

    def replace(self, **changes: Any) -> TrainState:
        """Return a copy with ``changes`` applied (tensors are shared, not cloned)."""
        return replace(self, **changes)

    def _rows(self) -> list[list[str]]:
        """The ``field``/``value`` rows of :meth:`__str__` and :meth:`_repr_html_`."""
        groups = (self.optimizer or {}).get("param_groups") or ()
        optimizer = (
            "none"
            if self.optimizer is None
            else f"{len(self.optimizer.get('state') or {})} parameter states, "
            f"{len(groups)} param groups"
            + (f" (lr {groups[0]['lr']:.4g})" if groups and "lr" in groups[0] else "")
        )
        return [
            ["spec", spec_summary(self.spec)],
            ["step", str(self.step)],
            ["episodes", str(self.episodes)],
            ["games", str(self.stats)],
            ["model", f"{len(self.model)} tensor{'' if len(self.model) == 1 else 's'}"],
            ["optimizer", optimizer],
            *(
                [name, "none" if getattr(self, name) is None else "saved"]
                for name in ("scheduler", "scaler")
            ),
            ["rng", ", ".join(self.rng) if self.rng else "none"],
            ["tensor bytes", human_bytes(self.nbytes)],
            *extra_rows(self.extra),
        ]

    def __repr__(self) -> str:
        """One line: the step, the spec and how much there is, not the tensors themselves
        (``str`` has the table; ``keisei_fn.testing.assert_states_equal`` compares)."""
        parts = [f"step={self.step}", f"spec={self.spec!r}"]
        parts.append(f"model={len(self.model)} tensors")
        parts += [name for name in ("optimizer", "scheduler", "scaler", "rng")
                  if getattr(self, name) is not None]  # fmt: skip
        if self.extra:
            parts.append(f"extra keys={sorted(map(str, self.extra))}")
        return f"TrainState({', '.join(parts)}, {human_bytes(self.nbytes)})"

    def __str__(self) -> str:
        """A ``field``/``value`` table (``print(state)`` in a notebook); ``repr`` is one line.

        Example:
            >>> state = TrainState(spec=None, step=3, model={"w": torch.zeros(2)},
            ...                    extra={"loss": 0.25})
            >>> print(state)  # doctest: +NORMALIZE_WHITESPACE
            TrainState at step 3
            field         value
            spec          none (an arbitrary user model)
            step          3
            episodes      0
            games         0 black wins, 0 white wins, 0 draws
            model         1 tensor
            optimizer     none
            scheduler     none
            scaler        none
            rng           none
            tensor bytes  8 B
            extra.loss    0.25
        """
        return fields_text(f"TrainState at step {self.step}", self._rows())

    def _repr_html_(self) -> str:
        """The same table as HTML, for Jupyter."""
        return fields_html(f"TrainState at step {self.step}", self._rows())

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors (shared storage counted once)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for _, tensor in iter_tensors(
            {"m": self.model, "o": self.optimizer, "s": self.scheduler, "r": self.rng}
        ):
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
        return total
