"""Importing the original Keisei's pickled ``.pth`` checkpoints, once, without running them.

:func:`import_legacy` reads a ``.pth`` with ``torch.load(..., weights_only=True)``, whose
unpickler builds only tensors, plain containers and numbers; on top of torch's own allowlist it
admits NumPy *scalars* (old metric histories hold NumPy floats) and nothing else. NumPy arrays
are refused: Keisei's histories are lists of scalars, and admitting ``ndarray`` reconstruction
would hand NumPy's C-level ``__setstate__`` arbitrary buffers and dtypes for no benefit. A file
that needs anything more is refused with :class:`UnsupportedFormatError` naming what it wanted;
nothing in the file ever runs. Zip-format files have every member's CRC-32 checked first
(``torch.load`` does not check them: a flipped bit would otherwise be imported silently); torch's
pre-1.6 non-zip format has no checksums, so damage there is caught only where it breaks the
pickle or the checks below.

The content becomes a :class:`TrainState` saved with the store (``save_state`` or
``save_final_model``): model weights under canonical keys (``_orig_mod.``/``module.`` stripped),
the Adam state as it was, the scheduler state, step, episodes and game results; every other
top-level entry (``elo_state``, ``metrics_history``, ``lr_schedule_type``,
``lr_schedule_step_on``, ...) goes to ``extra`` as plain Python values. The original never saved
RNG or GradScaler states, so the import has none: a resume from it is not bit-exact in sampling.

Naming rule (the file's stem decides, unless ``kind`` is given):

==========================================  ===============================================
legacy file                                 imported as
==========================================  ===============================================
``final_model.pth``                         ``final_model.*`` (weights only)
``<prefix>_ts<N>.pth``: ``checkpoint_ts``,  periodic ``<prefix>_ts<step>``; only
``initial_eval_checkpoint_ts``, ...         ``checkpoint_ts`` is a resume point, so an
                                            initial-eval checkpoint never becomes "latest"
anything else                               periodic ``checkpoint_ts<step>`` (a resume point)
==========================================  ===============================================

The step is always the file's ``global_timestep`` (the ``N`` of the name only when the file has
none); a name that disagrees with the content is logged as a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar  # type: ignore[no-redef]

from keisei_fn.capture import optimizer_problems
from keisei_fn.errors import (
    AlreadyConvertedError,
    CheckpointNotFoundError,
    IntegrityError,
    SpecError,
    StateMismatchError,
    UnsupportedFormatError,
)
from keisei_fn.features import FEATURE_SPECS
from keisei_fn.meta import KINDS, CheckpointMeta
from keisei_fn.nets import build_model, canonical_state_dict
from keisei_fn.paths import PathArg
from keisei_fn.spec import ModelSpec
from keisei_fn.state import GameStats, TrainState, layout_problems
from keisei_fn.store.checkpoints import save_final_model, save_state
from keisei_fn.store.names import FINAL_MODEL, RESUME_PREFIX
from keisei_fn.store.sniff import HEAD_BYTES, FileKind, identify_bytes

__all__ = ["import_legacy"]

log = logging.getLogger("keisei_fn.store")

#: What ``torch.load`` may build beyond its defaults: NumPy scalars of bool, int and float kinds.
#: The scalar reconstructor is listed under its NumPy 1 and NumPy 2 module paths (pickles name
#: the one of the NumPy that wrote them); a dtype's class is what the unpickler's BUILD checks.
_NUMPY_SCALAR_GLOBALS: list[Any] = [
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *dict.fromkeys(type(np.dtype(code)) for code in "?bhilqBHILQefd"),
]

#: Keisei's step-named files: ``checkpoint_ts10240``, ``initial_eval_checkpoint_ts0``.
_TS_NAME = re.compile(r"(?P<prefix>[A-Za-z_]*_ts)(?P<step>\d+)")
#: Names in torch's refusal messages: ``GLOBAL io.open was not...``, ``but got <class 'x.Y'>``.
_REFUSED_NAME = re.compile(r"(?:GLOBAL |but got <class ')([\w.]+)")
#: Top-level entries that become TrainState fields; every other entry goes to ``extra``.
_STATE_ENTRIES = frozenset(
    {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "global_timestep",
     "total_episodes_completed", "black_wins", "white_wins", "draws"}
)  # fmt: skip


def import_legacy(
    pth_path: str | os.PathLike[str],
    run_dir: PathArg,
    *,
    spec: ModelSpec | None = None,
    kind: str | None = None,
) -> CheckpointMeta:
    """Convert an original Keisei ``.pth`` checkpoint into a checkpoint in ``run_dir``.

    The file is loaded with ``torch.load(weights_only=True)`` (NumPy scalars allowed, nothing
    else added), checked against the architecture, and saved with the store; see the module
    docstring for the naming rule. Nothing is written unless every check passes; re-importing
    the same file returns the existing checkpoint.

    Args:
        pth_path: the legacy file (``checkpoint_ts{N}.pth``, ``final_model.pth``, ...), local.
        run_dir: the run directory to save into (created if missing; local or a URL).
        spec: the architecture the file was trained with; inferred from the weights' shapes
            when None (a ResNet tower: ``stem``, ``res_blocks.{i}``, SE, heads).
        kind: force ``"periodic"``, ``"final"`` or ``"final_model"`` instead of deciding by
            the file name.

    Returns:
        The meta of the saved checkpoint.

    Raises:
        CheckpointNotFoundError: ``pth_path`` does not exist (or is a directory).
        IntegrityError: the file is empty, truncated, fails a CRC check, or is not a
            recognisable file at all (its first bytes are named).
        AlreadyConvertedError: the file is a keisei_fn checkpoint's sidecar or weights file:
            it needs no conversion (load it directly).
        UnsupportedFormatError: the file is of another known kind (a foreign safetensors or JSON
            file, a zip archive that is not torch.save's), the pickle needs objects beyond
            tensors, containers, numbers and NumPy scalars (they are named, and never built),
            or the content is not a Keisei checkpoint (no ``model_state_dict``, a malformed
            optimizer state, non-int counters).
        StateMismatchError: the weights (or the Adam state) do not fit ``spec`` (or the
            inferred spec): missing and unexpected keys, other shapes and dtypes (a line per
            kind: how many, the first few named), and the optimizer's differences.
        SpecError: the spec cannot be inferred, ``kind`` is unknown, or the step is 0 for a
            periodic/final checkpoint (import it with ``kind="final_model"``).
        CheckpointExistsError: ``run_dir`` holds a different checkpoint at that step (or a
            different final model, for ``kind="final_model"``).

    Example:
        >>> import tempfile, torch
        >>> from keisei_fn import build_model, load_model
        >>> net = build_model(ModelSpec(tower_depth=1, tower_width=8, num_actions=10), seed=0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"model_state_dict": net.state_dict(), "global_timestep": 4096},
        ...                f"{tmp}/checkpoint_ts4096.pth")
        ...     meta = import_legacy(f"{tmp}/checkpoint_ts4096.pth", f"{tmp}/run")
        ...     model, _ = load_model(f"{tmp}/run")
        >>> meta.name, meta.spec.tower_width, meta.spec.se_ratio
        ('checkpoint_ts4096', 8, 0.25)
    """
    path = Path(pth_path)
    if kind is not None and kind not in KINDS:
        raise SpecError(f"import_legacy kind must be None or one of {KINDS}, got {kind!r}")
    content = _plain(_load_pickle(path))
    if not isinstance(content, dict) or not isinstance(content.get("model_state_dict"), dict):
        found = sorted(map(str, content))[:10] if isinstance(content, dict) else type(content)
        raise UnsupportedFormatError(
            f"{path}: not a Keisei checkpoint: expected a dict with a 'model_state_dict' "
            f"(and 'optimizer_state_dict', 'global_timestep', ...), found {found}. A bare "
            "state_dict can be wrapped first: torch.save({'model_state_dict': sd}, path)"
        )
    weights = _weights(content["model_state_dict"], path)
    optimizer = _optimizer(content.get("optimizer_state_dict"), path)
    name_kind, prefix, name_step = _plan_name(path.stem)
    kind = kind or name_kind
    step = _count(content, "global_timestep", path, default=name_step or 0)
    episodes = _count(content, "total_episodes_completed", path)
    stats = GameStats(
        **{k: _count(content, k, path) for k in ("black_wins", "white_wins", "draws")}
    )
    if step == 0 and kind != "final_model":
        raise SpecError(
            f"{path}: the step (global_timestep) is 0, but a {kind} checkpoint needs step > 0 "
            "(completed timesteps); import it as weights only with kind='final_model'"
        )
    inferred = spec is None
    spec = _infer_spec(weights, path) if spec is None else spec
    _check_fits(spec, weights, optimizer, path, inferred=inferred)

    if name_step is not None and name_step != step:
        log.warning(
            "%s: the name says step %d but global_timestep is %d; using %d (the file's content)",
            path, name_step, step, step,
        )  # fmt: skip
    state = TrainState(
        spec=spec,
        step=step,
        episodes=episodes,
        stats=stats,
        model=weights,
        optimizer=optimizer,
        scheduler=content.get("scheduler_state_dict"),
        extra={k: v for k, v in content.items() if k not in _STATE_ENTRIES},
    )
    if kind == "final_model":
        meta = save_final_model(state, run_dir, overwrite=False)
    else:
        meta = save_state(state, run_dir, kind=kind, prefix=prefix)
    log.info("imported legacy checkpoint %s as %s (%s)", path, meta.path, meta.kind)
    return meta


def _load_pickle(path: Path) -> Any:
    """``torch.load`` the file with the weights-only unpickler; failures become typed errors."""
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "missing"
        raise CheckpointNotFoundError(
            f"no legacy checkpoint file at {path} ({what}); check the path"
        )
    with open(path, "rb") as file:
        found = identify_bytes(file.read(HEAD_BYTES))
        if found.kind == "empty":
            raise IntegrityError(f"{path} is empty (0 bytes): the original save never completed")
        if not (found.is_torch or found.is_zip):
            raise _not_torch(path, found)
        is_zip = found.is_zip
        if is_zip:
            _check_zip(file, path)
        file.seek(0)
        # A file object, not the path: torch.load would hand a "*.safetensors" path to another
        # loader, and mmap (which a global torch config can switch on) needs a path.
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            try:
                return torch.load(file, map_location="cpu", weights_only=True, mmap=False)
            except pickle.UnpicklingError as exc:
                raise _refusal(path, file, is_zip, exc) from exc
            except (OSError, MemoryError):
                raise  # the disk or the machine, not the file's content
            except Exception as exc:
                # Only torch's and NumPy's builders ran; whatever they raise on these bytes
                # (EOFError, RuntimeError, TypeError, LookupError, struct.error, a failed
                # assert, ...) means they do not describe a checkpoint.
                raise IntegrityError(
                    f"{path}: not a readable torch.save file, truncated or corrupt "
                    f"({type(exc).__name__}: {exc})"
                ) from exc


def _not_torch(path: Path, found: FileKind) -> UnsupportedFormatError | IntegrityError:
    """The error for a file that is not a ``torch.save`` file, by what it is."""
    what = f"{path} is {found.description}"
    if found.is_ours:
        return AlreadyConvertedError(
            f"{what}: it needs no conversion. Load it directly: keisei_fn.load_state("
            f"{str(path)!r}) or keisei_fn.load_model(...), or `keisei-fn info {path}`"
        )
    if found.kind == "unknown":  # a damaged torch.save file, perhaps
        return IntegrityError(f"{what}: not a torch.save file, or a corrupt one")
    return UnsupportedFormatError(
        f"{what}: import_legacy converts torch.save files (Keisei's .pth checkpoints) only"
    )


def _check_zip(file: IO[bytes], path: Path) -> None:
    """Check a zip-format file's structure and every member's CRC-32.

    ``zipfile`` reports damage in many ways: BadZipFile, EOFError, ValueError (a mangled name),
    NotImplementedError (a mangled version or method), RuntimeError (a mangled "encrypted" flag)
    and OSError EINVAL (a seek to a mangled offset).
    """
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            compressed = [i.filename for i in archive.infolist() if i.compress_type]
            damaged = archive.testzip() if not compressed else None
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise IntegrityError(f"{path}: damaged zip archive, truncated or corrupt ({exc})") from exc
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise IntegrityError(f"{path}: damaged zip archive, truncated or corrupt ({exc})") from exc
    if compressed:
        raise IntegrityError(
            f"{path}: members {compressed} are compressed, but torch.save stores members "
            "uncompressed: the file is corrupt or was not written by torch.save"
        )
    if damaged is not None:
        raise IntegrityError(f"{path}: CRC mismatch in {damaged!r}: the file is corrupt")


def _refusal(
    path: Path, file: IO[bytes], is_zip: bool, exc: pickle.UnpicklingError
) -> UnsupportedFormatError | IntegrityError:
    """The error for a weights-only refusal: the objects it would not build, or corruption."""
    reason = str(exc.__context__ or exc)  # torch re-raises "from None" with a long preamble
    names = set(_REFUSED_NAME.findall(reason))
    if is_zip:  # every GLOBAL the pickle names, not just the first one refused
        file.seek(0)
        with contextlib.suppress(pickle.UnpicklingError, EOFError, ValueError):
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    if not names:
        return IntegrityError(f"{path}: not a valid torch.save pickle ({reason})")
    return UnsupportedFormatError(
        f"{path}: refused to unpickle {', '.join(sorted(names))}: a legacy checkpoint may hold "
        "only tensors, plain containers, numbers, strings and NumPy scalars, and nothing in the "
        "file was run. If you made this file and trust it, re-save it with those objects "
        "replaced by plain values, then import it again"
    )


def _plain(value: Any) -> Any:
    """NumPy scalars → Python numbers, dict subclasses → dicts, recursively; tensors kept."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _weights(state_dict: dict[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    bad = [
        repr(k) for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)
    ]
    if bad:
        raise UnsupportedFormatError(
            f"{path}: 'model_state_dict' must map str keys to tensors; offending keys: "
            f"{', '.join(bad[:10])}"
        )
    return {k: v.detach() for k, v in canonical_state_dict(state_dict).items()}


