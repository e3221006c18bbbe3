"""Sharded checkpoints of FSDP2 training through torch.distributed.checkpoint, never pickled.

``save_sharded`` runs on every rank of an FSDP2 (``fully_shard``) job: every rank writes its own
shards of the model and optimizer tensors, in parallel, through torch.distributed.checkpoint
(DCP) and its HuggingFace safetensors writer; rank 0 writes the rest of the training state and,
once every rank has finished and its files' digests are gathered, the sidecar: the commit
marker. ``load_sharded_`` reads it back on any number of ranks (resharding), ``load_state`` as
a plain, full TrainState in one process (like any checkpoint), and
``keisei_fn.store.convert.consolidate`` turns it into an ordinary single-file checkpoint that
``load_model`` reads on one CPU.

On disk, in a run directory::

    checkpoint_ts10240.json                   the sidecar: format version 2, layout "sharded"
    checkpoint_ts10240.<token>.shards/        a fresh directory per save (random token)
        shard-00001-model-00001-of-00001.safetensors    rank 0's shards, written by DCP
        shard-00002-model-00001-of-00001.safetensors    rank 1's shards
        state.safetensors                               rank 0: RNG, scheduler, extra tensors

Every file is a safetensors file. DCP's sharding offsets are in each shard's safetensors
metadata and the HF reader rebuilds DCP's metadata from those headers, so DCP's pickled
``.metadata`` file is never written nor read. A re-save gets a new directory, so no file that
a process may have mapped is ever written over.

Tensors named ``model/<key>`` and ``optimizer/state/<fqn>/<name>`` are in the shards: sharded
DTensors as every rank holds them, replicated plain tensors (BatchNorm buffers, Adam's ``step``)
as rank 0 holds them, like a single-file save on rank 0. Every other tensor (``rng/...``,
``scheduler/...``, ``extra/...``) is in ``state.safetensors``. The rest — optimizer
param_groups, step, episodes, stats, spec, scheduler and extra JSON — is in the sidecar,
encoded by ``keisei_fn.codec``.

The sidecar has format version 2 with ``"layout": "sharded"`` and a ``"shards"`` entry (see
``keisei_fn.meta.build_sharded_sidecar``). The rest of the store treats a sharded checkpoint like
any other: ``list_checkpoints``, ``latest_checkpoint`` (which returns its shards directory),
``verify_checkpoint``, ``prune``, ``resume``, and ``load_state``/``load_model`` (in full, in one
process). Sharded checkpoints live on local or mounted file systems: DCP's safetensors storage
writes local files.

This module is the public API; its parts live beside it: ``sharded_save`` (the save and its
commit), ``sharded_load`` (into a live job, or in full), ``sharded_check`` (finding and checking
a checkpoint before it is read), ``sharded_codec`` (a state as stored tensors and back),
``sharded_layout`` (where each tensor is kept; the chunk checks) and ``sharded_dcp`` (the
adapter to torch.distributed.checkpoint).

Example (one process also works, without FSDP or a process group):
    >>> import tempfile, torch
    >>> from keisei_fn import ModelSpec, build_model, load_state
    >>> spec = ModelSpec(model_type="testmodel")
    >>> model = build_model(spec, seed=0)
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     meta = save_sharded(model, optimizer, run_dir, step=2048, spec=spec)
    ...     state = load_state(run_dir)
    >>> meta.format_version, meta.name, state.step, sorted(state.optimizer["state"])[:2]
    (2, 'checkpoint_ts2048', 2048, [0, 1])
"""

from keisei_fn.store.sharded_check import verify_sharded
from keisei_fn.store.sharded_layout import STATE_FILE
from keisei_fn.store.sharded_load import load_full, load_sharded, load_sharded_
from keisei_fn.store.sharded_save import save_sharded

__all__ = [
    "STATE_FILE",
    "load_full",
    "load_sharded",
    "load_sharded_",
    "save_sharded",
    "verify_sharded",
]
