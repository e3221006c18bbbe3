"""Parameter averaging of compatible checkpoints ("model soup", SWA): ``average_states``.

The average of states with one spec and one layout (same keys, shapes and dtypes) is a state
whose floating tensors are the weighted means of theirs. It is defined so that it is exact
where it can be:

- each element is the sum, in float64, of the products ``weight * value`` taken in the order
  of their bit patterns (a canonical order), then rounded once to the tensor's dtype: the
  result does not depend on the order of the states, bit for bit; averaging one state gives
  it back (its tensors are copied);
- integer and bool tensors are not averaged: a BatchNorm ``num_batches_tracked`` takes the
  largest count of the inputs, and any other must be equal in every input (it is copied);
- BatchNorm running statistics are averaged like every floating tensor by default, or
  recomputed for the averaged weights on given positions (``recompute_bn=``, see
  :func:`recompute_bn`);
- the result is a model: optimizer, scheduler, scaler and RNG states are dropped, and
  ``extra`` holds only :data:`AVERAGE_KEY`, the record of what went in (each input's step,
  name when given, and normalised weight; how BatchNorm statistics were made), which
  ``keisei-fn info`` shows. Its step, episodes and stats are the newest input's.

Example:
    >>> import torch
    >>> from keisei_fn import TrainState
    >>> a = TrainState(spec=None, step=1, model={"w": torch.tensor([0.0, 2.0])})
    >>> b = TrainState(spec=None, step=2, model={"w": torch.tensor([1.0, 4.0])})
    >>> soup = average_states([a, b], weights=[3, 1])
    >>> soup.model["w"].tolist(), soup.step, [i["weight"] for i in soup.extra["average"]["inputs"]]
    ([0.25, 2.5], 2, [0.75, 0.25])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from keisei_fn.errors import CheckpointNotFoundError, SpecError, StateMismatchError
from keisei_fn.nets import build_model, canonical_state_dict
from keisei_fn.paths import PathArg, run_path
from keisei_fn.spec import ModelSpec, describe_spec_differences
from keisei_fn.state import TrainState, layout_problems, view_key

__all__ = [
    "AVERAGE_KEY",
    "Positions",
    "average_checkpoints",
    "average_states",
    "average_summary",
    "last_checkpoints",
    "normalized_weights",
    "recompute_bn",
]

#: The ``extra`` key of an average's record of its inputs.
AVERAGE_KEY = "average"
#: Positions to recompute BatchNorm statistics on: encoded planes ``(N, C, 9, 9)`` or SFENs.
Positions = torch.Tensor | Sequence[str]
#: The integer buffer BatchNorm counts its batches in: an average takes the largest count.
_BATCH_COUNT = "num_batches_tracked"
#: How many lines an incompatibility error shows (each summarises one kind of difference).
_SHOWN = 5


def normalized_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """Weights that sum to 1: uniform when None, else ``weights`` divided by their sum.

    Args:
        weights: one finite weight >= 0 per item, with a positive sum; or None.
        n: how many items there are (>= 1).

    Returns:
        ``n`` floats.

    Raises:
        SpecError: no items, a count that does not match, a negative or non-finite weight, or
            a zero sum.

    Example:
        >>> normalized_weights([1, 3], 2), normalized_weights(None, 4)
        ((0.25, 0.75), (0.25, 0.25, 0.25, 0.25))
    """
    if n < 1:
        raise SpecError("nothing to average: no inputs given")
    if weights is None:
        return (1.0 / n,) * n
    values = list(weights)
    if len(values) != n:
        raise SpecError(f"{len(values)} weights for {n} inputs: give one weight per input")
    numbers = all(isinstance(w, int | float) and not isinstance(w, bool) for w in values)
    try:
        floats = [float(w) for w in values] if numbers else []
    except OverflowError:  # an int beyond a float's range
        numbers = False
    if not numbers or not all(math.isfinite(w) and w >= 0 for w in floats):
        raise SpecError(f"weights must be finite numbers >= 0, got {values}")
    try:
        total = math.fsum(floats)
    except OverflowError:  # the sum is beyond a float's range: scale down first (same ratios)
        top = max(floats)
        floats = [w / top for w in floats]
        total = math.fsum(floats)
    if total <= 0:
        raise SpecError(f"weights must have a positive sum, got {values}")
    return tuple(w / total for w in floats)


def _incompatibilities(first: TrainState, other: TrainState, index: int) -> list[str]:
    """How state ``index`` differs from state 0 in spec, keys, shapes and dtypes."""
    where = f"state {index}"
    problems = []
    if first.spec is not None and other.spec is not None:
        differ = describe_spec_differences(other.spec, first.spec)
        if differ:
            problems.append(f"spec differs ({where} vs state 0): {differ}")
    elif other.spec != first.spec:
        problems.append(f"{where} has spec {other.spec!r}, state 0 has {first.spec!r}")
    return problems + layout_problems(
        other.model, first.model, found_name=where, expected_name="state 0"
    )


def _check_compatible(states: Sequence[TrainState]) -> None:
    problems = [p for i, s in enumerate(states[1:], 1) for p in _incompatibilities(states[0], s, i)]
    if problems:
        more = [f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else []
        raise StateMismatchError.listing(
            "cannot average incompatible states", problems[:_SHOWN] + more
        )


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sum of ``weight * tensor`` per element in float64, the products in the order of their
    bit patterns (a total order: equal keys are equal bits), rounded once to the tensors'
    dtype: independent of the order of the inputs, NaN payloads and signed zeros included.
    One tensor is copied as it is (arithmetic would quiet a signalling NaN)."""
    if len(tensors) == 1:
        return tensors[0].detach().clone(memory_format=torch.contiguous_format)
    products = torch.stack(
        [t.detach().to(torch.float64) * w for t, w in zip(tensors, weights, strict=True)]
    )
    ordered = products.gather(0, products.view(torch.int64).argsort(dim=0))
    total = ordered[0]
    for row in ordered[1:]:  # a plain left fold (torch.sum would start from +0.0: -0.0 lost)
        total = total + row
    return total.to(tensors[0].dtype)


