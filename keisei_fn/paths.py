"""Where run directories live: a local path, or an fsspec URL (``s3://``, ``gs://``, ``memory://``).

Every function of keisei_fn that takes a path takes either. Local paths stay plain
:class:`pathlib.Path` objects (and get the durable local write protocol); URLs become
:class:`upath.UPath` objects over their fsspec filesystem, configured the filesystem's usual way
(for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, … or ``~/.aws``; install ``s3fs``, or
``gcsfs`` for ``gs://``).

Example:
    >>> run_path("runs/a")
    PosixPath('runs/a')
    >>> str(run_path("memory://runs/a") / "checkpoint_ts10.json")
    'memory://runs/a/checkpoint_ts10.json'
    >>> is_remote(run_path("s3://bucket/run"))
    True
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, cast

from typing_extensions import TypeIs

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["PathArg", "RunPath", "is_remote", "run_path"]

#: A run directory or checkpoint file: local, or on an fsspec filesystem.
RunPath: TypeAlias = "Path | UPath"
#: What users may pass wherever a path is accepted.
PathArg: TypeAlias = "str | os.PathLike[str] | UPath"

_LOCAL_PROTOCOLS = ("", "file", "local")


def run_path(path: PathArg) -> RunPath:
    """A local :class:`~pathlib.Path`, or a :class:`~upath.UPath` for an fsspec URL.

    ``file://`` URLs and local UPaths become plain paths, so local directories always get the
    durable local protocol.

    Raises:
        ImportError: for a URL whose fsspec filesystem is not installed (e.g. ``s3fs``).
    """
    if "upath" in sys.modules:  # else nobody can have made a UPath: keep importing cheap
        from upath import UPath

        if isinstance(path, UPath):
            return Path(path.path) if path.protocol in _LOCAL_PROTOCOLS else path
    text = os.fspath(cast("str | os.PathLike[str]", path))  # UPaths were handled above
    if "://" in text:
        from upath import UPath

        return run_path(UPath(text))
    return Path(text)


def is_remote(path: RunPath) -> TypeIs[UPath]:
    """Whether ``path`` lives on an fsspec filesystem rather than the local disk."""
    return not isinstance(path, Path)
