"""Reading a run directory: which checkpoints are *listed*-valid, which are not, and why.

Validity has two levels (design.md). *Listed*: the sidecar parses, verifies its own digest, has
a known format version, matches its file name and step, and the weights file exists with the
recorded size (for a sharded checkpoint: every file of its shards directory, and nothing else
there) — cheap, used to list and to choose "latest". *Verified*: the digests match — checked on
load. Anything else is incomplete: never loaded, never latest.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    KeiseiFnError,
    SpecError,
    UnsupportedFormatError,
)
from keisei_fn.meta import MAX_SIDECAR_BYTES, CheckpointMeta, check_sidecar
from keisei_fn.paths import PathArg, RunPath, is_remote, run_path
from keisei_fn.store._fs import (
    ABANDONED_AFTER_SECONDS,
    entry_exists,
    file_exists,
    file_identity,
    file_size,
    is_directory,
    is_temp_name,
    list_file_names,
    list_names,
    modified_age,
    read_bounded,
)
from keisei_fn.store.checkpoint_list import CheckpointList
from keisei_fn.store.names import (
    BUNDLE_SIDECAR,
    RESUME_PREFIX,
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    generation_stem,
    parse_stem,
    shards_stem,
    sidecar_path,
    split_file,
)

log = logging.getLogger("keisei_fn.store")

KIND_ORDER = {"periodic": 0, "final": 1, "final_model": 2}
#: How many times a reader lists a run directory again when candidates vanished under it (or
#: reads a checkpoint again when its sidecar was replaced under it).
RELIST_TRIES = 20
#: OSErrors that are a problem of one file (skipped with a warning), not of the disk.
_PER_FILE_ERRNOS = frozenset(
    (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
     errno.ENXIO, errno.ENOENT)
)  # fmt: skip
T = TypeVar("T")


def problem_of_one_file(exc: KeiseiFnError | OSError) -> bool:
    """Whether an error reading a checkpoint is that file's problem (corrupt, incomplete, a
    symbolic link loop, no permission: skip it), not the disk's (raise it)."""
    return isinstance(exc, KeiseiFnError) or exc.errno in _PER_FILE_ERRNOS


