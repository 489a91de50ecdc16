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
buffer to that call's size. Growth never happens while a CUDA graph is being
captured: capture must reuse memory that exists, so run one eager call of the
largest shape, on the capturing stream, first.
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
        self.buffer: torch.Tensor | None = None  # uint8 [nbytes]
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
        """Make the buffer at least ``nbytes`` long and restart carving at 0.

        Raises RuntimeError if it would have to grow during CUDA-graph capture.
        """
        if nbytes > self.nbytes:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"deepspeed_diffusers_attn: the attention workspace on {self.device} "
                    f"(current stream) holds {self.nbytes} bytes but this call needs {nbytes}, "
                    "and it cannot grow during CUDA-graph capture. Run one eager warm-up call "
                    "with the largest shape (batch, sequence length) first, on the stream "
                    "that captures (e.g. under torch.cuda.stream(capture_stream)), then capture."
                )
            # The old buffer is released to the caching allocator, which orders
            # its reuse after the work already queued on this stream.
            self.buffer = None
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._offset = 0

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The next piece of the buffer as a contiguous tensor of this shape and dtype."""
        n = 1
        for s in shape:
            n *= s
        esize = dtype.itemsize
        start, end = self._offset, self._offset + n * esize
        if end > self.nbytes:
            raise RuntimeError(
                f"deepspeed_diffusers_attn: workspace overrun ({end} > {self.nbytes} bytes); "
                "reserve() was called with too small a size"
            )
        self._offset = _align(end)
        return self.buffer[start:end].view(dtype).view(shape)


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
