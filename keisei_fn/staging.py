"""Host staging of device tensors: page-locked buffers, snapshot copies to the host and load
copies to the device, on a side stream.

``copy_to_host`` is how ``capture`` snapshots CUDA tensors: every tensor gets a place in one
page-locked host buffer, and the copies run with ``non_blocking=True`` on a side stream that
first waits for the device's current stream (the one the training step ran on). The call then
waits for the side stream's event, so the copies are complete when it returns: the snapshot
costs no GPU memory, the next optimizer step (queued after the call) cannot reach it, and the
caller's thread is blocked only for the work queued before the call and the copy itself.

:class:`PinnedBuffers` keeps such buffers for reuse (``AsyncSaver.staging``): a buffer is lent
again only once no tensor made from it is alive (each lending is a fresh ``memoryview`` that
every tensor made from it references; the pool holds only a weak reference to it), so reusing
buffers can never change a snapshot that is still in use — a write in flight, or a snapshot the
caller kept.

``copy_to_device`` is how loads reach the GPU: tensors are copied through two page-locked
buffers in turn, so the host copies the next piece (reading the verified memory map) while the
device copies the previous one.

Example:
    >>> import torch
    >>> buffers = PinnedBuffers(pin=False)
    >>> (host,) = copy_to_host([torch.arange(4.0)], buffers)
    >>> host.tolist(), buffers.held_bytes >= host.nbytes
    ([0.0, 1.0, 2.0, 3.0], True)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CHUNK_BYTES", "PinnedBuffers", "copy_to_device", "copy_to_host"]

#: Each tensor's place in a host buffer starts at a multiple of this many bytes (any itemsize
#: divides it, and transfers from such addresses run at full speed).
ALIGN = 512
#: The size of each of the two page-locked buffers a load to the device goes through.
CHUNK_BYTES = 32 << 20

_side_streams: dict[int, torch.cuda.Stream] = {}
_side_lock = threading.Lock()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This process's copy stream for a CUDA device (one per device, made once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _side_lock:
        if index not in _side_streams:
            _side_streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
        return _side_streams[index]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(slots=True)
class _Buffer:
    """One host buffer and the weak reference to its current lending (None: never lent)."""

    memory: torch.Tensor
    lent: weakref.ref[memoryview] | None = None

    @property
    def free(self) -> bool:
        return self.lent is None or self.lent() is None


class PinnedBuffers:
    """Reusable page-locked host memory for snapshots of device tensors.

    Args:
        pin: page-lock the buffers (default: when CUDA is available; page-locked memory needs
            CUDA). Unpinned buffers behave the same, only the device copies are slower.
        keep: how many buffers to hold for reuse. ``AsyncSaver`` needs two: one the write in
            flight reads, one the next snapshot fills. A buffer forgotten while lent is freed
            when its last tensor dies.

    A buffer too small for a snapshot is replaced by one an eighth larger than needed, so a
    state that grows a little does not reallocate on every save.

    Example:
        >>> buffers = PinnedBuffers(pin=False)
        >>> first = buffers.lend(800)
        >>> second = buffers.lend(800)  # the first is still referenced: another buffer
        >>> buffers.held_bytes
        1800
        >>> del first
        >>> third = buffers.lend(800)  # the first one again
        >>> buffers.held_bytes
        1800
    """

    def __init__(self, *, pin: bool | None = None, keep: int = 2) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.keep = keep
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers held for reuse."""
        with self._lock:
            return sum(buffer.memory.numel() for buffer in self._buffers)

    def lend(self, nbytes: int) -> memoryview:
        """A writable buffer of at least ``nbytes`` bytes that no live tensor made from an
        earlier lending uses. Make tensors from it with ``torch.frombuffer``: the buffer is
        lent again once all of them (and the returned view) are gone.

        Raises:
            ValueError: for a negative size.
        """
        if nbytes < 0:
            raise ValueError(f"cannot lend {nbytes} bytes")
        with self._lock:
            free = [b for b in self._buffers if b.free]
            fitting = [b for b in free if b.memory.numel() >= nbytes]
            if fitting:
                buffer = min(fitting, key=lambda b: b.memory.numel())
            else:
                if free:  # too small: replace the largest free one
                    self._buffers.remove(max(free, key=lambda b: b.memory.numel()))
                buffer = _Buffer(self._allocate(nbytes + nbytes // 8))
                self._buffers.append(buffer)
                while len(self._buffers) > self.keep:  # forget the oldest (lent) one
                    self._buffers.pop(0)
            view = buffer.memory.numpy().data
            buffer.lent = weakref.ref(view)
            return view

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)


def _host_view(buffer: memoryview, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like ``like`` at ``offset`` of ``buffer``, with a storage of
    its own (so encoding a snapshot does not take its tensors for views of one storage)."""
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    flat = torch.frombuffer(buffer, dtype=like.dtype, count=like.numel(), offset=offset)
    return flat.view(like.shape)


def copy_to_host(
    tensors: Sequence[torch.Tensor], buffers: PinnedBuffers | None = None
) -> list[torch.Tensor]:
    """Contiguous host copies of ``tensors``, in (page-locked) host memory, complete on return.

    CUDA tensors are copied with ``non_blocking=True`` on a side stream of their device that
    first waits for the device's current stream; the call waits for the copies' event (not for
    the whole device). Other tensors are copied directly. Each copy has a storage of its own
    within one buffer lent by ``buffers`` (a fresh buffer when None).

    Args:
        tensors: the tensors to copy (e.g. a ``state_dict``'s, on any devices).
        buffers: where the host memory comes from, for reuse across snapshots.

    Returns:
        The copies, in order: CPU tensors of the same dtypes, shapes and values.

    Example:
        >>> copy_to_host([torch.ones(2, dtype=torch.int8)], PinnedBuffers(pin=False))
        [tensor([1, 1], dtype=torch.int8)]
    """
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += _aligned(tensor.numel() * tensor.element_size())
    if buffers is None:
        buffers = PinnedBuffers(keep=0)
    buffer = buffers.lend(total)
    hosts = [_host_view(buffer, o, t) for o, t in zip(offsets, tensors, strict=True)]
    by_device: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(i)
    sides = []
    try:
        for device, indices in by_device.items():
            if device.type != "cuda":
                for i in indices:
                    hosts[i].copy_(tensors[i].detach())
                continue
            side = _side_stream(device)
            sides.append(side)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for i in indices:
                    hosts[i].copy_(tensors[i].detach(), non_blocking=True)
    finally:
        # complete before return (no record_stream needed on the sources), and also when a
        # copy failed: the buffer goes back to the pool only once nothing writes into it
        for side in sides:
            side.record_event().synchronize()
    return hosts


def copy_to_device(
    tensors: Sequence[torch.Tensor],
    device: str | torch.device,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> list[torch.Tensor]:
    """New tensors on ``device`` holding the values of host ``tensors``, copied through two
    page-locked buffers of ``chunk_bytes`` in turn: the host fills one while the device copies
    from the other.

    On CUDA the copies run on a side stream; the device's current stream waits for them, so
    work queued after the call sees the values (the host does not wait). For any other device
    the same pieces are copied directly (unpinned).

    Args:
        tensors: CPU tensors (e.g. verified views of a checkpoint's memory map).
        device: the destination.
        chunk_bytes: each buffer's size; larger tensors go through in pieces.

    Returns:
        The new tensors, in order (contiguous, same dtypes and shapes).

    Raises:
        ValueError: for ``chunk_bytes`` < 1.

    Example:
        >>> moved = copy_to_device([torch.arange(6).view(2, 3)], "cpu", chunk_bytes=16)
        >>> moved[0].tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    device = torch.device(device)
    outs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in tensors]
    cuda = device.type == "cuda"
    side = _side_stream(device) if cuda else None
    if side is not None:  # the destinations were allocated on the current stream
        side.wait_stream(torch.cuda.current_stream(device))
    stage = _Staging(chunk_bytes, pin=cuda, side=side)
    try:
        for src, out in zip(tensors, outs, strict=True):
            if src.numel() == 0:
                continue
            flat = src.detach().resolve_conj().resolve_neg().reshape(-1)  # bytes of the values
            if flat.stride(0) != 1:  # one element with an odd stride: contiguous, not viewable
                flat = flat.clone(memory_format=torch.contiguous_format)
            src_bytes = flat.view(torch.uint8)
            out_bytes = out.view(-1).view(torch.uint8)
            for start in range(0, src_bytes.numel(), chunk_bytes):
                end = min(start + chunk_bytes, src_bytes.numel())
                stage.add(src_bytes[start:end], out_bytes[start:end])
        stage.flush()
    finally:
        # The destinations belong to the current stream (the caching allocator reuses their
        # memory in its order): it waits for the copies, also when one failed and they are freed
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
    return outs


class _Staging:
    """Two host buffers in turn: pieces are packed into the current one, whose device copies
    are issued when it is full; a buffer is refilled only after its copies finished."""

    def __init__(self, chunk_bytes: int, *, pin: bool, side: torch.cuda.Stream | None) -> None:
        self._chunk = chunk_bytes
        self._pin = pin
        self._side = side
        self._buffers: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0
        self._fill = 0
        self._pending: list[tuple[torch.Tensor, int, int]] = []

    def add(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Stage ``src`` (bytes, at most a buffer's size) for copying into ``dst``."""
        size = src.numel()
        if self._fill + size > self._chunk:
            self.flush()
        if len(self._buffers) <= self._slot:  # made when first needed
            self._buffers.append(torch.empty(self._chunk, dtype=torch.uint8, pin_memory=self._pin))
        self._buffers[self._slot][self._fill : self._fill + size].copy_(src)
        self._pending.append((dst, self._fill, size))
        self._fill = _aligned(self._fill + size)

    def flush(self) -> None:
        """Issue the current buffer's copies and switch to the other buffer, once the copies
        from that one have finished."""
        if not self._pending:
            return
        buffer = self._buffers[self._slot]
        if self._side is None:
            for dst, start, size in self._pending:
                dst.copy_(buffer[start : start + size])
        else:
            with torch.cuda.stream(self._side):
                for dst, start, size in self._pending:
                    dst.copy_(buffer[start : start + size], non_blocking=True)
            self._copied[self._slot] = self._side.record_event()
        self._pending.clear()
        self._fill = 0
        self._slot ^= 1
        copied = self._copied[self._slot]
        if copied is not None:
            copied.synchronize()
