"""Export bundles on disk: an inference-only model in a directory of its own.

A bundle directory holds

- ``bundle.json``: the sidecar, written last: the commit point. Format ``keisei_fn.bundle``
  version 1: the spec, the weights dtype (``float32``, ``bfloat16``, ``float16``, ``int8``; see
  ``keisei_fn.quantize``), which tensors are quantised and where their scales are, every
  tensor's dtype, shape and BLAKE3 digest, the weights file's name, size and digest, the ONNX
  file's (if any), the export record (the source checkpoint and its digests, sizes, the gate's
  figures: written by ``keisei_fn.serve``, opaque here), the creation time, the library
  versions, and its own digest (sealed and checked like a checkpoint's sidecar:
  ``keisei_fn.meta.seal``/``check_own_digest``).
- ``bundle.<token>.safetensors``: the weights, written by ``keisei_fn.store.weights`` (the
  model's state dict in the bundle's dtype; no optimizer, no RNG).
- optionally ``bundle.<token>.onnx``: the model as ONNX.

Writing follows the commit protocol (``keisei_fn.store.commit``): under the directory's lock,
the payloads go to fresh names and are made durable, then the sidecar naming them is written
atomically, then what a replaced bundle named is removed (and, under the lock, what killed
exports left). A kill or an I/O error at any instant
leaves the old bundle or the new one, never a half one that loads (payloads without their
sidecar are never read). Reading checks the sidecar's own digest, its fields, and the weights
file's size and digest (the ONNX file's on demand): a changed byte anywhere is refused with
:class:`~keisei_fn.errors.IntegrityError`, as for any checkpoint.

A bundle directory is not a run directory (``keisei_fn.store.listing.is_run_dir``): the one
resolution rule (``keisei_fn.store.locate.resolve_checkpoint``, ``load_model``) takes a bundle
directory, its ``bundle.json`` or its stem for the bundle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn

from keisei_fn.codec import DTYPE_NAMES, dumps, loads
from keisei_fn.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    StateMismatchError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from keisei_fn.meta import (
    BUNDLE_FORMAT,
    MAX_SIDECAR_BYTES,
    CheckpointMeta,
    check_own_digest,
    check_sidecar_cost,
    digest_bytes,
    library_versions,
    seal,
)
from keisei_fn.nets import build_model, set_compute_dtype_
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.quantize import BUNDLE_DTYPES, decode_weights
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, freeze
from keisei_fn.store._fs import (
    file_exists,
    file_size,
    is_directory,
    list_file_names,
    read_bounded,
    write_bytes_durably,
)
from keisei_fn.store.commit import fresh_payload, locked, remove_payload
from keisei_fn.store.names import BUNDLE_NAME, BUNDLE_SIDECAR, sidecar_path, split_file
from keisei_fn.store.weights import (
    check_digests,
    check_listed,
    read_weights,
    tensor_bytes,
    write_weights,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "BundleMeta",
    "bundle_model",
    "bundle_stem",
    "check_bundle_sidecar",
    "load_bundle_model",
    "read_bundle",
    "read_bundle_meta",
    "read_bundle_onnx",
    "verify_bundle",
    "write_bundle",
]

BUNDLE_FORMAT_VERSION = 1
_WEIGHTS_RE = re.compile(rf"{BUNDLE_NAME}\.[0-9a-f]{{8,64}}\.safetensors")
_ONNX_RE = re.compile(rf"{BUNDLE_NAME}\.[0-9a-f]{{8,64}}\.onnx")
_REQUIRED = {
    "created": str,
    "digest": str,
    "dtype": str,
    "export": dict,
    "format_version": int,
    "quantized": dict,
    "spec": dict,
    "step": int,
    "tensors": dict,
    "versions": dict,
    "weights": dict,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleMeta:
    """What a bundle's sidecar says.

    Attributes:
        path: the bundle's stem, ``<dir>/bundle`` (``path.parent`` is the bundle directory).
        dtype: how the weights are stored: ``float32``, ``bfloat16``, ``float16`` or ``int8``.
        spec: the network.
        step: the source checkpoint's step.
        quantized: quantised weight's name → its scales' name (``int8`` only).
        export: the export record (source, sizes, gate figures; see ``keisei_fn.serve``).
        tensors: stored name → (safetensors dtype, shape).
        tensor_digests: stored name → BLAKE3 digest of that tensor's bytes.
        weights_file, weights_size, weights_digest: the weights file.
        onnx_file, onnx_size, onnx_digest: the ONNX file (``onnx_file`` empty when none).
        digest: the sidecar's own digest.
        created: ISO-8601 UTC time of the export.
        versions: library versions that wrote it.
    """

    path: RunPath
    dtype: str
    spec: ModelSpec
    step: int
    quantized: Mapping[str, str] = field(default_factory=dict)
    export: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    tensor_digests: Mapping[str, str] = field(default_factory=dict)
    weights_file: str
    weights_size: int
    weights_digest: str
    onnx_file: str = ""
    onnx_size: int = 0
    onnx_digest: str = ""
    digest: str
    created: str
    versions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("quantized", "export", "tensors", "tensor_digests", "versions"):
            object.__setattr__(self, name, freeze(dict(getattr(self, name))))

    @property
    def directory(self) -> RunPath:
        """The bundle directory."""
        return self.path.parent

    @property
    def weights_path(self) -> RunPath:
        """The weights file the sidecar names."""
        return self.directory / self.weights_file

    @property
    def onnx_path(self) -> RunPath | None:
        """The ONNX file the sidecar names, or None."""
        return self.directory / self.onnx_file if self.onnx_file else None

    def as_checkpoint_meta(self) -> CheckpointMeta:
        """The bundle as :func:`~keisei_fn.store.load_model` reports it: a ``final_model``
        named ``bundle`` at the source's step, with ``extra`` holding ``dtype``,
        ``quantized`` and the export record."""
        return CheckpointMeta(
            path=self.path,
            name=self.path.name,
            format_version=BUNDLE_FORMAT_VERSION,
            kind="final_model",
            step=self.step,
            episodes=0,
            stats=GameStats(),
            spec=self.spec,
            weights_size=self.weights_size,
            weights_digest=self.weights_digest,
            digest=self.digest,
            tensors=self.tensors,
            created=self.created,
            versions=self.versions,
            extra={"bundle": {"dtype": self.dtype, **self.export}},
            weights_file=self.weights_file,
            tensor_digests=self.tensor_digests,
        )


def bundle_stem(path: PathArg) -> RunPath | None:
    """The bundle a user path names, or None when it names no bundle: a bundle directory (one
    holding ``bundle.json``), that ``bundle.json``, or the stem ``<dir>/bundle``.

    Example:
        >>> bundle_stem("runs/none") is None
        True
    """
    path = run_path(path)
    if is_directory(path):
        return path / BUNDLE_NAME if file_exists(path / BUNDLE_SIDECAR) else None
    if path.name in (BUNDLE_SIDECAR, BUNDLE_NAME):
        stem = path.parent / BUNDLE_NAME
        return stem if file_exists(sidecar_path(stem)) else None
    return None


def write_bundle(
    out_dir: PathArg,
    tensors: Mapping[str, torch.Tensor],
    *,
    spec: ModelSpec,
    dtype: str,
    step: int,
    quantized: Mapping[str, str],
    export: Mapping[str, Any],
    onnx: bytes | None = None,
    overwrite: bool = False,
) -> BundleMeta:
    """Write a bundle through the commit protocol (see the module docstring).

    Args:
        out_dir: the bundle directory (created if missing; it must not be a run directory).
        tensors: the stored tensors (``keisei_fn.quantize.encode_weights``).
        spec: the network.
        dtype: the weights' bundle dtype.
        step: the source checkpoint's step.
        quantized: quantised weight's name → its scales' name.
        export: the export record (JSON values; tagged like a sidecar's state).
        onnx: the ONNX model's bytes, or None.
        overwrite: replace a bundle already committed there.

    Returns:
        The committed bundle's meta.

    Raises:
        CheckpointExistsError: a bundle is there and ``overwrite`` is False, or ``out_dir``
            holds checkpoints (a run directory).
        UnsupportedValueError: the sidecar would be over a cap on what reading it may cost.
        OSError: the disk is full or not writable (the old bundle, if any, is still there).
    """
    directory = run_path(out_dir)
    stem = directory / BUNDLE_NAME
    with locked(directory) as held:
        names = list_file_names(directory)
        run_files = sorted(n for n in names if split_file(n) is not None)
        if run_files:
            raise CheckpointExistsError(
                f"{directory} is a run directory (it holds {run_files[0]}): export a bundle "
                "into a directory of its own"
            )
        old = _committed(stem)
        if old is not None and not overwrite:
            raise CheckpointExistsError(
                f"{sidecar_path(stem)} already holds a bundle; pass overwrite=True "
                "(--overwrite) to replace it"
            )
        weights = fresh_payload(stem, ".safetensors")
        onnx_path = fresh_payload(stem, ".onnx") if onnx is not None else None
        try:
            written = write_weights(dict(tensors), weights)
            sidecar: dict[str, Any] = {
                "created": datetime.now(UTC).isoformat(timespec="microseconds"),
                "dtype": dtype,
                "export": dict(export),
                "format": BUNDLE_FORMAT,
                "format_version": BUNDLE_FORMAT_VERSION,
                "onnx": None,
                "quantized": dict(quantized),
                "spec": spec.to_json(),
                "step": step,
                "tensors": {
                    k: {
                        "digest": written.tensor_digests[k],
                        "dtype": DTYPE_NAMES[t.dtype],
                        "shape": list(t.shape),
                    }
                    for k, t in tensors.items()
                },
                "versions": library_versions(),
                "weights": {"digest": written.digest, "file": weights.name, "size": written.size},
            }
            if onnx is not None and onnx_path is not None:
                write_bytes_durably(onnx_path, onnx)
                sidecar["onnx"] = {
                    "digest": digest_bytes(onnx),
                    "file": onnx_path.name,
                    "size": len(onnx),
                }
            data = dumps(seal(sidecar))
            try:
                check_sidecar_cost(data, where=str(sidecar_path(stem)))
            except IntegrityError as exc:  # it could never be read back: commit nothing
                raise UnsupportedValueError(str(exc)) from exc
            write_bytes_durably(sidecar_path(stem), data)
        except BaseException:
            if not _names(stem, weights):  # a failed directory fsync after the rename: kept
                for payload in (weights, onnx_path):
                    if payload is not None:
                        remove_payload(payload)
            raise
        keep = {weights.name, onnx_path.name if onnx_path is not None else ""}
        stale = (
            {p.name for p in (old.weights_path, old.onnx_path) if p is not None} if old else set()
        )
        if held:  # no writer is in flight: payloads of killed exports are stale too
            stale |= {n for n in names if _WEIGHTS_RE.fullmatch(n) or _ONNX_RE.fullmatch(n)}
        for name in sorted(stale - keep):
            remove_payload(directory / name)
    return _meta(loads(data), stem)


def _committed(stem: RunPath) -> BundleMeta | None:
    """The valid bundle committed at ``stem``, or None (none, or a corrupt one: replaced)."""
    try:
        return read_bundle_meta(stem)
    except (IntegrityError, IncompleteCheckpointError, CheckpointNotFoundError):
        return None


def _names(stem: RunPath, payload: RunPath) -> bool:
    """Whether the bundle committed at ``stem`` names ``payload`` (True when unreadable)."""
    try:
        found = read_bundle_meta(stem)
    except CheckpointNotFoundError:
        return False
    except Exception:
        return True
    return found.weights_path == payload


def check_bundle_sidecar(raw: bytes, *, where: str) -> dict[str, Any]:
    """Parse and check a bundle sidecar's bytes: cost caps, JSON, own digest, format, fields.

    Raises:
        IntegrityError: over a cap, unparsable, edited, a field missing or malformed.
        UnsupportedFormatError: not a bundle sidecar, or a newer format version.
    """
    check_sidecar_cost(raw, where=where)
    sidecar = loads(raw)
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("digest"), str):
        raise IntegrityError(f"{where}: not a sealed {BUNDLE_FORMAT} sidecar")
    check_own_digest(raw, sidecar, where)
    if sidecar.get("format") != BUNDLE_FORMAT:
        raise UnsupportedFormatError(
            f"{where}: not a {BUNDLE_FORMAT} sidecar (format {sidecar.get('format')!r})"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(sidecar.get(key), kind) or isinstance(sidecar.get(key), bool):
            raise IntegrityError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    if sidecar["format_version"] > BUNDLE_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: bundle format version {sidecar['format_version']} is newer than this "
            f"keisei_fn reads ({BUNDLE_FORMAT_VERSION}); upgrade keisei_fn"
        )
    weights, onnx = sidecar["weights"], sidecar.get("onnx")
    problems = [
        sidecar["dtype"] not in BUNDLE_DTYPES and f"unknown dtype {sidecar['dtype']!r}",
        not (isinstance(weights.get("file"), str) and _WEIGHTS_RE.fullmatch(weights["file"]))
        and f"weights file {weights.get('file')!r} is not a bundle's",
        (type(weights.get("size")) is not int or not isinstance(weights.get("digest"), str))
        and "the weights entry is malformed",
        onnx is not None
        and not (
            isinstance(onnx, dict)
            and isinstance(onnx.get("file"), str)
            and _ONNX_RE.fullmatch(onnx["file"])
            and type(onnx.get("size")) is int
            and isinstance(onnx.get("digest"), str)
        )
        and "the onnx entry is malformed",
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise IntegrityError(f"{where}: {problem}")
    return sidecar


def _meta(sidecar: Mapping[str, Any], stem: RunPath) -> BundleMeta:
    """The meta of a checked bundle sidecar."""
    onnx = sidecar.get("onnx") or {}
    try:
        return BundleMeta(
            path=stem,
            dtype=sidecar["dtype"],
            spec=ModelSpec.from_json(sidecar["spec"]),
            step=sidecar["step"],
            quantized={str(k): str(v) for k, v in sidecar["quantized"].items()},
            export=sidecar["export"],
            tensors={k: (v["dtype"], tuple(v["shape"])) for k, v in sidecar["tensors"].items()},
            tensor_digests={k: str(v["digest"]) for k, v in sidecar["tensors"].items()},
            weights_file=sidecar["weights"]["file"],
            weights_size=sidecar["weights"]["size"],
            weights_digest=sidecar["weights"]["digest"],
            onnx_file=onnx.get("file", ""),
            onnx_size=onnx.get("size", 0),
            onnx_digest=onnx.get("digest", ""),
            digest=sidecar["digest"],
            created=sidecar["created"],
            versions=sidecar["versions"],
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise IntegrityError(f"{sidecar_path(stem)}: a field is malformed: {exc!r}") from exc


def read_bundle_meta(source: PathArg) -> BundleMeta:
    """Read and check a bundle's sidecar, and that its weights (and ONNX) files are there with
    their recorded sizes — the *listed* level of a checkpoint.

    Args:
        source: a bundle directory, its ``bundle.json`` or its stem.

    Returns:
        The meta.

    Raises:
        CheckpointNotFoundError: no bundle there.
        IncompleteCheckpointError: a file the sidecar names is missing.
        IntegrityError: the sidecar is corrupt or edited, or a file's size differs.
        UnsupportedFormatError: a newer bundle format.
    """
    stem = bundle_stem(source)
    if stem is None:
        raise CheckpointNotFoundError(f"no export bundle at {source} (no {BUNDLE_SIDECAR})")
    where = sidecar_path(stem)
    try:
        raw = read_bounded(where, limit=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no export bundle at {source}") from None
    meta = _meta(check_bundle_sidecar(raw, where=str(where)), stem)
    for payload, size in ((meta.weights_path, meta.weights_size), (meta.onnx_path, meta.onnx_size)):
        if payload is None:
            continue
        if not file_exists(payload) or is_directory(payload):
            raise IncompleteCheckpointError(f"{where}: the file it names, {payload}, is missing")
        if file_size(payload) != size:
            raise IntegrityError(f"{payload}: its size is not the {size} bytes {where} records")
    return meta


def read_bundle(
    source: PathArg, *, verify: bool = True
) -> tuple[dict[str, torch.Tensor], BundleMeta]:
    """Read a bundle's stored tensors, bit-exact, verified against the sidecar.

    Args:
        source: a bundle directory, its ``bundle.json`` or its stem.
        verify: check the weights file's digest (see ``keisei_fn.store.weights.read_weights``).

    Returns:
        ``(tensors, meta)``: stored name → CPU tensor (copy-on-write views of the file).

    Raises:
        every error of :func:`read_bundle_meta`; IntegrityError for a digest or header
        mismatch.
    """
    meta = read_bundle_meta(source)
    tensors = read_weights(
        meta.weights_path, size=meta.weights_size, digest=meta.weights_digest if verify else None
    )
    recorded = {k: {"dtype": d, "shape": list(s)} for k, (d, s) in meta.tensors.items()}
    check_listed(tensors, recorded, meta.weights_path)
    return tensors, meta


def verify_bundle(source: PathArg) -> BundleMeta:
    """Fully verify a bundle: its sidecar, the weights file's size, digest and header, every
    tensor's own digest (hashed even if this process verified the file before), and the ONNX
    file's digest.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError,
        UnsupportedFormatError: naming the file and the problem.
    """
    meta = read_bundle_meta(source)
    tensors = read_weights(
        meta.weights_path, size=meta.weights_size, digest=meta.weights_digest, recheck=True
    )
    recorded = {k: {"dtype": d, "shape": list(s)} for k, (d, s) in meta.tensors.items()}
    check_listed(tensors, recorded, meta.weights_path)
    pieces = {name: tensor_bytes(tensor) for name, tensor in tensors.items()}
    check_digests(meta.weights_path, pieces, meta.tensor_digests)
    if meta.onnx_path is not None:
        read_bundle_onnx(meta)
    return meta


def read_bundle_onnx(meta: BundleMeta) -> bytes:
    """The bundle's ONNX model, verified against its recorded size and digest.

    Raises:
        CheckpointNotFoundError: the bundle has no ONNX model.
        IncompleteCheckpointError: its file is missing.
        IntegrityError: its size or digest differs.
    """
    if meta.onnx_path is None:
        raise CheckpointNotFoundError(f"{meta.directory} holds no ONNX model (export onnx=True)")
    try:
        data = read_bounded(meta.onnx_path, limit=meta.onnx_size)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{meta.onnx_path} is missing") from None
    found = digest_bytes(data)
    if len(data) != meta.onnx_size or found != meta.onnx_digest:
        raise IntegrityError(
            f"{meta.onnx_path}: digest {found}, the sidecar records {meta.onnx_digest}"
        )
    return data


def load_bundle_model(
    source: PathArg,
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, BundleMeta]:
    """Build a bundle's network with its weights (verified), in eval mode
    (:func:`bundle_model` of :func:`read_bundle`).

    Raises:
        StateMismatchError: the stored tensors do not fit the spec's network.
        and every error of :func:`read_bundle`.
    """
    tensors, meta = read_bundle(source)
    model = bundle_model(
        meta.spec, tensors, meta.quantized, device=device, compute_dtype=compute_dtype
    )
    return model, meta


def bundle_model(
    spec: ModelSpec,
    tensors: Mapping[str, torch.Tensor],
    quantized: Mapping[str, str],
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The network a bundle's stored tensors stand for, in eval mode.

    The stored weights are decoded into float32: a ``bfloat16`` or ``float16`` bundle is
    upcast exactly (every value of those dtypes is a float32), an ``int8`` one dequantised
    (``q * scale``, ``keisei_fn.quantize``). With ``compute_dtype=torch.bfloat16`` (or
    float16) the model then computes in that dtype: its inputs are cast to it and its
    outputs back to float32 (``keisei_fn.nets.set_compute_dtype_``).

    Raises:
        StateMismatchError: the tensors do not fit the spec's network.
        IntegrityError: a quantised weight without its scales.
    """
    state = decode_weights(tensors, quantized, dtype=torch.float32)
    model = build_model(spec, device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise StateMismatchError(f"the bundle's tensors do not fit {spec}: {exc}") from exc
    model = model.to(device).eval()
    if compute_dtype is not None and compute_dtype != torch.float32:
        set_compute_dtype_(model, compute_dtype)
    return model
