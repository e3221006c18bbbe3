"""Following a learner: self-play and evaluation workers that load each newer checkpoint.

A worker process calls :func:`follow` on the learner's run directory; each time it looks, it
loads the newest committed checkpoint newer than what it holds (its model part, verified tensor
by tensor) into the worker's model and yields its meta — checkpoints saved and superseded
between two looks are skipped. It only ever loads what a sidecar commits, in increasing
step order, and survives the learner's pruning at any instant: a checkpoint removed between the
listing and the read is skipped, never an error.

Example:
    >>> import tempfile
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"))
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     list(follow(run_dir, model, poll=0.01, timeout=0.05))  # nothing saved: times out
    []
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from torch import nn

from keisei_fn.capture import restore_
from keisei_fn.errors import KeiseiFnError, SpecError, UnhealthyCheckpointError
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import PathArg, RunPath, run_path
from keisei_fn.store._fs import entry_exists, file_identity
from keisei_fn.store.checkpoints import MODEL_ONLY, load_state_with_meta
from keisei_fn.store.listing import problem_of_one_file, resume_candidates
from keisei_fn.store.names import RESUME_PREFIX, parse_stem, sidecar_path

__all__ = ["follow"]

log = logging.getLogger("keisei_fn.store")


def follow(
    run_dir: PathArg,
    model: nn.Module,
    *,
    poll: float = 5.0,
    timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
    prefix: str = RESUME_PREFIX,
) -> Iterator[CheckpointMeta]:
    """Load the newest checkpoint of a run directory into ``model`` whenever a newer one is
    there (every ``poll`` seconds; ones superseded between two looks are skipped).

    Waits while the run directory is empty (or missing) or holds nothing newer than what
    ``model`` holds. A checkpoint that fails to load (corrupt, incomplete, a model that does
    not fit) or that the health gate marked unhealthy is skipped with one warning, and
    ``model`` keeps the last good weights; it is tried again only if its sidecar is replaced.
    Only the model part is read and verified (see ``load_state``'s ``parts``); optimizer
    state, RNG and ``extra`` are not touched.

    Args:
        run_dir: the learner's run directory (local or an fsspec URL).
        model: the worker's model, loaded in place (its device is kept).
        poll: seconds between looks at the run directory.
        timeout: stop when nothing newer has loaded for this many seconds (None: never).
        stop: stop once this returns True and everything committed before it did has been
            loaded (e.g. ``event.is_set`` of an event the learner sets after its last save).
        prefix: the resume prefix of the checkpoints to follow.

    Yields:
        The meta of each checkpoint loaded, steps strictly increasing; the last one yielded
        is what ``model`` holds.

    Raises:
        SpecError: for a non-positive ``poll`` or a negative ``timeout``.
        OSError: an I/O error that is not a problem of one file (e.g. the file system is
            gone).
    """
    if not poll > 0:
        raise SpecError(f"follow's poll must be > 0 seconds, got {poll!r}")
    if timeout is not None and not timeout >= 0:
        raise SpecError(f"follow's timeout must be >= 0 seconds, got {timeout!r}")
    path = run_path(run_dir)
    held = -1
    failed: dict[str, object] = {}  # name → its sidecar's identity when it failed
    waiting_since = time.monotonic()
    while True:
        stopping = stop is not None and stop()  # asked before the look: nothing is missed
        meta = _load_newer(path, model, held, failed, prefix)
        if meta is not None:
            held = meta.step
            waiting_since = time.monotonic()
            yield meta
            continue
        if stopping or (timeout is not None and time.monotonic() - waiting_since >= timeout):
            return
        time.sleep(poll)


def _load_newer(
    run_dir: RunPath, model: nn.Module, held: int, failed: dict[str, object], prefix: str
) -> CheckpointMeta | None:
    """Load the newest checkpoint above step ``held`` that loads into ``model``, or None."""
    for stem in resume_candidates(run_dir, prefix):
        parsed = parse_stem(stem.name)
        if parsed is None or parsed.step is None or parsed.step <= held:
            return None  # highest step first: nothing newer below
        identity = file_identity(sidecar_path(stem))
        if identity is None or failed.get(stem.name) == identity:
            continue  # pruned since the listing, or known bad
        try:
            state, meta = load_state_with_meta(stem, parts=MODEL_ONLY)
            if not meta.healthy:
                raise UnhealthyCheckpointError(f"it is {meta.health_summary}")
            restore_(state, model, rng=False)
        except (KeiseiFnError, OSError) as exc:
            if not entry_exists(sidecar_path(stem)):
                continue  # pruned under us: not a problem of the file
            if not problem_of_one_file(exc):
                raise
            failed[stem.name] = identity
            log.warning("follow: skipping %s, keeping step %d: %s", stem, held, exc)
            continue
        return meta
    return None
