"""CheckpointMeta and the sidecar: what a checkpoint's JSON file says, built and checked purely.

The sidecar is the commit marker of a checkpoint. It records the format and version, the kind,
step, episodes, stats, spec, the JSON state part, every tensor's dtype and shape, the weights
file's size and BLAKE3 digest, the creation time (UTC), the library versions, and its **own
digest**: BLAKE3 of its canonical bytes without the ``digest`` field, so an edit to the sidecar
is detected too.

Format versions (every one is still read):

- **3** (written now): a single weights file under a fresh *generation* name
  ``<name>.<token>.safetensors``, recorded in ``weights.file``, and every tensor's own BLAKE3
  digest in ``tensors``. The sidecar names its payload, so a replacement writes the new payload
  beside the old one and commits by replacing the sidecar (see ``keisei_fn.store.commit``).
- **2**: a sharded checkpoint (``keisei_fn.store.sharded``): ``"layout": "sharded"`` and
  ``"shards"`` (its directory, the world size, every file's size and digest); its ``"weights"``
  hold the files' total size and the digest of that file table.
- **1**: a single weights file named ``<name>.safetensors``, no per-tensor digests.

A format-3 sidecar may carry the **health mark** of ``keisei_fn.health``: ``"health"``, the
list of problems the health gate found when the state was saved (empty: checked and healthy).
A sidecar without it was not checked and reads as healthy. The mark is written in the same
commit as the rest of the sidecar and covered by its digest.

What a hostile sidecar can cost is bounded before it is parsed: at most
:data:`MAX_SIDECAR_BYTES` bytes, :data:`MAX_SIDECAR_VALUES` values and
:data:`MAX_SIDECAR_CONTAINERS` objects and arrays (``keisei_fn.codec.check_json_cost``); the
self-digest is checked on the file's own bytes, without serialising the parsed sidecar again.

Example:
    >>> sidecar = build_sidecar({"step": 1}, name="checkpoint_ts1", kind="periodic",
    ...     tensors={}, aliases={}, weights_file="checkpoint_ts1.0123abcd.safetensors",
    ...     weights_size=8, weights_digest="blake3:00", tensor_digests={})
    >>> checked = check_sidecar(dumps(sidecar), name="checkpoint_ts1")
    >>> checked["format_version"], checked["weights"]["file"]
    (3, 'checkpoint_ts1.0123abcd.safetensors')
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import blake3
import safetensors
import torch

from keisei_fn._version import __version__
from keisei_fn.codec import DTYPE_NAMES, check_json_cost, dumps, loads
from keisei_fn.display import (
    extra_rows,
    fields_html,
    fields_text,
    human_age,
    human_bytes,
    spec_summary,
)
from keisei_fn.errors import IntegrityError, SpecError, UnsupportedFormatError
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, freeze

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "MAX_SIDECAR_BYTES",
    "MAX_SIDECAR_CONTAINERS",
    "MAX_SIDECAR_VALUES",
    "NEWEST_FORMAT_VERSION",
    "SHARDED_FORMAT_VERSION",
    "CheckpointMeta",
    "build_sharded_sidecar",
    "build_sidecar",
    "check_own_digest",
    "check_sidecar",
    "check_sidecar_cost",
    "digest_bytes",
    "library_versions",
    "migrated_sidecar",
    "seal",
]

FORMAT_NAME = "keisei_fn.checkpoint"
#: The format of an export bundle's sidecar (``keisei_fn.store.bundle``): named here so that
#: a bundle given where a checkpoint is needed is refused in words a user can act on.
BUNDLE_FORMAT = "keisei_fn.bundle"
#: The format version of single-file checkpoints written now (generation-named weights file,
#: per-tensor digests).
FORMAT_VERSION = 3
#: The format version of sharded checkpoints (``"layout": "sharded"``).
SHARDED_FORMAT_VERSION = 2
#: The first format version: the weights file is ``<name>.safetensors``.
LEGACY_SINGLE_FILE_VERSION = 1
#: The newest format version this keisei_fn reads.
NEWEST_FORMAT_VERSION = 3
#: Sidecars larger than this are refused unread. A default Keisei checkpoint's sidecar is
#: ~60 KB; one carrying 160,000 floats of metrics history is 1.8 MB (17x margin).
MAX_SIDECAR_BYTES = 32 * 1024 * 1024
#: At most this many JSON values (commas + containers): 165,000 in that metrics-heavy sidecar.
#: A float costs 32 bytes parsed, so 1 M values cost at most ~32 MB.
MAX_SIDECAR_VALUES = 1_000_000
#: At most this many JSON objects/arrays: two per tensor (its entry and its shape), ~1,100 for
#: a default checkpoint with Adam state. A small dict costs up to ~232 bytes parsed: ~30 MB.
MAX_SIDECAR_CONTAINERS = 131_072
SHARDED = "sharded"
#: The sidecar field of the health mark (format 3).
HEALTH = "health"
#: periodic: a resume point; final: the last full state of a run; final_model: weights only.
KINDS = ("periodic", "final", "final_model")
_REQUIRED = {
    "format": str,
    "format_version": int,
    "name": str,
    "kind": str,
    "state": dict,
    "tensors": dict,
    "aliases": dict,
    "weights": dict,
    "created": str,
    "versions": dict,
    "digest": str,
}
T = TypeVar("T")
#: A weights file's generation suffix after its checkpoint's name: ``.<token>.safetensors``.
GENERATION_PATTERN = r"\.[0-9a-f]{8,64}\.safetensors"


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """``"blake3:<hex>"`` of ``data``."""
    return "blake3:" + blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def library_versions() -> dict[str, str]:
    """The versions of keisei_fn, torch, safetensors and Python, as files record them."""
    return {
        "keisei_fn": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def build_sidecar(
    header: Mapping[str, Any],
    *,
    name: str,
    kind: str,
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    weights_file: str,
    weights_size: int,
    weights_digest: str,
    tensor_digests: Mapping[str, str],
    created: str | None = None,
    health: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Assemble a complete format-3 sidecar (with its own digest) for an encoded state.

    Args:
        header: the JSON state part from ``keisei_fn.codec.encode_state``.
        name: the checkpoint's file stem, e.g. ``"checkpoint_ts10240"``.
        kind: one of :data:`KINDS`.
        tensors: the stored tensors (their dtypes and shapes are recorded).
        aliases: alias name → stored name.
        weights_file: the weights file's name, ``<name>.<token>.safetensors``.
        weights_size: byte size of the weights file.
        weights_digest: its digest.
        tensor_digests: stored name → digest of that tensor's bytes, for every tensor.
        created: ISO-8601 UTC time; now when None.
        health: the health gate's problems (empty: checked, healthy); None: not checked (no
            mark is recorded).

    Raises:
        SpecError: for an unknown kind, a weights file name that is not a generation name of
            ``name``, or tensors without a digest.
    """
    if not re.fullmatch(re.escape(name) + GENERATION_PATTERN, weights_file):
        raise SpecError(f"{weights_file!r} is not a weights file name for {name!r}")
    if set(tensor_digests) != set(tensors):
        raise SpecError("tensor_digests must hold a digest for every tensor and nothing else")
    sidecar = _base_sidecar(
        header,
        name=name,
        kind=kind,
        tensors={
            k: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "digest": tensor_digests[k]}
            for k, t in tensors.items()
        },
        aliases=aliases,
        weights={"file": weights_file, "size": weights_size, "digest": weights_digest},
        created=created,
    )
    sidecar["format_version"] = FORMAT_VERSION
    if health is not None:
        if isinstance(health, str) or not all(isinstance(p, str) for p in health):
            raise SpecError(f"health must be a sequence of strings, got {health!r}")
        sidecar[HEALTH] = list(health)
    return seal(sidecar)


