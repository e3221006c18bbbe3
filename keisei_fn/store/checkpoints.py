"""Saving, loading and verifying checkpoints: the store's edge to the file system.

A checkpoint is a pair in a run directory: ``<name>.json`` (the sidecar, written last: the
commit point) and the weights file it names, ``<name>.<token>.safetensors`` (every tensor).
See ``keisei_fn.store.commit`` for how a save commits, ``keisei_fn.meta`` for the sidecar and
``keisei_fn.store.listing`` for the two levels of validity.

Example:
    >>> import tempfile, torch
    >>> from keisei_fn import ModelSpec, build_model, capture, save_state, load_state
    >>> spec = ModelSpec(model_type="testmodel")
    >>> model = build_model(spec, seed=0)
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     meta = save_state(capture(spec, model, step=2048), run_dir)
    ...     state = load_state(run_dir)
    >>> meta.name, state.step
    ('checkpoint_ts2048', 2048)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from keisei_fn.capture import restore_
from keisei_fn.codec import (
    STATE_PARTS,
    EncodedState,
    check_parts,
    decode_state,
    dumps,
    encode_state,
    loads,
    only_parts,
    stored_names,
)
from keisei_fn.distributed import on_rank_zero
from keisei_fn.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    SpecError,
)
from keisei_fn.health import HealthProblem
from keisei_fn.meta import FORMAT_VERSION, CheckpointMeta, build_sidecar
from keisei_fn.nets import build_model, set_compute_dtype_
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.staging import copy_to_device
from keisei_fn.state import TrainState, iter_tensors, thaw
from keisei_fn.store._fs import hash_file
from keisei_fn.store.bundle import bundle_stem, load_bundle_model, verify_bundle
from keisei_fn.store.commit import (
    commit,
    existing_checkpoint,
    fresh_payload,
    locked,
    remove_payload,
)
from keisei_fn.store.listing import (
    is_run_dir,
    newest_usable,
    read_listed,
    stable,
    unhealthy_note,
)
from keisei_fn.store.locate import resolve_stem, run_dir_checkpoint
from keisei_fn.store.names import (
    FINAL_MODEL,
    RESUME_PREFIX,
    WEIGHTS_SUFFIX,
    checkpoint_stem,
    sidecar_path,
)
from keisei_fn.store.weights import (
    WrittenWeights,
    check_digests,
    check_listed,
    read_tensors,
    read_weights,
    tensor_bytes,
    weights_digest,
    write_weights,
)

__all__ = [
    "load_model",
    "load_state",
    "load_state_with_meta",
    "save_final_model",
    "save_state",
    "verify_checkpoint",
]


def save_state(
    state: TrainState,
    run_dir: PathArg,
    *,
    kind: str = "periodic",
    prefix: str = RESUME_PREFIX,
    overwrite: bool = False,
    health: Sequence[HealthProblem | str] | None = None,
) -> CheckpointMeta:
    """Durably and atomically save a TrainState as ``<prefix><step>.json`` (the sidecar) and the
    weights file it names, ``<prefix><step>.<token>.safetensors``.

    The commit protocol (``keisei_fn.store.commit``): under the run directory's lock, the
    weights go to a fresh file (temp file → fsync → rename → fsync directory; on an object
    store one upload that appears whole or not at all), then the sidecar naming them is
    written the same way — the single commit point — and only then is a replaced
    checkpoint's weights file removed. A crash or I/O error at any instant leaves the previous
    checkpoint or the complete new one, never neither; once this returns, the checkpoint stays
    until it is replaced or pruned. Re-saving an identical state at a committed, valid step
    writes nothing and returns the existing meta; ``kind="final"`` over an identical periodic
    checkpoint rewrites only the sidecar. An incomplete or corrupt checkpoint at that step is
    replaced.
    Under ``torch.distributed`` with several ranks, call it on every rank: rank 0 writes, and
    every rank returns the same meta (or raises the same error) once the checkpoint is
    committed (see ``keisei_fn.distributed``).

    Args:
        state: the snapshot (``state.step`` must be > 0).
        run_dir: the run directory (created if missing): a local path or an fsspec URL such as
            ``s3://bucket/run`` (see ``keisei_fn.store._fs``).
        kind: ``"periodic"`` or ``"final"`` (the last full state of a run).
        prefix: file name prefix (ASCII letters and underscores); only ``checkpoint_ts`` is a
            resume point by default.
        overwrite: replace a *different* valid checkpoint at the same step.
        health: the health mark to record in the sidecar: the problems ``check_health`` found
            (``str`` of each), empty for a healthy state; None records none (not checked).
            ``Checkpointer(health=...)`` and ``AsyncSaver(health=...)`` pass it. An identical
            state re-saved with another mark rewrites only the sidecar.

    Returns:
        The committed checkpoint's meta.

    Raises:
        CheckpointExistsError: a different valid checkpoint exists at this step (also when
            another writer committed it while this one was writing), or one this keisei_fn
            cannot read.
        UnsupportedDtypeError, UnsupportedValueError: the state cannot be stored exactly, or
            would be over a cap on what reading it back may cost (more than ``MAX_TENSORS``
            tensors, a sidecar over ``MAX_SIDECAR_BYTES``): nothing is committed.
        SpecError: for a bad prefix, kind or step.
        OSError: the disk is full or not writable (nothing visible is left behind).
    """
    if kind not in ("periodic", "final"):
        raise SpecError(f"save_state kind must be 'periodic' or 'final', got {kind!r}")
    if state.step <= 0:
        raise SpecError(f"a checkpoint needs step > 0 (completed timesteps), got {state.step}")
    stem = run_path(run_dir) / checkpoint_stem(prefix, state.step)
    return on_rank_zero(
        lambda: _save(
            encode_state(state),
            stem,
            kind=kind,
            overwrite=overwrite,
            health=None if health is None else tuple(str(p) for p in health),
        ),
        others=lambda: read_listed(stem)[0],
    )


def save_final_model(
    state: TrainState, run_dir: PathArg, *, keep_extra: bool = False, overwrite: bool = True
) -> CheckpointMeta:
    """Save the model weights (+ spec, step, episodes, stats) as ``final_model.*``.

    Optimizer, scheduler, scaler, RNG and ``extra`` are left out: this is the artifact to play
    with, not to resume from. An existing final model is replaced atomically: at any instant
    the old one or the new one is there (see :func:`save_state`).

    Args:
        state: the state whose model to save.
        run_dir: the run directory (created if missing).
        keep_extra: keep ``state.extra`` too (e.g. an average's record of its inputs).
        overwrite: replace an existing final model (the end of training does). False: an
            identical one is kept and returned, a different one refused.

    Raises:
        CheckpointExistsError: ``overwrite=False`` and a different final model is there.
        UnsupportedDtypeError: for weights that cannot be stored; OSError on I/O failure.
    """
    extra = state.extra if keep_extra else {}
    weights_only = state.replace(optimizer=None, scheduler=None, scaler=None, rng=None, extra=extra)
    stem = run_path(run_dir) / FINAL_MODEL
    return on_rank_zero(
        lambda: _save(encode_state(weights_only), stem, kind="final_model", overwrite=overwrite),
        others=lambda: read_listed(stem)[0],
    )


def _save(
    encoded: EncodedState,
    stem: RunPath,
    *,
    kind: str,
    overwrite: bool,
    health: tuple[str, ...] | None = None,
) -> CheckpointMeta:
    """Save through the commit protocol (``keisei_fn.store.commit``): under the run directory's
    lock, refuse or reuse what is there, write a fresh weights file, commit its sidecar."""
    header_bytes = dumps(encoded.header)
    header = loads(header_bytes)  # the JSON exactly as it will be read back

    def sidecar_for(payload: RunPath, written: WrittenWeights) -> dict[str, Any]:
        return build_sidecar(
            header,
            name=stem.name,
            kind=kind,
            tensors=encoded.tensors,
            aliases=encoded.aliases,
            weights_file=payload.name,
            weights_size=written.size,
            weights_digest=written.digest,
            tensor_digests=written.tensor_digests,
            health=health,
        )

    with locked(stem.parent):
        existing = existing_checkpoint(stem, overwrite=overwrite)
        if existing is not None:
            old_meta, old = existing
            new = weights_digest(encoded.tensors)
            same = (
                dumps(old["state"]) == header_bytes  # by bytes: 1 == 1.0 == True, 0.0 == -0.0
                and old_meta.weights_digest == new.digest
                and hash_file(old_meta.weights_path) == (new.size, new.digest)
            )
            if same and (kind, old_meta.kind) == ("periodic", "final"):
                kind = "final"  # an identical periodic save does not demote a final checkpoint
            if same and health is None:
                health = old_meta.health  # an unchecked save keeps the recorded mark
            if same and kind == old_meta.kind and health == old_meta.health:
                return old_meta
            if same and old_meta.format_version == FORMAT_VERSION:  # now final, or a new mark
                sidecar = sidecar_for(old_meta.weights_path, new)
                return commit(stem, sidecar, payload=old_meta.weights_path, replaced=old_meta)
            if not same and not overwrite:
                raise CheckpointExistsError(
                    f"{sidecar_path(stem)} already holds a different state at step "
                    f"{old_meta.step}; pass overwrite=True to replace it"
                )
        payload = fresh_payload(stem, WEIGHTS_SUFFIX)
        try:
            sidecar = sidecar_for(payload, write_weights(encoded.tensors, payload))
        except BaseException:
            remove_payload(payload)  # renamed before a failed directory fsync, perhaps
            raise
        replaced = existing[0] if existing is not None else None
        return commit(stem, sidecar, payload=payload, replaced=replaced)


#: What :func:`load_model` reads.
MODEL_ONLY = frozenset({"model"})


def _load_stem(
    stem: RunPath,
    *,
    verify: bool,
    map_location: str | torch.device,
    parts: frozenset[str] = frozenset(STATE_PARTS),
) -> tuple[TrainState, CheckpointMeta]:
    meta, sidecar = read_listed(stem)
    if meta.sharded:  # read in full: its parts are spread over the ranks' files
        from keisei_fn.store.sharded_load import load_full

        state, meta = load_full(stem, verify=verify)
        state = only_parts(state, parts)
    elif parts == set(STATE_PARTS) or (verify and not meta.tensor_digests):
        state = _read_single_file(meta, sidecar, verify=verify, parts=parts)
    else:  # only the tensors the parts need, each checked against its own digest
        state = _read_parts(meta, sidecar, verify=verify, parts=parts)
    if torch.device(map_location).type != "cpu":
        state = _to_device(state, torch.device(map_location))
    return state, meta


def _read_parts(
    meta: CheckpointMeta, sidecar: dict[str, Any], *, verify: bool, parts: frozenset[str]
) -> TrainState:
    """Read only what ``parts`` need of a single-file checkpoint, verified tensor by tensor."""
    names = stored_names(sidecar["tensors"], sidecar["aliases"], parts)
    tensors = read_tensors(
        meta.weights_path,
        names,
        size=meta.weights_size,
        digests=meta.tensor_digests if verify else None,
    )
    check_listed(tensors, {n: sidecar["tensors"][n] for n in names}, meta.weights_path)
    return decode_state(tensors, sidecar["aliases"], sidecar["state"], parts=parts)


def _read_single_file(
    meta: CheckpointMeta,
    sidecar: dict[str, Any],
    *,
    verify: bool,
    each_tensor: bool = False,
    parts: frozenset[str] = frozenset(STATE_PARTS),
) -> TrainState:
    """Read a single-file checkpoint; ``each_tensor``: hash the file even if this process
    verified it before, and check every tensor's own digest."""
    tensors = read_weights(
        meta.weights_path,
        size=meta.weights_size,
        digest=meta.weights_digest if verify else None,
        recheck=each_tensor,
    )
    check_listed(tensors, sidecar["tensors"], meta.weights_path)
    if each_tensor and meta.tensor_digests:  # format 3
        pieces = {name: tensor_bytes(tensor) for name, tensor in tensors.items()}
        check_digests(meta.weights_path, pieces, meta.tensor_digests)
    return decode_state(tensors, sidecar["aliases"], sidecar["state"], parts=parts)


def _to_device(state: TrainState, device: torch.device) -> TrainState:
    """Move model and optimizer tensors through page-locked staging (``copy_to_device``);
    tensors shared before stay shared (RNG stays on CPU)."""
    distinct = {
        id(tensor): tensor
        for part in (state.model, state.optimizer)
        for _, tensor in iter_tensors(part)
    }
    moved = dict(zip(distinct, copy_to_device(list(distinct.values()), device), strict=True))
    return state.replace(
        model=thaw(state.model, on_tensor=lambda t: moved[id(t)]),
        optimizer=thaw(state.optimizer, on_tensor=lambda t: moved[id(t)]),
    )


def load_state_with_meta(
    source: PathArg,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    prefix: str = RESUME_PREFIX,
    parts: Collection[str] = STATE_PARTS,
    include_unhealthy: bool = False,
) -> tuple[TrainState, CheckpointMeta]:
    """Like :func:`load_state`, also returning the meta of the checkpoint that was loaded."""
    path = run_path(source)
    load = partial(_load_stem, verify=verify, map_location=map_location, parts=check_parts(parts))
    if not is_run_dir(path):
        return stable(resolve_stem(path), load)
    found = newest_usable(path, load, prefix=prefix, healthy_only=not include_unhealthy)
    if found is None:
        note = "" if include_unhealthy else unhealthy_note(path, prefix)
        raise CheckpointNotFoundError(f"no valid {prefix}* checkpoint in {path}{note}")
    return found


def load_state(
    source: PathArg,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    prefix: str = RESUME_PREFIX,
    parts: Collection[str] = STATE_PARTS,
    include_unhealthy: bool = False,
) -> TrainState:
    """Load a checkpoint as a TrainState, bit-exact (same dtypes, shapes and bytes).

    Args:
        source: either file of the pair, their common stem, or a run directory (its latest
            valid checkpoint, falling back past a corrupt newest one with a warning); local
            or an fsspec URL such as ``s3://bucket/run``. A sharded checkpoint (FSDP, see
            ``keisei_fn.store.sharded``) loads as one full state, whatever its world size.
        map_location: device for model and optimizer tensors (RNG states stay on the CPU).
        verify: check the weights digest (BLAKE3 of the memory-mapped file on all cores: most
            of the load time; ``verify=False`` maps the file lazily). A local file this
            process verified before, unchanged since (same inode, size and times), is not
            hashed again (see ``keisei_fn.store.weights.read_weights``; ``verify_checkpoint``
            always hashes). Loaded tensors are copy-on-write views of a local file, which the
            store never writes over in place (a remote file is downloaded into memory).
        prefix: the resume prefix, when ``source`` is a run directory.
        parts: which of ``"model"``, ``"optimizer"``, ``"scheduler"``, ``"scaler"``, ``"rng"``,
            ``"extra"`` to load (default: all); the others are None (an empty model and
            extra). Loading some parts of a format-3 checkpoint reads only the file's header
            and the bytes of their tensors (ranged reads on an object store), each verified
            against its own digest in the sidecar; older formats and sharded checkpoints are
            read (and verified) in full.
        include_unhealthy: when ``source`` is a run directory, also consider checkpoints the
            health gate marked unhealthy (``keisei_fn.health``); by default they are skipped
            with a warning. An explicit checkpoint path loads whatever its mark.

    Returns:
        The snapshot; a final model loads without optimizer.

    Raises:
        CheckpointNotFoundError: nothing there (or no valid checkpoint in the directory, or
            none that is healthy: the message names the unhealthy ones).
        IntegrityError: a corrupt file, naming it.
        IncompleteCheckpointError: a save that never committed.
        UnsupportedFormatError: a ``torch.save`` file, whatever its name (use
            ``import_legacy``), another file that is not a checkpoint's (the message says what
            its first bytes are), or a newer format.
        SpecError: for an unknown part name.
    """
    return load_state_with_meta(
        source,
        map_location=map_location,
        verify=verify,
        prefix=prefix,
        parts=parts,
        include_unhealthy=include_unhealthy,
    )[0]


def load_model(
    source: PathArg,
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """Build the network a checkpoint records and load its weights — the notebook entry point.

    Args:
        source: a checkpoint, a final model, a run directory (its final model if there is
            a valid one, else its latest healthy checkpoint; the returned meta says which), or
            an export bundle (its directory, see ``keisei_fn.export_model``).
        device: where to build the model; the verified weights go straight to it (on CUDA
            through page-locked staging, see ``restore_``), with no copy of the model on the
            CPU.
        compute_dtype: the floating dtype the model computes in. None: float32 — a
            ``bfloat16``/``float16`` bundle is upcast on load (exactly), an ``int8`` one
            dequantised. ``torch.bfloat16`` or ``torch.float16``: parameters in that dtype,
            inputs cast to it and outputs back to float32
            (``keisei_fn.nets.set_compute_dtype_``).

    Only the model's tensors are read (and verified, each against its own digest) from a
    format-3 checkpoint, not its optimizer state. A bundle's weights file is verified whole;
    its meta is a ``final_model`` named ``bundle`` at the source's step, whose ``extra``
    holds ``"bundle"``: the dtype and the export record (source, sizes, gate figures).

    Returns:
        ``(model in eval mode, meta)``.

    Raises:
        SpecError: the checkpoint holds an arbitrary model (no spec): use ``load_state``.
        and every error of :func:`load_state`.
    """
    path = run_path(source)
    if (bundle := bundle_stem(path)) is not None:
        load_bundle = partial(load_bundle_model, device=device, compute_dtype=compute_dtype)
        bundle_model, bundle_meta = stable(bundle, load_bundle)
        return bundle_model, bundle_meta.as_checkpoint_meta()
    load = partial(_load_stem, verify=True, map_location="cpu", parts=MODEL_ONLY)
    if is_run_dir(path):
        state, meta = run_dir_checkpoint(path, load)
    else:
        state, meta = load_state_with_meta(path, parts=MODEL_ONLY)
    if state.spec is None:
        raise SpecError(
            f"{meta.path}: the checkpoint holds an arbitrary model without a ModelSpec; "
            "build your model and use load_state + restore_"
        )
    model = build_model(state.spec, device=device)
    restore_(state, model, rng=False)
    model.eval()
    if compute_dtype is not None and compute_dtype != torch.float32:
        set_compute_dtype_(model, compute_dtype)
    return model, meta


def verify_checkpoint(path: PathArg) -> CheckpointMeta:
    """Fully verify one checkpoint: sidecar, weights size and digest, header consistency, and
    (format 3) every tensor's own digest — or an export bundle (also its ONNX file's digest;
    the meta as :func:`load_model` gives it).

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError,
        UnsupportedFormatError: naming the file and the problem.

    Example:
        >>> verify_checkpoint("runs/none/checkpoint_ts1")
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none/checkpoint_ts1
    """
    if (bundle := bundle_stem(path)) is not None:
        return verify_bundle(bundle).as_checkpoint_meta()
    stem = resolve_stem(path)
    meta, sidecar = read_listed(stem)
    if meta.sharded:  # every file's digest and the shards' layout, not loaded
        from keisei_fn.store.sharded_check import verify_sharded

        return verify_sharded(stem)
    _read_single_file(meta, sidecar, verify=True, each_tensor=True)
    return meta
