"""Will a checkpoint load into this network? ``check_compatible`` answers from the sidecar alone.

The sidecar records every stored tensor's dtype and shape and the model's ``state_dict`` keys,
so the answer needs no tensor read: the network's expected ``state_dict`` is built on the
``meta`` device (no memory) from a :class:`ModelSpec`, or read off a live model, and compared
key by key, with the comparison ``restore_`` makes (``keisei_fn.state.layout_problems``). The
problems are short sentences that summarise (one per kind of difference, naming the first few
keys), so a width change over a whole tower reads as one line, not 170.

Example:
    >>> import tempfile
    >>> from keisei_fn import ModelSpec, build_model, capture, save_state
    >>> spec = ModelSpec(model_type="testmodel")
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     meta = save_state(capture(spec, build_model(spec, seed=0), step=1), run_dir)
    ...     ok = check_compatible(meta, spec)
    ...     problems = check_compatible(run_dir, ModelSpec(tower_depth=1, tower_width=8))
    >>> ok
    ()
    >>> print(problems[0])
    spec differs: model_type 'testmodel' vs 'resnet', tower_width 16 vs 8, se_ratio 0.0 vs 0.25
"""

from __future__ import annotations

from torch import nn

from keisei_fn.codec import stored_layout, tensor_name
from keisei_fn.meta import CheckpointMeta
from keisei_fn.nets import build_model, unwrap_model
from keisei_fn.paths import PathArg
from keisei_fn.spec import ModelSpec, describe_spec_differences
from keisei_fn.state import Layout, layout_problems
from keisei_fn.store.listing import read_listed
from keisei_fn.store.locate import resolve_checkpoint

__all__ = ["check_compatible"]


def check_compatible(
    source: PathArg | CheckpointMeta, spec_or_model: ModelSpec | nn.Module
) -> tuple[str, ...]:
    """Every reason the checkpoint's model would not ``restore_`` into a network, read from its
    sidecar only (no tensor is loaded).

    Args:
        source: a checkpoint (either file of the pair or their stem), a run directory (its
            final model, else its latest checkpoint, as ``load_model`` picks), or its
            :class:`CheckpointMeta`.
        spec_or_model: the network: a spec (built on the ``meta`` device with float32
            weights, as ``build_model`` builds it) or a live model (its own keys, shapes and
            dtypes; wrappers stripped).

    Returns:
        The problems, empty when ``restore_(state, model)`` would accept the checkpoint's model:
        the spec difference first (when a spec was given and the checkpoint records one), then
        one line each for missing keys, unexpected keys, other shapes and other dtypes.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, IntegrityError,
        UnsupportedFormatError: as ``load_state`` for the checkpoint's sidecar.

    Example:
        >>> check_compatible("runs/none", ModelSpec())
        Traceback (most recent call last):
        ...
        keisei_fn.errors.CheckpointNotFoundError: no checkpoint at runs/none
    """
    stem = source.path if isinstance(source, CheckpointMeta) else resolve_checkpoint(source)
    meta, sidecar = read_listed(stem)
    aliases = sidecar["aliases"]
    saved: dict[str, Layout] = {}
    for key in sidecar["state"]["model"]:
        name = tensor_name("model", (key,))
        entry = sidecar["tensors"][aliases.get(name, name)]
        saved[key] = stored_layout(entry)
    if isinstance(spec_or_model, ModelSpec):
        net = build_model(spec_or_model, device="meta")
    else:
        net = unwrap_model(spec_or_model)
    problems = layout_problems(
        saved, net.state_dict(), found_name="the checkpoint", expected_name="the model"
    )
    if problems and isinstance(spec_or_model, ModelSpec) and meta.spec is not None:
        differ = describe_spec_differences(meta.spec, spec_or_model)
        if differ:
            problems.insert(0, f"spec differs: {differ}")
    return tuple(problems)