def migrated_sidecar(
    sidecar: Mapping[str, Any],
    *,
    weights_file: str,
    weights_size: int,
    weights_digest: str,
    tensor_digests: Mapping[str, str],
) -> dict[str, Any]:
    """The format-3 sidecar of an older single-file checkpoint whose tensors were rewritten,
    unchanged, to ``weights_file`` (``keisei_fn.store.migrate``).

    Everything the old sidecar says is kept (name, kind, state, aliases, tensor layouts, the
    creation time and the ``versions`` of the library that wrote it); the weights entry names
    the new file, every tensor gains its digest, and ``"migrated"`` records the format version
    it came from, when, and the versions of the library that migrated it.

    Args:
        sidecar: the checked older sidecar (format 1).
        weights_file: the new weights file's name, ``<name>.<token>.safetensors``.
        weights_size: its byte size.
        weights_digest: its digest.
        tensor_digests: stored name → digest, for every tensor the old sidecar lists.

    Raises:
        SpecError: a sidecar of another format version than 1, a weights file name that is not
            a generation name of the checkpoint, or digests for other tensors than listed.

    Example:
        >>> migrated_sidecar({"format_version": 3, "name": "x"},
        ...     weights_file="x.0a1b2c3d.safetensors", weights_size=0, weights_digest="",
        ...     tensor_digests={})
        Traceback (most recent call last):
        ...
        keisei_fn.errors.SpecError: only a format-1 sidecar migrates, not format 3
    """
    if sidecar["format_version"] != LEGACY_SINGLE_FILE_VERSION:
        raise SpecError(f"only a format-1 sidecar migrates, not format {sidecar['format_version']}")
    name = sidecar["name"]
    if not re.fullmatch(re.escape(name) + GENERATION_PATTERN, weights_file):
        raise SpecError(f"{weights_file!r} is not a weights file name for {name!r}")
    if set(tensor_digests) != set(sidecar["tensors"]):
        raise SpecError("tensor_digests must hold a digest for every listed tensor and no other")
    migrated = {
        **sidecar,
        "format_version": FORMAT_VERSION,
        "tensors": {k: {**v, "digest": tensor_digests[k]} for k, v in sidecar["tensors"].items()},
        "weights": {"file": weights_file, "size": weights_size, "digest": weights_digest},
        "migrated": {
            "from_format_version": sidecar["format_version"],
            "at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "versions": library_versions(),
        },
    }
    return seal(migrated)