def read_listed(stem: RunPath) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Check a checkpoint at the *listed* level and return its meta and parsed sidecar.

    Raises:
        CheckpointNotFoundError: neither the sidecar nor any payload of ``stem`` exists.
        IncompleteCheckpointError: a payload without its sidecar, or a sidecar whose payload is
            missing.
        IntegrityError: the sidecar is corrupt, edited, mismatched, over a size cap, or not a
            regular file, or the weights' size differs.
        UnsupportedFormatError: a newer or foreign format.
        SpecError: a spec this keisei_fn cannot build (an unregistered model type).
    """
    sidecar_file = sidecar_path(stem)
    try:
        raw = read_bounded(sidecar_file, limit=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        written = payloads(stem)
        if written:
            raise IncompleteCheckpointError(
                f"{written[0]}: no sidecar {sidecar_file.name}; the save never committed"
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint {stem} (.safetensors/.json)") from None
    except IsADirectoryError as exc:
        raise IntegrityError(f"{sidecar_file} is a directory") from exc
    sidecar = check_sidecar(raw, name=stem.name, where=str(sidecar_file))
    meta = CheckpointMeta.from_sidecar(sidecar, run_dir=stem.parent, sidecar_size=len(raw))
    parsed = parse_stem(stem.name)
    if parsed is not None and parsed.step is not None and parsed.step != meta.step:
        raise IntegrityError(
            f"{sidecar_file}: records step {meta.step}, the name says {parsed.step}"
        )
    if meta.sharded:
        _check_shards(meta, sidecar)
        return meta, sidecar
    try:
        size = file_size(meta.weights_path)
    except (FileNotFoundError, IsADirectoryError):
        raise IncompleteCheckpointError(
            f"{sidecar_file}: its weights file {meta.weights_file} is missing"
        ) from None
    if size != meta.weights_size:
        raise IntegrityError(
            f"{meta.weights_path}: size is {size} bytes, the sidecar records {meta.weights_size}"
        )
    return meta, sidecar


def payloads(stem: RunPath) -> list[RunPath]:
    """Every payload written for ``stem``, committed or not: format-1 and generation-named
    weights files and shards directories (one directory listing)."""
    found = [
        stem.parent / name
        for name in sorted(_names(stem.parent)[0])
        if name == stem.name + WEIGHTS_SUFFIX or generation_stem(name) == stem.name
    ]
    return found + shard_dirs(stem.parent, stem.name)


def committed(stem: RunPath) -> tuple[CheckpointMeta, dict[str, Any]] | None:
    """The listed-valid checkpoint at ``stem``, or None when there is none or it is incomplete
    or corrupt (the usual case before a save: one stat, no directory scan).

    Raises:
        UnsupportedFormatError, SpecError: a checkpoint this keisei_fn cannot read is there.
    """
    if not file_exists(sidecar_path(stem)):
        return None
    try:
        return read_listed(stem)
    except (CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError):
        return None


def _check_shards(meta: CheckpointMeta, sidecar: dict[str, Any]) -> None:
    """Every file a sharded checkpoint's sidecar lists exists with its size, and its shards
    directory holds nothing else (DCP's reader would read any ``*.safetensors`` there)."""
    shards, files = meta.weights_path, sidecar["shards"]["files"]
    try:
        present = set(list_file_names(shards))
    except NotADirectoryError:
        raise IntegrityError(f"{shards} is not a directory") from None
    for name, record in files.items():
        if name not in present:
            raise IncompleteCheckpointError(
                f"{meta.sidecar_path}: its shard file {shards / name} is missing"
            )
        size = file_size(shards / name)
        if size != record["size"]:
            raise IntegrityError(
                f"{shards / name}: size is {size} bytes, the sidecar records {record['size']}"
            )
    unexpected = sorted(n for n in present - set(files) if not n.startswith("."))
    if unexpected:
        raise IntegrityError(f"{shards}: holds {unexpected}, which the sidecar does not list")


def is_run_dir(path: RunPath) -> bool:
    """Whether ``path`` is a run directory (a directory, but not a sharded checkpoint's, nor an
    export bundle's: one holding ``bundle.json``, see ``keisei_fn.store.bundle``)."""
    return (
        shards_stem(path.name) is None
        and is_directory(path)
        and not file_exists(path / BUNDLE_SIDECAR)
    )


def shard_dirs(run_dir: RunPath, name: str | None = None) -> list[RunPath]:
    """The shards directories ``<name>.<token>.shards`` in ``run_dir`` (of every checkpoint
    name when ``name`` is None), committed or not."""
    if is_remote(run_dir) or not run_dir.is_dir():
        return []  # sharded checkpoints are written to local (or mounted) file systems only
    with os.scandir(run_dir) as entries:
        return sorted(
            run_dir / e.name
            for e in entries
            if e.is_dir(follow_symlinks=False)
            and (stem := shards_stem(e.name)) is not None
            and name in (None, stem)
        )


@dataclass(frozen=True, slots=True)
class RunDirScan:
    """Everything found in a run directory.

    Attributes:
        valid: listed-valid checkpoints, sorted by (step, kind, name).
        invalid: (path, error) for checkpoints that fail the listed check.
        leftovers: what can never become valid: temp files, weights without a sidecar, shards
            directories no sidecar refers to (once abandoned: see ``ABANDONED_AFTER_SECONDS``).
        unreadable: (path, error) for checkpoints that may be fine but cannot be read here (a
            newer format version, an unregistered model type, an I/O error): never pruned, nor
            any payload of theirs.
    """

    valid: list[CheckpointMeta]
    invalid: list[tuple[RunPath, KeiseiFnError]]
    leftovers: list[RunPath]
    unreadable: list[tuple[RunPath, Exception]]


def _names(run_dir: RunPath) -> tuple[list[str], list[str]]:
    """``(files, others)`` of a run directory (see ``list_names``)."""
    try:
        return list_names(run_dir)
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{run_dir} is not a directory") from None


def scan_run_dir(run_dir: PathArg) -> RunDirScan:
    """Classify every checkpoint file of ``run_dir`` (a missing directory is empty).

    Total: one bad file never makes it raise; each invalid or unreadable checkpoint is logged
    once (a warning naming the file and why). A payload no valid sidecar names is a leftover
    (a crashed save's, a replaced checkpoint's, or one a save in flight has not committed yet:
    :func:`keisei_fn.store.prune` removes leftovers only under the run directory's lock).

    Raises:
        CheckpointNotFoundError: when ``run_dir`` is a file.
    """
    run_dir = run_path(run_dir)
    sidecars: list[str] = []
    payload_files: dict[str, str] = {}  # file name -> owner stem
    leftovers = []
    files, others = _names(run_dir)
    for name in files:
        if is_temp_name(name):
            leftovers.append(run_dir / name)
        elif (split := split_file(name)) is not None:
            if split[1] == SIDECAR_SUFFIX:
                sidecars.append(split[0])
            else:
                payload_files[name] = split[0]
    valid: list[CheckpointMeta] = []
    invalid: list[tuple[RunPath, KeiseiFnError]] = []
    unreadable: list[tuple[RunPath, Exception]] = []
    for name in others:
        split = split_file(name)
        if split is not None and split[1] == SIDECAR_SUFFIX:  # never opened: a FIFO would block
            not_a_file = IntegrityError(f"{run_dir / name} is not a regular file")
            unreadable.append((run_dir / split[0], not_a_file))
            skipped(run_dir / split[0], not_a_file)
    for stem in sorted(sidecars):
        try:
            valid.append(stable(run_dir / stem, read_listed)[0])
        except (KeiseiFnError, OSError) as exc:
            if not entry_exists(sidecar_path(run_dir / stem)):
                continue  # removed since the directory was listed (pruned)
            # Kept without its traceback: its frames (and the file's bytes in them) would
            # otherwise stay alive in a cycle with this frame until the garbage collector runs.
            exc.with_traceback(None)
            if isinstance(exc, UnsupportedFormatError | SpecError | OSError):
                unreadable.append((run_dir / stem, exc))
            else:
                invalid.append((run_dir / stem, exc))
            skipped(run_dir / stem, exc)
    valid.sort(key=lambda m: (m.step, KIND_ORDER[m.kind], m.name))
    named = {m.weights_file for m in valid}
    kept = {stem.name for stem, _ in unreadable}
    leftovers += [
        run_dir / name
        for name, owner in payload_files.items()
        if name not in named and owner not in kept
    ]
    leftovers += _stale_shard_dirs(run_dir, valid, unreadable)
    return RunDirScan(valid, invalid, sorted(leftovers, key=str), unreadable)


def skipped(path: RunPath, error: BaseException) -> None:
    """Say once, as a warning, that a checkpoint is skipped and why."""
    log.warning("skipping %s: %s", path, error)


def _stale_shard_dirs(
    run_dir: RunPath,
    valid: list[CheckpointMeta],
    unreadable: list[tuple[RunPath, Exception]],
) -> list[RunPath]:
    """Shards directories no valid sidecar refers to, untouched for ABANDONED_AFTER_SECONDS
    (a save in progress is younger), of checkpoints that this keisei_fn can read."""
    referenced = {m.shards_dir for m in valid}
    keep = {stem.name for stem, _ in unreadable}
    return [
        directory
        for directory in shard_dirs(run_dir)
        if directory.name not in referenced
        and shards_stem(directory.name) not in keep
        and (age := modified_age(directory)) is not None  # None: removed since listed
        and age > ABANDONED_AFTER_SECONDS
    ]


def resume_candidates(run_dir: RunPath, prefix: str = RESUME_PREFIX) -> Iterator[RunPath]:
    """Stems with ``prefix`` that have a sidecar, highest step first — by name only, unchecked.

    One regex over one ``listdir``; paths are built lazily, since "latest" usually needs only
    the first (10,000 checkpoints: ~30 ms).
    """
    sidecar = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(SIDECAR_SUFFIX))
    files, others = _names(run_dir)  # others: to say why a sidecar that is not a file is skipped
    names = files + others
    found = sorted(((int(m[1]), m[0]) for m in map(sidecar.fullmatch, names) if m), reverse=True)
    for _, name in found:
        yield run_dir / name[: -len(SIDECAR_SUFFIX)]


