"""The measurements: save, load, capture, listing and import, each against its baselines.

Every function returns :class:`Row` values; a row compares ``ours`` with one baseline measured
in the same rounds (``ratio`` = baseline time / our time, the median of per-round ratios), or
states an absolute figure against a target.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.timing import Samples, measure_rounds, run_rounds
from keisei_fn import (
    ModelSpec,
    TrainState,
    build_model,
    capture,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_state,
    save_state,
)
from keisei_fn.codec import encode_state
from keisei_fn.meta import CheckpointMeta
from keisei_fn.store import checkpoints, weights
from keisei_fn.store import commit as commit_protocol
from keisei_fn.store.weights import METADATA, read_weights, write_weights

MODELS = {
    "test": ModelSpec(model_type="testmodel"),
    "default": ModelSpec(),
    "large": ModelSpec(tower_depth=20),
}


@dataclass(frozen=True)
class Row:
    """One line of the results table.

    Attributes:
        group: what is measured on what, e.g. ``"default (159 MB)"``.
        measure: our operation.
        ours_ms: its median time.
        baseline: the baseline, or None for an absolute figure.
        baseline_ms: the baseline's median time.
        ratio: paired median of baseline / ours (> 1: ours is faster).
        extra_ms: paired median of ours - baseline, where the target is a difference.
        target: the target, if the issues set one.
        met: whether the target is met.
        samples_ms: every round's time of each variant involved.
    """

    group: str
    measure: str
    ours_ms: float
    baseline: str | None = None
    baseline_ms: float | None = None
    ratio: float | None = None
    extra_ms: float | None = None
    target: str | None = None
    met: bool | None = None
    samples_ms: dict[str, list[float]] = field(default_factory=dict)


def compared(
    group: str,
    samples: Samples,
    ours: str,
    baseline: str,
    *,
    minimum: float | None = None,
    label: str | None = None,
) -> Row:
    """A row comparing two variants of ``samples``; ``minimum`` is a target speed-up."""
    ratio = samples.speedup(ours, baseline)
    return Row(
        group=group,
        measure=label or ours,
        ours_ms=samples.median_ms(ours),
        baseline=baseline,
        baseline_ms=samples.median_ms(baseline),
        ratio=ratio,
        target=None if minimum is None else f">= {minimum:g}x",
        met=None if minimum is None else ratio >= minimum,
        samples_ms=samples.ms(ours, baseline),
    )


@dataclass(frozen=True)
class Trained:
    """A model after one real Adam step, and its snapshot."""

    spec: ModelSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (parameters, buffers, Adam state, RNG)."""
        return sum(t.numel() * t.element_size() for t in encode_state(self.state).tensors.values())

    def live_tensors(self) -> list[torch.Tensor]:
        """The live tensors ``capture`` clones: state_dict and optimizer state tensors."""
        found = list(self.model.state_dict().values())
        for entries in self.optimizer.state.values():
            found += [v for v in entries.values() if isinstance(v, torch.Tensor)]
        return found


def trained(spec: ModelSpec) -> Trained:
    """Build the model, take one Adam step on random observations, capture it."""
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits, value = model(
        torch.randn(8, *spec.obs_shape, generator=torch.Generator().manual_seed(0))
    )
    (logits.logsumexp(-1).mean() + value.square().mean()).backward()
    optimizer.step()
    return Trained(spec, model, optimizer, capture(spec, model, optimizer, step=1))


def clear(directory: Path) -> None:
    """Remove every file in ``directory`` (kept, so writes do not pay for a fresh directory)."""
    for entry in directory.iterdir():
        entry.unlink()