def _base_sidecar(
    header: Mapping[str, Any],
    *,
    name: str,
    kind: str,
    tensors: dict[str, dict[str, Any]],
    aliases: Mapping[str, str],
    weights: dict[str, Any],
    created: str | None,
) -> dict[str, Any]:
    """The fields every format version shares (no version, no digest yet)."""
    if kind not in KINDS:
        raise SpecError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "format": FORMAT_NAME,
        "name": name,
        "kind": kind,
        "state": dict(header),
        "tensors": tensors,
        "aliases": dict(aliases),
        "weights": weights,
        "created": created or datetime.now(UTC).isoformat(timespec="microseconds"),
        "versions": library_versions(),
    }


def seal(sidecar: dict[str, Any]) -> dict[str, Any]:
    """``sidecar`` with its own digest: of its canonical bytes without the digest field.

    Every JSON file of ours that carries its own digest (checkpoint sidecars, export bundles'
    sidecars) is sealed here and checked by :func:`check_own_digest`; its keys must sort
    ``aliases`` (optional), ``created``, ``digest`` first.
    """
    sidecar.pop("digest", None)
    sidecar["digest"] = digest_bytes(dumps(sidecar))
    return sidecar


def _manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """The digest of a sharded checkpoint's file table."""
    return digest_bytes(dumps({k: dict(v) for k, v in files.items()}))