def list_checkpoints(run_dir: PathArg) -> CheckpointList:
    """Every listed-valid checkpoint of a run directory, sorted by step.

    Periodic checkpoints of every prefix, final checkpoints and the final model are included;
    incomplete and corrupt ones are not (``keisei-fn verify`` names them). A run directory that
    does not exist yet has none.

    Returns:
        A list of metas that prints as a table and plots its checkpoints' metrics
        (:class:`~keisei_fn.store.checkpoint_list.CheckpointList`).

    Example:
        >>> list_checkpoints("runs/does-not-exist")
        []
        >>> print(list_checkpoints("runs/does-not-exist"))
        no checkpoints
    """
    return CheckpointList(scan_run_dir(run_dir).valid)


def stable(stem: RunPath, use: Callable[[RunPath], T]) -> T:
    """``use(stem)``, tried again while the sidecar at ``stem`` is replaced under it.

    A reader that read a sidecar just before a save replaced it (``overwrite=True``, a new
    final model) finds the weights that sidecar named removed; it reads the new checkpoint
    instead. A failure while the sidecar stayed the same (or vanished) is raised.

    Raises:
        Whatever ``use`` raised.
    """
    for _ in range(RELIST_TRIES - 1):
        before = file_identity(sidecar_path(stem))
        try:
            return use(stem)
        except (KeiseiFnError, OSError):
            now = file_identity(sidecar_path(stem))
            if before is None or now is None or now == before:
                raise
    return use(stem)


