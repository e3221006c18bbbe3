"""What changed between two training states: ``diff_states`` (pure) and ``diff_checkpoints``.

A :class:`StateDiff` lists the spec's and the metadata's differences (step, episodes, game
stats, ``extra`` keys), every tensor that was added, removed, reshaped, retyped or changed —
model, optimizer moments and step counts, RNG and ``extra`` tensors alike, each with the L2
norm and the largest absolute value of the change, the change relative to the old tensor's
norm, and the fraction of elements that changed — and the non-tensor values of the optimizer,
scheduler, scaler and RNG state that differ. Tensors are compared by their bits first, so a
NaN that stayed a NaN is unchanged.

Example:
    >>> import torch
    >>> from keisei_fn.state import TrainState
    >>> a = TrainState(spec=None, step=1, model={"w": torch.zeros(4)})
    >>> b = a.replace(step=2, model={"w": torch.tensor([0.0, 0.0, 0.0, 3.0])})
    >>> d = diff_states(a, b)
    >>> d.identical, d.metadata, d.tensors[0].status, d.tensors[0].fraction_changed
    (False, (('step', 1, 2),), 'changed', 0.25)
    >>> diff_states(a, a).identical
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from keisei_fn.codec import STATE_PARTS, tensor_name
from keisei_fn.display import format_value, render_table
from keisei_fn.paths import PathArg
from keisei_fn.spec import spec_differences
from keisei_fn.state import Layout, TrainState, iter_tensors, tensor_layout

__all__ = ["StateDiff", "TensorDiff", "ValueDiff", "diff_checkpoints", "diff_states"]

Status = Literal["added", "removed", "reshaped", "retyped", "changed"]
#: A difference of one value: ``(where, before, after)``.
ValueDiff = tuple[str, Any, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorDiff:
    """How one stored tensor differs.

    Attributes:
        name: where it is, e.g. ``"model/stem.weight"`` or ``"optimizer/state/0/exp_avg"``.
        status: ``"added"``, ``"removed"``, ``"reshaped"``, ``"retyped"`` (dtype) or
            ``"changed"`` (same shape and dtype, other bits).
        before, after: ``(dtype, shape)`` on each side (None where absent).
        l2: the L2 norm of the change (``changed`` only; else NaN).
        max_abs: the largest absolute change (``changed`` only; else NaN).
        relative: ``l2`` over the old tensor's L2 norm (inf when that is zero).
        fraction_changed: the fraction of elements whose bits changed.
    """

    name: str
    status: Status
    before: Layout | None
    after: Layout | None
    l2: float = math.nan
    max_abs: float = math.nan
    relative: float = math.nan
    fraction_changed: float = math.nan

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-able values (NaN and inf as strings)."""
        return {
            "name": self.name,
            "status": self.status,
            "before": _layout_json(self.before),
            "after": _layout_json(self.after),
            **{k: _number(getattr(self, k)) for k in _NUMBERS},
        }


_NUMBERS = ("l2", "max_abs", "relative", "fraction_changed")