def build_sharded_sidecar(
    header: Mapping[str, Any],
    *,
    name: str,
    kind: str,
    tensors: Mapping[str, torch.Tensor],
    shards_dir: str,
    world_size: int,
    files: Mapping[str, tuple[int, str]],
    created: str | None = None,
) -> dict[str, Any]:
    """Assemble a sharded checkpoint's sidecar (format version 2) with its own digest.

    It records what :func:`build_sidecar` records (without per-tensor digests: the shard files
    carry digests of their own) plus ``"layout": "sharded"`` and ``"shards"``; ``"weights"``
    holds the files' total size and the digest of the file table.

    Args:
        header: the JSON state part.
        name: the checkpoint's stem, e.g. ``"checkpoint_ts10240"``.
        kind: ``"periodic"`` or ``"final"``.
        tensors: every stored tensor under its stored name; for a DTensor the full (unsharded)
            dtype and shape are recorded (meta tensors will do).
        shards_dir: the shards directory's name (in the run directory).
        world_size: the number of ranks that wrote it.
        files: file name (in the shards directory) → (size, digest).
        created: ISO-8601 UTC time; now when None.

    Raises:
        SpecError: for an unknown kind.

    Example:
        >>> s = build_sharded_sidecar({"step": 1}, name="checkpoint_ts1", kind="periodic",
        ...     tensors={}, shards_dir="checkpoint_ts1.ab.shards", world_size=2, files={})
        >>> s["format_version"], s["layout"], check_sidecar(dumps(s))["shards"]["dir"]
        (2, 'sharded', 'checkpoint_ts1.ab.shards')
    """
    table = {f: {"size": size, "digest": digest} for f, (size, digest) in sorted(files.items())}
    sidecar = _base_sidecar(
        header,
        name=name,
        kind=kind,
        tensors={
            k: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()
        },
        aliases={},
        weights={
            "size": sum(size for size, _ in files.values()),
            "digest": _manifest_digest(table),
        },
        created=created,
    )
    sidecar["format_version"] = SHARDED_FORMAT_VERSION
    sidecar["layout"] = SHARDED
    sidecar["shards"] = {"dir": shards_dir, "world_size": world_size, "files": table}
    return seal(sidecar)


def _plain_name(value: Any) -> bool:
    """A file name that stays inside its directory and is not hidden."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and (not value.startswith("."))
    )


def _shards_problem(sidecar: Mapping[str, Any]) -> str | None:
    """What is wrong with a version-2 sidecar's ``"layout"`` and ``"shards"`` entries."""
    shards = sidecar.get("shards")
    if sidecar.get("layout") != SHARDED:
        return f"unknown layout {sidecar.get('layout')!r}"
    if not isinstance(shards, dict):
        return "field 'shards' is missing or not a dict"
    directory = shards.get("dir")
    pattern = re.escape(sidecar["name"]) + r"\.[0-9a-f]+\.shards"
    if not isinstance(directory, str) or not re.fullmatch(pattern, directory):
        return f"shards directory {directory!r} is not a name for this checkpoint"
    if type(shards.get("world_size")) is not int or shards["world_size"] < 1:
        return f"world size {shards.get('world_size')!r} is not an int >= 1"
    files = shards.get("files")
    if not isinstance(files, dict) or not all(
        _plain_name(f)
        and isinstance(v, dict)
        and type(v.get("size")) is int
        and v["size"] >= 0
        and isinstance(v.get("digest"), str)
        for f, v in files.items()
    ):
        return "the shards' file table is malformed"
    if sidecar["weights"].get("size") != sum(v["size"] for v in files.values()) or sidecar[
        "weights"
    ].get("digest") != _manifest_digest(files):
        return "the weights entry does not match the shards' file table"
    return None


