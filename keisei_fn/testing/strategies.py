"""Hypothesis strategies for keisei_fn values: specs, tensors, JSON values, states, metas.

Every strategy takes keyword-only options and composes with the others (pass one as an option
of another, e.g. ``train_states(specs=model_specs(depth=(1, 1)))``). Defaults are small, so a
property over them runs quickly.

Tensors are generated as raw bit patterns (unsigned integers, then ``.view(dtype)``): bfloat16,
float16 and float8 get NaNs with any sign and payload, ``-0.0``, infinities and subnormals,
which a detour through Python floats would lose. Tensors with more than a few elements are
filled from a drawn seed, with drawn special values at drawn positions, so a state of a real
(small) network stays cheap to generate.

Example:
    >>> from hypothesis import given
    >>> from keisei_fn.testing import assert_roundtrip, fresh_run_dir, train_states
    >>> @given(train_states())
    ... def test_roundtrip(state):
    ...     with fresh_run_dir() as run_dir:
    ...         assert_roundtrip(state, run_dir=run_dir)
"""

from __future__ import annotations

import functools
import random
import string
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from keisei_fn.codec import DTYPE_NAMES
from keisei_fn.features import FEATURE_SPECS
from keisei_fn.meta import FORMAT_VERSION, KINDS, CheckpointMeta
from keisei_fn.nets import build_model
from keisei_fn.rng import numpy_legacy_state
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, TrainState

__all__ = [
    "checkpoint_metas",
    "game_stats",
    "json_values",
    "model_specs",
    "tensors",
    "train_states",
]

#: Every dtype a checkpoint stores (``keisei_fn.codec.DTYPE_NAMES``).
STORED_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPE_NAMES)
#: Keys the JSON codec uses as tags; user data that looks like them must survive too.
TAG_LIKE_KEYS = ("__float__", "__int__", "__tuple__", "__items__", "__tensor__")

#: Floats a plain ``st.floats()`` rarely draws: both zeros, infinities, NaNs of either sign and
#: with a payload.
_SPECIAL_FLOATS = tuple(
    struct.unpack("<d", struct.pack("<Q", bits))[0]
    for bits in (
        0,
        1 << 63,
        0x7FF0 << 48,
        0xFFF0 << 48,
        0x7FF8 << 48,
        0xFFF8 << 48,
        0x7FF0_0000_0000_0001,
    )
)
_DRAW_EVERY_ELEMENT = 4  # tensors with more elements are filled from a drawn seed
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SINTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_specs(
    *,
    model_types: Sequence[str] = ("resnet", "testmodel"),
    input_features: Sequence[str] | None = None,
    depth: tuple[int, int] = (1, 2),
    width: tuple[int, int] = (1, 16),
    se_ratios: Sequence[float] = (0.0, 0.25, 0.5),
    num_actions: tuple[int, int] = (1, 32),
) -> st.SearchStrategy[ModelSpec]:
    """Small valid :class:`~keisei_fn.ModelSpec` values.

    Args:
        model_types: the model types to choose from (test types build depth 1, width 16).
        input_features: feature set names; every registered one when None.
        depth: inclusive range of ``tower_depth``.
        width: inclusive range of ``tower_width``.
        se_ratios: ``se_ratio`` values (``0`` disables squeeze-excitation).
        num_actions: inclusive range of the policy size.

    Returns:
        A strategy of specs.

    Example:
        >>> from hypothesis import find
        >>> find(model_specs(depth=(1, 1)), lambda spec: spec.model_type == "resnet").tower_depth
        1
    """
    return st.builds(
        ModelSpec,
        model_type=st.sampled_from(tuple(model_types)),
        input_features=st.sampled_from(tuple(input_features or FEATURE_SPECS)),
        tower_depth=st.integers(*depth),
        tower_width=st.integers(*width),
        se_ratio=st.sampled_from(tuple(se_ratios)),
        num_actions=st.integers(*num_actions),
    )


