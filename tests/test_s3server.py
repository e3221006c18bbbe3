"""The S3 test server (keisei_fn.testing.s3server, the ``s3_server``/``s3_url`` fixtures) is real
S3, and the write semantics the checkpoint store builds on hold for it.

The property the store relies on is "object writes are atomic per object": an object appears
whole or not at all. S3 provides it (a single PUT is stored only if its body arrived complete; a
multipart upload becomes an object only on CompleteMultipartUpload), but s3fs's file objects
COMMIT whatever was written when they are closed, and they are closed by ``__exit__`` even when
an exception is propagating, and by ``__del__`` when dropped unclosed. The tests whose
docstring starts with "Characterization" pin such behaviours of s3fs and SeaweedFS (not promises
of S3), so that the store's authors know them and notice when they change.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs

from keisei_fn.testing.s3server import ACCESS_KEY, S3Server, S3ServerError

MiB = 2**20
BLOCK = 5 * MiB  # s3fs's smallest block size; bigger writes go through a multipart upload


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    parts = urllib.parse.urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def pending_uploads(fs: Any, url: str) -> list[dict[str, Any]]:
    """Incomplete multipart uploads under ``url`` (ListMultipartUploads with a prefix)."""
    bucket, prefix = split(url)
    return list(
        fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    )


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie awaiting its reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether process ``pid`` ends within ``timeout`` seconds (a signal acts asynchronously)."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def fresh_fs() -> Any:
    """A new S3FileSystem (no shared instance, no cached listings), configured by the env."""
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_plain_clients_talk_to_the_test_server(s3_url: str, s3_server: S3Server) -> None:
    fs = fsspec.filesystem("s3")
    assert isinstance(fs, s3fs.S3FileSystem)
    assert fs.client_kwargs == {} and fs.endpoint_url is None  # configured by the env only
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    bucket, key = split(s3_url)
    assert fs.exists(bucket) and not fs.exists(s3_url) and key
    fs.pipe_file(f"{s3_url}/probe", b"x")
    (obj,) = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
    assert obj["Key"] == f"{key}/probe"  # the server itself holds what s3fs wrote

    # Authentication is enforced, as on a real bucket.
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem(anon=True, skip_instance_cache=True).ls(s3_url)
    wrong = s3fs.S3FileSystem(key=ACCESS_KEY, secret="wrong", skip_instance_cache=True)
    with pytest.raises(PermissionError):
        wrong.ls(s3_url)


def test_write_list_read_delete(s3_url: str, s3_server: S3Server) -> None:
    data = bytes(range(256)) * 4096 + os.urandom(12345)
    path = f"{s3_url}/step-00000001/weights.safetensors"
    with fsspec.open(path, "wb") as f:
        f.write(data)

    fs = fsspec.filesystem("s3")
    (entry,) = fs.ls(f"{s3_url}/step-00000001", detail=True)
    assert entry["name"] == split(path)[0] + "/" + split(path)[1]
    assert entry["type"] == "file" and entry["size"] == len(data)
    assert fs.find(s3_url) == [entry["name"]]
    with fsspec.open(path, "rb") as f:
        assert f.read() == data
    assert fresh_fs().cat_file(path) == data

    fs.rm(path)
    assert not fs.exists(path) and not fresh_fs().exists(path)
    bucket, key = split(s3_url)
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key)


def test_multipart_upload_lands_as_one_object(s3_url: str) -> None:
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/big.bin"
    chunks = [os.urandom(MiB) for _ in range(11)]
    with fs.open(path, "wb", block_size=BLOCK) as f:
        for chunk in chunks:
            f.write(chunk)
        assert len(pending_uploads(fs, s3_url)) == 1  # parts sent, object not there yet
        assert not fresh_fs().exists(path)

    info = fresh_fs().info(path)
    assert info["size"] == 11 * MiB
    assert info["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert fs.cat_file(path) == b"".join(chunks)
    assert pending_uploads(fs, s3_url) == []


def test_discard_leaves_no_object(s3_url: str) -> None:
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/discarded.bin"
    f = fs.open(path, "wb", block_size=BLOCK)
    f.write(os.urandom(BLOCK + MiB))  # part 1 is on the server
    assert len(pending_uploads(fs, s3_url)) == 1
    f.discard()  # AbortMultipartUpload
    # A discarded S3File is unusable: s3fs 2026.9 cannot even close() it (AttributeError), and
    # close() is what __del__ would call, so mark it closed to keep garbage collection quiet.
    f.closed = True
    assert pending_uploads(fs, s3_url) == []
    assert not fresh_fs().exists(path)


@pytest.mark.parametrize("size", [10, BLOCK + MiB], ids=["single-put", "multipart"])
def test_exception_inside_with_commits_the_partial_object(s3_url: str, size: int) -> None:
    """Characterization: ``with fs.open(path, "wb")`` is NOT a transaction. ``__exit__`` closes
    the file whatever happened, and closing commits: the partial object becomes visible."""
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/partial.bin"
    with pytest.raises(RuntimeError), fs.open(path, "wb", block_size=BLOCK) as f:
        f.write(b"p" * size)
        raise RuntimeError("crash in the middle of a save")
    assert fresh_fs().cat_file(path) == b"p" * size
    with pytest.raises(RuntimeError), fsspec.open(f"{s3_url}/partial2.bin", "wb") as f:
        f.write(b"partial")
        raise RuntimeError("the same through fsspec.open")
    assert fresh_fs().cat_file(f"{s3_url}/partial2.bin") == b"partial"


def test_abandoned_open_file_is_committed_when_collected(s3_url: str) -> None:
    """Characterization: an S3File dropped unclosed (say, by an exception unwinding the frame
    that held it) is closed by ``__del__``, which commits the partial data."""
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/abandoned.bin"

    def save() -> None:
        f = fs.open(path, "wb")
        f.write(b"half of it")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        save()
    gc.collect()
    assert fresh_fs().cat_file(path) == b"half of it"


def test_uncommitted_writes_leave_no_object(s3_url: str) -> None:
    """The safe patterns: ``autocommit=False`` (commit or discard explicitly), or a
    ``fs.transaction`` block, which commits on success and discards on an exception."""
    fs = fsspec.filesystem("s3")
    # autocommit=False: even closing only uploads the parts; commit() completes the upload.
    path = f"{s3_url}/explicit.bin"
    with pytest.raises(RuntimeError), fs.open(path, "wb", autocommit=False) as f:
        f.write(b"partial")
        raise RuntimeError("crash")
    assert not fresh_fs().exists(path)
    assert len(pending_uploads(fs, s3_url)) == 1  # invisible, but takes space until aborted
    f.discard()
    assert pending_uploads(fs, s3_url) == []
    ok = fs.open(f"{s3_url}/explicit-ok.bin", "wb", autocommit=False)
    ok.write(b"complete")
    ok.close()
    assert not fresh_fs().exists(f"{s3_url}/explicit-ok.bin")
    ok.commit()
    assert fresh_fs().cat_file(f"{s3_url}/explicit-ok.bin") == b"complete"

    # fs.transaction defers the commit of every file opened on this (shared, cached) instance
    # meanwhile, from any thread (pipe_file and put_file are single PUTs: not deferred).
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open(f"{s3_url}/tx.bin", "wb") as f:
            f.write(b"complete file, incomplete checkpoint")
        raise RuntimeError("crash")
    assert not fresh_fs().exists(f"{s3_url}/tx.bin")
    assert pending_uploads(fs, s3_url) == []


WRITER = textwrap.dedent(
    """
    import os, sys, time, fsspec
    fs = fsspec.filesystem("s3")
    f = fs.open(sys.argv[1], "wb", block_size=5 * 2**20)
    f.write(os.urandom(6 * 2**20))  # > block size: CreateMultipartUpload + UploadPart 1
    print("PART-SENT", flush=True)
    time.sleep(60)
    """
)


def test_killed_writer_leaves_no_object(s3_url: str) -> None:
    """A writer SIGKILLed in the middle of a multipart upload leaves no object, only an
    incomplete upload, which ListMultipartUploads finds and AbortMultipartUpload removes."""
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/killed.bin"
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True
    ) as writer:
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "PART-SENT"
            assert [u["Key"] for u in pending_uploads(fs, s3_url)] == [split(path)[1]]
        finally:
            writer.send_signal(signal.SIGKILL)
    assert writer.returncode == -signal.SIGKILL
    assert not fresh_fs().exists(path)
    assert fresh_fs().find(s3_url) == []

    bucket, _ = split(s3_url)
    (upload,) = pending_uploads(fs, s3_url)
    fs.call_s3(
        "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
    )
    assert pending_uploads(fs, s3_url) == []


def test_truncated_put_leaves_no_object(s3_url: str) -> None:
    """A single PUT whose body stops short (the writer died mid-request) stores nothing."""
    fs = fsspec.filesystem("s3")
    path = f"{s3_url}/truncated.bin"
    url = urllib.parse.urlsplit(fs.url(path, expires=60, client_method="put_object"))
    assert url.hostname is not None and url.port is not None

    def put(declared: int, body: bytes) -> bytes:
        with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
            head = f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            conn.sendall(f"{head}Content-Length: {declared}\r\nConnection: close\r\n\r\n".encode())
            conn.sendall(body)
            conn.shutdown(socket.SHUT_WR)  # as a dying process would: EOF mid-body
            return conn.recv(4096)

    status = put(2 * MiB, b"t" * MiB).split(b"\r\n", 1)[0]
    assert not status.endswith(b" 200 OK"), status
    assert not fresh_fs().exists(path)
    # The same presigned request with its whole body does store the object.
    assert put(MiB, b"t" * MiB).startswith(b"HTTP/1.1 200 OK")
    assert fresh_fs().info(path)["size"] == MiB


def test_listings_are_cached_per_instance(s3_url: str) -> None:
    """Characterization of s3fs: an instance caches the listings it made, and answers ``ls``,
    ``exists``, ``info`` (hence ``open(..., "rb")`` and ``cat``) from them: writes and deletes
    by another process or instance stay invisible until the cache is invalidated."""
    reader, writer = fresh_fs(), fresh_fs()
    writer.pipe_file(f"{s3_url}/one", b"1")
    assert reader.ls(s3_url, detail=False) == [f"{split(s3_url)[0]}/{split(s3_url)[1]}/one"]

    writer.pipe_file(f"{s3_url}/two", b"2")
    writer.rm(f"{s3_url}/one")
    assert [Path(p).name for p in reader.ls(s3_url, detail=False)] == ["one"]  # stale
    assert reader.exists(f"{s3_url}/one") and not reader.exists(f"{s3_url}/two")
    with pytest.raises(FileNotFoundError):
        reader.open(f"{s3_url}/two", "rb")
    with pytest.raises(FileNotFoundError):
        reader.cat_file(f"{s3_url}/two")  # it asks info() for the size first

    assert [Path(p).name for p in reader.ls(s3_url, detail=False, refresh=True)] == ["two"]
    writer.pipe_file(f"{s3_url}/three", b"3")
    reader.invalidate_cache(s3_url)  # or invalidate_cache() for everything
    assert reader.exists(f"{s3_url}/three")
    uncached = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    assert len(uncached.ls(s3_url)) == 2
    writer.pipe_file(f"{s3_url}/four", b"4")
    assert len(uncached.ls(s3_url)) == 3


def test_emptied_prefix_lingers_as_a_directory(s3_url: str, s3_server: S3Server) -> None:
    """Characterization of SeaweedFS (not of AWS S3): its buckets are filer directories, and a
    directory emptied by deleting its last object stays until the filer's empty-folder cleaner
    removes it, 2 minutes later by default (filer.toml: ``[filer.options]
    s3.empty_folder_cleanup_delay``). Meanwhile delimited listings report it as a common prefix,
    so s3fs sees an empty directory where AWS would show nothing. Flat listings are exact."""
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_url}/step-1/weights.safetensors", b"w")
    fs.pipe_file(f"{s3_url}/step-2/weights.safetensors", b"w")
    fs.rm(f"{s3_url}/step-1/weights.safetensors")

    bucket, key = split(s3_url)
    flat = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/")
    assert [o["Key"] for o in flat["Contents"]] == [f"{key}/step-2/weights.safetensors"]
    nested = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/", Delimiter="/")
    assert [p["Prefix"] for p in nested["CommonPrefixes"]] == [f"{key}/step-1/", f"{key}/step-2/"]
    entries = {Path(e["name"]).name: e["type"] for e in fresh_fs().ls(s3_url, detail=True)}
    assert entries == {"step-1": "directory", "step-2": "directory"}
    assert fresh_fs().isdir(f"{s3_url}/step-1")
    assert fresh_fs().find(f"{s3_url}/step-1") == [f"{bucket}/{key}/step-1"]  # not []


def test_server_start_stop_leaves_nothing_behind(s3_server: S3Server) -> None:
    server = S3Server(buckets=())
    with server:
        pid, ports, workdir = server.pid, dict(server.ports), server.workdir
        assert pid is not None and workdir is not None and server.running
        (weed,) = children(pid)  # under the watchdog
        with socket.create_connection(("127.0.0.1", ports["s3"]), timeout=2):
            pass
        assert set(ports.values()).isdisjoint(s3_server.ports.values())
    assert not server.running and server.pid is None and not workdir.exists()
    assert gone(pid) and wait_gone(weed)
    for port in ports.values():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{ports['s3'] + 10000}.sock"))
    server.stop()  # idempotent


def test_startup_failure_reports_the_log_and_kills_the_group(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text(
        f"#!/bin/sh\necho 'fake weed here'\nsleep 30 &\necho $! > {tmp_path}/child\nwait\n"
    )
    fake.chmod(0o755)
    server = S3Server(weed=fake, startup_timeout=1.0)
    with pytest.raises(S3ServerError, match=r"(?s)did not open its S3 port.*fake weed here"):
        server.start()
    assert wait_gone(int((tmp_path / "child").read_text()))  # the weed stand-in's own child
    assert not server.running and server.workdir is None

    fake.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 3\n")
    with pytest.raises(S3ServerError, match=r"(?s)exited with status 3.*no such flag"):
        S3Server(weed=fake).start()


OWNER = textwrap.dedent(
    """
    import random, sys, time
    sys.path.insert(0, sys.argv[1])
    from keisei_fn.testing.s3server import S3Server
    server = S3Server(weed=sys.argv[2])
    server._launch(random.Random())  # the process setup of start(), without the wait
    print(server.workdir, flush=True)
    time.sleep(60)
    """
)


def test_watchdog_cleans_up_after_a_killed_owner(tmp_path: Path) -> None:
    """The owner of a server (a test session) dies by SIGKILL, so no stop() runs: the watchdog
    notices the closed pipe, stops weed (here a stand-in) and deletes the work directory."""
    fake = tmp_path / "weed"
    fake.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 60\n")
    fake.chmod(0o755)
    tests = str(Path(__file__).parent)
    with subprocess.Popen(
        [sys.executable, "-c", OWNER, tests, str(fake)], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        workdir = Path(owner.stdout.readline().strip())
        deadline = time.monotonic() + 10
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        weed = int((tmp_path / "pid").read_text())
        assert workdir.is_dir() and not gone(weed)
        owner.send_signal(signal.SIGKILL)
    assert wait_gone(weed), "the watchdog left weed running"
    while workdir.exists():
        assert time.monotonic() < deadline, "the watchdog left weed's files behind"
        time.sleep(0.02)


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    from keisei_fn.testing.s3server import WeedNotFoundError

    with pytest.raises(WeedNotFoundError, match="dev extra"):
        S3Server(weed=tmp_path / "weed").start()