def _combine(key: str, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    first = tensors[0]
    if first.is_floating_point():
        return _weighted_mean(tensors, weights)
    if key.rsplit(".", 1)[-1] == _BATCH_COUNT:
        return torch.stack([t.detach() for t in tensors]).amax(dim=0)
    for i, tensor in enumerate(tensors[1:], 1):
        if not torch.equal(tensor, first):
            raise StateMismatchError(
                f"cannot average {key!r}: a {first.dtype} tensor (not averaged) that differs "
                f"between state 0 and state {i}"
            )
    return first.detach().clone()


def average_states(
    states: Sequence[TrainState],
    weights: Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
    recompute_bn: Positions | None = None,
) -> TrainState:
    """Average the model weights of compatible states (a "model soup", SWA).

    See the module's notes for the exact definition: a float64 sum in a canonical order, so
    the result does not depend on the order of the inputs and one state averages to itself.

    Args:
        states: one or more states with the same spec and model layout.
        weights: one weight >= 0 per state (normalised to sum to 1); uniform when None.
        names: what to call each input in the record (e.g. checkpoint names); by default the
            record has their steps only.
        recompute_bn: positions to recompute BatchNorm running statistics on for the averaged
            weights (see :func:`recompute_bn`); None keeps the averaged statistics.

    Returns:
        A weights-only state (no optimizer, scheduler, scaler or RNG) at the newest input's
        step, episodes and stats; ``extra[AVERAGE_KEY]`` records the inputs (sorted by step,
        then name) and ``"bn"``: ``"averaged"`` or ``{"recomputed": <positions>}``.

    Raises:
        SpecError: no states, bad weights, names of the wrong length, or ``recompute_bn``
            without a spec or with positions that do not fit it.
        StateMismatchError: the states differ in spec, keys, shapes or dtypes (the first
            differences are listed), or in an integer tensor that cannot be averaged.

    Example:
        >>> from keisei_fn import ModelSpec, build_model, capture
        >>> spec = ModelSpec(model_type="testmodel", num_actions=8)
        >>> states = [capture(spec, build_model(spec, seed=s), step=s + 1) for s in range(3)]
        >>> soup = average_states(states, names=["a", "b", "c"])
        >>> soup.step, soup.optimizer, [i["source"] for i in soup.extra["average"]["inputs"]]
        (3, None, ['a', 'b', 'c'])
    """
    states = list(states)
    shares = normalized_weights(weights, len(states))
    if names is not None and len(names) != len(states):
        raise SpecError(f"{len(names)} names for {len(states)} states: give one name per state")
    _check_compatible(states)
    model: dict[str, torch.Tensor] = {}
    done: dict[tuple[Any, ...], torch.Tensor] = {}  # tied tensors stay tied
    for key in states[0].model:
        tensors = [s.model[key] for s in states]
        tie = tuple(view_key(t) for t in tensors)
        if None not in tie and tie in done:
            model[key] = done[tie]
            continue
        model[key] = done[tie] = _combine(key, tensors, shares)
    inputs = [
        {"step": s.step, "weight": w, **({"source": names[i]} if names is not None else {})}
        for i, (s, w) in enumerate(zip(states, shares, strict=True))
    ]
    inputs.sort(key=lambda item: (item["step"], item.get("source", ""), item["weight"]))
    newest = max(states, key=lambda s: (s.step, s.episodes, *s.stats.to_json().values()))
    soup = TrainState(
        spec=states[0].spec,
        step=newest.step,
        episodes=newest.episodes,
        stats=newest.stats,
        model=model,
        extra={AVERAGE_KEY: {"inputs": inputs, "bn": "averaged"}},
    )
    if recompute_bn is None:
        return soup
    return _recompute(soup, recompute_bn)


def _observations(positions: Positions, spec: ModelSpec) -> torch.Tensor:
    if isinstance(positions, torch.Tensor):
        obs = positions
    else:
        from keisei_fn import shogi

        if isinstance(positions, str):
            raise SpecError("recompute_bn takes a sequence of SFENs, got one string")
        obs = shogi.encode_observations(shogi.board_from_sfen(s) for s in positions)
    if obs.dim() != 4 or tuple(obs.shape[1:]) != spec.obs_shape or len(obs) == 0:
        raise SpecError(
            f"recompute_bn needs positions of shape (N >= 1, {', '.join(map(str, spec.obs_shape))})"
            f" for {spec.input_features}, got {tuple(obs.shape)}"
        )
    return obs


def recompute_bn(state: TrainState, positions: Positions, *, batch_size: int = 256) -> TrainState:
    """Recompute a model's BatchNorm running statistics on ``positions``.

    Builds the network ``state.spec`` describes, loads the weights, resets every BatchNorm's
    running statistics and runs the positions through it in training mode with
    ``momentum=None`` (a cumulative average: the running mean and variance become the average
    of the batches' statistics), without gradients. Nothing else changes; the global RNG is not
    touched.

    Args:
        state: a state with a spec.
        positions: encoded feature planes ``(N, *spec.obs_shape)``, or SFEN strings (encoded
            with the core46 encoder of ``keisei_fn.shogi``).
        batch_size: positions per forward pass (the statistics are averaged over batches).

    Returns:
        The state with new running statistics (and ``num_batches_tracked`` = batches run); an
        average's record (``extra[AVERAGE_KEY]["bn"]``) says on how many positions.

    Raises:
        SpecError: no spec, a bad ``batch_size``, or positions that do not fit the spec.
        InvalidPositionError: a malformed SFEN.

    Example:
        >>> from keisei_fn import ModelSpec, build_model, capture
        >>> spec = ModelSpec(model_type="testmodel", num_actions=8)
        >>> state = capture(spec, build_model(spec, seed=0), step=1)
        >>> fresh = recompute_bn(state, torch.ones(4, 46, 9, 9))
        >>> int(fresh.model["bn_stem.num_batches_tracked"])
        1
    """
    return _recompute(state, positions, batch_size=batch_size)


def _recompute(state: TrainState, positions: Positions, *, batch_size: int = 256) -> TrainState:
    from keisei_fn.capture import capture, restore_

    if state.spec is None:
        raise SpecError("recompute_bn needs a state with a ModelSpec (to build the network)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch_size must be an int >= 1, got {batch_size!r}")
    floating = [t.dtype for t in state.model.values() if t.is_floating_point()]
    dtype = floating[0] if floating else torch.float32
    model = build_model(state.spec, seed=0, dtype=dtype)
    restore_(state.replace(optimizer=None), model, rng=False)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    obs = _observations(positions, state.spec).to(dtype)
    model.train()
    with torch.no_grad():
        for batch in torch.split(obs, batch_size):
            model(batch)
    fresh = capture(state.spec, model, step=state.step, rng=False).model
    extra = dict(state.extra)
    if average_summary(extra) is not None:  # an average's record (not the user's own key)
        extra[AVERAGE_KEY] = {**extra[AVERAGE_KEY], "bn": {"recomputed": len(obs)}}
    return state.replace(model=canonical_state_dict(fresh), extra=extra)


def last_checkpoints(run_dir: PathArg, n: int) -> list[PathArg]:
    """The ``n`` newest valid resume points (``checkpoint_ts*``) of a run directory, oldest
    first; checkpoints the health gate marked unhealthy (``keisei_fn.health``) are left out.

    Raises:
        SpecError: ``n < 1``, or fewer than ``n`` usable (valid, not marked unhealthy)
            checkpoints (it says how many there are).
        CheckpointNotFoundError: ``run_dir`` is not a directory.

    Example:
        >>> last_checkpoints("runs/none", 1)
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no run directory runs/none
    """
    from keisei_fn.store import directory_exists, list_checkpoints
    from keisei_fn.store.names import RESUME_PREFIX, parse_stem

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"how many checkpoints to average must be an int >= 1, got {n!r}")
    if not directory_exists(run_path(run_dir)):
        raise CheckpointNotFoundError(f"no run directory {run_dir}")
    resume_points = [
        meta
        for meta in list_checkpoints(run_dir)
        if (parsed := parse_stem(meta.name)) is not None
        and parsed.prefix == RESUME_PREFIX
        and meta.healthy
    ]
    if len(resume_points) < n:
        raise SpecError(
            f"{run_dir} has {len(resume_points)} usable {RESUME_PREFIX}* checkpoints, "
            f"fewer than {n}"
        )
    return [meta.path for meta in sorted(resume_points, key=lambda m: m.step)[-n:]]