@functools.cache
def _special_bits(dtype: torch.dtype) -> tuple[int, ...]:
    """Bit patterns worth hitting for ``dtype``: zeros, extremes, infinities, odd NaNs."""
    bits = dtype.itemsize * 8
    mask = (1 << bits) - 1
    if dtype == torch.bool:
        return (0, 1)
    if dtype == torch.complex64:
        parts = _special_bits(torch.float32)
        return tuple(re | (im << 32) for re in parts[:6] for im in parts[:6])
    if not dtype.is_floating_point:
        return (0, 1, mask, 1 << (bits - 1), (1 << (bits - 1)) - 1)
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, float("inf"), -float("inf")]
    patterns = {
        int(v) & mask
        for v in torch.tensor(values, dtype=torch.float64).to(dtype).view(_SINTS[dtype.itemsize])
    }
    sign = 1 << (bits - 1)
    nan = int(torch.tensor(float("nan")).to(dtype).view(_SINTS[dtype.itemsize])) & mask
    nan &= ~sign  # a positive quiet NaN; below: its negative twin and payload variants
    patterns |= {1, sign | 1, nan, nan | sign, nan ^ 1, (nan ^ 1) | sign}
    return tuple(sorted(patterns))


def _from_bits(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype).reshape(shape)


@functools.cache
def _element(dtype: torch.dtype) -> st.SearchStrategy[int]:
    """One element's bits: any valid pattern, often a special one."""
    return st.one_of(st.integers(0, _top(dtype)), st.sampled_from(_special_bits(dtype)))


def _top(dtype: torch.dtype) -> int:
    """The largest valid bit pattern (a bool is 0 or 1)."""
    return 1 if dtype == torch.bool else (1 << (dtype.itemsize * 8)) - 1