def _single_file_problem(sidecar: Mapping[str, Any]) -> str | None:
    """What is wrong with a version-1 or version-3 sidecar's weights and tensors entries."""
    if "shards" in sidecar or "layout" in sidecar:
        return f"a version-{sidecar['format_version']} sidecar with a shards entry"
    weights = sidecar["weights"]
    if type(weights.get("size")) is not int or weights["size"] < 0:
        return f"weights size {weights.get('size')!r} is not an int >= 0"
    if not isinstance(weights.get("digest"), str):
        return "the weights digest is missing"
    for key, entry in sidecar["tensors"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            return f"tensor entry {key!r} is malformed"
    file = weights.get("file")
    if sidecar["format_version"] == LEGACY_SINGLE_FILE_VERSION:  # always <name>.safetensors
        return None if file is None else f"a version-1 sidecar names a weights file {file!r}"
    pattern = re.escape(sidecar["name"]) + GENERATION_PATTERN
    if not isinstance(file, str) or not re.fullmatch(pattern, file):
        return f"weights file {file!r} is not a name for this checkpoint"
    if not all(isinstance(e.get("digest"), str) for e in sidecar["tensors"].values()):
        return "a tensor entry has no digest"
    return None


#: The start of every sealed file keisei_fn writes (keys sorted: ``aliases`` (a flat str → str
#: object; a bundle's sidecar has none), ``created``, ``digest``). Quotes inside JSON strings are
#: escaped, so ``},"created":"`` can only be structure: the match is exact.
_SEALED_PREFIX = re.compile(
    rb'\{(?:"aliases":\{.*?\},)?"created":"[^"\\]*",(?P<member>"digest":"(?P<digest>[^"\\]*)",)',
    re.DOTALL,
)


def check_own_digest(raw: bytes, sidecar: dict[str, Any], where: str) -> None:
    """Check that the recorded self-digest is BLAKE3 of the sidecar's bytes without its digest
    member (a file sealed by :func:`seal`).

    For the canonical bytes keisei_fn writes, those are exactly the canonical bytes of the
    sidecar without its ``digest`` field, so this checks what :func:`seal` computed, on the
    file's own bytes: any changed byte (whitespace, number spelling, key order) is detected,
    and nothing is serialised again (no second copy of a large sidecar in memory).

    Args:
        raw: the file's bytes.
        sidecar: the parsed file (its ``"digest"`` is the recorded one).
        where: the file, for messages.

    Raises:
        IntegrityError: the bytes are not what was sealed.
    """
    recorded = sidecar["digest"]
    match = _SEALED_PREFIX.match(raw)
    if match is None or match["digest"].decode() != recorded:
        raise IntegrityError(f"{where}: the sidecar is not in canonical form; it was edited")
    start, end = match.span("member")
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(memoryview(raw)[:start])
    hasher.update(memoryview(raw)[end:])
    actual = "blake3:" + hasher.hexdigest()
    if actual != recorded:
        raise IntegrityError(
            f"{where}: the sidecar was modified or is not in canonical form (digest {actual}, "
            f"recorded {recorded})"
        )


def check_sidecar_cost(raw: bytes, *, where: str = "sidecar") -> None:
    """Check a sidecar's bytes against the caps on what reading it may cost, without parsing:
    :data:`MAX_SIDECAR_BYTES`, :data:`MAX_SIDECAR_VALUES`, :data:`MAX_SIDECAR_CONTAINERS`.

    Raises:
        IntegrityError: naming ``where`` and the cap.

    Example:
        >>> check_sidecar_cost(b"{}")
    """
    if len(raw) > MAX_SIDECAR_BYTES:
        raise IntegrityError(
            f"{where}: {len(raw)} bytes is larger than the {MAX_SIDECAR_BYTES}-byte limit"
        )
    check_json_cost(
        raw, max_values=MAX_SIDECAR_VALUES, max_containers=MAX_SIDECAR_CONTAINERS, where=where
    )


def check_sidecar(raw: bytes, *, name: str | None = None, where: str = "sidecar") -> dict[str, Any]:
    """Parse and check a sidecar's bytes: size and cost caps, JSON, own digest, known format
    version, name, and the fields of its format version.

    Args:
        raw: the file's bytes.
        name: the expected checkpoint name (the file's stem), if known.
        where: the file, for error messages.

    Returns:
        The parsed sidecar.

    Raises:
        IntegrityError: over a cap, unparsable, a field missing or mistyped, a digest or name
            mismatch.
        UnsupportedFormatError: another format, or a newer format version.
    """
    check_sidecar_cost(raw, where=where)
    try:
        sidecar = loads(raw)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from exc
    if not isinstance(sidecar, dict):
        raise UnsupportedFormatError(
            f"{where}: not a {FORMAT_NAME} sidecar (a JSON {type(sidecar).__name__})"
        )
    # The digest first: a changed byte anywhere (even in "format" or "format_version") is
    # corruption, not a foreign or newer file. Every format version digests the same way.
    if isinstance(sidecar.get("digest"), str):
        check_own_digest(raw, sidecar, where)
    if sidecar.get("format") == BUNDLE_FORMAT:
        raise UnsupportedFormatError(
            f"{where}: this is an export bundle (inference weights, no training state), not a "
            "checkpoint; give its source checkpoint instead (`keisei-fn info` on the bundle "
            "names it)"
        )
    if sidecar.get("format") != FORMAT_NAME:
        found = sidecar.get("format")
        raise UnsupportedFormatError(f"{where}: not a {FORMAT_NAME} sidecar (format {found!r})")
    for key, kind in _REQUIRED.items():
        if not isinstance(sidecar.get(key), kind) or isinstance(sidecar.get(key), bool):
            raise IntegrityError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    version = sidecar["format_version"]
    if version > NEWEST_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: format version {version} is newer than this keisei_fn reads "
            f"({NEWEST_FORMAT_VERSION}); upgrade keisei_fn"
        )
    if version < LEGACY_SINGLE_FILE_VERSION:
        raise IntegrityError(f"{where}: unknown format version {version}")
    if name is not None and sidecar["name"] != name:
        raise IntegrityError(f"{where}: sidecar is for {sidecar['name']!r}, file is {name!r}")
    if sidecar["kind"] not in KINDS:
        raise IntegrityError(f"{where}: unknown kind {sidecar['kind']!r}")
    problem = (
        _shards_problem(sidecar)
        if version == SHARDED_FORMAT_VERSION
        else _single_file_problem(sidecar)
    )
    health = sidecar.get(HEALTH, [])
    if not isinstance(health, list) or not all(isinstance(p, str) for p in health):
        problem = problem or "the health mark is not a list of strings"
    if problem:
        raise IntegrityError(f"{where}: {problem}")
    return sidecar