@dataclass(frozen=True, slots=True, kw_only=True)
class StateDiff:
    """Everything that differs between two states (empty tuples: nothing).

    Attributes:
        spec: ``(field, before, after)`` per differing ModelSpec field (``"spec"`` when one
            side has none).
        metadata: ``(field, before, after)`` for step, episodes, the game stats and each
            ``extra`` key (``extra.<key>``; a missing side is ``None``).
        tensors: every tensor that differs, in the order of the parts.
        values: ``(where, before, after)`` for the non-tensor optimizer, scheduler, scaler and
            RNG values that differ.
        read_tensors: False when the diff was decided from the checkpoints' recorded digests.
    """

    spec: tuple[ValueDiff, ...] = ()
    metadata: tuple[ValueDiff, ...] = ()
    tensors: tuple[TensorDiff, ...] = ()
    values: tuple[ValueDiff, ...] = ()
    read_tensors: bool = field(default=True, compare=False)

    @property
    def identical(self) -> bool:
        """Whether nothing differs."""
        return not (self.spec or self.metadata or self.tensors or self.values)

    def top(self, n: int = 10) -> tuple[TensorDiff, ...]:
        """The ``n`` tensors that changed most: structural changes first, then by relative
        change (largest first)."""

        def key(t: TensorDiff) -> tuple[bool, float]:
            score = t.relative if not math.isnan(t.relative) else math.inf
            return (t.status == "changed", -score)

        return tuple(sorted(self.tensors, key=key)[:n])

    def to_json(self) -> dict[str, Any]:
        """The whole diff as JSON-able values."""
        return {
            "identical": self.identical,
            "spec": [list(map(_jsonable, d)) for d in self.spec],
            "metadata": [list(map(_jsonable, d)) for d in self.metadata],
            "tensors": [t.to_json() for t in self.tensors],
            "values": [list(map(_jsonable, d)) for d in self.values],
        }

    def summary(self, top: int = 10) -> str:
        """A readable report: the differing spec and metadata, then the ``top`` tensors."""
        if self.identical:
            how = "" if self.read_tensors else " (equal recorded digests; tensors not read)"
            return f"identical{how}"
        lines = [f"{w}: {format_value(a)} -> {format_value(b)}" for w, a, b in self.spec]
        lines += [f"{w}: {format_value(a)} -> {format_value(b)}" for w, a, b in self.metadata]
        lines += [f"{w}: {format_value(a)} -> {format_value(b)}" for w, a, b in self.values]
        if self.tensors:
            counts: dict[str, int] = {}
            for t in self.tensors:
                counts[t.status] = counts.get(t.status, 0) + 1
            lines.append(
                f"{len(self.tensors)} tensors differ ("
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + f"); the top {min(top, len(self.tensors))}:"
            )
            rows = [
                [t.name, t.status, *(_short(getattr(t, k)) for k in _NUMBERS)]
                for t in self.top(top)
            ]
            header = ["tensor", "status", "L2", "max |Δ|", "relative", "changed"]
            lines.append(render_table(header, rows))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def diff_states(before: TrainState, after: TrainState) -> StateDiff:
    """What differs from ``before`` to ``after``. Pure: neither state is changed.

    Args:
        before: the older (or reference) state.
        after: the newer (or candidate) state.

    Returns:
        The differences; ``.identical`` when there are none.
    """
    spec: list[ValueDiff] = []
    if before.spec != after.spec:
        if before.spec is None or after.spec is None:
            spec.append(("spec", before.spec, after.spec))
        else:
            spec += spec_differences(before.spec, after.spec)
    metadata: list[ValueDiff] = [
        (name, getattr(before, name), getattr(after, name))
        for name in ("step", "episodes")
        if getattr(before, name) != getattr(after, name)
    ]
    a_stats, b_stats = before.stats.to_json(), after.stats.to_json()
    metadata += [
        (f"stats.{k}", a_stats[k], b_stats[k]) for k in a_stats if a_stats[k] != b_stats[k]
    ]
    for key in sorted(set(before.extra) | set(after.extra), key=str):
        a_value, b_value = before.extra.get(key), after.extra.get(key)
        if not _same_json(_without_tensors(a_value), _without_tensors(b_value)):
            metadata.append((f"extra.{key}", a_value, b_value))
    tensors = [
        record
        for part in STATE_PARTS
        for record in _tensor_diffs(_tensors(before, part), _tensors(after, part))
    ]
    values = [
        diff
        for part in STATE_PARTS[1:-1]
        for diff in _value_diffs(
            part, _without_tensors(getattr(before, part)), _without_tensors(getattr(after, part))
        )
    ]
    return StateDiff(
        spec=tuple(spec), metadata=tuple(metadata), tensors=tuple(tensors), values=tuple(values)
    )