def average_checkpoints(
    sources: Sequence[PathArg],
    weights: Sequence[float] | None = None,
    *,
    recompute_bn: Positions | None = None,
) -> TrainState:
    """Load the models of checkpoints (each verified, nothing but the model read) and average
    them with :func:`average_states`, recording each by its path (without suffix).

    Args:
        sources: checkpoints, each as ``load_model`` takes it (a run directory: its final
            model, else its latest checkpoint); see :func:`last_checkpoints` for a run's newest.
        weights: as for :func:`average_states`.
        recompute_bn: as for :func:`average_states`.

    Returns:
        The average.

    Raises:
        Every error of ``load_state`` and of :func:`average_states`.

    Example:
        >>> average_checkpoints([])
        Traceback (most recent call last):
        ...
        keisei_fn.errors.SpecError: nothing to average: no inputs given
    """
    from keisei_fn.store.checkpoints import MODEL_ONLY, load_state_with_meta
    from keisei_fn.store.locate import resolve_checkpoint

    normalized_weights(weights, len(sources))  # refuse bad weights before reading anything
    loaded = [
        load_state_with_meta(resolve_checkpoint(source), parts=MODEL_ONLY) for source in sources
    ]
    return average_states(
        [state for state, _ in loaded],
        weights,
        names=[str(meta.path) for _, meta in loaded],
        recompute_bn=recompute_bn,
    )


