"""The CUDA paths, on a real GPU: snapshots through page-locked memory, loads to the device,
exact AMP resume in a fresh process, compiled models. Every test here is marked ``cuda`` and is
skipped, saying why, where torch sees no GPU (tests/conftest.py); ``make gpu-check`` runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw_bytes

from keisei_fn import (
    AsyncSaver,
    ModelSpec,
    TrainState,
    build_model,
    capture,
    load_model,
    load_state,
    restore_,
    save_state,
)
from keisei_fn.precision import make_scaler, precision_policy
from keisei_fn.staging import PinnedBuffers, _side_stream, copy_to_device, copy_to_host
from keisei_fn.state import thaw
from keisei_fn.testing import assert_states_equal
from keisei_fn.testing.strategies import tensors

pytestmark = pytest.mark.cuda

TESTS = Path(__file__).resolve().parent
#: cuBLAS reads this when CUDA starts: deterministic matrix products (see README).
CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def on_cpu(state: TrainState) -> TrainState:
    """The state with model and optimizer tensors copied to the CPU (synchronously)."""
    return state.replace(
        model=thaw(state.model, on_tensor=lambda t: t.detach().cpu().clone()),
        optimizer=thaw(state.optimizer, on_tensor=lambda t: t.detach().cpu().clone()),
    )


def trained(spec: ModelSpec, batch: int = 8) -> tuple[torch.nn.Module, torch.optim.Adam]:
    model = build_model(spec, seed=0, device="cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step(model, optimizer, spec, batch)
    return model, optimizer


def step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: ModelSpec, batch: int
) -> None:
    logits, value = model(torch.randn(batch, *spec.obs_shape, device="cuda"))
    optimizer.zero_grad(set_to_none=True)
    (logits.logsumexp(-1).mean() + value.square().mean()).backward()
    optimizer.step()


def reference(
    spec: ModelSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer, at: int
) -> TrainState:
    """The state as it is after the work queued so far: clones queued on the current stream,
    nothing waited for (the caller queues more steps before it reads them)."""
    return TrainState(
        spec=spec,
        step=at,
        model={k: t.detach().clone() for k, t in model.state_dict().items()},
        optimizer=thaw(optimizer.state_dict(), on_tensor=lambda t: t.detach().clone()),
    )


def test_a_step_right_after_save_returns_never_reaches_the_snapshot(tmp_path: Path) -> None:
    """The snapshot holds exactly the state after the steps queued before ``capture`` (its
    copies wait for the training stream), and none of the steps queued after ``save`` returns
    (``capture`` waits for its copies: nothing between it and the next steps synchronises);
    what is written is that snapshot."""
    spec = ModelSpec()
    model, optimizer = trained(spec, batch=256)
    expected = {}
    with AsyncSaver(tmp_path) as saver:
        for at in range(1, 5):
            step(model, optimizer, spec, 256)  # queued, not waited for: the snapshot must see it
            state = capture(spec, model, optimizer, step=at, rng=False, staging=saver.staging)
            queued = reference(spec, model, optimizer, at)  # after the step, before the next
            saver.save(state)
            step(model, optimizer, spec, 256)  # queued at once: changes every parameter
            step(model, optimizer, spec, 256)
            expected[at] = on_cpu(queued)  # waits for the clones (and the steps) only now
            assert_states_equal(expected[at], state)
            assert all(t.is_pinned() for t in state.model.values() if t.numel())
            del state, queued
        nbytes = sum(t.nbytes for t in expected[1].model.values())
    for at, state in expected.items():
        assert_states_equal(state, load_state(tmp_path / f"checkpoint_ts{at}"))
    adam = sum(t.nbytes for s in expected[1].optimizer["state"].values() for t in s.values())
    assert saver.staging.held_bytes <= 2 * 1.2 * (nbytes + adam) + 2 * 512 * 1024


def test_a_snapshot_takes_no_gpu_memory() -> None:
    spec = ModelSpec()
    model, optimizer = trained(spec)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    state = capture(spec, model, optimizer, step=1)
    assert torch.cuda.max_memory_allocated() == before
    assert all(t.device.type == "cpu" for t in state.model.values())


def test_load_state_to_cuda_is_bit_exact_and_on_the_device(tmp_path: Path) -> None:
    spec = ModelSpec()
    model, optimizer = trained(spec)
    state = capture(spec, model, optimizer, step=1)
    save_state(state, tmp_path)
    loaded = load_state(tmp_path, map_location="cuda")
    assert all(t.is_cuda for t in loaded.model.values())
    assert_states_equal(state, on_cpu(loaded))
    net, _ = load_model(tmp_path, device="cuda")
    assert all(p.is_cuda for p in net.parameters())
    assert_states_equal(
        state.replace(optimizer=None, rng=None, extra={}),
        capture(spec, net, step=1, rng=False),
    )


def test_copy_to_device_through_chunks_is_bit_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randn(n, generator=generator) for n in (0, 1, 1000, 5000, 3)]
    sources.append(torch.arange(7, dtype=torch.int8))
    moved = copy_to_device(sources, "cuda", chunk_bytes=4096)
    for source, out in zip(sources, moved, strict=True):
        assert out.is_cuda and out.dtype == source.dtype
        assert torch.equal(out.cpu().view(torch.uint8), source.view(torch.uint8))


def bits(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor's values (a one-element view with an odd stride included)."""
    if tensor.numel() == 0:
        return b""
    return raw_bytes(tensor.detach().cpu().clone(memory_format=torch.contiguous_format))