def newest_usable(
    run_dir: RunPath,
    use: Callable[[RunPath], T],
    *,
    prefix: str = RESUME_PREFIX,
    healthy_only: bool = False,
) -> T | None:
    """``use(stem)`` of the newest resume checkpoint for which it succeeds, or None.

    With ``healthy_only``, a checkpoint the health gate marked unhealthy (see
    ``keisei_fn.health``) is skipped with a warning, as a corrupt one is; when only unhealthy
    ones are usable, a warning says so (and None is returned).

    Candidates are tried from the highest step down (each through :func:`stable`); one that is
    corrupt, incomplete or unreadable (a symbolic link loop, no permission) is skipped with
    one warning. A reader racing a pruner never reports "none" while a valid checkpoint
    exists: when a candidate vanished under it (its sidecar is gone) and no candidate was
    usable, the directory is listed again (up to :data:`RELIST_TRIES` times; each pass sees
    every checkpoint committed before it started).

    Raises:
        CheckpointNotFoundError: when ``run_dir`` is a file.
        OSError: an I/O error (not a problem of one file) reading a candidate that is still
            there.
    """
    warned: set[str] = set()
    for _ in range(RELIST_TRIES):
        vanished = False
        for stem in resume_candidates(run_dir, prefix):
            try:
                if healthy_only and not (meta := stable(stem, _meta)).healthy:
                    if stem.name not in warned:
                        warned.add(stem.name)
                        log.warning(
                            "skipping %s, falling back to an older checkpoint: %s",
                            stem,
                            meta.health_summary,
                        )
                    continue
                return stable(stem, use)
            except (KeiseiFnError, OSError) as exc:
                if not entry_exists(sidecar_path(stem)):
                    vanished = True  # pruned under us: not a problem of the file
                    continue
                if not problem_of_one_file(exc):
                    raise
                if stem.name not in warned:
                    warned.add(stem.name)
                    log.warning("skipping %s, falling back to an older checkpoint: %s", stem, exc)
        if not vanished:
            break
    if healthy_only and (note := unhealthy_note(run_dir, prefix)):
        log.warning("no healthy %s* checkpoint in %s%s", prefix, run_dir, note)
    return None


def _meta(stem: RunPath) -> CheckpointMeta:
    return read_listed(stem)[0]


def unhealthy_note(run_dir: RunPath, prefix: str = RESUME_PREFIX) -> str:
    """``"; N ... marked unhealthy ..."`` naming a run directory's listed-valid ``prefix``
    checkpoints that the health gate marked unhealthy (the newest with its problems), for the
    message that no healthy one was found; ``""`` when there is none."""
    found = []
    for stem in resume_candidates(run_dir, prefix):
        try:
            meta = _meta(stem)
        except (KeiseiFnError, OSError):
            continue
        if not meta.healthy:
            found.append(meta)
    if not found:
        return ""
    return (
        f"; {len(found)} checkpoint{'s are' if len(found) > 1 else ' is'} marked unhealthy by "
        f"the health gate (newest {found[0].name}: {found[0].health_summary}); pass "
        "include_unhealthy=True, or its path, to use one anyway"
    )


def latest_checkpoint(
    run_dir: PathArg, *, prefix: str = RESUME_PREFIX, include_unhealthy: bool = False
) -> RunPath | None:
    """The weights path of the highest-step listed-valid resume checkpoint, or None (for a
    sharded checkpoint: its shards directory).

    A checkpoint the health gate marked unhealthy (``keisei_fn.health``) is skipped with a
    warning unless ``include_unhealthy``; when every valid one is unhealthy, a warning says so
    and None is returned.

    Never by modification time or name order; only ``prefix`` counts (other prefixes such as
    ``initial_eval_checkpoint_ts`` and the final model are not resume points). Only the sidecars
    of the candidates from the top down are read, until one is valid; each one skipped is
    logged once. No side effects. Never raises because of a bad file, and never returns None
    while a valid (and, by default, healthy) checkpoint exists, even while another process
    saves and prunes.

    Example:
        >>> latest_checkpoint("runs/does-not-exist") is None
        True
    """
    return newest_usable(
        run_path(run_dir),
        lambda stem: read_listed(stem)[0].weights_path,
        prefix=prefix,
        healthy_only=not include_unhealthy,
    )