def diff_checkpoints(before: PathArg, after: PathArg) -> StateDiff:
    """:func:`diff_states` of two checkpoints (files, stems or run directories: the final
    model, else the latest checkpoint). When their sidecars record the same weights digest and
    the same state, they are identical without a tensor being read (whether the files still
    match their digests is ``verify_checkpoint``'s question).

    Args:
        before: the older (or reference) checkpoint.
        after: the newer (or candidate) one.

    Returns:
        The differences.

    Raises:
        CheckpointNotFoundError, IntegrityError, UnsupportedFormatError: as ``load_state``.
    """
    from keisei_fn.store.checkpoints import load_state
    from keisei_fn.store.listing import read_listed
    from keisei_fn.store.locate import resolve_checkpoint

    stems = resolve_checkpoint(before), resolve_checkpoint(after)
    (meta_a, sidecar_a), (meta_b, sidecar_b) = (read_listed(stem) for stem in stems)
    if meta_a.weights_digest == meta_b.weights_digest and _same_json(
        sidecar_a["state"], sidecar_b["state"]
    ):
        return StateDiff(read_tensors=False)
    return diff_states(load_state(stems[0]), load_state(stems[1]))


def _tensors(state: TrainState, part: str) -> dict[str, torch.Tensor]:
    value = getattr(state, part)
    if part == "model":
        return {tensor_name("model", (k,)): t for k, t in value.items()}
    return {tensor_name(part, path): t for path, t in iter_tensors(value)}


def _tensor_diffs(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> Iterator[TensorDiff]:
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        layout_a, layout_b = (None if t is None else tensor_layout(t) for t in (a, b))
        if a is None or b is None:
            yield TensorDiff(
                name=name, status="added" if a is None else "removed", before=layout_a,
                after=layout_b,
            )  # fmt: skip
        elif a.shape != b.shape or a.dtype != b.dtype:
            status: Status = "reshaped" if a.shape != b.shape else "retyped"
            yield TensorDiff(name=name, status=status, before=layout_a, after=layout_b)
        else:
            bits_a, bits_b = _bits(a), _bits(b)
            if not torch.equal(bits_a, bits_b):
                yield _changed(name, a, b, bits_a != bits_b, layout_a)


def _changed(
    name: str, a: torch.Tensor, b: torch.Tensor, differ: torch.Tensor, layout: Any
) -> TensorDiff:
    """The size of a change between two tensors of one shape and dtype."""
    x, y = (_numbers(t) for t in (a, b))
    delta = (y - x).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    l2 = float(delta.norm()) if delta.numel() else 0.0
    norm = float(x.nan_to_num(nan=0.0).norm()) if x.numel() else 0.0
    return TensorDiff(
        name=name,
        status="changed",
        before=layout,
        after=layout,
        l2=l2,
        max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        relative=l2 / norm if norm > 0 else math.inf,
        fraction_changed=float(differ.to(torch.float64).mean()) if differ.numel() else 0.0,
    )


def _numbers(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach().cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64) if t.dtype != torch.float64 else t


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """One integer per element holding its bits (an element's bytes compared as a whole)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bool or t.element_size() == 1:
        return t.view(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def _without_tensors(value: Any) -> Any:
    """A structure's non-tensor values, tensors replaced by a placeholder (they are diffed
    as tensors)."""
    if isinstance(value, torch.Tensor):
        return "<tensor>"
    if isinstance(value, Mapping):
        return {k: _without_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return (
            type(value)(_without_tensors(v) for v in value)
            if type(value) in (list, tuple)
            else [_without_tensors(v) for v in value]
        )
    return value


def _value_diffs(where: str, a: Any, b: Any) -> Iterator[ValueDiff]:
    """Differing leaves of two JSON-like structures (a sequence of scalars is one leaf)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in [*a, *(k for k in b if k not in a)]:
            yield from _value_diffs(f"{where}.{key}", a.get(key), b.get(key))
    elif (
        isinstance(a, list | tuple)
        and isinstance(b, list | tuple)
        and len(a) == len(b)
        and any(isinstance(v, Mapping | list | tuple) for v in (*a, *b))
    ):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _value_diffs(f"{where}[{i}]", x, y)
    elif not _same_json(a, b):
        yield (where, a, b)


def _same_json(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and tells 1 from 1.0 and True."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _short(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def _layout_json(layout: Layout | None) -> Any:
    return None if layout is None else {"dtype": layout[0], "shape": list(layout[1])}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)
