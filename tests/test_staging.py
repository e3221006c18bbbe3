"""keisei_fn.staging on the CPU: the host copies, the buffer pool's reuse rules and the chunked
device copies, through the same code the CUDA paths take (unpinned buffers; a CPU destination
copies each staged piece directly instead of on a side stream). The CUDA side is in
test_cuda.py."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from saved_states import raw_bytes
from torch.utils._python_dispatch import TorchDispatchMode

from keisei_fn import AsyncSaver, ModelSpec, build_model, capture, load_state, restore_
from keisei_fn.staging import ALIGN, PinnedBuffers, copy_to_device, copy_to_host
from keisei_fn.testing import assert_states_equal
from keisei_fn.testing.strategies import tensors


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: dtype, shape and bytes (an empty tensor has none to compare). Compared
    through fresh copies: ``raw_bytes`` cannot view one element with an odd stride as bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    fresh = [t.clone(memory_format=torch.contiguous_format) for t in (a, b)]
    return a.numel() == 0 or raw_bytes(fresh[0]) == raw_bytes(fresh[1])


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@given(st.lists(tensors(noncontiguous=True), max_size=6))
def test_copy_to_host_is_bit_exact_contiguous_and_each_copy_has_its_own_storage(
    sources: list[torch.Tensor],
) -> None:
    buffers = PinnedBuffers(pin=False)
    hosts = copy_to_host(sources, buffers)
    assert len(hosts) == len(sources)
    for source, host in zip(sources, hosts, strict=True):
        assert same(source, host)
        assert host.device.type == "cpu" and host.is_contiguous()
    placed = [h for h in hosts if h.numel()]
    assert len({storage_of(h) for h in placed}) == len(placed)  # codec: no shared storages
    assert all(storage_of(h) % ALIGN == storage_of(placed[0]) % ALIGN for h in placed)


def test_a_buffer_is_not_lent_again_while_a_tensor_made_from_it_lives() -> None:
    buffers = PinnedBuffers(pin=False)
    first = copy_to_host([torch.arange(1000.0)], buffers)[0]
    second = copy_to_host([torch.ones(1000)], buffers)[0]  # the first is alive: another buffer
    assert storage_of(second) != storage_of(first)
    kept_view = first[10:20]
    del first
    gc.collect()
    third = copy_to_host([torch.zeros(1000)], buffers)[0]  # a view of the first still lives
    assert torch.equal(kept_view, torch.arange(10.0, 20.0))
    assert torch.equal(second, torch.ones(1000))
    third_ptr = storage_of(third)
    del kept_view, third
    fourth = copy_to_host([torch.full((1000,), 7.0)], buffers)[0]
    assert storage_of(fourth) == third_ptr  # the only free buffer the pool still holds
    assert torch.equal(second, torch.ones(1000))


def test_buffers_are_reused_allocated_once_and_grown_when_the_state_grows() -> None:
    buffers = PinnedBuffers(pin=False)
    addresses = set()
    for _ in range(5):  # what AsyncSaver sees: each snapshot dropped after its write
        (host,) = copy_to_host([torch.ones(4096)], buffers)
        addresses.add(storage_of(host))
        del host
    assert len(addresses) == 1
    held = buffers.held_bytes
    assert 4096 * 4 <= held < 2 * 4096 * 4
    (host,) = copy_to_host([torch.ones(8192)], buffers)  # grown: the small one is replaced
    assert 8192 * 4 <= buffers.held_bytes < 2 * 8192 * 4
    grown = storage_of(host)
    del host
    (host,) = copy_to_host([torch.ones(8200)], buffers)  # headroom: the same buffer
    assert storage_of(host) == grown
    assert buffers.held_bytes < 2 * 8192 * 4


def test_the_pool_keeps_at_most_keep_buffers_and_never_reuses_a_lent_one() -> None:
    buffers = PinnedBuffers(pin=False, keep=2)
    kept = [copy_to_host([torch.full((256,), float(i))], buffers)[0] for i in range(4)]
    assert buffers.held_bytes <= 2 * (256 * 4 + 128)
    for i, host in enumerate(kept):
        assert torch.equal(host, torch.full((256,), float(i)))


def test_lend_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError, match="-1"):
        PinnedBuffers(pin=False).lend(-1)


@given(
    st.lists(tensors(noncontiguous=True), max_size=6),
    st.integers(min_value=1, max_value=64),
)
def test_copy_to_device_through_small_chunks_is_bit_exact(
    sources: list[torch.Tensor], chunk_bytes: int
) -> None:
    moved = copy_to_device(sources, "cpu", chunk_bytes=chunk_bytes)
    for source, out in zip(sources, moved, strict=True):
        assert same(source, out)
        if source.numel():
            assert storage_of(out) != storage_of(source)


def test_conjugate_and_negative_views_are_copied_as_their_values() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j, -5j])
    views = [z.conj(), torch.conj_physical(z).conj().imag, z.conj().imag]
    assert views[0].is_conj() and views[2].is_neg()
    for moved in (copy_to_device(views, "cpu", chunk_bytes=8), copy_to_host(views)):
        for view, copy in zip(views, moved, strict=True):
            assert same(view, copy)


def test_copy_to_device_refuses_empty_chunks() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        copy_to_device([torch.ones(1)], "cpu", chunk_bytes=0)


def test_async_saver_writes_snapshots_taken_into_its_staging_buffers(tmp_path: Path) -> None:
    spec = ModelSpec(model_type="testmodel", num_actions=32)
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    expected = []
    with AsyncSaver(tmp_path) as saver:
        assert saver.staging.pin == torch.cuda.is_available()
        for step in (1, 2, 3):
            model(torch.ones(2, *spec.obs_shape))[0].sum().backward()
            optimizer.step()
            state = capture(spec, model, optimizer, step=step, staging=saver.staging)
            saver.save(state)
            expected.append(capture(spec, model, optimizer, step=step))
    for step, state in enumerate(expected, 1):
        assert_states_equal(state, load_state(tmp_path / f"checkpoint_ts{step}"))


def test_restore_clones_cpu_optimizer_state_so_a_step_leaves_the_snapshot_alone() -> None:
    spec = ModelSpec(model_type="testmodel", num_actions=32)
    model = build_model(spec, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, *spec.obs_shape))[0].sum().backward()
    optimizer.step()
    state = capture(spec, model, optimizer, step=1)
    before = capture(spec, model, optimizer, step=1)
    restore_(state, model, optimizer)
    model(torch.ones(2, *spec.obs_shape))[0].sum().backward()
    optimizer.step()
    assert_states_equal(before, state)


def test_se_pooling_is_a_mean_whose_backward_is_deterministic_on_every_device() -> None:
    """The SE blocks' ``adaptive_avg_pool2d(x, 1)`` reaches the backends as ``aten.mean`` and
    its backward as expand and divide: a composite above the device dispatch, so CUDA runs the
    same ops (deterministic), never the pooling kernels (whose CUDA backward is not)."""
    seen: set[str] = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    se = build_model(ModelSpec(tower_depth=1, tower_width=16), seed=0).res_blocks[0].se
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    with Ops():
        se(x).sum().backward()
    assert "aten::mean" in seen
    assert not {op for op in seen if "pool" in op}, seen


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_the_network_scripts() -> None:
    model = build_model(ModelSpec(tower_depth=1, tower_width=16), seed=0)
    x = torch.randn(2, 46, 9, 9, generator=torch.Generator().manual_seed(1))
    scripted = torch.jit.script(model)
    for a, b in zip(scripted(x), model(x), strict=True):
        assert same(a, b)
