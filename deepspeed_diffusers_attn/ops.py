"""Typed wrappers over ``torch.ops.dda.*`` and their fake (meta) kernels.

The ops are declared once in ``csrc/torch/ops.cpp``; the CPU impls are the fp32 C
references, the CUDA impls run our kernels on the current stream. The fake kernels
here give shapes and dtypes to ``torch.compile`` and fake-tensor tracing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the library, which registers torch.ops.dda)

__all__ = [
    "linear",
    "linear_out",
    "attention",
    "attention_out",
    "attention_backends",
    "attention_precisions",
    "attention_kernel_for",
    "attention_kernel_name",
    "attention_supported",
    "cuda_built",
    "geglu",
    "group_norm",
    "group_norm_supported",
    "low_rank_accumulate",
    "LOW_RANK_MAX_SEGMENTS",
]

LOW_RANK_MAX_SEGMENTS = 16  # DDA_LOW_RANK_MAX_SEGMENTS: the segments one low_rank_accumulate call takes


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """``alpha * x @ weight.T + beta * residual + bias`` in one GEMM (cuBLASLt on CUDA).

    x: ``[..., K]``, last dim contiguous, leading dims collapsible into rows.
    weight: ``[N, K]`` contiguous (torch ``Linear`` layout). bias: ``[N]`` (not scaled by alpha).
    residual: ``[..., N]``; ignored terms may be ``None``. Returns a new ``[..., N]`` tensor.
    """
    return torch.ops.dda.linear(x, weight, bias, residual, float(alpha), float(beta))


def linear_out(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """:func:`linear` written into ``out`` (``[..., N]``; its row stride may exceed N). Returns ``out``."""
    torch.ops.dda.linear_out(x, weight, bias, residual, float(alpha), float(beta), out)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    precision: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward: ``softmax(scale * q k^T + mask) v``.

    q: ``[B, Sq, H, D]``, k/v: ``[B, Sk, H, D]``, any strides with D contiguous (for example
    ``qkv.unbind(2)`` of a packed ``[B, S, 3, H, D]``). mask: ``None``, bool (True = attend) or
    additive float, broadcastable to ``[B, H, Sq, Sk]``. scale defaults to ``1/sqrt(D)``.
    Scores and softmax are fp32 for every dtype. Returns ``(out [B, Sq, H, D], lse)``; lse is
    ``[B, H, Sq]`` fp32 when ``return_lse`` else an empty tensor. A fully masked row gives 0.
    backend: ``"auto"`` (the dispatcher picks) or one of :func:`attention_backends`; a family
    that cannot run the inputs raises, naming why (:func:`attention_supported`), and never
    falls back to another.
    precision: ``"exact"`` (the inputs multiplied as they are), or an 8-bit scheme of
    :func:`attention_precisions`: ``"int8-qk"`` (q k^T on an int8 grid per token, K smoothed
    by its channel means; p v exact) or ``"fp8"`` (the same q k^T; p and v on the e4m3 grid).
    ``csrc/include/dda.h`` defines them to the rounding; the C reference (CPU) computes them,
    no CUDA kernel yet, so CUDA tensors with an 8-bit precision raise. An input element that
    is not finite makes the outputs it reaches NaN under an 8-bit precision.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.dda.attention(q, k, v, mask, float(scale), bool(return_lse), str(backend), str(precision))


def attention_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: Optional[float],
    out: torch.Tensor,
    lse: Optional[torch.Tensor] = None,
    backend: str = "auto",
    precision: str = "exact",
) -> torch.Tensor:
    """:func:`attention` written into ``out`` ``[B, Sq, H, D]`` (and ``lse``, if given). Returns ``out``."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    torch.ops.dda.attention_out(q, k, v, mask, float(scale), out, lse, str(backend), str(precision))
    return out


def attention_backends() -> Tuple[str, ...]:
    """The values of ``backend``: ``"auto"``, ``"reference"`` (the C reference, the only
    backend for CPU tensors) and the CUDA kernel families (``"generic"``, ``"mma"``,
    ``"short"``, ``"d512"``, ``"sm90"``, ``"sm90_tma"``)."""
    return tuple(torch.ops.dda.attention_backends())