def _optimizer(value: Any, path: Path) -> dict[str, Any] | None:
    """The optimizer's state_dict as it was, after a structural check (None when absent)."""
    if value is None:
        return None
    state = value.get("state") if isinstance(value, dict) else None
    groups = value.get("param_groups") if isinstance(value, dict) else None
    well_formed = (
        isinstance(state, dict)
        and all(isinstance(k, int) and isinstance(v, dict) for k, v in state.items())
        and isinstance(groups, list)
        and all(
            isinstance(g, dict)
            and isinstance(g.get("params"), list)
            and all(isinstance(i, int) for i in g["params"])
            for g in groups
        )
    )
    if not well_formed:
        raise UnsupportedFormatError(
            f"{path}: 'optimizer_state_dict' is not an optimizer state_dict: expected "
            "{'state': {int: {...}}, 'param_groups': [{'params': [int, ...], ...}, ...]}"
        )
    return dict(value)


def _infer_spec(weights: Mapping[str, torch.Tensor], path: Path) -> ModelSpec:
    """The ResNet-tower spec whose network has these weights' shapes.

    The model type is always ``"resnet"``: Keisei's test types build the same tower and the
    weights cannot tell them apart. ``se_ratio`` is ``h / W`` (nudged up by an ulp when
    ``int(W * h / W)`` rounds below ``h``), which builds the same SE as the original ratio.
    """
    stem, policy = weights.get("stem.weight"), weights.get("policy_head.4.weight")
    if stem is None or stem.dim() != 4 or policy is None or policy.dim() != 2:
        raise SpecError(
            f"{path}: cannot infer the ModelSpec: no 4-d 'stem.weight' and 2-d "
            "'policy_head.4.weight' (not a Keisei ActorCriticResTower); pass spec=..."
        )
    width, planes = int(stem.shape[0]), int(stem.shape[1])
    features = sorted(n for n, f in FEATURE_SPECS.items() if f.num_planes == planes)
    if "core46" in features:
        features = ["core46"]
    if len(features) != 1:
        raise SpecError(
            f"{path}: cannot infer input_features: the stem takes {planes} planes and the "
            f"feature sets with that many are {features or 'none'}; pass spec=... (or register "
            "the feature set with keisei_fn.register_feature_set)"
        )
    blocks = {k.split(".")[1] for k in weights if k.startswith("res_blocks.")}
    se = weights.get("res_blocks.0.se.fc1.weight")
    se_ratio = 0.0
    if se is not None:
        hidden = int(se.shape[0])
        se_ratio = hidden / width
        while max(1, int(width * se_ratio)) < hidden:  # h / W * W can round below h
            se_ratio = math.nextafter(se_ratio, math.inf)
    return ModelSpec(
        model_type="resnet",
        input_features=features[0],
        tower_depth=len(blocks),
        tower_width=width,
        se_ratio=se_ratio,
        num_actions=int(policy.shape[0]),
    )


