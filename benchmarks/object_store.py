"""Run directories on S3 against the local disk: the same state, saved and loaded in one run.

The S3 side is a real SeaweedFS server on loopback (``keisei_fn.testing.s3server``) reached
through s3fs, so the figures are the cost of the protocol and the client (HTTP, multipart
uploads, a download into memory instead of a memory map), not of a network.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import s3fs

from benchmarks.cases import Row, Trained, clear, compared
from benchmarks.timing import run_rounds
from keisei_fn import load_state, save_state
from keisei_fn.paths import run_path
from keisei_fn.store._fs import list_file_names, remove_durably
from keisei_fn.testing.s3server import DEFAULT_BUCKET, S3Server


def s3_rows(group: str, subject: Trained, scratch: Path, repeat: int) -> list[Row]:
    """``save_state`` and ``load_state`` (with verification) on S3 vs on the local disk."""
    local = scratch / "s3-baseline"
    local.mkdir()
    with S3Server() as server:
        saved_env = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an old endpoint
        try:
            remote = f"s3://{DEFAULT_BUCKET}/bench-{uuid.uuid4().hex}"

            def clear_remote() -> None:
                directory = run_path(remote)
                remove_durably(*(directory / name for name in list_file_names(directory)))

            saves = run_rounds(
                {
                    "save_state to s3://": lambda: save_state(subject.state, remote),
                    "save_state to local disk": lambda: save_state(subject.state, local),
                },
                repeat=repeat,
                cleanup=lambda: (clear(local), clear_remote()),
            )
            remote_meta = save_state(subject.state, remote)
            local_meta = save_state(subject.state, local)
            loads = run_rounds(
                {
                    "load_state from s3://": lambda: load_state(remote_meta.path),
                    "load_state from local disk": lambda: load_state(local_meta.path),
                },
                repeat=repeat,
            )
        except Exception:
            print(f"S3 server log, last lines:\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    group = f"{group}, SeaweedFS on loopback"
    return [
        compared(group, saves, "save_state to s3://", "save_state to local disk"),
        compared(group, loads, "load_state from s3://", "load_state from local disk"),
    ]
