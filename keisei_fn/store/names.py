"""Checkpoint file names: the sidecar ``<prefix><step>.json`` (or ``final_model.json``), the
weights file it names — ``<stem>.<token>.safetensors`` (a fresh generation per save; format 1
used ``<stem>.safetensors``) — and the shards directories of sharded checkpoints,
``<prefix><step>.<token>.shards``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from keisei_fn.errors import SpecError
from keisei_fn.meta import GENERATION_PATTERN
from keisei_fn.paths import RunPath

NAME_RE = re.compile(r"(?P<prefix>[A-Za-z_]+?)(?P<step>\d+)")
PREFIX_RE = re.compile(r"[A-Za-z_]+")
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
SHARDS_SUFFIX = ".shards"
SHARDS_RE = re.compile(rf"(?P<stem>{NAME_RE.pattern})\.(?P<token>[0-9a-f]+)\.shards")
FINAL_MODEL = "final_model"
GENERATION_RE = re.compile(rf"(?P<stem>{NAME_RE.pattern}|{FINAL_MODEL}){GENERATION_PATTERN}")
#: An export bundle's stem and sidecar in its directory (``keisei_fn.store.bundle``).
BUNDLE_NAME = "bundle"
BUNDLE_SIDECAR = BUNDLE_NAME + SIDECAR_SUFFIX
#: Keisei's periodic checkpoints: the only prefix that counts as a resume point by default.
RESUME_PREFIX = "checkpoint_ts"


@dataclass(frozen=True, slots=True)
class ParsedName:
    """A checkpoint stem split into prefix and step (step None for ``final_model``)."""

    stem: str
    prefix: str
    step: int | None


def parse_stem(stem: str) -> ParsedName | None:
    """Split a file stem by the name grammar; None when it is not a checkpoint name."""
    if stem == FINAL_MODEL:
        return ParsedName(stem, FINAL_MODEL, None)
    match = NAME_RE.fullmatch(stem)
    if match is None:
        return None
    return ParsedName(stem, match["prefix"], int(match["step"]))


def split_file(name: str) -> tuple[str, str] | None:
    """``(stem, suffix)`` of a checkpoint file name — a sidecar, a format-1 weights file or a
    generation-named one (suffix ``.safetensors``) — else None.

    Example:
        >>> split_file("checkpoint_ts10.json"), split_file("final_model.0a1b2c3d.safetensors")
        (('checkpoint_ts10', '.json'), ('final_model', '.safetensors'))
    """
    if (stem := generation_stem(name)) is not None:
        return stem, WEIGHTS_SUFFIX
    for suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX):
        if name.endswith(suffix) and parse_stem(name[: -len(suffix)]) is not None:
            return name[: -len(suffix)], suffix
    return None


def shards_stem(name: str) -> str | None:
    """The checkpoint stem a shards directory name belongs to, else None.

    Example:
        >>> shards_stem("checkpoint_ts10.9f2c.shards"), shards_stem("checkpoint_ts10.json")
        ('checkpoint_ts10', None)
    """
    match = SHARDS_RE.fullmatch(name)
    return match["stem"] if match is not None else None


def generation_stem(name: str) -> str | None:
    """The checkpoint stem a generation-named weights file belongs to, else None.

    Example:
        >>> generation_stem("checkpoint_ts10.9f2c4d0a1b2c3d4e.safetensors")
        'checkpoint_ts10'
        >>> generation_stem("checkpoint_ts10.json") is None
        True
    """
    match = GENERATION_RE.fullmatch(name)
    return match["stem"] if match is not None else None


def checkpoint_stem(prefix: str, step: int) -> str:
    """``f"{prefix}{step}"`` after checking the prefix fits the grammar.

    Raises:
        SpecError: for a prefix with characters other than ASCII letters and underscores.
    """
    if not PREFIX_RE.fullmatch(prefix):
        raise SpecError(f"checkpoint prefix must match [A-Za-z_]+, got {prefix!r}")
    return f"{prefix}{step}"


def sidecar_path(stem: RunPath) -> RunPath:
    """``stem`` + ``.json``."""
    return stem.parent / (stem.name + SIDECAR_SUFFIX)