def write_fsync(path: Path, data: bytes) -> None:
    """The raw baseline: one new file, ``write`` of all bytes, ``fsync``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_fsync(obj: Any, path: Path) -> None:
    """``torch.save`` to a new file, flushed and fsynced."""
    with open(path, "xb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_file_fsync(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The previous weights writer: ``safetensors.torch.save_file``, then fsync."""
    save_file(tensors, path, metadata=METADATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_rows(group: str, subject: Trained, scratch: Path, repeat: int) -> list[Row]:
    """Durable save against a raw write+fsync of the same bytes and torch.save + fsync."""
    tensors = encode_state(subject.state).tensors
    reference = save_state(subject.state, scratch / "reference").weights_path.read_bytes()
    out = scratch / "writes"
    out.mkdir()
    samples = run_rounds(
        {
            "save_state": lambda: save_state(subject.state, out),
            "write_weights": lambda: write_weights(tensors, out / "w.safetensors"),
            "raw write+fsync of the same bytes": lambda: write_fsync(out / "raw", reference),
            "torch.save + fsync": lambda: torch_save_fsync(tensors, out / "t.pt"),
            "safetensors save_file + fsync": lambda: save_file_fsync(tensors, out / "s"),
        },
        repeat=repeat,
        cleanup=lambda: clear(out),
    )
    raw, pickle_, library = (
        "raw write+fsync of the same bytes",
        "torch.save + fsync",
        "safetensors save_file + fsync",
    )
    return [
        compared(group, samples, "save_state", raw, minimum=0.8),
        compared(group, samples, "save_state", pickle_, minimum=1.0),
        compared(group, samples, "write_weights", raw),
        compared(group, samples, "write_weights", library),
    ]


def load_rows(group: str, subject: Trained, scratch: Path, repeat: int) -> list[Row]:
    """Load + verify against torch.load(weights_only=True) and a raw read (warm cache); a
    file this process verified before; the model part alone."""
    saved = save_state(subject.state, scratch / "reference")  # already there: not rewritten
    path = saved.weights_path
    pickled = scratch / "reference" / "t.pt"
    torch_save_fsync(encode_state(subject.state).tensors, pickled)
    remembered = save_state(subject.state, scratch / "remembered").weights_path
    time.sleep(max(0.0, weights.TRUSTED_AGE_NS / 1e9 - (time.time() - remembered.stat().st_ctime)))
    load_state(remembered)  # verified once: this process remembers the file

    def first_load() -> object:
        os.utime(path)  # a file changed since: hashed again, as on its first load
        return load_state(path)

    samples = run_rounds(
        {
            "load_state": first_load,
            "load_state, file verified before": lambda: load_state(remembered),
            "load_state(parts=model)": lambda: load_state(path, parts=("model",)),
            "load_model": lambda: load_model(path),
            "load_state(verify=False)": lambda: load_state(path, verify=False),
            "read_weights": lambda: read_weights(
                path, size=saved.weights_size, digest=saved.weights_digest, recheck=True
            ),
            "torch.load(weights_only=True)": lambda: torch.load(pickled, weights_only=True),
            "torch.load(weights_only=True, mmap=True)": lambda: torch.load(
                pickled, weights_only=True, mmap=True
            ),
            "raw read of our file": path.read_bytes,
        },
        repeat=repeat,
    )
    pickle_ = "torch.load(weights_only=True)"
    return [
        compared(group, samples, "load_state", pickle_, minimum=4.0, label="load_state (+verify)"),
        compared(
            group,
            samples,
            "load_state, file verified before",
            pickle_,
            label="load_state (+verify), file verified before",
        ),
        compared(
            group, samples, "load_state", "raw read of our file", label="load_state (+verify)"
        ),
        compared(
            group,
            samples,
            "load_state",
            "torch.load(weights_only=True, mmap=True)",
            label="load_state (+verify)",
        ),
        compared(
            group,
            samples,
            "load_state(parts=model)",
            "load_state",
            minimum=2.0,
            label="load_state(parts=model) (+verify)",
        ),
        compared(
            group,
            samples,
            "load_state(parts=model)",
            pickle_,
            label="load_state(parts=model) (+verify)",
        ),
        compared(group, samples, "load_model", pickle_, label="load_model (+verify)"),
        compared(group, samples, "read_weights", pickle_, label="read_weights (+verify)"),
        compared(group, samples, "load_state(verify=False)", pickle_),
    ]


def capture_rows(group: str, subject: Trained, repeat: int) -> list[Row]:
    """``capture`` against a plain clone of the same live tensors."""
    live = subject.live_tensors()
    samples = run_rounds(
        {
            "capture": lambda: capture(subject.spec, subject.model, subject.optimizer, step=1),
            "[t.clone() for t in tensors]": lambda: [t.clone() for t in live],
        },
        repeat=repeat,
    )
    return [compared(group, samples, "capture", "[t.clone() for t in tensors]")]


@contextlib.contextmanager
def timed_calls(targets: list[tuple[Any, str]]) -> Iterator[dict[str, float]]:
    """Wrap ``owner.name`` for each target so that its calls add up their wall time."""
    totals = {name: 0.0 for _, name in targets}
    originals = [(owner, name, vars(owner)[name]) for owner, name in targets]

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return call

    for owner, name, _ in originals:
        wrapped = timed(name, getattr(owner, name))
        setattr(owner, name, staticmethod(wrapped) if isinstance(owner, type) else wrapped)
    try:
        yield totals
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


SAVE_PARTS = [
    (checkpoints, "encode_state"),
    (checkpoints, "dumps"),
    (checkpoints, "loads"),
    (commit_protocol, "committed"),
    (checkpoints, "write_weights"),
    (weights, "_layout"),
    (weights, "_write_all"),
    (weights, "_hash"),
    (checkpoints, "build_sidecar"),
    (commit_protocol, "write_bytes_durably"),
    (commit_protocol, "remove_durably"),
    (CheckpointMeta, "from_sidecar"),
]
LOAD_PARTS = [
    (checkpoints, "read_listed"),
    (checkpoints, "read_weights"),
    (checkpoints, "decode_state"),
]
#: Parts that run inside ``write_weights`` (``_hash`` in its worker thread, overlapping).
INSIDE_WRITE = ("_layout", "_write_all", "_hash")


def breakdown(
    run: Callable[[], object],
    parts: list[tuple[Any, str]],
    repeat: int,
    cleanup: Callable[[], None],
) -> dict[str, float]:
    """Median ms per part of ``run`` over ``repeat`` calls (one warm-up), and ``"total"``."""
    per_call: list[dict[str, float]] = []
    for index in range(repeat + 1):
        with timed_calls(parts) as totals:
            start = time.perf_counter()
            run()
            totals["total"] = time.perf_counter() - start
        cleanup()
        if index:
            inside = {name: totals.pop(name) for name in INSIDE_WRITE if name in totals}
            totals["other"] = totals["total"] - sum(
                value for name, value in totals.items() if name != "total"
            )
            if inside:
                totals["weights_rest"] = (
                    totals["write_weights"] - inside["_layout"] - inside["_write_all"]
                )
            per_call.append(totals | inside)
    return {name: statistics.median(c[name] for c in per_call) * 1e3 for name in per_call[0]}


def save_breakdown(subject: Trained, scratch: Path, repeat: int) -> dict[str, float]:
    """Where the time of ``save_state`` goes, beyond writing the weights."""
    out = scratch / "breakdown"
    out.mkdir()
    return breakdown(lambda: save_state(subject.state, out), SAVE_PARTS, repeat, lambda: clear(out))


def load_breakdown(subject: Trained, scratch: Path, repeat: int) -> dict[str, float]:
    """Where the time of ``load_state`` goes."""
    path = save_state(subject.state, scratch / "reference").weights_path
    return breakdown(lambda: load_state(path), LOAD_PARTS, repeat, lambda: None)


@contextlib.contextmanager
def fsync_disabled() -> Iterator[None]:
    """Make ``os.fsync`` a no-op: only to generate listing fixtures quickly (their durability
    does not matter; the files are the same)."""
    fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = fsync


def listing_rows(sizes: list[int], scratch: Path, repeat: int) -> list[Row]:
    """``latest_checkpoint`` and ``list_checkpoints`` over run directories of ``sizes``
    checkpoints, each made by ``save_state`` of a tiny state."""
    source = scratch / "listing-all"
    tiny = TrainState(spec=None, step=1, model={"w": torch.zeros(4)})
    with fsync_disabled():
        metas = [save_state(tiny.replace(step=step), source) for step in range(1, max(sizes) + 1)]
    rows = []
    for size in sizes:
        run_dir = scratch / f"listing-{size}"
        run_dir.mkdir()
        for meta in metas[:size]:
            for name in (meta.weights_file, meta.sidecar_path.name):
                os.link(source / name, run_dir / name)
        samples = run_rounds(
            {
                "latest_checkpoint": functools.partial(latest_checkpoint, run_dir),
                "list_checkpoints": functools.partial(list_checkpoints, run_dir),
            },
            repeat=repeat,
        )
        limit = {1000: 50.0, 10000: 100.0}.get(size)
        latest = samples.median_ms("latest_checkpoint")
        group = f"run dir with {size:,} checkpoints"
        rows.append(
            Row(
                group=group,
                measure="latest_checkpoint",
                ours_ms=latest,
                target=None if limit is None else f"<= {limit:g} ms",
                met=None if limit is None else latest <= limit,
                samples_ms=samples.ms("latest_checkpoint"),
            )
        )
        rows.append(
            Row(
                group=group,
                measure="list_checkpoints",
                ours_ms=samples.median_ms("list_checkpoints"),
                samples_ms=samples.ms("list_checkpoints"),
            )
        )
    return rows


def import_rows(repeat: int) -> list[Row]:
    """``import keisei_fn`` against ``import torch``, each timed inside a fresh interpreter
    (interpreter start-up and exit are left out: they are the same for both and only add
    noise), and ``import keisei_fn`` in an interpreter that has already imported torch.

    Bytecode caches are allowed (as for any installed package): the warm-up round writes them
    even when ``PYTHONDONTWRITEBYTECODE`` is set in the calling environment.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def importing(module: str, *, after: str = "") -> Callable[[], float]:
        script = (
            f"{after}\nimport time\nstart = time.perf_counter()\nimport {module}\n"
            "print(time.perf_counter() - start)"
        )
        command = [sys.executable, "-c", script]
        return lambda: float(
            subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout
        )

    samples = measure_rounds(
        {
            "import keisei_fn": importing("keisei_fn"),
            "import torch": importing("torch"),
            "import keisei_fn after import torch": importing("keisei_fn", after="import torch"),
        },
        repeat=repeat,
    )
    extra = samples.difference_ms("import keisei_fn", "import torch")
    own = samples.median_ms("import keisei_fn after import torch")
    group = "fresh interpreter"
    return [
        Row(
            group=group,
            measure="import keisei_fn",
            ours_ms=samples.median_ms("import keisei_fn"),
            baseline="import torch",
            baseline_ms=samples.median_ms("import torch"),
            extra_ms=extra,
            target="<= import torch + 50 ms",
            met=extra <= 50.0,
            samples_ms=samples.ms("import keisei_fn", "import torch"),
        ),
        Row(
            group=group,
            measure="import keisei_fn after import torch",
            ours_ms=own,
            target="<= 50 ms",
            met=own <= 50.0,
            samples_ms=samples.ms("import keisei_fn after import torch"),
        ),
    ]


@contextlib.contextmanager
def scratch_dir(parent: Path | None) -> Iterator[Path]:
    """A fresh directory under ``parent`` (the system temp dir by default), removed after."""
    path = Path(tempfile.mkdtemp(prefix="keisei-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