def attention_precisions() -> Tuple[str, ...]:
    """The values of ``precision`` (:func:`attention`): ``"exact"``, then the 8-bit schemes
    ``"int8-qk"`` and ``"fp8"``."""
    return tuple(torch.ops.dda.attention_precisions())


def attention_supported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    precision: str = "exact",
) -> str:
    """Why :func:`attention` would refuse these inputs with this backend and precision on
    their device, or ``""`` if it runs them. The op's own checks and the C capability rules
    (``dda_attention_supported_cpu`` / ``_cuda``) answer; nothing is launched."""
    return torch.ops.dda.attention_supported(q, k, v, mask, str(backend), str(precision))


def attention_kernel_name(
    device: torch.device | str | int, dtype: torch.dtype, head_dim: int, seq_k: int
) -> str:
    """The attention kernel chosen on ``device`` for this dtype and head dim, for inputs
    whose pointers and strides are 16-byte aligned (the packed projection layouts are;
    misaligned inputs run the generic kernel), or ``"cpu_reference"`` on the CPU.

    Where the choice depends on B·H·Sq (the mma kernel's tiling; on Hopper, the sm_90a
    kernel needs a full wave of 128-row blocks), the name lists the candidates
    (``wgmma_sm90_...|mma_sm80_..._m128kb64|m64kb64|m32kb64``); :func:`attention_kernel_for`
    answers exactly for given tensors.
    Starts with ``"unsupported: "`` and a reason when no kernel can run the case.
    ``seq_k`` <= 128 picks the short-key kernel (``short_sm80_...``: cross-attention on the
    text tokens) where the head dim is at most 160."""
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type == "cpu":
        # the C rules on stand-in tensors of this dtype and head dim (k expanded: no memory)
        q = torch.empty((1, 1, 1, max(int(head_dim), 0)), dtype=dtype)
        k = q.expand(1, max(int(seq_k), 0), 1, q.shape[-1])
        why = attention_supported(q, k, k)
        return "unsupported: " + why if why else "cpu_reference"
    major, minor = torch.cuda.get_device_capability(device)
    return torch.ops.dda.attention_kernel_name(major, minor, dtype, int(head_dim), int(seq_k))


def attention_kernel_for(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    precision: str = "exact",
) -> str:
    """The kernel :func:`attention` runs for these inputs, backend and precision on their
    device: the same selection as the launch (compute capability, build, dtype, head
    dim, alignment of the pointers and strides, grid size, backend, precision).
    ``"cpu_reference"`` on the CPU (``"cpu_reference (int8-qk)"`` for an 8-bit precision).
    Bad inputs raise the op's own errors; ``"unsupported: <why>"`` where no kernel (of that
    backend) runs them. Launches nothing."""
    return torch.ops.dda.attention_kernel_for(q, k, v, mask, str(backend), str(precision))