def average_summary(extra: Mapping[str, Any]) -> str | None:
    """One line on where an average came from, from its ``extra`` (a state's or a
    checkpoint meta's); None when it is not an average's record (``extra`` is the user's, and
    its ``"average"`` key may hold anything).

    Example:
        >>> record = {"inputs": [{"step": 10, "weight": 0.5}, {"step": 20, "weight": 0.5}],
        ...           "bn": {"recomputed": 64}}
        >>> print(average_summary({"average": record}))
        average of 2: step 10 (w 0.5), step 20 (w 0.5); BatchNorm recomputed on 64 positions
        >>> average_summary({"average": {"inputs": [{"step": 1, "weight": "heavy"}]}}) is None
        True
    """
    record = extra.get(AVERAGE_KEY)
    if not isinstance(record, Mapping):
        return None
    items = record.get("inputs")
    if isinstance(items, str | bytes) or not isinstance(items, Sequence) or not items:
        return None
    if not all(isinstance(item, Mapping) and _is_number(item.get("weight")) for item in items):
        return None
    inputs = ", ".join(
        f"{item.get('source', 'step ' + str(item.get('step')))} (w {item['weight']:.4g})"
        for item in items
    )
    bn = record.get("bn")
    how = (
        f"recomputed on {bn['recomputed']} positions"
        if isinstance(bn, Mapping) and _is_number(bn.get("recomputed"))
        else "statistics averaged"
    )
    return f"average of {len(items)}: {inputs}; BatchNorm {how}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
