"""Which checkpoint a user's path names: either file of the pair, a sharded checkpoint's shards
directory, or the stem itself. Shared by every loading path (single file and sharded) and by
``publish`` and the CLI, so that none of them imports another's module to find a checkpoint.
"""

from __future__ import annotations

from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    UnsupportedFormatError,
)
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.store._fs import file_exists
from keisei_fn.store.listing import read_listed, shard_dirs
from keisei_fn.store.names import (
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    shards_stem,
    sidecar_path,
    weights_path,
)

__all__ = ["resolve_stem"]

_LEGACY_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


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
        IncompleteCheckpointError: for a shards directory that no sidecar commits.

    Example:
        >>> resolve_stem("runs/none/checkpoint_ts1.json")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none/checkpoint_ts1.json
    """
    path = run_path(source)
    if (name := shards_stem(path.name)) is not None:  # a sharded checkpoint's directory
        meta = read_listed(path.parent / name)[0]
        if meta.shards_dir != path.name:
            raise IncompleteCheckpointError(
                f"{path} was never committed: {meta.sidecar_path.name} refers to {meta.shards_dir}"
            )
        return meta.path
    if path.suffix in _LEGACY_SUFFIXES:
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
    if not (
        file_exists(sidecar_path(path))
        or file_exists(weights_path(path))
        or shard_dirs(path.parent, path.name)
    ):
        raise CheckpointNotFoundError(f"no checkpoint at {source}")
    return path
