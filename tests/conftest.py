"""Shared test setup. Hypothesis profiles come from keisei_fn's own pytest plugin
(``keisei_fn.testing.plugin``): ``keisei-dev`` unless KEISEI_FN_HYPOTHESIS_PROFILE names another
(``.ci/run`` uses ``keisei-ci``; ``keisei-slow`` for long runs)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from keisei_fn.testing.s3server import DEFAULT_BUCKET, S3Server, WeedNotFoundError

os.environ.setdefault("KEISEI_FN_HYPOTHESIS_PROFILE", "keisei-dev")


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker (``make test`` runs one per core): one torch intra-op thread,
    in the worker and in every process its tests start (``OMP_NUM_THREADS``, unless set). Two
    threads per worker would oversubscribe the cores, and OpenMP threads that spin waiting for
    a descheduled sibling burned about a sixth of the suite's CPU time on two cores."""
    if hasattr(config, "workerinput"):
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests run only with KEISEI_FN_SLOW=1 (or when selected with ``-m slow``); ``cuda``
    tests only where torch sees a GPU (skipped, saying why)."""
    skip_cuda = _no_cuda()
    if skip_cuda is not None:
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=skip_cuda))
    if os.environ.get("KEISEI_FN_SLOW") == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: set KEISEI_FN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _no_cuda() -> str | None:
    """Why the ``cuda`` tests cannot run here, or None when torch sees a GPU."""
    import torch

    if torch.version.cuda is None:
        return f"cuda: torch {torch.__version__} is a CPU build (make gpu-check on a GPU machine)"
    if not torch.cuda.is_available():
        return f"cuda: torch {torch.__version__} sees no GPU (make gpu-check on a GPU machine)"
    return None


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a module's tests, restored afterwards (a module asks with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): results compared bit-exactly
    with another process's need the same thread count, and on a busy machine a second OpenMP
    thread spinning beside a tiny network made an example take seconds instead of ~0.1 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- S3: a real SeaweedFS server on loopback (keisei_fn.testing.s3server) ----------------------

# Settings that would override or disturb the test endpoint and credentials of ``s3_url``.
_FOREIGN_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",  # a service-specific endpoint beats AWS_ENDPOINT_URL
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",  # would make botocore ignore AWS_ENDPOINT_URL
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_CA_BUNDLE",
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session, started when a test first asks for it
    (about 3 s) and stopped at the end. Fails (does not skip) when ``weed`` is missing: the
    ``dev`` extra installs it, so a missing binary is a broken setup, not an optional feature."""
    missing = None
    try:
        server = S3Server().start()
    except WeedNotFoundError as error:
        missing = str(error)
    if missing is not None:
        pytest.fail(missing, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    """``s3://keisei-test/<unique prefix for this test>`` on the session's S3 server.

    Nothing exists under the prefix yet. The standard AWS environment variables point every
    client created during the test at the server (``fsspec.filesystem("s3")``,
    ``s3fs.S3FileSystem()``, subprocesses), and AWS settings from the developer's environment
    and ``~/.aws`` are hidden. s3fs caches filesystem instances (and each instance caches
    listings), so the cache is cleared before and after the test."""
    import fsspec.config
    import s3fs

    for name in [*_FOREIGN_AWS_VARS, *(n for n in os.environ if n.startswith("FSSPEC_S3_"))]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # fsspec's own defaults for s3 (FSSPEC_S3_* variables, ~/.config/fsspec), read at import,
    # would apply too.
    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    test_id = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.nodeid).strip("-")[-120:]
    yield f"s3://{DEFAULT_BUCKET}/{test_id}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
