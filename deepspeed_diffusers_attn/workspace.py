"""The scratch memory shared by every DeepSpeedDiffusersAttention layer.

One workspace exists per (device, stream). A layer's forward writes its
intermediates into it through the ops' ``*_out`` variants and reads them back
as views; only the final output linear allocates a fresh tensor, so nothing a
layer returns ever aliases the workspace.

Size. With ``e`` the element size of the layer's dtype, ``inner = heads * dim_head``,
batch ``B``, query length ``Sq`` and key length ``Sk`` (``Sk == Sq`` without a
context), one call needs::

    self-attention  (no context): e * B * Sq * inner * 4          # qkv [B,Sq,3,H,D] + o [B,Sq,H,D]
    with a context:               e * B * inner * (2*Sq + 2*Sk)   # q + kv [B,Sk,2,H,D] + o

(each piece rounded up to ``ALIGN`` bytes). The first call of layer 0 allocates
exactly what it needs (a UNet's layer 0 is its largest self-attention, so this
is usually final); any later call of any layer that needs more grows the
buffer to that call's size.

CUDA-graph capture never touches this buffer. A call captured into a graph carves its
pieces from a buffer allocated for that call during the capture, which comes from the
graph's private memory pool: the graph owns it (replays read it at the same address,
and the pool is freed with the graph), and no eager call ever uses it. So a graph
never reads memory that a later, larger eager call could free by growing the
workspace, and capture works with no warm-up on the capturing stream (PyTorch's
``torch.cuda.graph`` recipe and ``make_graphed_callables`` capture on a stream of their
own). Within one capture the pool reuses each call's buffer for the next, so a graph
holds about one call's worth, the largest.
"""
from __future__ import annotations

import torch

__all__ = ["ALIGN", "Workspace", "get_workspace", "workspace_nbytes", "release_workspaces"]

ALIGN = 256
"""Byte alignment of every piece carved from a workspace."""


def _align(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class Workspace:
    """A growable byte buffer for one (device, stream), carved into typed views.

    Usage per call: ``reserve(total_bytes)`` once, then ``take(...)`` for each
    piece, in order, starting from offset 0.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None  # uint8 [nbytes], for eager calls
        self._capture_buffer: torch.Tensor | None = None  # this captured call's, from the graph's pool
        self._offset = 0

    @property
    def nbytes(self) -> int:
        """The bytes currently allocated (0 before the first reserve)."""
        return 0 if self.buffer is None else self.buffer.numel()

    @staticmethod
    def bytes_for(shapes, dtype: torch.dtype) -> int:
        """The bytes ``reserve`` needs for pieces of these shapes and this dtype."""
        esize = dtype.itemsize
        total = 0
        for shape in shapes:
            n = 1
            for s in shape:
                n *= s
            total += _align(n * esize)
        return total

    def reserve(self, nbytes: int) -> None:
        """Make room for one call's ``nbytes`` and restart carving at 0.

        Eager: grows the buffer if it is smaller. During CUDA-graph capture: a fresh
        buffer of exactly ``nbytes`` from the graph's pool, used for this call only.
        """
        self._offset = 0
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._capture_buffer = None  # the previous captured call's: its memory returns to the pool
            self._capture_buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return
        self._capture_buffer = None
        if nbytes > self.nbytes:
            # The old buffer is released to the caching allocator, which orders
            # its reuse after the work already queued on this stream.
            self.buffer = None
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The next piece of the buffer as a contiguous tensor of this shape and dtype."""
        n = 1
        for s in shape:
            n *= s
        esize = dtype.itemsize
        buffer = self._capture_buffer if self._capture_buffer is not None else self.buffer
        start, end = self._offset, self._offset + n * esize
        if buffer is None or end > buffer.numel():
            raise RuntimeError(
                f"deepspeed_diffusers_attn: workspace overrun ({end} > "
                f"{0 if buffer is None else buffer.numel()} bytes); reserve() was called with too small a size"
            )
        self._offset = _align(end)
        return buffer[start:end].view(dtype).view(shape)


_WORKSPACES: dict[tuple, Workspace] = {}


def _key(device: torch.device) -> tuple:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ("cuda", index, torch.cuda.current_stream(index).cuda_stream)
    return (device.type, device.index, 0)


def get_workspace(device: torch.device) -> Workspace:
    """The workspace of ``device`` and its current stream (created empty on first use)."""
    device = torch.device(device)
    key = _key(device)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", key[1])
        ws = _WORKSPACES[key] = Workspace(device)
    return ws


def workspace_nbytes(device) -> int:
    """The bytes allocated for ``device``'s current stream (0 if none yet)."""
    ws = _WORKSPACES.get(_key(torch.device(device)))
    return 0 if ws is None else ws.nbytes


def release_workspaces() -> None:
    """Drop every workspace; the next forward allocates afresh."""
    _WORKSPACES.clear()
