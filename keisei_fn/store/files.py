"""Run-directory files for the layers above the store: the CLI and ``publish`` ask here whether a
directory exists, how large a file is and where a checkpoint's files are locally, instead of
opening run-directory files themselves or importing ``keisei_fn.store._fs``. Local paths and
fsspec URLs alike.

Example:
    >>> directory_exists("runs/does-not-exist")
    False
"""

from __future__ import annotations

from pathlib import Path

from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, is_remote, run_path
from keisei_fn.store._fs import copy_file, file_size, is_directory

__all__ = ["directory_exists", "local_checkpoint_files", "stored_size"]


def directory_exists(path: PathArg) -> bool:
    """Whether ``path`` is an existing directory (on an object store: a prefix with objects
    under it).

    Args:
        path: a local path or an fsspec URL.

    Returns:
        True for a directory; False for a file or nothing.
    """
    return is_directory(run_path(path))


def stored_size(path: PathArg) -> int | None:
    """The byte size of a file in a run directory, or None for a directory (e.g. a shards
    directory).

    Args:
        path: a local path or an fsspec URL.

    Returns:
        The file's size, or None.

    Raises:
        FileNotFoundError: nothing is there.
    """
    resolved = run_path(path)
    return None if is_directory(resolved) else file_size(resolved)


def local_checkpoint_files(meta: CheckpointMeta, staging: Path) -> list[Path]:
    """A single-file checkpoint's two files as local paths, weights first: a local checkpoint's
    own files, or copies of a remote one's, downloaded into ``staging`` under the same names.

    Args:
        meta: the checkpoint (its files are the ones its sidecar names).
        staging: an existing local directory for the downloads.

    Returns:
        ``[weights, sidecar]``.

    Raises:
        FileNotFoundError: a remote file is missing.
        OSError: a download failed.
    """
    files = []
    for path in (meta.weights_path, meta.sidecar_path):
        if is_remote(path):
            copy_file(path, staging / path.name)
            path = staging / path.name
        files.append(path)
    return files