def strided(tensor: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view of ``tensor`` (every other element), or the tensor itself."""
    return tensor.reshape(-1)[::2] if tensor.numel() > 2 else tensor


@settings(max_examples=30, deadline=None)
@given(st.lists(tensors(noncontiguous=True), max_size=6), st.integers(1, 64))
def test_odd_tensors_go_to_the_gpu_and_back_bit_exactly(
    sources: list[torch.Tensor], chunk_bytes: int
) -> None:
    """Every dtype (bool, bfloat16, integers), 0-d, empty and non-contiguous tensors, through
    tiny chunks to the GPU, then strided views of them back to page-locked memory."""
    moved = copy_to_device(sources, "cuda", chunk_bytes=chunk_bytes)
    views = [strided(t) for t in moved]
    hosts = copy_to_host(views, PinnedBuffers())
    for source, out, view, host in zip(sources, moved, views, hosts, strict=True):
        assert out.is_cuda and out.is_contiguous() and not host.is_cuda
        assert (out.dtype, out.shape) == (source.dtype, source.shape)
        assert bits(out) == bits(source)
        assert (host.dtype, host.shape) == (view.dtype, view.shape)
        assert bits(host) == bits(view)


def test_a_failed_snapshot_leaves_no_copy_running_into_its_buffer() -> None:
    """When a later copy fails, ``copy_to_host`` still waits for the copies it queued: the
    buffer goes back to the pool, and a copy still writing into it would corrupt the next
    snapshot lent it."""
    big = torch.randn(64 << 20, device="cuda")  # 256 MB: its copy takes milliseconds
    buffers = PinnedBuffers()
    with pytest.raises(NotImplementedError, match="meta"):
        copy_to_host([big, torch.empty(4, device="meta")], buffers)
    assert _side_stream(big.device).query()  # nothing queued on the copy stream still runs


def test_restore_onto_cuda_model_and_optimizer(tmp_path: Path) -> None:
    spec = ModelSpec(tower_depth=2, tower_width=32)
    model, optimizer = trained(spec)
    state = capture(spec, model, optimizer, step=1, rng=False)
    save_state(state, tmp_path)
    loaded = load_state(tmp_path)
    fresh = build_model(spec, seed=1, device="cuda")
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    restore_(loaded, fresh, fresh_optimizer)
    assert_states_equal(state, capture(spec, fresh, fresh_optimizer, step=1, rng=False))
    entries = next(iter(fresh_optimizer.state.values()))
    assert entries["exp_avg"].is_cuda and entries["step"].device.type == "cpu"
    step(fresh, fresh_optimizer, spec, 8)  # the restored optimizer steps; the snapshot stays
    assert_states_equal(state, loaded)


@pytest.mark.parametrize("capturable", [False, True])
def test_step_counts_loaded_to_cuda_are_placed_as_the_optimizer_wants(
    tmp_path: Path, capturable: bool
) -> None:
    # load_state(map_location="cuda") puts Adam's step counts on the GPU; a plain Adam must get
    # them back on the CPU (else it synchronises per parameter per step), a capturable one on
    # its parameters' device.
    spec = ModelSpec(tower_depth=2, tower_width=32)
    model, optimizer = trained(spec)
    save_state(capture(spec, model, optimizer, step=1, rng=False), tmp_path)
    loaded = load_state(tmp_path, map_location="cuda")
    fresh = build_model(spec, seed=1, device="cuda")
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2, capturable=capturable)
    restore_(loaded, fresh, fresh_optimizer)
    steps = {entries["step"].device.type for entries in fresh_optimizer.state.values()}
    assert steps == {"cuda" if capturable else "cpu"}
    step(fresh, fresh_optimizer, spec, 8)


def test_compiled_model_captures_and_restores_with_canonical_keys() -> None:
    spec = ModelSpec(model_type="testmodel")
    model = torch.compile(build_model(spec, seed=0, device="cuda"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step(model, optimizer, spec, 4)
    state = capture(spec, model, optimizer, step=1, rng=False)
    assert state.model and not any(k.startswith("_orig_mod.") for k in state.model)
    other = torch.compile(build_model(spec, seed=1, device="cuda"))
    other_optimizer = torch.optim.Adam(other.parameters(), lr=1e-2)
    restore_(state, other, other_optimizer)
    assert_states_equal(state, capture(spec, other, other_optimizer, step=1, rng=False))
    step(other, other_optimizer, spec, 4)


def test_precision_policy_on_a_real_gpu_picks_what_it_claims() -> None:
    fp16 = precision_policy("cuda", mixed_precision=True)
    assert (fp16.enabled, fp16.dtype, fp16.use_scaler) == (True, torch.float16, True)
    scaler = make_scaler(fp16)
    assert scaler is not None and scaler.is_enabled()
    bf16 = precision_policy("cuda", mixed_precision="bf16")
    assert (bf16.enabled, bf16.dtype, bf16.use_scaler) == (True, torch.bfloat16, False)
    assert make_scaler(bf16) is None
    layer = torch.nn.Linear(4, 4).cuda()
    for policy in (fp16, bf16):
        with policy.autocast():
            assert layer(torch.ones(2, 4, device="cuda")).dtype == policy.dtype


@pytest.mark.parametrize("check", ["default-network", "fp16", "bf16"])
def test_deterministic_cuda_training_and_exact_amp_resume_in_a_fresh_process(
    check: str, tmp_path: Path
) -> None:
    """fp16 + GradScaler and bf16: resumed in a fresh process, bit-identical to the straight run
    (scaler scale and growth tracker, every CUDA generator included); Keisei's default network
    trains under deterministic algorithms."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import cuda_loops; "
        "cuda_loops.prove(sys.argv[1], sys.argv[2])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, check, str(tmp_path)],
        env={**os.environ, **CUBLAS},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"{check}: ok" in done.stdout
