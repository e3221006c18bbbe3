"""The checkpoint store: the only part of keisei_fn that opens run-directory files.

Submodules: ``commit`` (the commit protocol every layout follows, and the run directory's
writer/pruner lock), ``checkpoints`` (save/load/verify), ``listing`` (validity, list, latest),
``checkpoint_list`` (what ``list_checkpoints`` returns: a list that prints as a table and
plots), ``locate`` (which checkpoint a user's path names), ``sniff`` (what a file is, by its
first bytes), ``resume``, ``follow`` (workers that load each newer checkpoint), ``retention``
(RetentionPolicy, plan_prune, prune), ``checkpointer`` (the loop-facing helper),
``background`` (AsyncSaver), ``preemption`` (a signal becomes a checkpoint and an exit),
``ledger`` (the publication ledger), ``files`` (directory checks, sizes and local copies for
the CLI and ``publish``), ``legacy`` (Keisei ``.pth`` import), ``convert`` (``consolidate``: a
sharded checkpoint → a single-file one), ``sharded`` (FSDP2 checkpoints through DCP, imported
on first use; its parts are the ``sharded_*`` modules), ``weights`` (the safetensors file),
``names`` and ``_fs`` (file primitives for local paths and fsspec URLs alike); ``migrate``
(older on-disk formats rewritten in the newest).
"""

from keisei_fn.store.background import AsyncSaver, SaveHandle
from keisei_fn.store.checkpoint_list import CheckpointList
from keisei_fn.store.checkpointer import Checkpointer, SaveResult, checkpoint_due, round_interval
from keisei_fn.store.checkpoints import (
    load_model,
    load_state,
    load_state_with_meta,
    save_final_model,
    save_state,
    verify_checkpoint,
)
from keisei_fn.store.files import directory_exists, local_checkpoint_files, stored_size
from keisei_fn.store.follow import follow
from keisei_fn.store.ledger import append_ledger, pending_publications, read_ledger
from keisei_fn.store.legacy import import_legacy
from keisei_fn.store.listing import RunDirScan, latest_checkpoint, list_checkpoints, scan_run_dir
from keisei_fn.store.migrate import Migration, migrate
from keisei_fn.store.preemption import Preemption
from keisei_fn.store.resume import Resumed, resume
from keisei_fn.store.retention import PrunePlan, RetentionPolicy, plan_prune, prune

__all__ = [
    "AsyncSaver",
    "CheckpointList",
    "Checkpointer",
    "Migration",
    "Preemption",
    "PrunePlan",
    "Resumed",
    "RetentionPolicy",
    "RunDirScan",
    "SaveHandle",
    "SaveResult",
    "append_ledger",
    "checkpoint_due",
    "directory_exists",
    "follow",
    "import_legacy",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_state",
    "load_state_with_meta",
    "local_checkpoint_files",
    "migrate",
    "pending_publications",
    "plan_prune",
    "prune",
    "read_ledger",
    "resume",
    "round_interval",
    "save_final_model",
    "save_state",
    "scan_run_dir",
    "stored_size",
    "verify_checkpoint",
]