def _check_fits(
    spec: ModelSpec,
    weights: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any] | None,
    path: Path,
    *,
    inferred: bool,
) -> None:
    """Compare the weights (and Adam state) with ``spec``'s network, built on the meta device."""
    model = build_model(spec, device="meta")
    problems = layout_problems(weights, model.state_dict(), found_name="the checkpoint")
    if optimizer is not None:
        problems += optimizer_problems(optimizer, torch.optim.Adam(model.parameters()))
    if problems:
        hint = (
            "the file is not the network inferred from its shapes; pass spec=..."
            if inferred
            else "pass the spec the run was trained with, or spec=None to infer it"
        )
        raise StateMismatchError.listing(
            f"{path}: the checkpoint does not fit {'the inferred ' if inferred else ''}{spec} "
            f"({hint})",
            problems,
        )


def _plan_name(stem: str) -> tuple[str, str, int | None]:
    """``(kind, prefix, step in the name)`` for a legacy file's stem (the naming rule)."""
    if stem == FINAL_MODEL:
        return "final_model", RESUME_PREFIX, None
    match = _TS_NAME.fullmatch(stem)
    if match is None:
        return "periodic", RESUME_PREFIX, None
    return "periodic", match["prefix"], int(match["step"])


def _count(content: Mapping[str, Any], key: str, path: Path, *, default: int = 0) -> int:
    value = content.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedFormatError(
            f"{path}: {key!r} must be an int >= 0, found {value!r} ({type(value).__name__})"
        )
    return value
