"""The commit protocol: how every checkpoint layout becomes visible, replaces, and is pruned.

One promise: once a save has returned, its checkpoint stays loadable until the user deletes
it (or a later save replaces it), and nothing listed is broken. Every layout keeps it the same
way:

1. **Refuse or reuse** under the run directory's lock: a different valid checkpoint at the name
   is refused (unless ``overwrite``); an identical one is returned as it is.
2. **Write the payload under a fresh generation name** no committed sidecar uses
   (``<name>.<token>.safetensors``, or a shards directory ``<name>.<token>.shards``) and make it
   durable.
3. **Commit**: write the sidecar that names the payload and its digests, atomically (temp file
   → fsync → rename → fsync the directory; one PUT on an object store). This is the single
   commit point: before it the old checkpoint is listed, after it the new one.
4. **Remove what the replaced sidecar named** (best effort: a failure here leaves an
   unreferenced payload, which pruning removes, and the save still succeeded).

A crash or an I/O error at any instant therefore leaves the old checkpoint or the new one,
never neither; a failure before the commit removes the new payload.

**Writers and pruners cooperate through one lock**: an exclusive ``flock`` on the run
directory itself (no lock file to litter it), held by a save from its check to its cleanup and
by :func:`keisei_fn.store.prune` for its whole scan-and-delete. So prune never sees a payload
that a save in flight still needs (any unreferenced payload or temp file it sees belongs to a
process that died), and two writers at one name are serialised: the second sees the first's
commit and is refused (or, with ``overwrite``, replaces it whole). ``flock`` locks are released
by the kernel when a process dies, so a killed writer never blocks the next one. Why a lock and
not only generation names or a grace period: generation names make replacement atomic, but
without the lock a pruner cannot tell an abandoned payload from one about to be committed, and
two writers could both pass the "is there a checkpoint already?" check.

Readers take no lock (a read-only run directory must stay readable); a reader that loses a
race to a pruner (the checkpoint it chose vanished) looks again (see
``keisei_fn.store.listing``).

On object stores there is no lock (and no rename): the payload is uploaded under its fresh
name, then the sidecar in one PUT, so the same order holds and a replacement still leaves old
or new. Two writers at one name there: the last sidecar PUT wins, whole and consistent. Prune
there removes an unreferenced payload only once it is older than
``keisei_fn.store._fs.ABANDONED_AFTER_SECONDS`` (a save in flight is younger). Where the local
file system does not support ``flock`` (some network file systems), saving and pruning go on
without the lock (with a warning): a replacement is still atomic, prune removes unreferenced
files only once they are old, as on an object store, but two writers at one step are not
serialised (the last sidecar wins, whole).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

from keisei_fn.codec import dumps
from keisei_fn.errors import (
    CheckpointExistsError,
    IntegrityError,
    SpecError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from keisei_fn.meta import CheckpointMeta, check_sidecar_cost
from keisei_fn.paths import RunPath, is_remote
from keisei_fn.store._fs import make_dirs, remove_durably, write_bytes_durably
from keisei_fn.store.listing import committed
from keisei_fn.store.names import sidecar_path

__all__ = [
    "commit",
    "existing_checkpoint",
    "fresh_payload",
    "locked",
    "names_payload",
    "remove_payload",
]

log = logging.getLogger("keisei_fn.store")

#: Errors of ``flock`` that mean "this file system does not lock", not "you may not".
_NO_LOCKING = frozenset(
    {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EINVAL, errno.ENOSYS}
)


@contextlib.contextmanager
def locked(run_dir: RunPath) -> Iterator[bool]:
    """Hold the run directory's writer/pruner lock (creating the directory) for the block.

    An exclusive ``flock`` on the directory: saves and prunes of every process (and thread:
    each holds its own open file description) on this machine's view of the file system are
    serialised; readers are not affected. A child forked while it is held does not keep it.
    Not re-entrant: a thread holding it must not save or prune the same run directory inside
    the block.

    Yields:
        Whether the lock is held: False on an object store and on a file system without
        ``flock`` (warned once per directory), where a prune then treats unreferenced files
        like an object store does (removed only once they are old).

    Raises:
        OSError: when the directory cannot be created or opened.
    """
    if is_remote(run_dir):
        yield False
        return
    make_dirs(run_dir)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        held = _flock(fd, run_dir)
        if held:
            _held.add(fd)
        try:
            yield held
        finally:
            _held.discard(fd)
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, run_dir: RunPath) -> bool:
    """Take the exclusive lock on ``fd``; False (warned once) where the file system has none."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in _NO_LOCKING:
            raise
        if str(run_dir) not in _warned_unlocked:
            _warned_unlocked.add(str(run_dir))
            log.warning(
                "%s does not support flock (%s): saves and prunes there do not exclude each "
                "other; prune leaves unreferenced files alone until they are old",
                run_dir,
                exc,
            )
        return False
    return True


