"""CheckpointMeta and the sidecar: what a checkpoint's JSON file says, built and checked purely.

The sidecar is the commit marker of a checkpoint. It records the format and version, the kind,
step, episodes, stats, spec, the JSON state part, every tensor's dtype and shape, the weights
file's size and BLAKE3 digest, the creation time (UTC), the library versions, and its **own
digest**: BLAKE3 of its canonical bytes without the ``digest`` field, so an edit to the sidecar
is detected too.

A sharded checkpoint (``keisei_fn.store.sharded``) has a format-version-2 sidecar: the same
fields plus ``"layout": "sharded"`` and ``"shards"`` (its directory, the world size, every
file's size and digest); its ``"weights"`` hold the files' total size and the digest of that file
table. Single-file checkpoints are still written as version 1, so an older keisei_fn reads them
and refuses a sharded one as a newer format instead of taking it for an incomplete checkpoint.

Example:
    >>> sidecar = build_sidecar({"step": 1}, name="checkpoint_ts1", kind="periodic",
    ...     tensors={}, aliases={}, weights_size=8, weights_digest="blake3:00")
    >>> check_sidecar(dumps(sidecar), name="checkpoint_ts1")["kind"]
    'periodic'
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import blake3
import safetensors
import torch

from keisei_fn._version import __version__
from keisei_fn.codec import DTYPE_NAMES, dumps, loads
from keisei_fn.errors import IntegrityError, UnsupportedFormatError
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, freeze

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "SHARDED_FORMAT_VERSION",
    "CheckpointMeta",
    "build_sharded_sidecar",
    "build_sidecar",
    "check_sidecar",
    "digest_bytes",
]

FORMAT_NAME = "keisei_fn.checkpoint"
#: The format version of single-file checkpoints.
FORMAT_VERSION = 1
#: The format version of sharded checkpoints (``"layout": "sharded"``); the newest one read.
SHARDED_FORMAT_VERSION = 2
SHARDED = "sharded"
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


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """``"blake3:<hex>"`` of ``data``."""
    return "blake3:" + blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def _versions() -> dict[str, str]:
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
    weights_size: int,
    weights_digest: str,
    created: str | None = None,
) -> dict[str, Any]:
    """Assemble a complete sidecar dict (with its own digest) for an encoded state.

    Args:
        header: the JSON state part from ``keisei_fn.codec.encode_state``.
        name: the checkpoint's file stem, e.g. ``"checkpoint_ts10240"``.
        kind: one of :data:`KINDS`.
        tensors: the stored tensors (their dtypes and shapes are recorded).
        aliases: alias name → stored name.
        weights_size: byte size of the weights file.
        weights_digest: its digest.
        created: ISO-8601 UTC time; now when None.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "kind": kind,
        "state": dict(header),
        "tensors": {
            k: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()
        },
        "aliases": dict(aliases),
        "weights": {"size": weights_size, "digest": weights_digest},
        "created": created or datetime.now(UTC).isoformat(timespec="microseconds"),
        "versions": _versions(),
    }
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

    It is :func:`build_sidecar`'s sidecar plus ``"layout": "sharded"`` and ``"shards"``;
    ``"weights"`` holds the files' total size and the digest of the file table.

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
        ValueError: for an unknown kind.

    Example:
        >>> s = build_sharded_sidecar({"step": 1}, name="checkpoint_ts1", kind="periodic",
        ...     tensors={}, shards_dir="checkpoint_ts1.ab.shards", world_size=2, files={})
        >>> s["format_version"], s["layout"], check_sidecar(dumps(s))["shards"]["dir"]
        (2, 'sharded', 'checkpoint_ts1.ab.shards')
    """
    table = {f: {"size": size, "digest": digest} for f, (size, digest) in sorted(files.items())}
    sidecar = build_sidecar(
        header,
        name=name,
        kind=kind,
        tensors=tensors,
        aliases={},
        weights_size=sum(size for size, _ in files.values()),
        weights_digest=_manifest_digest(table),
        created=created,
    )
    del sidecar["digest"]
    sidecar["format_version"] = SHARDED_FORMAT_VERSION
    sidecar["layout"] = SHARDED
    sidecar["shards"] = {"dir": shards_dir, "world_size": world_size, "files": table}
    sidecar["digest"] = digest_bytes(dumps(sidecar))
    return sidecar


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


def check_sidecar(raw: bytes, *, name: str | None = None, where: str = "sidecar") -> dict[str, Any]:
    """Parse and check a sidecar's bytes: JSON, own digest, known format version, canonical
    bytes (so every changed byte is detected), name.

    Args:
        raw: the file's bytes.
        name: the expected checkpoint name (the file's stem), if known.
        where: the file, for error messages.

    Returns:
        The parsed sidecar.

    Raises:
        IntegrityError: unparsable, a field missing or mistyped, a digest or name mismatch.
        UnsupportedFormatError: another format, or a newer format version.
    """
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
    recorded = sidecar.get("digest")
    if isinstance(recorded, str):
        actual = digest_bytes(dumps({k: v for k, v in sidecar.items() if k != "digest"}))
        if recorded != actual:
            raise IntegrityError(
                f"{where}: the sidecar was modified (digest {actual}, recorded {recorded})"
            )
    if sidecar.get("format") != FORMAT_NAME:
        found = sidecar.get("format")
        raise UnsupportedFormatError(f"{where}: not a {FORMAT_NAME} sidecar (format {found!r})")
    for key, kind in _REQUIRED.items():
        if not isinstance(sidecar.get(key), kind) or isinstance(sidecar.get(key), bool):
            raise IntegrityError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    if sidecar["format_version"] > SHARDED_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: format version {sidecar['format_version']} is newer than this "
            f"keisei_fn reads ({SHARDED_FORMAT_VERSION}); upgrade keisei_fn"
        )
    if dumps(sidecar) != raw:  # same values, other bytes (whitespace, "1E5" for "1e5", ...)
        raise IntegrityError(f"{where}: the sidecar is not in canonical form; it was edited")
    if name is not None and sidecar["name"] != name:
        raise IntegrityError(f"{where}: sidecar is for {sidecar['name']!r}, file is {name!r}")
    if sidecar["kind"] not in KINDS:
        raise IntegrityError(f"{where}: unknown kind {sidecar['kind']!r}")
    if sidecar["format_version"] == SHARDED_FORMAT_VERSION:
        if problem := _shards_problem(sidecar):
            raise IntegrityError(f"{where}: {problem}")
    elif "shards" in sidecar or "layout" in sidecar:
        raise IntegrityError(f"{where}: a version-1 sidecar with a shards entry")
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
        sidecar_size: the sidecar's byte size: its canonical bytes, which are the file's (0 for
            a meta built by hand rather than from a sidecar).
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
    sidecar_size: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", run_path(self.path))
        object.__setattr__(self, "tensors", freeze(dict(self.tensors)))
        object.__setattr__(self, "versions", freeze(dict(self.versions)))
        object.__setattr__(self, "extra", freeze(dict(self.extra)))

    @property
    def sharded(self) -> bool:
        """Whether this is a sharded checkpoint (its tensors in a shards directory)."""
        return self.shards_dir is not None

    @property
    def weights_path(self) -> RunPath:
        """``<run_dir>/<name>.safetensors``, or a sharded checkpoint's shards directory."""
        if self.shards_dir is not None:
            return self.path.parent / self.shards_dir
        return self.path.parent / (self.name + ".safetensors")

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

    @classmethod
    def from_sidecar(cls, sidecar: Mapping[str, Any], *, run_dir: PathArg) -> CheckpointMeta:
        """Build the meta from a checked sidecar (see :func:`check_sidecar`).

        Raises:
            IntegrityError: when a state field is malformed.
        """
        from keisei_fn.codec import decode_json

        state = sidecar["state"]
        try:
            spec = state.get("spec")
            return cls(
                path=run_path(run_dir) / sidecar["name"],
                name=sidecar["name"],
                format_version=sidecar["format_version"],
                kind=sidecar["kind"],
                step=state["step"],
                episodes=state["episodes"],
                stats=GameStats.from_json(state["stats"]),
                spec=ModelSpec.from_json(spec) if spec is not None else None,
                weights_size=sidecar["weights"]["size"],
                weights_digest=sidecar["weights"]["digest"],
                digest=sidecar["digest"],
                tensors={k: (v["dtype"], tuple(v["shape"])) for k, v in sidecar["tensors"].items()},
                created=sidecar["created"],
                versions=sidecar["versions"],
                extra=decode_json(state.get("extra") or {}, tensors=_TensorNames()),
                shards_dir=sidecar["shards"]["dir"] if "shards" in sidecar else None,
                world_size=sidecar["shards"]["world_size"] if "shards" in sidecar else 1,
                sidecar_size=len(dumps(dict(sidecar))),  # check_sidecar: the file holds them
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"sidecar {sidecar.get('name')!r} is malformed: {exc!r}") from exc