@st.composite
def _bits_tensor(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` and ``shape`` with arbitrary (valid) bit patterns."""
    numel = int(np.prod(shape, dtype=np.int64))
    uint = _UINTS[dtype.itemsize]
    element = _element(dtype)
    if numel <= _DRAW_EVERY_ELEMENT:
        raw = np.array(draw(st.lists(element, min_size=numel, max_size=numel)), dtype=uint)
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        raw = np.random.default_rng(seed).integers(
            0, _top(dtype), size=numel, dtype=uint, endpoint=True
        )
        positions = st.integers(0, numel - 1)
        for index, value in draw(st.lists(st.tuples(positions, element), max_size=8)):
            raw[index] = value
    return _from_bits(raw, dtype, shape)


@functools.cache
def _shapes() -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def tensors(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[torch.dtype] = STORED_DTYPES,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
    noncontiguous: bool = False,
) -> torch.Tensor:
    """CPU tensors of every stored dtype with arbitrary bit patterns (NaN payloads, ``-0.0``).

    Args:
        dtypes: the dtypes to choose from; every dtype a checkpoint stores by default.
        shapes: a strategy of shapes; by default up to 3 dims of 0 to 4, so 0-d and empty tensors
            occur.
        noncontiguous: also produce views: strided, transposed, offset into a larger storage,
            and expanded (stride 0).

    Returns:
        A strategy of tensors.

    Example:
        >>> from hypothesis import find
        >>> t = find(tensors(dtypes=[torch.bfloat16], shapes=st.just((2, 3))), lambda t: True)
        >>> t.dtype, tuple(t.shape)
        (torch.bfloat16, (2, 3))
    """
    dtype = draw(st.sampled_from(tuple(dtypes)))
    shape = draw(shapes if shapes is not None else _shapes())
    layout = "contiguous"
    if noncontiguous:
        layouts = ["contiguous", "strided", "offset", "expanded"]
        layout = draw(st.sampled_from(layouts + (["transposed"] if len(shape) >= 2 else [])))
    if layout == "strided":
        return draw(_bits_tensor(dtype, (*shape, 2)))[..., 0]
    if layout == "transposed":
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return draw(_bits_tensor(dtype, swapped)).transpose(-1, -2)
    if layout == "offset":
        numel = int(np.prod(shape, dtype=np.int64))
        return draw(_bits_tensor(dtype, (numel + 1,)))[1:].view(shape)
    if layout == "expanded" and shape:
        return draw(_bits_tensor(dtype, (1, *shape[1:]))).expand(shape)
    return draw(_bits_tensor(dtype, shape))


def game_stats() -> st.SearchStrategy[GameStats]:
    """Valid :class:`~keisei_fn.GameStats` (counts up to ``2**63 - 1``).

    Example:
        >>> from hypothesis import find
        >>> find(game_stats(), lambda stats: stats.draws > 0).draws
        1
    """
    count = st.integers(0, 2**63 - 1)
    return st.builds(GameStats, black_wins=count, white_wins=count, draws=count)


@functools.cache
def _texts() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=8), st.sampled_from(TAG_LIKE_KEYS))


def json_values(*, max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """The values a checkpoint's JSON part stores exactly (the codec's tagged-JSON domain).

    None, bools, ints of any size (beyond 64 bits too), floats including NaN with any payload,
    ``±inf`` and ``-0.0``, strings (tag-like ones such as ``"__tuple__"`` too), lists, tuples,
    and dicts keyed by strings, ints or tuples, nested.

    Args:
        max_leaves: bound on the size of one value.

    Returns:
        A strategy of values.

    Example:
        >>> from hypothesis import find
        >>> find(json_values(), lambda v: isinstance(v, tuple) and len(v) == 2)
        (None, None)
    """
    return _json_values(max_leaves)


@functools.cache  # building a recursive strategy is costly; it is immutable, so share it
def _json_values(max_leaves: int) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**64 - 2, max_value=2**70) | st.integers(-(2**70), -(2**63) - 1),
        st.floats(),
        st.sampled_from(_SPECIAL_FLOATS),
        _texts(),
    )
    keys = st.one_of(
        _texts(),
        st.integers(),
        st.tuples(st.integers(-3, 3), _texts()),
        st.sampled_from([(), (0,)]),
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(_texts(), children, max_size=4),
            st.dictionaries(keys, children, max_size=4),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


@functools.cache
def _layout(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...], torch.dtype, bool], ...]:
    """``(key, shape, dtype, is_parameter)`` of a spec's state_dict, in order."""
    model = build_model(spec, device="meta")
    params = {name for name, _ in model.named_parameters()}
    return tuple(
        (key, tuple(t.shape), t.dtype, key in params) for key, t in model.state_dict().items()
    )


@functools.cache
def _state_dict_keys() -> st.SearchStrategy[str]:
    dotted = st.lists(
        st.text(string.ascii_letters + string.digits + "_%/", min_size=1, max_size=6),
        min_size=1,
        max_size=3,
    ).map(".".join)
    return st.one_of(dotted, st.text(max_size=6))


@st.composite
def _model(
    draw: st.DrawFn, spec: ModelSpec | None
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Model tensors and the subset that are parameters (what an optimizer steps)."""
    if spec is not None:
        layout = _layout(spec)
        model = {key: draw(_bits_tensor(dtype, shape)) for key, shape, dtype, _ in layout}
        params = [model[key] for key, _, _, is_param in layout if is_param]
        return model, params
    keys = draw(st.lists(_state_dict_keys(), unique=True, max_size=6))
    model = {key: draw(tensors(noncontiguous=True)) for key in keys}
    return model, list(model.values())


def _tie_(draw: st.DrawFn, model: dict[str, torch.Tensor]) -> None:
    """Maybe make one key share another's tensor (tied weights), in place."""
    layouts = {k: (t.shape, t.dtype) for k, t in model.items() if t.numel()}
    pairs = [(a, b) for a in layouts for b in layouts if a < b and layouts[a] == layouts[b]]
    if not pairs or not draw(st.booleans()):
        return
    a, b = draw(st.sampled_from(pairs))
    model[b] = model[a]


_flags = st.booleans()
_maybe_flag = st.none() | st.booleans()
_rates = st.floats(0, 1, allow_nan=False)


@st.composite
def _optimizer(draw: st.DrawFn, params: list[torch.Tensor]) -> dict[str, Any]:
    """An Adam- or SGD-shaped ``state_dict``: int-keyed state, param_groups with tuples."""
    adam = draw(st.booleans())
    state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(params):
        like = _bits_tensor(param.dtype, tuple(param.shape))
        if not draw(st.booleans()):
            continue  # no step taken for this parameter yet
        if adam:
            step = draw(_bits_tensor(torch.float32, ()))
            state[index] = {"step": step, "exp_avg": draw(like), "exp_avg_sq": draw(like)}
        else:
            state[index] = {"momentum_buffer": draw(st.none() | like)}
    split = draw(st.integers(0, len(params)))
    groups: list[dict[str, Any]] = []
    for indices in ([*range(split)], [*range(split, len(params))]):
        if not indices and groups:
            continue
        lr = draw(_rates | tensors(dtypes=[torch.float32, torch.float64], shapes=st.just(())))
        group: dict[str, Any] = {"lr": lr, "weight_decay": draw(_rates), "maximize": draw(_flags)}
        if adam:
            group |= {
                "betas": (draw(_rates), draw(_rates)),
                "eps": draw(st.floats(1e-12, 1e-3)),
                "amsgrad": draw(_flags),
                "capturable": draw(_flags),
            }
        else:
            group |= {
                "momentum": draw(_rates),
                "dampening": draw(_rates),
                "nesterov": draw(_flags),
            }
        group |= {
            "foreach": draw(_maybe_flag),
            "differentiable": draw(_flags),
            "fused": draw(_maybe_flag),
            "params": indices,
        }
        groups.append(group)
    return {"state": state, "param_groups": groups}


@st.composite
def _scheduler(draw: st.DrawFn) -> dict[str, Any]:
    """A StepLR- or ReduceLROnPlateau-shaped ``state_dict`` (the latter with ``best=inf``)."""
    lrs = draw(st.lists(_rates, min_size=1, max_size=2))
    epoch = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        return {
            "step_size": draw(st.integers(1, 100)),
            "gamma": draw(_rates),
            "base_lrs": lrs,
            "last_epoch": epoch,
            "_step_count": epoch + 1,
            "_get_lr_called_within_step": False,
            "_last_lr": lrs,
        }
    mode = draw(st.sampled_from(["min", "max"]))
    worse = float("inf") if mode == "min" else -float("inf")
    return {
        "factor": draw(_rates),
        "min_lrs": [0.0] * len(lrs),
        "patience": draw(st.integers(0, 20)),
        "cooldown": 0,
        "cooldown_counter": 0,
        "mode": mode,
        "threshold": 1e-4,
        "threshold_mode": "rel",
        "best": draw(st.just(worse) | st.floats(allow_nan=False)),
        "num_bad_epochs": draw(st.integers(0, 20)),
        "mode_worse": worse,
        "eps": 1e-8,
        "last_epoch": epoch,
        "_last_lr": lrs,
    }


@functools.cache
def _scaler() -> st.SearchStrategy[dict[str, Any]]:
    """A ``GradScaler.state_dict()``."""
    return st.fixed_dictionaries(
        {
            "scale": st.sampled_from([65536.0, 1.0, 2.0**-10]) | st.floats(0, 2.0**24),
            "growth_factor": st.just(2.0),
            "backoff_factor": st.just(0.5),
            "growth_interval": st.integers(1, 2000),
            "_growth_tracker": st.integers(0, 2000),
        }
    )


def _rng(seed: int) -> dict[str, Any]:
    """An RNG part shaped like ``keisei_fn.capture``'s, from ``seed`` (global RNGs untouched):
    Python's tuple state, NumPy's MT19937 key, torch's byte state, and a user PCG64 generator
    (128-bit integers)."""
    return {
        "python": random.Random(seed).getstate(),
        "numpy": numpy_legacy_state(np.random.RandomState(seed)),
        "torch": torch.Generator().manual_seed(seed).get_state(),
        "cuda": [],
        "generators": {
            "env": {"type": "numpy", "state": np.random.default_rng(seed).bit_generator.state},
            "sampler": {"type": "python", "state": random.Random(seed + 1).getstate()},
        },
    }


@st.composite
def _extra(draw: st.DrawFn) -> dict[str, Any]:
    """Keisei's ``elo_state`` and ``metrics_history``, arbitrary JSON, sometimes a tensor."""
    extra: dict[str, Any] = {}
    if draw(st.booleans()):
        history = st.lists(st.floats(), max_size=3)
        extra["elo_state"] = {
            "black_rating": draw(st.floats(0, 3000)),
            "white_rating": draw(st.floats(0, 3000)),
            "initial_rating": 1500.0,
            "k_factor": 32.0,
            "rating_history": draw(st.lists(st.fixed_dictionaries({"black": _rates}), max_size=2)),
        }
        extra["metrics_history"] = {
            name: draw(history) for name in ("policy_losses", "value_losses", "win_rates")
        }
    extra.update(draw(st.dictionaries(_texts(), json_values(max_leaves=8), max_size=3)))
    if draw(st.booleans()):
        extra["buffer"] = draw(tensors())
    return extra


@st.composite
def train_states(
    draw: st.DrawFn,
    *,
    specs: st.SearchStrategy[ModelSpec | None] | None = None,
    steps: st.SearchStrategy[int] | None = None,
) -> TrainState:
    """Complete :class:`~keisei_fn.TrainState` values, as capture would make them and worse.

    With a spec, the model holds exactly that network's state_dict keys, shapes and dtypes
    (arbitrary bit patterns as values), and the optimizer's state is shaped like its
    parameters, so ``restore_`` accepts it. Without one (``spec=None``), the model is an
    arbitrary module: any keys, every dtype, 0-d, empty and non-contiguous tensors. Either way
    two keys may share one tensor (tied weights), the optimizer is Adam- or SGD-shaped (int-keyed
    state, param_groups with tuples, None, bools and sometimes a tensor ``lr``), the scheduler is
    StepLR- or ReduceLROnPlateau-shaped (``best=inf``), and scaler, RNG and ``extra`` (Keisei's
    elo and metrics, arbitrary JSON) are each present or None.

    Args:
        specs: a strategy of specs (or None); by default half None, half :func:`model_specs`.
        steps: a strategy of the step (> 0 to be saveable); by default 1 to ``2**40``.

    Returns:
        A strategy of states.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(train_states(specs=st.none(), steps=st.integers(1, 100)))
        ... def test_states(state):
        ...     assert state.spec is None and 1 <= state.step <= 100
        >>> test_states()
    """
    spec = draw(specs if specs is not None else st.none() | model_specs())
    model, params = draw(_model(spec))
    optimizer = draw(st.none() | _optimizer(params))
    _tie_(draw, model)
    return TrainState(
        spec=spec,
        step=draw(steps if steps is not None else st.integers(1, 2**40)),
        episodes=draw(st.integers(0, 2**40)),
        stats=draw(game_stats()),
        model=model,
        optimizer=optimizer,
        scheduler=draw(st.none() | _scheduler()),
        scaler=draw(st.none() | _scaler()),
        rng=draw(st.none() | st.integers(0, 2**32 - 1).map(_rng)),
        extra=draw(_extra()),
    )


@st.composite
def checkpoint_metas(
    draw: st.DrawFn,
    *,
    run_dir: Path = Path("run"),
    kinds: Sequence[str] = KINDS,
    prefixes: Sequence[str] = ("checkpoint_ts", "initial_eval_checkpoint_ts"),
    steps: st.SearchStrategy[int] | None = None,
) -> CheckpointMeta:
    """:class:`~keisei_fn.CheckpointMeta` values as the store lists them (nothing on disk).

    Names follow the grammar (``<prefix><step>``, ``final_model`` for the final model);
    ``extra`` holds a few numeric metrics (sometimes NaN or missing) for ``keep_best``.

    Args:
        run_dir: the directory the metas claim to live in.
        kinds: kinds to choose from.
        prefixes: name prefixes of periodic and final checkpoints.
        steps: a strategy of steps; by default 1 to 10**6.

    Returns:
        A strategy of metas.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(checkpoint_metas(kinds=["periodic"], steps=st.just(5)))
        ... def test_metas(meta):
        ...     assert meta.kind == "periodic" and meta.name.endswith("_ts5")
        >>> test_metas()
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    step = draw(steps if steps is not None else st.integers(1, 10**6))
    name = "final_model" if kind == "final_model" else f"{draw(st.sampled_from(prefixes))}{step}"
    hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
    metric = st.none() | st.floats(-1, 1) | st.just(float("nan"))
    extra = {k: v for k in ("win_rate", "loss") if (v := draw(metric)) is not None}
    return CheckpointMeta(
        path=Path(run_dir) / name,
        name=name,
        format_version=FORMAT_VERSION,
        kind=kind,
        step=step,
        episodes=draw(st.integers(0, 10**9)),
        stats=draw(game_stats()),
        spec=draw(st.none() | model_specs()),
        weights_size=draw(st.integers(8, 10**9)),
        weights_digest="blake3:" + draw(hex64),
        digest="blake3:" + draw(hex64),
        tensors={"model/w": ("F32", (draw(st.integers(0, 8)),))},
        created=draw(st.datetimes()).isoformat() + "+00:00",
        versions={"keisei_fn": "0.1.0"},
        extra=extra,
    )