#: Descriptors of the locks this process holds: a forked child closes its copies, so that the
#: lock is released when the parent releases it (a flock belongs to the open file description,
#: which a child shares until it closes it).
_held: set[int] = set()
_warned_unlocked: set[str] = set()


def _forget_held_locks() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_held_locks)


def existing_checkpoint(
    stem: RunPath, *, overwrite: bool
) -> tuple[CheckpointMeta, dict[str, Any]] | None:
    """The valid checkpoint committed at ``stem`` (call it under :func:`locked`), or None.

    An incomplete or corrupt one counts as none: the save replaces it.

    Raises:
        CheckpointExistsError: a checkpoint this keisei_fn cannot read (a newer format, an
            unregistered model type) is there and ``overwrite`` is False.
    """
    try:
        return committed(stem)
    except (UnsupportedFormatError, SpecError) as exc:
        if not overwrite:
            raise CheckpointExistsError(
                f"{sidecar_path(stem)} holds a checkpoint this keisei_fn cannot read ({exc}); "
                "pass overwrite=True to replace it"
            ) from exc
        return None


def fresh_payload(stem: RunPath, suffix: str) -> RunPath:
    """A payload path no sidecar has named: ``<stem>.<16 hex digits><suffix>``.

    Example:
        >>> from pathlib import Path
        >>> p = fresh_payload(Path("run/checkpoint_ts5"), ".safetensors")
        >>> p.name.startswith("checkpoint_ts5.") and p.name.endswith(".safetensors")
        True
    """
    return stem.parent / f"{stem.name}.{secrets.token_hex(8)}{suffix}"


def remove_payload(payload: RunPath) -> None:
    """Remove a payload (file or directory) that no sidecar names; errors are logged, never
    raised: an unreferenced payload left behind is removed by the next prune."""
    try:
        remove_durably(payload)
    except OSError as exc:
        log.warning("could not remove %s (prune removes it later): %s", payload, exc)


def commit(
    stem: RunPath,
    sidecar: dict[str, Any],
    *,
    payload: RunPath,
    replaced: CheckpointMeta | None,
) -> CheckpointMeta:
    """Commit a durable payload by writing its sidecar, then remove what ``replaced`` named.

    Call it under :func:`locked`, after the payload is durable.

    Args:
        stem: the checkpoint's path without suffix.
        sidecar: the complete sidecar naming ``payload``.
        payload: the payload just written (removed if the commit fails).
        replaced: the checkpoint committed at ``stem`` before, if any.

    Returns:
        The committed checkpoint's meta.

    Raises:
        UnsupportedValueError: the sidecar is over a cap on what reading it may cost (it could
            never be read back); nothing is committed, the payload is removed.
        OSError: when the sidecar cannot be written. Whatever was committed at ``stem`` before
            is still there, and the payload is removed; or, when the failure came after the
            rename (fsyncing the directory), the new checkpoint is there and complete.
    """
    data = dumps(sidecar)
    try:
        try:
            check_sidecar_cost(data, where=str(sidecar_path(stem)))
        except IntegrityError as exc:  # it could never be read back: refuse, commit nothing
            raise UnsupportedValueError(
                f"{exc}; keep large data out of the JSON state (tensors in extra go to the "
                "weights file)"
            ) from exc
        write_bytes_durably(sidecar_path(stem), data)
    except BaseException:
        if not names_payload(stem, payload):
            remove_payload(payload)
        raise
    if replaced is not None and replaced.weights_path != payload:
        remove_payload(replaced.weights_path)
    return CheckpointMeta.from_sidecar(sidecar, run_dir=stem.parent, sidecar_size=len(data))


def names_payload(stem: RunPath, payload: RunPath) -> bool:
    """Whether the sidecar at ``stem`` names ``payload``; True when that cannot be read (a
    payload kept by mistake is pruned later, one removed by mistake is a lost checkpoint).
    Ask before removing a payload after a failed save."""
    try:
        found = committed(stem)
    except Exception:
        return True
    return found is not None and found[0].weights_path == payload
