"""Migrating a run directory's checkpoints of older on-disk formats to the format written now,
in place.

The formats keisei_fn has written (``keisei_fn.meta``): **1**, a single weights file
``<name>.safetensors`` without per-tensor digests; **3**, a generation-named weights file
``<name>.<token>.safetensors`` with every tensor's digest, written now. **2** is the sharded
(FSDP) layout, still written for sharded checkpoints: it is not older, and stays as it is
(``consolidate`` turns one into a single file). So the one migration today is 1 → 3. Every
format stays readable without migrating; a migration adds what the newer format checks (the
per-tensor digests that partial loads verify) and retires the fixed weights-file name.

Each checkpoint migrates through the commit protocol (``keisei_fn.store.commit``), under the
run directory's lock: its weights file is read and verified against the recorded digest (a
corrupt checkpoint is skipped, never given fresh digests), the same tensors are written to a
fresh generation-named file, and the new sidecar is committed over the old one; only then is
the old weights file removed. A kill at any instant leaves the format-1 checkpoint or the
format-3 one, both loadable, plus at most an unreferenced file that ``prune`` removes. The
tensors are bit-identical; the sidecar keeps everything it said (step, kind, state, creation
time, and the library versions that wrote it) and records the migration under ``"migrated"``.
Running it again finds nothing to migrate and changes nothing.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     migrate(run_dir)
    ()
"""

from __future__ import annotations

from dataclasses import dataclass

from keisei_fn.errors import CheckpointNotFoundError, KeiseiFnError
from keisei_fn.meta import FORMAT_VERSION, LEGACY_SINGLE_FILE_VERSION, migrated_sidecar
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.store._fs import is_directory
from keisei_fn.store.commit import commit, fresh_payload, locked, remove_payload
from keisei_fn.store.listing import committed, scan_run_dir
from keisei_fn.store.names import WEIGHTS_SUFFIX
from keisei_fn.store.weights import check_listed, read_weights, write_weights

__all__ = ["Migration", "migrate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """What ``migrate`` did (or, in a dry run, would do) with one checkpoint.

    Attributes:
        name: the checkpoint's name.
        status: ``"migrated"``, ``"would migrate"`` (a dry run), ``"current"`` (already the
            newest format of its layout) or ``"skipped"`` (invalid or unreadable: left alone).
        from_version: its format version before (None when it could not be read).
        to_version: its format version after.
        detail: why it was skipped.
    """

    name: str
    status: str
    from_version: int | None
    to_version: int | None
    detail: str = ""

    def __str__(self) -> str:
        """One line, e.g. ``migrated       checkpoint_ts10  format 1 → 3``."""
        if self.status == "skipped":
            return f"{self.status:<14} {self.name}  {self.detail}"
        if self.status == "current":
            return f"{self.status:<14} {self.name}  format {self.from_version}"
        return f"{self.status:<14} {self.name}  format {self.from_version} → {self.to_version}"


def migrate(run_dir: PathArg, *, dry_run: bool = False) -> tuple[Migration, ...]:
    """Rewrite every checkpoint of an older format in ``run_dir`` in the newest one, in place.

    Atomic per checkpoint and idempotent (see the module's docstring); invalid and unreadable
    checkpoints are reported and left alone, and so is anything that is not a checkpoint.

    Args:
        run_dir: the run directory (local or an fsspec URL).
        dry_run: only say what would be migrated (each checkpoint is read and verified as a
            migration would, so a corrupt one is reported as skipped); write nothing.

    Returns:
        One :class:`Migration` per checkpoint: the valid ones by step, then the skipped ones.

    Raises:
        CheckpointNotFoundError: ``run_dir`` is not a directory.
        OSError: a write failed (the checkpoint being migrated is still there, in its old
            format; those migrated before stay migrated).
    """
    path = run_path(run_dir)
    if not is_directory(path):
        raise CheckpointNotFoundError(f"no run directory {path}")
    scan = scan_run_dir(path)
    done: list[Migration] = []
    for meta in scan.valid:
        if meta.format_version != LEGACY_SINGLE_FILE_VERSION:
            done.append(_current(meta.name, meta.format_version))
        else:
            done.append(_migrate_one(meta.path, dry_run=dry_run))
    for stem, error in [*scan.invalid, *scan.unreadable]:
        done.append(_skipped(stem.name, error))
    return tuple(done)


def _current(name: str, version: int) -> Migration:
    return Migration(name=name, status="current", from_version=version, to_version=version)


def _skipped(name: str, error: BaseException, version: int | None = None) -> Migration:
    return Migration(
        name=name,
        status="skipped",
        from_version=version,
        to_version=version,
        detail=f"{type(error).__name__}: {error}",
    )


def _migrate_one(stem: RunPath, *, dry_run: bool) -> Migration:
    """Migrate the format-1 checkpoint at ``stem`` through the commit protocol (``dry_run``:
    only read and verify it, so that a corrupt one is reported as skipped there too)."""
    with locked(stem.parent):
        try:
            found = committed(stem)
        except KeiseiFnError as exc:  # replaced since the scan by one this cannot read
            return _skipped(stem.name, exc)
        if found is None:  # pruned or broken since the scan
            return _skipped(stem.name, CheckpointNotFoundError("no longer a valid checkpoint"))
        meta, sidecar = found
        if meta.format_version != LEGACY_SINGLE_FILE_VERSION:
            return _current(meta.name, meta.format_version)
        try:
            tensors = read_weights(
                meta.weights_path, size=meta.weights_size, digest=meta.weights_digest, recheck=True
            )
            check_listed(tensors, sidecar["tensors"], meta.weights_path)
        except KeiseiFnError as exc:  # corrupt: never given fresh digests
            return _skipped(meta.name, exc, meta.format_version)
        if dry_run:
            return Migration(
                name=meta.name,
                status="would migrate",
                from_version=meta.format_version,
                to_version=FORMAT_VERSION,
            )
        payload = fresh_payload(stem, WEIGHTS_SUFFIX)
        try:
            written = write_weights(tensors, payload)
            new = migrated_sidecar(
                sidecar,
                weights_file=payload.name,
                weights_size=written.size,
                weights_digest=written.digest,
                tensor_digests=written.tensor_digests,
            )
        except BaseException:
            remove_payload(payload)
            raise
        commit(stem, new, payload=payload, replaced=meta)
    return Migration(
        name=meta.name,
        status="migrated",
        from_version=meta.format_version,
        to_version=FORMAT_VERSION,
    )
