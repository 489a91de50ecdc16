"""Fixed-address float32 factors that CUDA graphs read at replay, written for a whole model in
one host-to-device copy.

The LoRA banks (:mod:`.adapters.lora_bank`) of every patched attention module keep their
adapters' factors here. An adapter switch (``set_adapters``...) changes the factors
of every module; writing each module's slice with its own copies would cost a few tensor
operations per module (milliseconds for a UNet's 140 modules). Here a bank writes its
values into a host mirror (plain Python arrays, no tensor operation), and :func:`flush`
copies the written range of each changed chunk to the device once (one copy per switch while
the model's factors fit one chunk), on the current stream, before anything
reads it: at the end of :meth:`.module_state.ModelState.key` (before a graph replays or
is captured) and before a module's eager kernels run.

Storage comes in chunks that never move (a captured graph holds their addresses); a
bank that is rebuilt gets a new slice, and a chunk is freed once no live slice is in it.
"""
from __future__ import annotations

from array import array

import torch

__all__ = ["Slice", "reserve", "flush", "pending", "capturing"]

_CHUNK = 1 << 16  # entries per chunk (256 KiB): SDXL's 140 modules with 2 adapters of rank 32 take 36K
_pools: dict = {}  # device -> list of live chunks, the last one open for new slices
_dirty: dict = {}  # chunks written since their last flush (dict: insertion-ordered set)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (factors must not change then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _refuse_during_capture() -> None:
    if capturing():
        raise RuntimeError("deepspeed_diffusers_attn: fixed-address factors (LoRA adapter state) changed during a "
                           "CUDA-graph capture; run one eager call after changing adapters")


class _Chunk:
    """One block of device storage with its host mirror."""

    def __init__(self, device: torch.device, size: int):
        self.device = device
        self.factors = torch.zeros(size, dtype=torch.float32, device=device)
        self.host_factors = array("f", bytes(4 * size))
        self.size = size
        self.used = 0  # entries handed out (slices are never reused: a rebuilt bank takes new ones)
        self.live = 0  # slices not yet released
        self.lo, self.hi = size, 0  # the range written since the last flush

    def flush(self) -> None:
        lo, hi = self.lo, self.hi
        self.lo, self.hi = self.size, 0
        if hi <= lo:
            return
        f = torch.frombuffer(self.host_factors, dtype=torch.float32, count=hi - lo, offset=4 * lo)
        if self.device.type == "cuda":
            # fresh pinned staging per flush: the copy is ordered on the current stream without
            # the host waiting for it, and torch's pinned allocator reuses a staging buffer only
            # once its copy is done
            f = f.pin_memory()
        self.factors[lo:hi].copy_(f, non_blocking=True)


class Slice:
    """``n`` consecutive entries of a chunk: :attr:`factors` (float32) is a device view that
    never moves; :meth:`write` sets it (seen after :func:`flush`)."""

    def __init__(self, chunk: _Chunk, start: int, n: int):
        self._chunk, self._start, self.n = chunk, start, n
        self.factors = chunk.factors[start : start + n]

    def write(self, entries) -> None:
        """Stage ``((index, value), ...)``: those entries of the slice get those values (the
        others keep theirs). Raises during a CUDA-graph capture (the capture would freeze them)."""
        _refuse_during_capture()
        c, s, hf = self._chunk, self._start, self._chunk.host_factors
        for i, value in entries:
            if not 0 <= i < self.n:
                raise IndexError(f"factor slice of {self.n} entries given index {i}")
            hf[s + i] = value
        c.lo, c.hi = min(c.lo, s), max(c.hi, s + self.n)
        _dirty[c] = None

    def release(self) -> None:
        """Give the entries back (the chunk is freed with its last live slice)."""
        c, self._chunk = self._chunk, None
        if c is None:
            return
        c.live -= 1
        chunks = _pools.get(c.device, [])
        if c.live == 0 and c is not (chunks[-1] if chunks else None):
            chunks.remove(c)
            _dirty.pop(c, None)


def reserve(n: int, device: torch.device) -> Slice:
    """A new slice of ``n`` entries on ``device`` (0 until written)."""
    chunks = _pools.setdefault(device, [])
    if not chunks or chunks[-1].used + n > chunks[-1].size:
        last = chunks[-1] if chunks else None
        if last is not None and last.live == 0:
            chunks.pop()
        chunks.append(_Chunk(device, max(_CHUNK, n)))
    c = chunks[-1]
    piece = Slice(c, c.used, n)
    c.used += n
    c.live += 1
    return piece


def pending() -> bool:
    """Whether some slice was written since the last :func:`flush`."""
    return bool(_dirty)


def flush() -> None:
    """Copy every written chunk to its device (on the current stream). Raises during a
    CUDA-graph capture when something is pending."""
    if not _dirty:
        return
    _refuse_during_capture()
    chunks = list(_dirty)
    _dirty.clear()
    for c in chunks:
        c.flush()
