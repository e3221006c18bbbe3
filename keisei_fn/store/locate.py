"""Which checkpoint a user's path names: either file of the pair (the sidecar, or the weights
file it names), a sharded checkpoint's shards directory, or the stem itself. Shared by every
loading path (single file and sharded) and by ``publish`` and the CLI, so that none of them
imports another's module to find a checkpoint.
"""

from __future__ import annotations

from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    UnsupportedFormatError,
)
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.store._fs import file_exists
from keisei_fn.store.listing import payloads, read_listed
from keisei_fn.store.names import (
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    generation_stem,
    shards_stem,
    sidecar_path,
)

__all__ = ["LEGACY_SUFFIXES", "resolve_stem"]

#: Suffixes of pickled torch checkpoints (Keisei's ``.pth``), never loaded directly.
LEGACY_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def resolve_stem(source: PathArg) -> RunPath:
    """The checkpoint stem a user path names: either file of the pair, a sharded checkpoint's
    shards directory, or the stem itself.

    Args:
        source: a local path or an fsspec URL.

    Returns:
        The stem (``<run_dir>/<name>``), which may be incomplete or corrupt: this only checks
        that something is there (a shards directory's sidecar is read, to map it to its stem).

    Raises:
        UnsupportedFormatError: for a legacy ``.pth``/``.pt`` file.
        CheckpointNotFoundError: when nothing exists there.
        IncompleteCheckpointError: for a payload (a weights file or shards directory) that no
            sidecar names.

    Example:
        >>> resolve_stem("runs/none/checkpoint_ts1.json")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none/checkpoint_ts1.json
    """
    path = run_path(source)
    owner = shards_stem(path.name) or generation_stem(path.name)
    if owner is not None:  # a payload: a generation-named weights file or a shards directory
        meta = read_listed(path.parent / owner)[0]
        if meta.weights_file != path.name:
            raise IncompleteCheckpointError(
                f"{path} is not committed: {meta.sidecar_path.name} names {meta.weights_file} "
                "(a save that never committed, or a checkpoint replaced since)"
            )
        return meta.path
    if path.suffix in LEGACY_SUFFIXES:
        if not file_exists(path):
            raise CheckpointNotFoundError(f"no such file: {path}")
        raise UnsupportedFormatError(
            f"{path} is a pickled torch checkpoint; it is never loaded directly (it could run "
            f"code). Convert it once with keisei_fn.import_legacy({str(path)!r}, run_dir) or "
            "`keisei-fn convert`"
        )
    for suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX):
        if path.name.endswith(suffix):
            path = path.parent / path.name[: -len(suffix)]
            break
    if not (file_exists(sidecar_path(path)) or payloads(path)):
        raise CheckpointNotFoundError(f"no checkpoint at {source}")
    return path