def geglu(x: torch.Tensor, approximate: bool = False) -> torch.Tensor:
    """diffusers' GEGLU activation in one pass: ``x[..., :N] * gelu(x[..., N:])`` for
    ``x [..., 2N]`` (the FeedForward projection output; last dim contiguous, leading dims
    collapsible into rows). ``approximate``: the tanh form of gelu. fp32 math; returns a
    new ``[..., N]`` tensor in x's dtype."""
    return torch.ops.dda.geglu(x, bool(approximate))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    silu: bool = False,
    shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.group_norm(x + shift)`` (then ``F.silu`` if ``silu``) for a channels-last
    ``[N, C, H, W]`` x, in x's layout: no NCHW round trip. fp32 statistics (per-channel
    shifted sums, combined in double). weight / bias: ``[C]`` in x's dtype, or None. shift:
    ``[N, C]`` or ``[N, C, 1, 1]`` in x's dtype (a ResnetBlock2D's projected time embedding),
    added in fp32 without rounding ``x + shift`` first, or None. On CUDA the channel count must
    be a multiple of ``16 // x.element_size()`` and x / weight / bias 16-byte aligned
    (:func:`group_norm_supported` says whether a call is taken). Returns a new channels-last tensor."""
    return torch.ops.dda.group_norm(x, int(num_groups), weight, bias, float(eps), bool(silu), shift)


def group_norm_supported(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> str:
    """Why :func:`group_norm` would refuse these inputs on their device, or ``""`` if it takes
    them. The op's own checks and the C capability rules (``dda_group_norm_supported_cpu`` /
    ``_cuda``) answer; nothing is allocated or launched."""
    return torch.ops.dda.group_norm_supported(x, int(num_groups), weight, bias, shift)


def low_rank_accumulate(
    t: torch.Tensor,
    factors: torch.Tensor,
    segments: Sequence[Tuple[int, int, int, torch.Tensor]],
    out: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """The B side of LoRA for every adapter of the projections that read one input, in one
    kernel: for each segment ``(r0, r1, col0, b)``::

        out[..., col0:col0 + n] += alpha * factors[r0] * t[..., r0:r1] @ b.T      (n = b.shape[0])

    t: ``[..., R]`` (x @ A.T of the adapters, their A stacked along the rank), last dim
    contiguous, leading dims collapsible into M rows. factors: float32 ``[R]`` on t's device,
    read when the kernel runs (a CUDA graph replays with the current values); a segment uses
    ``factors[r0]``. b: ``[n, r1 - r0]`` contiguous (the adapter's own ``lora_B`` weight).
    out: ``[..., N]`` with M rows (for example the fused Q/K/V output, one target per
    projection at its ``col0``), updated in place. At most :data:`LOW_RANK_MAX_SEGMENTS`
    segments. Segments with the same ``(col0, n)`` (several adapters on one projection) are
    summed in fp32 and added once; different targets must not share columns; segments may
    share ranks. A segment whose factor is exactly 0 adds nothing (``inf`` in its ranks of t
    gives no NaN); a NaN factor gives NaN in its columns. Columns outside the targets, and
    targets whose factors are all 0, are not written.

    Dtypes: t, b and out alike, float16 / bfloat16 on CUDA (tensor cores, fp32 accumulation),
    also float32 on the CPU (the C reference). Any r, n, col0 and strides; 16-byte aligned
    pointers, strides, r0, r, col0 and n (multiples of 8 elements) take the vector path.
    Returns ``out``.
    """
    b = [seg[3] for seg in segments]
    r0 = [int(seg[0]) for seg in segments]
    r1 = [int(seg[1]) for seg in segments]
    col0 = [int(seg[2]) for seg in segments]
    torch.ops.dda.low_rank_accumulate(t, factors, b, r0, r1, col0, float(alpha), out)
    return out


def cuda_built() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return bool(torch.ops.dda.cuda_built())


@torch.library.register_fake("dda::linear")
def _linear_fake(x, weight, bias, residual, alpha, beta):
    torch._check(weight.dim() == 2, lambda: "dda.linear: weight must be 2-D")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "dda.linear: x [..., K] must match weight [N, K]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("dda::linear_out")
def _linear_out_fake(x, weight, bias, residual, alpha, beta, out):
    return None


@torch.library.register_fake("dda::attention")
def _attention_fake(q, k, v, mask, scale, return_lse, backend="auto", precision="exact"):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "dda.attention: q, k must be 4-D")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if return_lse:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("dda::attention_out")
def _attention_out_fake(q, k, v, mask, scale, out, lse, backend="auto", precision="exact"):
    return None


@torch.library.register_fake("dda::geglu")
def _geglu_fake(x, approximate):
    torch._check(x.dim() >= 1 and x.shape[-1] % 2 == 0, lambda: "dda.geglu: the last dim of x must be even")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("dda::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, silu, shift=None):
    torch._check(x.dim() == 4, lambda: "dda.group_norm: x must be [N, C, H, W]")
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.register_fake("dda::low_rank_accumulate")
def _low_rank_accumulate_fake(t, factors, b, r0, r1, col0, alpha, out):
    torch._check(len(b) == len(r0) == len(r1) == len(col0),
                 lambda: "dda.low_rank_accumulate: b, r0, r1 and col0 need one entry per segment")
    return None
