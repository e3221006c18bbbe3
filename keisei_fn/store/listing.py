"""Reading a run directory: which checkpoints are *listed*-valid, which are not, and why.

Validity has two levels (design.md). *Listed*: the sidecar parses, verifies its own digest, has
a known format version, matches its file name and step, and the weights file exists with the
recorded size — cheap, used to list and to choose "latest". *Verified*: the weights digest
matches — checked on load. Anything else is incomplete: never loaded, never latest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from keisei_fn.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IntegrityError,
    KeiseiFnError,
    SpecError,
    UnsupportedFormatError,
)
from keisei_fn.meta import CheckpointMeta, check_sidecar
from keisei_fn.store._fs import (
    PathArg,
    RunPath,
    file_exists,
    file_size,
    is_temp_name,
    list_file_names,
    read_bounded,
    run_path,
)
from keisei_fn.store.names import (
    RESUME_PREFIX,
    SIDECAR_SUFFIX,
    WEIGHTS_SUFFIX,
    parse_stem,
    sidecar_path,
    split_file,
    weights_path,
)

log = logging.getLogger("keisei_fn.store")

#: Sidecars larger than this are refused unread (bounded memory on absurd files).
MAX_SIDECAR_BYTES = 256 * 1024 * 1024

KIND_ORDER = {"periodic": 0, "final": 1, "final_model": 2}


def read_listed(stem: RunPath) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Check a checkpoint at the *listed* level and return its meta and parsed sidecar.

    Raises:
        CheckpointNotFoundError: neither file exists.
        IncompleteCheckpointError: one of the pair is missing.
        IntegrityError: the sidecar is corrupt, edited, mismatched, or the weights' size differs.
        UnsupportedFormatError: a newer or foreign format.
    """
    sidecar_file, weights_file = sidecar_path(stem), weights_path(stem)
    try:
        raw = read_bounded(sidecar_file, limit=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        if file_exists(weights_file):
            raise IncompleteCheckpointError(
                f"{weights_file}: no sidecar {sidecar_file.name}; the save never committed"
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint {stem} (.safetensors/.json)") from None
    except IsADirectoryError as exc:
        raise IntegrityError(f"{sidecar_file} is a directory") from exc
    sidecar = check_sidecar(raw, name=stem.name, where=str(sidecar_file))
    meta = CheckpointMeta.from_sidecar(sidecar, run_dir=stem.parent)
    parsed = parse_stem(stem.name)
    if parsed is not None and parsed.step is not None and parsed.step != meta.step:
        raise IntegrityError(
            f"{sidecar_file}: records step {meta.step}, the name says {parsed.step}"
        )
    try:
        size = file_size(weights_file)
    except (FileNotFoundError, IsADirectoryError):
        raise IncompleteCheckpointError(
            f"{sidecar_file}: its weights file {weights_file.name} is missing"
        ) from None
    if size != meta.weights_size:
        raise IntegrityError(
            f"{weights_file}: size is {size} bytes, the sidecar records {meta.weights_size}"
        )
    return meta, sidecar


@dataclass(frozen=True, slots=True)
class RunDirScan:
    """Everything found in a run directory.

    Attributes:
        valid: listed-valid checkpoints, sorted by (step, kind, name).
        invalid: (path, error) for checkpoints that fail the listed check.
        leftovers: files that can never become valid: temp files, weights without a sidecar.
        unreadable: (path, error) for checkpoints that may be fine but cannot be read here (a
            newer format version, an unregistered model type): never pruned.
    """

    valid: list[CheckpointMeta]
    invalid: list[tuple[RunPath, KeiseiFnError]]
    leftovers: list[RunPath]
    unreadable: list[tuple[RunPath, KeiseiFnError]]


def _file_names(run_dir: RunPath) -> list[str]:
    try:
        return list_file_names(run_dir)
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{run_dir} is not a directory") from None


def scan_run_dir(run_dir: PathArg) -> RunDirScan:
    """Classify every checkpoint file of ``run_dir`` (a missing directory is empty).

    Raises:
        CheckpointNotFoundError: when ``run_dir`` is a file.
    """
    run_dir = run_path(run_dir)
    stems: dict[str, set[str]] = {}
    leftovers = []
    for name in _file_names(run_dir):
        if is_temp_name(name):
            leftovers.append(run_dir / name)
        elif (split := split_file(name)) is not None:
            stems.setdefault(split[0], set()).add(split[1])
    valid: list[CheckpointMeta] = []
    invalid: list[tuple[RunPath, KeiseiFnError]] = []
    unreadable: list[tuple[RunPath, KeiseiFnError]] = []
    for stem, suffixes in sorted(stems.items()):
        if SIDECAR_SUFFIX not in suffixes:
            leftovers.append(run_dir / (stem + WEIGHTS_SUFFIX))
            continue
        try:
            valid.append(read_listed(run_dir / stem)[0])
        except (UnsupportedFormatError, SpecError) as exc:
            unreadable.append((run_dir / stem, exc))
        except (IntegrityError, IncompleteCheckpointError) as exc:
            invalid.append((run_dir / stem, exc))
    valid.sort(key=lambda m: (m.step, KIND_ORDER[m.kind], m.name))
    return RunDirScan(valid, invalid, sorted(leftovers, key=str), unreadable)


def resume_candidates(run_dir: RunPath, prefix: str = RESUME_PREFIX) -> Iterator[RunPath]:
    """Stems with ``prefix`` that have a sidecar, highest step first — by name only, unchecked.

    One regex over one ``listdir``; paths are built lazily, since "latest" usually needs only
    the first (10,000 checkpoints: ~30 ms).
    """
    sidecar = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(SIDECAR_SUFFIX))
    names = _file_names(run_dir)
    found = sorted(((int(m[1]), m[0]) for m in map(sidecar.fullmatch, names) if m), reverse=True)
    for _, name in found:
        yield run_dir / name[: -len(SIDECAR_SUFFIX)]


def list_checkpoints(run_dir: PathArg) -> list[CheckpointMeta]:
    """Every listed-valid checkpoint of a run directory, sorted by step.

    Periodic checkpoints of every prefix, final checkpoints and the final model are included;
    incomplete and corrupt ones are not (``keisei-fn verify`` names them). A run directory that
    does not exist yet has none.

    Example:
        >>> list_checkpoints("runs/does-not-exist")
        []
    """
    return scan_run_dir(run_dir).valid


def latest_checkpoint(run_dir: PathArg, *, prefix: str = RESUME_PREFIX) -> RunPath | None:
    """The weights path of the highest-step listed-valid resume checkpoint, or None.

    Never by modification time or name order; only ``prefix`` counts (other prefixes such as
    ``initial_eval_checkpoint_ts`` and the final model are not resume points). Only the sidecars
    of the candidates from the top down are read, until one is valid. No side effects.

    Example:
        >>> latest_checkpoint("runs/does-not-exist") is None
        True
    """
    for stem in resume_candidates(run_path(run_dir), prefix):
        try:
            read_listed(stem)
        except (
            IntegrityError,
            IncompleteCheckpointError,
            UnsupportedFormatError,
            SpecError,
        ) as exc:
            log.warning("skipping %s: %s", stem, exc)
            continue
        return weights_path(stem)
    return None