class _TensorNames(dict[str, Any]):
    """Resolves a tensor reference in ``extra`` to the tensor's stored name."""

    def __missing__(self, key: str) -> str:
        return key


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointMeta:
    """What a checkpoint's sidecar says, plus where the pair lives.

    Attributes:
        path: the checkpoint's path without suffix (``run_dir / name``).
        name: the file stem, e.g. ``"checkpoint_ts10240"``.
        format_version: the on-disk format version.
        kind: ``"periodic"``, ``"final"`` or ``"final_model"``.
        step, episodes, stats, spec: what was trained.
        weights_size, weights_digest: the weights file's byte size and BLAKE3 digest.
        digest: the sidecar's own digest.
        tensors: name → (safetensors dtype, shape) of every stored tensor.
        created: ISO-8601 UTC creation time.
        versions: library versions that wrote it.
        extra: the user's JSON state (a tensor in it appears as its stored name, e.g.
            ``"extra/table"``: a meta never loads tensors).
        shards_dir: a sharded checkpoint's shards directory name (None: a single file).
        world_size: how many ranks wrote a sharded checkpoint (1 for a single file).
        weights_file: a single-file checkpoint's weights file name (format 3:
            ``<name>.<token>.safetensors``; format 1: ``<name>.safetensors``); for a sharded
            checkpoint its shards directory.
        tensor_digests: stored name → BLAKE3 digest of that tensor's bytes (format 3; empty
            for older formats and sharded checkpoints).
        sidecar_size: the sidecar's byte size: its canonical bytes, which are the file's (0 for
            a meta built by hand rather than from a sidecar).
        health: the problems the health gate (``keisei_fn.health``) recorded when it was saved:
            empty when checked and healthy, None when it was not checked (read as healthy).
    """

    path: RunPath
    name: str
    format_version: int
    kind: str
    step: int
    episodes: int
    stats: GameStats
    spec: ModelSpec | None
    weights_size: int
    weights_digest: str
    digest: str
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    created: str
    versions: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    shards_dir: str | None = None
    world_size: int = 1
    weights_file: str = ""
    tensor_digests: Mapping[str, str] = field(default_factory=dict)
    sidecar_size: int = 0
    health: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", run_path(self.path))
        if not self.weights_file:
            object.__setattr__(self, "weights_file", self.shards_dir or self.name + ".safetensors")
        if not _plain_name(self.weights_file) or not _plain_name(self.name):
            raise IntegrityError(
                f"checkpoint {self.name!r} names its weights {self.weights_file!r}: not a file "
                "name inside the run directory"
            )
        object.__setattr__(self, "tensor_digests", freeze(dict(self.tensor_digests)))
        object.__setattr__(self, "tensors", freeze(dict(self.tensors)))
        object.__setattr__(self, "versions", freeze(dict(self.versions)))
        object.__setattr__(self, "extra", freeze(dict(self.extra)))
        if self.health is not None:
            object.__setattr__(self, "health", tuple(self.health))

    @property
    def healthy(self) -> bool:
        """False when the health gate recorded a problem; True when it found none or the
        checkpoint was not checked.

        Example:
            >>> meta = CheckpointMeta(path="run/checkpoint_ts1", name="checkpoint_ts1",
            ...     format_version=3, kind="periodic", step=1, episodes=0, stats=GameStats(),
            ...     spec=None, weights_size=0, weights_digest="", digest="", created="?",
            ...     health=("non_finite: model w has 1 NaN of 2 elements",))
            >>> meta.healthy, meta.replace(health=None).healthy
            (False, True)
        """
        return not self.health

    @property
    def sharded(self) -> bool:
        """Whether this is a sharded checkpoint (its tensors in a shards directory)."""
        return self.shards_dir is not None

    @property
    def weights_path(self) -> RunPath:
        """The payload the sidecar names: the weights file, or a sharded checkpoint's shards
        directory."""
        return self.path.parent / self.weights_file

    @property
    def sidecar_path(self) -> RunPath:
        """``<run_dir>/<name>.json``."""
        return self.path.parent / (self.name + ".json")

    @property
    def run_dir(self) -> RunPath:
        """The directory holding the pair."""
        return self.path.parent

    @property
    def training_completed(self) -> bool:
        """True for a final checkpoint or final model."""
        return self.kind in ("final", "final_model")

    @property
    def total_bytes(self) -> int:
        """Weights (every shard file of a sharded checkpoint) plus sidecar bytes on disk."""
        return self.weights_size + self.sidecar_size

    def replace(self, **changes: Any) -> CheckpointMeta:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def _rows(self) -> list[list[str]]:
        """The ``field``/``value`` rows of :meth:`__str__` and :meth:`_repr_html_`."""
        layout = f"{self.world_size} shards in {self.shards_dir}" if self.sharded else "1 file"
        return [
            ["path", str(self.path)],
            ["kind", self.kind],
            ["step", str(self.step)],
            ["episodes", str(self.episodes)],
            ["games", str(self.stats)],
            ["spec", spec_summary(self.spec)],
            ["created", f"{self.created} ({human_age(self.created)} ago)"],
            ["size", f"{human_bytes(self.total_bytes)} ({layout}, {len(self.tensors)} tensors)"],
            ["weights", f"{self.weights_file}  {self.weights_digest[:23]}…"],
            ["format", f"{FORMAT_NAME} {self.format_version}"],
            *([] if self.health is None else [["health", self.health_summary]]),
            *extra_rows(self.extra),
        ]

    @property
    def health_summary(self) -> str:
        """``"healthy"``, ``"not checked"``, or ``"UNHEALTHY: "`` and the problems."""
        if self.health is None:
            return "not checked"
        return "UNHEALTHY: " + "; ".join(self.health) if self.health else "healthy"

    @property
    def health_mark(self) -> str:
        """A table cell: ``ok``, ``-`` (not checked) or ``UNHEALTHY`` and which checks failed.

        Example:
            >>> meta = CheckpointMeta(path="run/checkpoint_ts1", name="checkpoint_ts1",
            ...     format_version=3, kind="periodic", step=1, episodes=0, stats=GameStats(),
            ...     spec=None, weights_size=0, weights_digest="", digest="", created="?",
            ...     health=("non_finite: model w has 1 NaN of 2 elements", "norm_jump: ..."))
            >>> meta.health_mark, meta.replace(health=()).health_mark
            ('UNHEALTHY: non_finite, norm_jump', 'ok')
        """
        if self.health is None:
            return "-"
        if not self.health:
            return "ok"
        return "UNHEALTHY: " + ", ".join(dict.fromkeys(p.split(":", 1)[0] for p in self.health))

    def __repr__(self) -> str:
        """One line: what and where, not every tensor's layout (``str`` has the table)."""
        return (
            f"CheckpointMeta(name={self.name!r}, kind={self.kind!r}, step={self.step}, "
            f"path={str(self.path)!r}, {len(self.tensors)} tensors, "
            f"{human_bytes(self.total_bytes)})"
        )

    def __str__(self) -> str:
        """A ``field``/``value`` table of the checkpoint (``print(meta)`` in a notebook);
        ``repr`` is one line.

        Example:
            >>> meta = CheckpointMeta(path="runs/a/checkpoint_ts10", name="checkpoint_ts10",
            ...     format_version=3, kind="periodic", step=10, episodes=2, stats=GameStats(),
            ...     spec=None, weights_size=2000, weights_digest="blake3:00", digest="blake3:11",
            ...     created="2025-01-01T00:00:00+00:00", extra={"loss": 0.5})
            >>> print("\\n".join(str(meta).splitlines()[:5]))
            checkpoint_ts10
            field       value
            path        runs/a/checkpoint_ts10
            kind        periodic
            step        10
            >>> str(meta).splitlines()[-1]
            'extra.loss  0.5'
        """
        return fields_text(self.name, self._rows())

    def _repr_html_(self) -> str:
        """The same table as HTML, for Jupyter."""
        return fields_html(self.name, self._rows())

    @classmethod
    def from_sidecar(
        cls, sidecar: Mapping[str, Any], *, run_dir: PathArg, sidecar_size: int = 0
    ) -> CheckpointMeta:
        """Build the meta from a checked sidecar (see :func:`check_sidecar`).

        Args:
            sidecar: the parsed, checked sidecar.
            run_dir: the directory holding it.
            sidecar_size: the sidecar file's byte size, when known (for ``total_bytes``).

        Raises:
            IntegrityError: when a state field is malformed (wrong types, negative counts, ...).
            SpecError: for a spec this keisei_fn cannot build (e.g. an unregistered model type).
        """
        from keisei_fn.codec import decode_json

        state = sidecar["state"]
        name = sidecar["name"]

        def field(key: str, build: Callable[[], T]) -> T:
            try:
                return build()
            except (SpecError, UnsupportedFormatError):
                raise  # a model type or format this keisei_fn cannot read: unreadable, not broken
            except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
                raise IntegrityError(
                    f"sidecar {name!r}: field {key!r} is malformed: {exc!r}"
                ) from exc

        def extra() -> Mapping[str, Any]:
            value = decode_json(state.get("extra") or {}, tensors=_TensorNames())
            if not isinstance(value, dict):
                raise TypeError(f"a JSON object expected, found {type(value).__name__}")
            return value

        spec = state.get("spec")
        shards = sidecar.get("shards")
        return field(
            "state",
            lambda: cls(
                path=run_path(run_dir) / name,
                name=name,
                format_version=sidecar["format_version"],
                kind=sidecar["kind"],
                step=field("state.step", lambda: _count(state["step"])),
                episodes=field("state.episodes", lambda: _count(state["episodes"])),
                stats=field("state.stats", lambda: GameStats.from_json(state["stats"])),
                spec=field(
                    "state.spec", lambda: None if spec is None else ModelSpec.from_json(spec)
                ),
                weights_size=sidecar["weights"]["size"],
                weights_digest=sidecar["weights"]["digest"],
                digest=sidecar["digest"],
                tensors=field(
                    "tensors",
                    lambda: {
                        k: (v["dtype"], tuple(v["shape"])) for k, v in sidecar["tensors"].items()
                    },
                ),
                created=sidecar["created"],
                versions=field("versions", lambda: dict(sidecar["versions"])),
                extra=field("state.extra", extra),
                shards_dir=shards["dir"] if shards else None,
                world_size=shards["world_size"] if shards else 1,
                weights_file=(
                    sidecar["weights"]["file"]
                    if sidecar["format_version"] == FORMAT_VERSION
                    else ""
                ),
                tensor_digests={
                    k: v["digest"] for k, v in sidecar["tensors"].items() if "digest" in v
                },
                sidecar_size=sidecar_size,
                health=tuple(sidecar[HEALTH]) if HEALTH in sidecar else None,
            ),
        )


def _count(value: Any) -> int:
    """A step or episode count: an int >= 0."""
    if type(value) is not int or value < 0:
        raise ValueError(f"an int >= 0 expected, found {value!r}")
    return value
