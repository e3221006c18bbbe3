"""Pure encoding between a TrainState and (tensor dict, JSON dict); no file system.

Tensors go to the weights file under readable names (``model/<key>``,
``optimizer/state/0/exp_avg``, ``rng/torch``, ...); everything else is JSON, written by one small
encoder with sorted keys (byte-deterministic) and tags for what JSON/orjson lose or refuse:

============================  ===================================
value                          JSON
============================  ===================================
NaN, inf, -inf                 ``{"__float__": "nan"}``, ``"inf"``, ``"-inf"``
NaN with a sign or payload     ``{"__float__": "nan:fff8000000000000"}`` (its 64 bits)
int beyond 64 bits             ``{"__int__": "123..."}``
tuple                          ``{"__tuple__": [...]}``
dict with non-str keys         ``{"__items__": [[key, value], ...]}``
(or keys that look like tags)
tensor                         ``{"__tensor__": "optimizer/state/0/exp_avg"}``
============================  ===================================

A round trip gives back exactly the Python values that went in (NumPy scalars come back as
the equal Python numbers). Tensors that share storage are stored once: the second name is
recorded as an alias of the first, and decoding gives the same tensor object back for both.
Strings must be valid UTF-8 (a lone surrogate is refused).

Example:
    >>> value = {"best": float("inf"), 0: (1, 2), "pcg": 2**100}
    >>> decode_json(encode_json(value)) == value
    True
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import orjson
import torch

from keisei_fn.errors import (
    IntegrityError,
    SpecError,
    UnsupportedDtypeError,
    UnsupportedValueError,
)
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, Layout, TrainState, dtype_name, view_key

__all__ = [
    "DTYPE_NAMES",
    "EncodedState",
    "Store",
    "check_json_cost",
    "check_storable",
    "decode_json",
    "decode_state",
    "dumps",
    "encode_header",
    "encode_json",
    "encode_state",
    "loads",
    "stored_layout",
    "tensor_name",
]

_TAGS = ("__float__", "__int__", "__tuple__", "__items__", "__tensor__")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
#: Bytes counted at a time by check_json_cost (a memoryview is never copied whole).
_COUNT_CHUNK = 1 << 20

#: Every tensor dtype a checkpoint stores, by its safetensors name.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def stored_layout(entry: Mapping[str, Any]) -> Layout:
    """The layout (torch's dtype name and the shape) that a sidecar's ``tensors`` entry records.

    Raises:
        KeyError: an entry without a known ``dtype`` name or a ``shape`` (sidecars are
            validated when read: this is for entries of a sidecar already checked).

    Example:
        >>> stored_layout({"dtype": "BF16", "shape": [2, 3]})
        ('bfloat16', (2, 3))
    """
    return dtype_name(DTYPES_BY_NAME[entry["dtype"]]), tuple(entry["shape"])


TensorRef = Callable[[tuple[Any, ...], torch.Tensor], str]


def _float_bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


_NAN_BITS = _float_bits(math.nan)


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if not math.isnan(value):
        return {"__float__": "inf" if value > 0 else "-inf"}
    bits = _float_bits(value)  # keep the sign and payload of a non-default NaN
    return {"__float__": "nan" if bits == _NAN_BITS else f"nan:{bits:016x}"}


def encode_json(value: Any, *, tensor_ref: TensorRef | None = None) -> Any:
    """Turn a nested Python value into plain JSON data (see the module's table of tags).

    Args:
        value: dicts, lists, tuples, str, int, float, bool, None, NumPy scalars and (with
            ``tensor_ref``) tensors, nested freely.
        tensor_ref: called with ``(path, tensor)`` for every tensor; returns its stored name.

    Raises:
        UnsupportedValueError: for anything else, naming the path to it.
    """
    return _encode(value, (), tensor_ref)


def _encode(value: Any, path: tuple[Any, ...], tensor_ref: TensorRef | None) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value, path)
    if isinstance(value, int):
        return int(value) if _INT_MIN <= value <= _INT_MAX else {"__int__": str(value)}
    if isinstance(value, float):
        return _float(float(value))
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float)):
        return _encode(value.item(), path, tensor_ref)
    if isinstance(value, torch.Tensor):
        if tensor_ref is None:
            raise UnsupportedValueError(f"a tensor at {_show(path)} cannot be stored in JSON here")
        return {"__tensor__": tensor_ref(path, value)}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {_text(k, path): _encode(v, (*path, k), tensor_ref) for k, v in value.items()}
        return {
            "__items__": [
                [_encode(k, path, None), _encode(v, (*path, k), tensor_ref)]
                for k, v in value.items()
            ]
        }
    if isinstance(value, list | tuple):
        items = [_encode(v, (*path, i), tensor_ref) for i, v in enumerate(value)]
        # a FrozenList (a tuple subclass) was a list
        return {"__tuple__": items} if type(value) is tuple else items
    raise UnsupportedValueError(
        f"cannot store a {type(value).__name__} at {_show(path)} in a checkpoint: only dicts, "
        "lists, tuples, str, int, float, bool, None and tensors are stored exactly"
    )


def _text(value: str, path: tuple[Any, ...]) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: JSON text cannot hold it
        raise UnsupportedValueError(
            f"string {value!r} at {_show(path)} is not UTF-8: {exc}"
        ) from exc
    return value


def _show(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "the top level"


def decode_json(data: Any, *, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`encode_json`; ``tensors`` resolves ``{"__tensor__": name}`` references.

    Raises:
        IntegrityError: for a malformed tag or a reference to a tensor that is not there.
    """
    if isinstance(data, list):
        return [decode_json(v, tensors=tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((tag, inner),) = data.items()
        if tag in _TAGS:
            return _decode_tag(tag, inner, tensors)
    return {k: decode_json(v, tensors=tensors) for k, v in data.items()}


def _decode_tag(tag: str, inner: Any, tensors: Mapping[str, torch.Tensor] | None) -> Any:
    try:
        if tag == "__float__":
            if isinstance(inner, str) and inner.startswith("nan:"):
                return struct.unpack("<d", struct.pack("<Q", int(inner[4:], 16)))[0]
            return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[inner]
        if tag == "__int__":
            return int(inner)
        if tag == "__tuple__":
            return tuple(decode_json(v, tensors=tensors) for v in inner)
        if tag == "__items__":
            return {_hashable(decode_json(k)): decode_json(v, tensors=tensors) for k, v in inner}
        if tensors is None:
            raise KeyError(inner)
        return tensors[inner]
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise IntegrityError(f"malformed JSON tag {tag!r}: {inner!r:.200} ({exc!r})") from exc


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def dumps(data: Any) -> bytes:
    """Canonical JSON bytes of plain JSON data: sorted keys, so equal data gives equal bytes.

    Raises:
        UnsupportedValueError: for what JSON cannot hold (e.g. a step beyond 64 bits).
    """
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise UnsupportedValueError(f"cannot write as JSON: {exc}") from exc


def check_json_cost(
    raw: bytes | bytearray | memoryview, *, max_values: int, max_containers: int, where: str
) -> None:
    """Refuse JSON whose parse could cost far more memory than its bytes, before parsing it.

    Parsing amplifies: three bytes ``{},`` become a 64-byte dict, four bytes ``1e0,`` a 32-byte
    float. Counting commas (values) and opening brackets (containers) bounds the objects a
    parse can create, in one pass over the bytes. Characters inside strings count too, so the
    counts are upper bounds: a refusal may be conservative, never too lenient.

    Raises:
        IntegrityError: naming ``where``, when a count is over its cap.

    Example:
        >>> check_json_cost(b"[1,2,3]", max_values=10, max_containers=1, where="x")
        >>> check_json_cost(b"[[],[]]", max_values=10, max_containers=2, where="x")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.IntegrityError: x: 3 JSON containers, more than the cap of 2
    """
    containers = commas = 0
    for start in range(0, len(raw), _COUNT_CHUNK):  # a memoryview is counted piece by piece
        piece = raw[start : start + _COUNT_CHUNK]
        data = piece.tobytes() if isinstance(piece, memoryview) else piece
        containers += data.count(b"{") + data.count(b"[")
        commas += data.count(b",")
    if containers > max_containers:
        raise IntegrityError(
            f"{where}: {containers} JSON containers, more than the cap of {max_containers}"
        )
    values = commas + containers
    if values > max_values:
        raise IntegrityError(f"{where}: {values} JSON values, more than the cap of {max_values}")


def loads(raw: bytes | str) -> Any:
    """Parse JSON bytes.

    Raises:
        IntegrityError: when ``raw`` is not valid JSON.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"invalid JSON: {exc}") from exc


def tensor_name(section: str, path: tuple[Any, ...]) -> str:
    """The stored name of a tensor at ``path`` in a state section, e.g. ``"model/stem.weight"``:
    "/" separates path parts; "%" and "/" inside a part are escaped so names never collide.

    Example:
        >>> tensor_name("optimizer", ("state", 0, "exp_avg"))
        'optimizer/state/0/exp_avg'
    """
    parts = (str(p).replace("%", "%25").replace("/", "%2F") for p in path)
    return "/".join((section, *parts))


class EncodedState:
    """A TrainState as stored: the tensors to write, the aliases, and the JSON state part.

    Attributes:
        tensors: name → contiguous CPU tensor, each storage once (safetensors refuses shared
            memory).
        aliases: name → the name of the identical tensor it shares storage with.
        header: the JSON-ready state part of the sidecar.
    """

    __slots__ = ("aliases", "header", "tensors")

    def __init__(
        self, tensors: dict[str, torch.Tensor], aliases: dict[str, str], header: dict[str, Any]
    ) -> None:
        self.tensors = tensors
        self.aliases = aliases
        self.header = header


def _dense(tensor: torch.Tensor) -> bool:
    """Row-major strides exactly (``is_contiguous`` also accepts any stride on a size-1 or an
    empty dim, which a flat byte view of the tensor refuses)."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    return tensor.stride() == tuple(reversed(expected))


def check_storable(name: str, tensor: torch.Tensor) -> None:
    """Raise unless a checkpoint can store ``tensor`` exactly.

    Raises:
        UnsupportedDtypeError: for complex128, complex32, float8_e8m0fnu and other dtypes that
            cannot be stored losslessly.
        UnsupportedValueError: for a sparse or otherwise non-strided tensor.
    """
    if tensor.dtype not in DTYPE_NAMES:
        raise UnsupportedDtypeError(
            f"tensor {name!r} has dtype {tensor.dtype}, which cannot be stored losslessly; "
            f"supported: {', '.join(str(d).removeprefix('torch.') for d in DTYPE_NAMES)}"
        )
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(f"tensor {name!r} is {tensor.layout}; convert it to dense")


class _TensorTable:
    """Names every tensor, storing each distinct view once and recording exact aliases."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> str:
        base, n = name, 1
        while name in self.tensors or name in self.aliases:  # e.g. keys 0 and "0" in one dict
            name, n = f"{base}#{n}", n + 1
        check_storable(name, tensor)
        view = view_key(tensor)
        ptr = view[0] if view is not None else 0
        if view is not None and view in self._views:
            self.aliases[name] = self._views[view]
            return name
        if ptr in self._storages or not _dense(tensor) or tensor.device.type != "cpu":
            # another view of shared memory, a strided view or a device tensor: store a copy
            tensor = tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        self.tensors[name] = tensor.detach()
        if view is not None:
            self._views[view] = name
            self._storages.add(ptr)
        return name


def encode_state(state: TrainState) -> EncodedState:
    """Split a TrainState into tensors to write and the JSON state part of the sidecar.

    Pure: ``state`` is not changed; equal states give equal results (and equal bytes on disk).

    Raises:
        UnsupportedDtypeError: for complex128, complex32, float8_e8m0fnu and other dtypes that
            cannot be stored losslessly.
        UnsupportedValueError: for non-JSON values outside the tensors.
    """
    table = _TensorTable()
    return EncodedState(table.tensors, table.aliases, encode_header(state, table.add))


#: Keeps a tensor under a stored name and returns the name for the header to record.
Store = Callable[[str, torch.Tensor], str]


def encode_header(state: TrainState, store: Store) -> dict[str, Any]:
    """The JSON state part of ``state``, handing every tensor to ``store(name, tensor)``, which
    keeps it and returns the name the header records (``encode_state`` stores each storage
    once; sharded checkpoints split the tensors between DCP and a small file).

    Raises:
        UnsupportedValueError: for non-JSON values outside the tensors; and whatever ``store``
            raises.
    """
    for key, tensor in state.model.items():
        store(tensor_name("model", (key,)), tensor)

    def tree(section: str, value: Any) -> Any:
        if value is None:
            return None
        return encode_json(value, tensor_ref=lambda p, t: store(tensor_name(section, p), t))

    return {
        "spec": state.spec.to_json() if state.spec is not None else None,
        "step": state.step,
        "episodes": state.episodes,
        "stats": state.stats.to_json(),
        "model": list(state.model),  # the keys; their tensors' names are escaped
        "optimizer": tree("optimizer", state.optimizer),
        "scheduler": tree("scheduler", state.scheduler),
        "scaler": tree("scaler", state.scaler),
        "rng": tree("rng", state.rng),
        "extra": tree("extra", state.extra),
    }


#: The parts of a TrainState that hold tensors or user state, in the order they are stored.
STATE_PARTS = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")


def check_parts(parts: Collection[str]) -> frozenset[str]:
    """``parts`` as a set, refusing a name that is not one of :data:`STATE_PARTS`.

    Raises:
        SpecError: for an unknown part (or a bare string, which would be its letters).

    Example:
        >>> sorted(check_parts(["model", "rng"]))
        ['model', 'rng']
    """
    if isinstance(parts, str):
        raise SpecError(f"parts must be a collection of names, e.g. ({parts!r},), got a string")
    unknown = sorted(set(parts) - set(STATE_PARTS))
    if unknown:
        raise SpecError(f"unknown state parts {unknown}; known: {', '.join(STATE_PARTS)}")
    return frozenset(parts)


def stored_names(
    names: Collection[str], aliases: Mapping[str, str], parts: Collection[str]
) -> set[str]:
    """The stored tensors that the ``parts`` of a state need: every stored name or alias in
    those sections, an alias replaced by the tensor it shares (which may be another part's)."""
    return {
        aliases.get(name, name) for name in (*names, *aliases) if name.split("/", 1)[0] in parts
    }


def only_parts(state: TrainState, parts: Collection[str]) -> TrainState:
    """``state`` without the parts not in ``parts`` (None; an empty model and extra)."""
    return state.replace(
        model=state.model if "model" in parts else {},
        extra=state.extra if "extra" in parts else {},
        **{name: None for name in STATE_PARTS[1:-1] if name not in parts},
    )


def decode_state(
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    header: Mapping[str, Any],
    *,
    parts: Collection[str] = STATE_PARTS,
) -> TrainState:
    """Inverse of :func:`encode_state`.

    Args:
        tensors: the stored tensors (at least those the ``parts`` need).
        aliases: the sidecar's aliases.
        header: the sidecar's state part.
        parts: the parts to decode; the others are left out (None; an empty model and extra).

    Raises:
        IntegrityError: when the header and the tensors do not fit together (a missing or an
            unreferenced tensor, a malformed field).
    """
    try:
        resolved = dict(tensors)
        for alias, target in aliases.items():
            if target in tensors:
                resolved[alias] = tensors[target]
        used: set[str] = set()

        class _Tracking(dict[str, torch.Tensor]):
            def __getitem__(self, key: str) -> torch.Tensor:
                used.add(key)
                return super().__getitem__(key)

        lookup = _Tracking(resolved)
        model = (
            {key: lookup[tensor_name("model", (key,))] for key in header["model"]}
            if "model" in parts
            else {}
        )
        decoded: dict[str, Any] = {
            name: decode_json(header[name], tensors=lookup) if name in parts else None
            for name in STATE_PARTS[1:]
        }
        decoded["extra"] = decoded["extra"] or {}
        spec = header["spec"]
        state = TrainState(
            spec=ModelSpec.from_json(spec) if spec is not None else None,
            step=header["step"],
            episodes=header["episodes"],
            stats=GameStats.from_json(header["stats"]),
            model=model,
            **decoded,
        )
    except (IntegrityError, SpecError):
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"checkpoint state does not decode: {exc!r}") from exc
    # a name of no part is always unused; a part left out may hold aliases of loaded tensors
    unused = sorted(
        n for n in set(resolved) - used if n.split("/", 1)[0] not in set(STATE_PARTS) - set(parts)
    )
    if unused:
        raise IntegrityError(f"weights file holds tensors no field refers to: {unused[:5]}")
    return state
