"""Growing a network during training: a state of Keisei's residual tower becomes a state of a
deeper and/or wider tower whose network computes the same function.

How the new network keeps the old function:

- **Deeper** (``tower_depth``): new residual blocks go after the last one. Their weights are
  freshly initialised (``build_model(new_spec, seed=seed)``), except the last BatchNorm's scale
  (``bn2.weight``), which is zero: the block's branch outputs ``bn2.bias`` = 0 (and so does the
  squeeze-excitation that scales it), and ``relu(0 + x) = x`` because ``x`` is already the
  output of a ReLU. The block is an identity until training moves that scale.
- **Wider** (``tower_width``, and with it the squeeze-excitation's hidden units): Net2Net's
  function-preserving widening. Every widened dimension has its own map from new units to old
  ones: the old units keep their place, each new unit copies a random old one (seeded). A layer
  *producing* the dimension copies its output rows (convolution weights and biases, and
  BatchNorm's scale, shift and running statistics), so a copy computes exactly what its
  original computes. A layer *consuming* it splits each original's input weight between the
  original and its copies, with random positive shares that sum to one for every weight
  element: ``W'[o, j] = W[o, g(j)] * s[o, j]``. The sum over the copies is the old weight, so
  the next layer's pre-activations are unchanged up to float rounding. Random shares (Net2Net
  with equal shares plus noise breaks exactness) make the copies' gradients differ, so training
  can pull them apart; equal shares would keep them identical forever.

The grown network computes the old one's outputs in **eval mode** and in **train mode** alike:
in train mode a copied channel's batch statistics equal its original's, so its BatchNorm output
is a copy too, and a new block's branch is ``0 * x_hat + 0`` whatever the batch statistics. The
running statistics a train-mode forward updates stay copies as well. Equality is within float
rounding (the split weights are summed in another order), not bit-exact.

The optimizer state follows its parameters (Adam, AdamW and SGD: ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``momentum_buffer``; scalar entries such as ``step`` are copied). A moment
is a statistic of its parameter's gradient, so it is mapped the way the gradient maps at the
point of growth: the gradient of a split input weight equals its original's (its input is a
copy of the original input), so its moments are copied; a copied output unit receives, in
expectation over the random shares, ``1/n`` of its original's gradient (``n``: the original's
number of copies, itself included), so first moments are divided by ``n`` and second moments
by ``n**2``. Adam's update ``m / sqrt(v)`` is unchanged by that scaling (up to ``eps``); it
matters for SGD's momentum. New parameters (the new blocks') get zero moments and step 0.
Parameters are numbered as ``torch.optim`` numbers them: in the order their groups list them.
``grow`` expects the groups to list the model's parameters in the model's order
(``Adam(model.parameters())``, or groups that each take theirs in that order); with torch's
``param_names`` in the groups, those names decide. A new parameter joins the group of its
counterpart in the last old block. Restore the grown state into ``build_model(new_spec)`` and a
fresh optimizer of the same class built the same way.

Example:
    >>> import torch
    >>> from keisei_fn import ModelSpec, build_model, capture, restore_
    >>> spec = ModelSpec(tower_depth=1, tower_width=4, num_actions=8)
    >>> model = build_model(spec, seed=0).eval()
    >>> bigger = spec.replace(tower_depth=2, tower_width=6)
    >>> grown = grow(capture(spec, model, step=1, rng=False), bigger, seed=0)
    >>> new_model = build_model(bigger)
    >>> restore_(grown, new_model)
    >>> x = torch.randn(3, 46, 9, 9)
    >>> torch.allclose(model(x)[0], new_model.eval()(x)[0], atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keisei_fn.errors import GrowError, StateMismatchError
from keisei_fn.nets import build_model
from keisei_fn.spec import TEST_MODEL_TYPES, ModelSpec, spec_differences
from keisei_fn.state import TrainState

__all__ = ["grow"]

#: The model types whose network is Keisei's residual tower.
_TOWER_TYPES = frozenset({"resnet", *TEST_MODEL_TYPES})
#: The spec fields ``grow`` may change (to larger values only).
_GROWABLE = ("tower_depth", "tower_width")
#: Parameter-shaped optimizer state entries ``grow`` maps → the power of the gradient they
#: average (1: first moments, 2: second moments).
_MOMENT_POWER = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True, slots=True)
class _Widening:
    """One widened dimension: new unit ``j`` copies old unit ``index[j]``; ``counts[i]`` is how
    many new units copy old unit ``i`` (itself included)."""

    index: Tensor
    counts: Tensor

    @property
    def identity(self) -> bool:
        return bool((self.counts == 1).all())


def _widening(old: int, new: int, generator: torch.Generator) -> _Widening:
    extra = torch.randint(old, (new - old,), generator=generator)
    index = torch.cat([torch.arange(old), extra])
    return _Widening(index, torch.bincount(index, minlength=old))


#: A state_dict key's widenings: (of its output dimension 0, of its input dimension 1).
_Rule = tuple[_Widening | None, _Widening | None]


def _rules(
    old: ModelSpec,
    old_shapes: Mapping[str, torch.Size],
    new_shapes: Mapping[str, torch.Size],
    generator: torch.Generator,
) -> dict[str, _Rule]:
    """How each widened key of the old tower maps into the new one (keys not listed are
    copied as they are)."""
    tower = _widening(old_shapes["stem.weight"][0], new_shapes["stem.weight"][0], generator)
    rules: dict[str, _Rule] = {"stem.weight": (tower, None), "stem.bias": (tower, None)}

    def batch_norm(prefix: str, widening: _Widening) -> None:
        rules.update({f"{prefix}.{name}": (widening, None) for name in _BATCH_NORM})

    batch_norm("bn_stem", tower)
    for b in range(old.tower_depth):
        p = f"res_blocks.{b}"
        inner = _widening(
            old_shapes[f"{p}.conv1.weight"][0], new_shapes[f"{p}.conv1.weight"][0], generator
        )
        rules.update({f"{p}.conv1.weight": (inner, tower), f"{p}.conv1.bias": (inner, None)})
        batch_norm(f"{p}.bn1", inner)
        rules.update({f"{p}.conv2.weight": (tower, inner), f"{p}.conv2.bias": (tower, None)})
        batch_norm(f"{p}.bn2", tower)
        if f"{p}.se.fc1.weight" in old_shapes:
            fc1 = f"{p}.se.fc1.weight"
            hidden = _widening(old_shapes[fc1][0], new_shapes[fc1][0], generator)
            rules.update({fc1: (hidden, tower), f"{p}.se.fc1.bias": (hidden, None)})
            rules.update({f"{p}.se.fc2.weight": (tower, hidden), f"{p}.se.fc2.bias": (tower, None)})
    for head in ("policy_head", "value_head"):
        rules[f"{head}.0.weight"] = (None, tower)
    return rules


def _widen_parameter(tensor: Tensor, rule: _Rule, generator: torch.Generator) -> Tensor:
    """Copy the output rows of ``rule[0]``; split the input columns of ``rule[1]``."""
    out, into = rule
    if out is not None:
        tensor = tensor.index_select(0, out.index.to(tensor.device))
    if into is None:
        return tensor
    tensor = tensor.index_select(1, into.index.to(tensor.device))
    if into.identity:
        return tensor
    raw = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) + 0.5
    sums = torch.zeros((tensor.shape[0], len(into.counts), *tensor.shape[2:]), dtype=torch.float64)
    sums.index_add_(1, into.index, raw)
    shares = raw / sums.index_select(1, into.index)  # exactly 1.0 for a unit without copies
    return (tensor.double() * shares.to(tensor.device)).to(tensor.dtype)


def _widen_moment(tensor: Tensor, rule: _Rule, power: int) -> Tensor:
    """A moment of a widened parameter: copied like the parameter, a copied output unit's
    divided by ``n**power`` (see the module's docstring)."""
    out, into = rule
    if out is not None:
        tensor = tensor.index_select(0, out.index.to(tensor.device))
        if not out.identity:
            scale = out.counts.index_select(0, out.index).double() ** -power
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            tensor = (tensor.double() * scale.view(shape).to(tensor.device)).to(tensor.dtype)
    if into is not None:
        tensor = tensor.index_select(1, into.index.to(tensor.device))
    return tensor


def _check_specs(old: ModelSpec | None, new: ModelSpec) -> ModelSpec:
    if old is None:
        raise GrowError(
            "grow needs the state's ModelSpec; this state holds an arbitrary model",
            field="model_type",
        )
    if old.model_type not in _TOWER_TYPES:
        raise GrowError(
            f"grow grows Keisei's residual tower ({', '.join(sorted(_TOWER_TYPES))}), not "
            f"model type {old.model_type!r}",
            field="model_type",
        )
    for name, before, after in spec_differences(old, new):
        if name not in _GROWABLE:
            raise GrowError(
                f"grow changes only {' and '.join(_GROWABLE)}; {name} differs: "
                f"{before!r} → {after!r}",
                field=name,
            )
        if after < before:
            raise GrowError(f"grow cannot shrink the tower: {name} {before} → {after}", field=name)
    return old


def _check_model(state: TrainState, expected: Mapping[str, torch.Size]) -> None:
    found = {k: tuple(t.shape) for k, t in state.model.items()}
    wanted = {k: tuple(s) for k, s in expected.items()}
    if found != wanted:
        differ = sorted(set(found) ^ set(wanted) | {k for k in found if found[k] != wanted.get(k)})
        raise StateMismatchError(
            f"state (step {state.step}) does not hold the model its spec describes: "
            f"{len(differ)} keys differ (first: {differ[0]!r})"
        )


def grow(state: TrainState, new_spec: ModelSpec, *, seed: int = 0) -> TrainState:
    """A state for a deeper and/or wider residual tower that computes the same function.

    Pure: ``state`` is not changed. The same ``state``, ``new_spec`` and ``seed`` give the same
    bits. Step, episodes, stats, scheduler, scaler, RNG and ``extra`` are kept as they are, so
    an EMA in ``extra`` (``keisei_fn.ema``) still fits the old network: grow its tensors with
    the same ``seed`` (``grow(state.replace(model=ema.tensors, optimizer=None), new_spec,
    seed=seed).model``: the same copies and shares) and start a new ``EMA`` from them.
    See the module's docstring for how weights and optimizer moments are mapped.

    Args:
        state: a state of ``resnet`` (or a test type, which cannot grow: its tower is fixed).
        new_spec: the same spec with a larger (or equal) ``tower_depth`` and/or ``tower_width``.
        seed: seeds the new blocks' initial weights, which old units the new ones copy, and the
            split shares.

    Returns:
        The grown state: restore it into ``build_model(new_spec)`` and a fresh optimizer of the
        same class.

    Raises:
        GrowError: another field differs, the tower would shrink, or the state has no spec or
            another model type (``.field`` names the field).
        StateMismatchError: the state's model does not fit its own spec, or its optimizer
            state does not fit the model (parameter count or shapes).

    Example:
        >>> from keisei_fn import ModelSpec, build_model, capture
        >>> spec = ModelSpec(tower_depth=1, tower_width=4)
        >>> state = capture(spec, build_model(spec, seed=0), step=1, rng=False)
        >>> grow(state, spec.replace(tower_depth=3)).model["res_blocks.2.bn2.weight"].abs().sum()
        tensor(0.)
        >>> try:
        ...     grow(state, spec.replace(se_ratio=0.5))
        ... except GrowError as exc:
        ...     print(exc.field)
        se_ratio
    """
    old = _check_specs(state.spec, new_spec)
    old_net, new_net = build_model(old, device="meta"), build_model(new_spec, device="meta")
    old_shapes = {k: t.shape for k, t in old_net.state_dict().items()}
    new_shapes = {k: t.shape for k, t in new_net.state_dict().items()}
    _check_model(state, old_shapes)
    generator = torch.Generator().manual_seed(seed)
    rules = _rules(old, old_shapes, new_shapes, generator)
    fresh = (
        build_model(new_spec, seed=seed).state_dict()
        if new_spec.tower_depth > old.tower_depth
        else {}
    )
    model: dict[str, Tensor] = {}
    for key in new_shapes:
        if key in state.model:
            model[key] = _widen_parameter(state.model[key], rules.get(key, (None, None)), generator)
            continue
        like = state.model[_counterpart(key, old)]
        tensor = fresh[key].to(device=like.device, dtype=like.dtype)
        model[key] = torch.zeros_like(tensor) if key.endswith(".bn2.weight") else tensor
    old_names = [name for name, _ in old_net.named_parameters()]
    new_names = [name for name, _ in new_net.named_parameters()]
    optimizer = (
        None
        if state.optimizer is None
        else _grow_optimizer(state, old, old_names, new_names, model, rules)
    )
    return state.replace(spec=new_spec, model=model, optimizer=optimizer)


def _counterpart(key: str, old: ModelSpec) -> str:
    """The old key a new block's key is modelled on: the same key in the last old block."""
    _, _, rest = key.split(".", 2)  # res_blocks.<b>.<rest>
    return f"res_blocks.{old.tower_depth - 1}.{rest}"


def _param_names(state: TrainState, old_names: list[str]) -> dict[Any, str]:
    """Optimizer parameter index → the model's parameter name."""
    assert state.optimizer is not None
    groups = state.optimizer["param_groups"]
    indices = [i for group in groups for i in group["params"]]
    if len(indices) != len(old_names):
        raise StateMismatchError(
            f"the optimizer state lists {len(indices)} parameters, the model has "
            f"{len(old_names)}: grow needs the optimizer of the whole model"
        )
    if all("param_names" in group for group in groups):
        names = [name for group in groups for name in group["param_names"]]
        if sorted(names) != sorted(old_names):
            raise StateMismatchError("the optimizer's param_names are not the model's")
        return dict(zip(indices, names, strict=True))
    return dict(zip(indices, old_names, strict=True))


def _grow_optimizer(
    state: TrainState,
    old: ModelSpec,
    old_names: list[str],
    new_names: list[str],
    model: Mapping[str, Tensor],
    rules: Mapping[str, _Rule],
) -> dict[str, Any]:
    assert state.optimizer is not None
    name_of = _param_names(state, old_names)
    group_of = {
        name_of[i]: g
        for g, group in enumerate(state.optimizer["param_groups"])
        for i in group["params"]
    }
    entries_of = {name_of[i]: entries for i, entries in state.optimizer["state"].items()}
    new_state: dict[str, dict[str, Any]] = {}
    for name in new_names:
        if name in group_of:
            if name in entries_of:
                new_state[name] = _map_entries(
                    name, entries_of[name], state.model[name], rules.get(name, (None, None))
                )
            continue
        counterpart = _counterpart(name, old)
        group_of[name] = group_of[counterpart]
        if counterpart in entries_of:
            new_state[name] = _zero_entries(entries_of[counterpart], model[name])
    groups: list[dict[str, Any]] = []
    state_dict: dict[int, dict[str, Any]] = {}
    index = 0
    for g, group in enumerate(state.optimizer["param_groups"]):
        names = [name for name in new_names if group_of[name] == g]
        params = list(range(index, index + len(names)))
        index += len(names)
        state_dict.update(
            {i: new_state[n] for i, n in zip(params, names, strict=True) if n in new_state}
        )
        changed = {"params": params, **({"param_names": names} if "param_names" in group else {})}
        groups.append({**group, **changed})
    return {**state.optimizer, "state": state_dict, "param_groups": groups}


def _map_entries(
    name: str, entries: Mapping[str, Any], param: Tensor, rule: _Rule
) -> dict[str, Any]:
    mapped: dict[str, Any] = {}
    for key, value in entries.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            if key not in _MOMENT_POWER:
                raise GrowError(
                    f"grow maps the state of Adam, AdamW and SGD ({', '.join(_MOMENT_POWER)}); "
                    f"optimizer state {key!r} of {name!r} is unknown",
                    field="optimizer",
                )
            if value.shape != param.shape:
                raise StateMismatchError(
                    f"optimizer state {key!r} of {name!r} has shape {list(value.shape)}, the "
                    f"parameter {list(param.shape)}: the optimizer's groups do not list the "
                    "model's parameters in the model's order"
                )
            value = _widen_moment(value, rule, _MOMENT_POWER[key])
        mapped[key] = value
    return mapped


def _zero_entries(template: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """A new parameter's optimizer state: its counterpart's entries, every tensor zero."""
    return {
        key: (
            torch.zeros(
                param.shape if value.dim() > 0 else (), dtype=value.dtype, device=value.device
            )
            if isinstance(value, Tensor)
            else value
        )
        for key, value in template.items()
    }
