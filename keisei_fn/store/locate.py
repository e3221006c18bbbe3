"""Which checkpoint a user's path names: either file of the pair (the sidecar, or the weights
file it names), a sharded checkpoint's shards directory, or the stem itself — or a run
directory, which stands for its final model, else its latest checkpoint. Shared by every
loading path (single file and sharded) and by ``publish`` and the CLI, so that none of them
imports another's module to find a checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    KeiseiFnError,
    UnsupportedFormatError,
)
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.store._fs import file_exists
from keisei_fn.store.bundle import bundle_stem
from keisei_fn.store.listing import (
    is_run_dir,
    newest_usable,
    payloads,
    read_listed,
    stable,
    unhealthy_note,
)
from keisei_fn.store.names import (
    FINAL_MODEL,
    RESUME_PREFIX,
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    generation_stem,
    shards_stem,
    sidecar_path,
)
from keisei_fn.store.sniff import FileKind, identify_file

__all__ = [
    "LEGACY_SUFFIXES",
    "not_loadable",
    "resolve_checkpoint",
    "resolve_stem",
    "run_dir_checkpoint",
]

log = logging.getLogger("keisei_fn.store")
T = TypeVar("T")

#: Names that suggest a pickled torch checkpoint (Keisei's ``.pth``): used only to mention such
#: files in a run directory's messages. A file a user names is judged by its content
#: (``keisei_fn.store.sniff``), never by its suffix.
LEGACY_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def resolve_stem(source: PathArg) -> RunPath:
    """The checkpoint stem a user path names: either file of the pair, a sharded checkpoint's
    shards directory, or the stem itself.

    Args:
        source: a local path or an fsspec URL.

    Returns:
        The stem (``<run_dir>/<name>``), which may be incomplete or corrupt: this only checks
        that something is there (a shards directory's sidecar is read, to map it to its stem).
        For an export bundle's directory, the bundle's stem: reading it as a checkpoint raises
        an ``UnsupportedFormatError`` that says it is a bundle.

    Raises:
        UnsupportedFormatError: for a file that is not one of a checkpoint's, whatever its
            name: a ``torch.save`` file or pickle (convert it with ``import_legacy``), or
            anything else (the message says what its first bytes are).
        IntegrityError: for an empty file.
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
    stem = path
    for suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX):
        if path.name.endswith(suffix):
            stem = path.parent / path.name[: -len(suffix)]
            break
    if file_exists(sidecar_path(stem)):
        return stem
    if file_exists(path):  # no sidecar: what is the file?
        found = identify_file(path)
        if found.kind != "weights" or not payloads(stem):
            raise not_loadable(path, found)
        return stem  # an uncommitted weights file: read_listed says so
    if payloads(stem):
        return stem
    if (bundle := bundle_stem(path)) is not None:  # reading it says it is no checkpoint
        return bundle
    raise CheckpointNotFoundError(f"no checkpoint at {source}")


def not_loadable(path: RunPath, found: FileKind) -> KeiseiFnError:
    """The error for a file that is not a checkpoint's sidecar or weights, by what it is.

    Args:
        path: the file a user named.
        found: what its content is (:func:`keisei_fn.store.sniff.identify_file`).

    Returns:
        An :class:`UnsupportedFormatError` (a torch.save file or pickle: convert it; anything
        else: what it is and what a checkpoint is), :class:`IncompleteCheckpointError` (our
        weights file, but no sidecar names it) or :class:`IntegrityError` (an empty file).

    Example:
        >>> from keisei_fn.store.sniff import identify_bytes
        >>> error = not_loadable(run_path("model.bin"), identify_bytes(b"hello"))
        >>> type(error).__name__
        'UnsupportedFormatError'
        >>> str(error)[:65]
        "model.bin is not a recognisable checkpoint (first bytes b'hello')"
    """
    what = f"{path} is {found.description}"
    if found.is_torch:
        return UnsupportedFormatError(
            f"{what}: keisei_fn never unpickles a file directly (unpickling can run code). "
            f"Convert it once with keisei_fn.import_legacy({str(path)!r}, run_dir) or "
            f"`keisei-fn convert {path} RUN_DIR`, then load the converted checkpoint"
        )
    if found.kind == "empty":
        return IntegrityError(f"{what}: a save that never completed, or not a checkpoint")
    if found.kind == "weights":
        return IncompleteCheckpointError(
            f"{what}, but no sidecar names it: a checkpoint is loaded through its <name>.json "
            "sidecar (the commit point), which is missing or names another file"
        )
    if found.kind == "sidecar":
        return UnsupportedFormatError(
            f"{what} under another name: sidecars are named <name>.json; rename it to "
            f"{found.name or '<name>'}.json beside its weights file, and load that"
        )
    return UnsupportedFormatError(
        f"{what}; a keisei_fn checkpoint is a <name>.json sidecar plus the .safetensors weights "
        "file it names"
    )


def run_dir_checkpoint(
    run_dir: RunPath, use: Callable[[RunPath], T], *, prefix: str = RESUME_PREFIX
) -> T:
    """``use(stem)`` of the checkpoint a run directory stands for: its final model when it has
    one and ``use`` succeeds on it, else the newest ``prefix`` checkpoint for which ``use``
    succeeds and that the health gate did not mark unhealthy (see
    :func:`~keisei_fn.store.listing.newest_usable`). The one rule of
    ``load_model`` and of every CLI command that takes a checkpoint.

    Args:
        run_dir: an existing run directory.
        use: reads or checks one stem (e.g. ``read_listed``, or a load that verifies); an
            ``IntegrityError`` or ``IncompleteCheckpointError`` on the final model falls back to
            the latest checkpoint with a warning.
        prefix: the resume prefix.

    Returns:
        What ``use`` returned.

    Raises:
        CheckpointNotFoundError: no usable final model and no usable ``prefix`` checkpoint.
        Every other error of ``use`` on the final model.
    """
    final = run_dir / FINAL_MODEL
    if file_exists(sidecar_path(final)):
        try:
            return stable(final, use)
        except (IntegrityError, IncompleteCheckpointError) as exc:
            log.warning(
                "final model in %s is not usable, using the latest checkpoint: %s", run_dir, exc
            )
    found = newest_usable(run_dir, use, prefix=prefix, healthy_only=True)
    if found is None:
        raise CheckpointNotFoundError(
            f"no valid checkpoint in {run_dir}: no final model and no valid {prefix}* "
            f"checkpoint{unhealthy_note(run_dir, prefix)}"
        )
    return found


def resolve_checkpoint(source: PathArg) -> RunPath:
    """The checkpoint stem a user path names, a run directory included (its final model, else
    its latest checkpoint, by :func:`run_dir_checkpoint` at the listed level), or an export
    bundle (its directory or ``bundle.json``: the bundle's stem ``<dir>/bundle``, which
    ``load_model`` takes; see ``keisei_fn.store.bundle``).

    Args:
        source: as for :func:`resolve_stem`, a run directory, or a bundle; local or an fsspec
            URL.

    Returns:
        The stem (``<run_dir>/<name>``); for a run directory, a listed-valid one.

    Raises:
        CheckpointNotFoundError: nothing there, or a run directory without a valid checkpoint.
        and every error of :func:`resolve_stem`.

    Example:
        >>> resolve_checkpoint("runs/none")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none
    """
    path = run_path(source)
    if (bundle := bundle_stem(path)) is not None:
        return bundle
    if not is_run_dir(path):
        return resolve_stem(path)
    return run_dir_checkpoint(path, lambda stem: read_listed(stem)[0].path)
