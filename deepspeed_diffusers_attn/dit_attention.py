"""Fused attention for DiT and video transformers: joint text+image attention with QK RMSNorm
and RoPE (SD3, SD3.5, Flux), and cross-attention with QK RMSNorm and a second K/V set (Wan).

Two modules, both inference only and both without any diffusers import (the adapters in
:mod:`.adapters` map diffusers modules onto them):

:class:`JointAttention`: one or two token streams, ``x`` (image tokens) and an optional
``context`` (text tokens), attending jointly::

    x [B,Sx,Cx] ──► QKV GEMM (+bias) ──► rows of qkv ─┐   qkv [B, S, 3, H, D], S = Sx + Sc, the two
    c [B,Sc,Cc] ──► QKV GEMM (+bias) ──► rows of qkv ─┤   streams' rows in the caller's order
                    RMSNorm(q, k) and RoPE, in place ─┘   (one pass per stream, fp32 math)
    attention(q, k, v) on qkv.unbind(2)                   strided views: no concatenation, no copy
    o [B, S, H, D] ──► rows of x ─► out GEMM (+bias) ──► y_x [B, Sx, Cx_out]
                   └─► rows of c ─► out GEMM (+bias) ──► y_c [B, Sc, Cc_out]  (or o's rows, raw)

:class:`QKNormCrossAttention`: queries from ``x``, keys/values from a ``context`` and,
optionally, a second attention over an ``image`` context added to the first (Wan I2V)::

    x ──► Q GEMM ──► RMSNorm(q)           c ──► KV GEMM ──► kv [B, Sc, 2, H, D], RMSNorm(k)
    o = attention(q, k, v) [+ attention(q, k_img, v_img)] ──► out GEMM (+bias) ──► y

What each step costs (e = bytes per element, inner = H * D, B batch, S tokens):

* projections: one cuBLASLt GEMM per stream, its bias in the epilogue, written straight into
  that stream's rows of the packed buffer (a row stride of ``3 * inner``), 2·B·S·C·3·inner
  FLOPs. With B > 1 and two streams, a stream's rows of ``[B, S, ...]`` are not one strided
  matrix, so each stream takes B GEMMs of S_stream rows (the same FLOPs);
* QK RMSNorm and RoPE: torch ops over the q/k rows of the packed buffer, in fp32, written back
  once: seven kernels (an fp32 copy, ``F.rms_norm``, the weight, two products and two fused
  multiply-adds writing the even and odd halves into the buffer), each reading or writing
  about B·S·2·inner elements (a fused norm+RoPE kernel would make this one pass of
  2·B·S·2·inner·e bytes);
* attention: our kernel reading q, k, v from the packed layout, 4·B·H·S²·D FLOPs; ``o`` is one
  new ``[B, S, H, D]`` tensor;
* output projections: one GEMM per stream (B per stream when B > 1 and there are two streams),
  bias in the epilogue, 2·B·S·inner·C_out FLOPs, each into a new tensor.

Against diffusers' processors this saves the three ``torch.cat`` copies of q/k/v
(3·B·S·inner·e bytes written), the head transposes SDPA needs, the ``.contiguous()`` copies
of the split outputs and the separate bias adds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .attention import unsupported_head_dim
from .precision import AttentionPrecision, precision_problem

__all__ = [
    "QKNorm",
    "Stream",
    "Rope",
    "JointAttentionConfig",
    "JointAttention",
    "CrossAttentionConfig",
    "QKNormCrossAttention",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QKNorm:
    """RMSNorm applied to queries and/or keys: ``x * rsqrt(mean(x²) + eps) * weight`` in fp32.

    across_heads: normalise over all heads at once (width ``heads * dim_head``, Wan) instead
        of over each head (width ``dim_head``, SD3.5, Flux).
    eps: the epsilon; None means ``torch.finfo(dtype).eps`` of the module's dtype (as
        ``torch.nn.RMSNorm(eps=None)``).
    affine: whether there is a weight (``elementwise_affine``).
    """

    across_heads: bool = False
    eps: Optional[float] = 1e-6
    affine: bool = True

    def width(self, heads: int, dim_head: int) -> int:
        """The normalised width: ``heads * dim_head`` across heads, else ``dim_head``."""
        return heads * dim_head if self.across_heads else dim_head


@dataclass(frozen=True)
class Stream:
    """One token stream of a :class:`JointAttention`.

    in_features: its channels C (the QKV projection's input width).
    qkv_bias: whether its Q/K/V projections have a bias (all three, or none: zero-filled).
    out_features: its output projection's width; None: no output projection, the stream's
        rows of the attention output are returned as they are.
    out_bias: whether the output projection has a bias.
    qk_norm: the RMSNorm of its queries and keys (one spec for both, two weights), or None.
    """

    in_features: int
    qkv_bias: bool = True
    out_features: Optional[int] = None
    out_bias: bool = True
    qk_norm: Optional[QKNorm] = None


class Rope(NamedTuple):
    """Rotary embedding of adjacent pairs ``(x[2i], x[2i+1])`` of each head, as tables per token.

    ``y[2i]   = x[2i]   * cos_even[s, i] - x[2i+1] * sin_even[s, i]``
    ``y[2i+1] = x[2i+1] * cos_odd[s, i]  + x[2i]   * sin_odd[s, i]``

    Each table is ``[S, D/2]`` (any strides, any float dtype: the math runs in the wider of
    fp32 and the tables' dtype) over all S tokens of the call, in the order the streams'
    rows are packed. With ``cos_even == cos_odd`` and ``sin_even == sin_odd`` this is the
    usual complex rotation; four tables reproduce variants that read them differently.
    """

    cos_even: torch.Tensor
    sin_even: torch.Tensor
    cos_odd: torch.Tensor
    sin_odd: torch.Tensor

    def rows(self, start: int, end: int) -> "Rope":
        """The tables of tokens ``start:end``."""
        return Rope(*(t[start:end] for t in self))

    def check(self, seq: int, dim_head: int) -> None:
        """ValueError unless every table is a floating ``[seq, dim_head / 2]`` tensor."""
        want = (seq, dim_head // 2)
        for name, t in zip(self._fields, self):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"rope.{name} must be a floating tensor of shape {list(want)} "
                                 f"([tokens, head_dim / 2]), got {got}")


def _check_common(problems: list, heads: int, dim_head: int, dtype: torch.dtype, precision: str) -> None:
    """Append to ``problems`` what is wrong with the heads, head dim, dtype and attention
    precision shared by both configs."""
    if heads < 1:
        problems.append(f"heads must be >= 1, got {heads}")
    why = unsupported_head_dim(dim_head)
    if why:
        problems.append(why)
    if dtype not in _DTYPES:
        problems.append(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    why = precision_problem(precision)
    if why:
        problems.append(why)


class _HeadsConfig:
    """What both configs derive from ``heads``, ``dim_head`` and ``scale``."""

    @property
    def inner_dim(self) -> int:
        """heads * dim_head."""
        return self.heads * self.dim_head

    @property
    def softmax_scale(self) -> float:
        """The scale used: ``scale``, or 1/sqrt(dim_head)."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.dim_head)


@dataclass
class JointAttentionConfig(_HeadsConfig):
    """Shape and options of a :class:`JointAttention`.

    heads, dim_head: H and D of every stream (inner = H * D).
    x: the image-token stream (always present).
    context: the text-token stream, or None (self-attention of ``x`` only).
    context_first: the packed order: ``[context; x]`` (Flux) instead of ``[x; context]`` (SD3);
        it decides which RoPE table rows each stream gets and the summation order of the softmax.
    scale: the softmax scale; None means 1/sqrt(dim_head).
    dtype: the parameters' dtype.
    attention_precision: ``"exact"`` or an 8-bit scheme (:mod:`.precision`).
    """

    heads: int
    dim_head: int
    x: Stream
    context: Optional[Stream] = None
    context_first: bool = False
    scale: Optional[float] = None
    dtype: torch.dtype = torch.float32
    attention_precision: str = "exact"

    def __post_init__(self):
        problems = []
        _check_common(problems, self.heads, self.dim_head, self.dtype, self.attention_precision)
        for name, s in (("x", self.x), ("context", self.context)):
            if s is not None and (s.in_features < 1 or (s.out_features is not None and s.out_features < 1)):
                problems.append(f"{name}: in_features and out_features must be >= 1")
        if problems:
            raise ValueError("JointAttentionConfig: " + "; ".join(problems))


class _InferenceOnly(torch.autograd.Function):
    """Runs a forward closure as one autograd node whose backward raises (the kernels have none)."""

    @staticmethod
    def forward(ctx, run, *tensors):
        """``run()``; ``tensors`` are passed only so that autograd records this node."""
        return run()

    @staticmethod
    def backward(ctx, *grads):
        """Always raises: the fused DiT attention modules are inference only."""
        raise RuntimeError(
            "deepspeed_diffusers_attn's DiT attention is inference-only and has no backward. Run it under "
            "torch.no_grad() or torch.inference_mode(), or unpatch the model (dda.unpatch) to train.")


def _run_inference_only(run, module: nn.Module, inputs):
    """``run()``, through :class:`_InferenceOnly` when autograd is recording and one of ``inputs``
    or ``module``'s parameters needs grad (so that a backward raises instead of passing silently)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return run()
    tensors = tuple(t for t in (*inputs, *module.parameters()) if isinstance(t, torch.Tensor))
    if any(t.requires_grad for t in tensors):
        return _InferenceOnly.apply(run, *tensors)
    return run()


def _input(t, name: str, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t [B, S, width] checked and made what the GEMM reads: the module's dtype (float32 is
    cast to a float16/bfloat16 module's), contiguous (copied only if it is not)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[-1] != width or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [B, S, {width}] tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the module is on {device}")
    if t.dtype != dtype:
        if not (t.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
            raise TypeError(f"{name} has dtype {t.dtype} but the module is {dtype}")
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _mask(mask, batch: int, seq_k: int):
    """An attention mask as diffusers' dispatcher hands it to SDPA: ``[B, Sk]`` becomes
    ``[B, 1, 1, Sk]``; anything else must broadcast to ``[B, H, Sq, Sk]`` (the op checks)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2 and tuple(mask.shape) == (batch, seq_k):
        return mask[:, None, None, :]
    return mask


def _collapses(t: torch.Tensor) -> bool:
    """Whether a [B, n, N] tensor with a contiguous last dim is one strided matrix of B·n rows."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _linear_into(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out [B, n, N] = x [B, n, K] @ w.T + b, bias in the GEMM epilogue: one GEMM when x and out
    are each one strided matrix, else one per batch item (a stream's rows of a packed buffer)."""
    if _collapses(x) and _collapses(out):
        ops.linear_out(x, w, b, None, 1.0, 1.0, out)
        return
    for i in range(x.shape[0]):
        ops.linear_out(x[i], w, b, None, 1.0, 1.0, out[i])


def _normalize_rotate_(qk: torch.Tensor, weight: Optional[torch.Tensor], norm: Optional[QKNorm],
                       rope: Optional[Rope]) -> None:
    """RMSNorm then RoPE of ``qk`` [B, S, m, H, D] in place (m = 2: q and k; 1: one of them).

    weight: ``[m, width]`` (row i for slot i) or None. The math runs in fp32 and is written
    back once (one rounding to the module's dtype).
    """
    if norm is None and rope is None:
        return
    y = qk.to(torch.float32, copy=True)  # a copy even in fp32: RoPE reads it while writing qk
    if norm is not None:
        eps = norm.eps if norm.eps is not None else torch.finfo(qk.dtype).eps
        z = y.flatten(-2) if norm.across_heads else y  # [B, S, m, H*D] or [B, S, m, H, D]
        z = F.rms_norm(z, (z.shape[-1],), None, eps)  # one fused kernel
        if weight is not None:
            w = weight.float()
            z.mul_(w if norm.across_heads else w.unsqueeze(-2))  # [m, H*D] or [m, 1, D]
        y = z.view(y.shape)
    if rope is None:
        qk.copy_(y)
        return
    # [S, 1, 1, D/2]; on q/k's device, as diffusers' apply_rotary_emb moves them there
    ce, se, co, so = (t.to(y.device)[:, None, None, :] for t in rope)
    ye, yo = y[..., 0::2], y[..., 1::2]
    # even = ye ce - yo se, odd = yo co + ye so: fp32 math, each written into qk once
    if torch.compiler.is_compiling():  # traced: strided out= is not; inductor fuses this anyway
        qk.copy_(torch.stack((ye * ce - yo * se, yo * co + ye * so), dim=-1).flatten(-2))
        return
    torch.addcmul(ye * ce, yo, se, value=-1, out=qk[..., 0::2])
    torch.addcmul(yo * co, ye, so, out=qk[..., 1::2])


def _param(*shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class JointAttention(AttentionPrecision, nn.Module):
    """Joint attention of one or two token streams on fused kernels (inference only); see the
    module docstring for the data flow and what each step costs.

    Parameters (torch ``Linear`` layout ``[out, in]``; only those used exist), for the ``x``
    stream, and likewise ``ctx_*`` for the ``context`` stream:

    * ``attn_qkvw`` [3*inner, C] (rows Q, K, V), ``attn_qkvb`` [3*inner] if ``qkv_bias``;
    * ``attn_ow`` [C_out, inner], ``attn_ob`` [C_out] if the stream has an output projection;
    * ``attn_normw`` [2, width] (the q and k RMSNorm weights) if its ``qk_norm`` is affine.

    :meth:`views` names each projection's and norm's slice of these. Parameters do not
    require grad; a backward through the module raises.
    """

    _precision_reference = "attn_qkvw"

    def __init__(self, config: JointAttentionConfig, device=None):
        super().__init__()
        self.config = config
        factory = dict(device=device, dtype=config.dtype)
        inner = config.inner_dim
        for prefix, s in (("attn", config.x), ("ctx", config.context)):
            if s is None:
                continue
            setattr(self, f"{prefix}_qkvw", _param(3 * inner, s.in_features, **factory))
            setattr(self, f"{prefix}_qkvb", _param(3 * inner, **factory) if s.qkv_bias else None)
            has_out = s.out_features is not None
            setattr(self, f"{prefix}_ow", _param(s.out_features, inner, **factory) if has_out else None)
            setattr(self, f"{prefix}_ob", _param(s.out_features, **factory) if has_out and s.out_bias else None)
            affine = s.qk_norm is not None and s.qk_norm.affine
            width = s.qk_norm.width(config.heads, config.dim_head) if affine else 0
            setattr(self, f"{prefix}_normw", _param(2, width, **factory) if affine else None)
        self.reset_parameters()
        self._settle_precision()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (uniform ±1/sqrt(fan_in)) and the norms' weights to 1."""
        for name, p in self.named_parameters():
            if name.endswith("normw"):
                p.fill_(1.0)
            else:
                fan_in = (self.get_parameter(name[:-1] + "w")).shape[1]
                p.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def weights_changed(self) -> None:
        """Nothing is derived from the weights here (the stand-ins call this after weight writes)."""

    def views(self) -> dict[str, torch.Tensor]:
        """Each projection's and norm's tensors as views of the fused parameters, by name:
        ``"{stream}.{q|k|v|out}.{weight|bias}"`` and ``"{stream}.{q_norm|k_norm}.weight"``,
        stream ``x`` or ``context``; absent when unused. Writing a view writes what runs."""
        inner = self.config.inner_dim
        found = {}
        for stream, prefix in (("x", "attn"), ("context", "ctx")):
            w = getattr(self, f"{prefix}_qkvw", None)
            if w is None:
                continue
            b, ow, ob, nw = (getattr(self, f"{prefix}_{n}") for n in ("qkvb", "ow", "ob", "normw"))
            for i, name in enumerate("qkv"):
                found[f"{stream}.{name}.weight"] = w.data[i * inner : (i + 1) * inner]
                if b is not None:
                    found[f"{stream}.{name}.bias"] = b.data[i * inner : (i + 1) * inner]
            if ow is not None:
                found[f"{stream}.out.weight"] = ow.data
            if ob is not None:
                found[f"{stream}.out.bias"] = ob.data
            if nw is not None:
                found[f"{stream}.q_norm.weight"] = nw.data[0]
                found[f"{stream}.k_norm.weight"] = nw.data[1]
        return found

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                rope: Optional[Rope] = None, project: bool = True, parallel: Optional[Callable] = None):
        """Joint attention of ``x`` [B, Sx, Cx] and ``context`` [B, Sc, Cc] (or ``x`` alone).

        mask: None, ``[B, Sk]``, or anything broadcastable to ``[B, H, S, S]`` (bool: True =
            attend; float: added), over the packed token order.
        rope: a :class:`Rope` over all S tokens in the packed order, applied to q and k after
            their RMSNorm, or None.
        project: False returns every stream's attention output unprojected (``[B, S_i, inner]``).
        parallel: None, or ``attend(q, k, v, scale, precision=...)`` of :mod:`.context_parallel` when the tokens
            given are this rank's shard of a context-parallel sequence (no mask then).
        Returns ``(y_x, y_context)``: each stream's output (projected if it has an output
        projection and ``project``), ``y_context`` None without a context. Outputs are new
        tensors (an unprojected one is a view of the new attention output).
        """
        return _run_inference_only(lambda: self._forward(x, context, mask, rope, project, parallel), self,
                                   (x, context, mask, *(rope or ())))

    def _forward(self, x, context, mask, rope, project, parallel=None):
        cfg = self.config
        H, D, inner = cfg.heads, cfg.dim_head, cfg.inner_dim
        dtype, device = self.attn_qkvw.dtype, self.attn_qkvw.device
        self._precision_on(device, dtype)
        x = _input(x, "x", cfg.x.in_features, dtype, device)
        streams = [("x", x, cfg.x, "attn")]
        if context is not None:
            if cfg.context is None:
                raise ValueError("this JointAttention has no context stream, but a context was given")
            context = _input(context, "context", cfg.context.in_features, dtype, device)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context has batch {context.shape[0]} but x has {x.shape[0]}")
            streams.insert(0 if cfg.context_first else 1, ("context", context, cfg.context, "ctx"))
        B = x.shape[0]
        S = sum(t.shape[1] for _, t, _, _ in streams)
        if rope is not None:
            rope = Rope(*rope)
            rope.check(S, D)

        qkv = torch.empty((B, S, 3, H, D), dtype=dtype, device=device)
        flat = qkv.view(B, S, 3 * inner)
        rows = {}
        start = 0
        for name, t, spec, prefix in streams:
            end = start + t.shape[1]
            rows[name] = (start, end)
            _linear_into(t, getattr(self, f"{prefix}_qkvw"), getattr(self, f"{prefix}_qkvb"), flat[:, start:end])
            _normalize_rotate_(qkv[:, start:end, :2], getattr(self, f"{prefix}_normw"), spec.qk_norm,
                               None if rope is None else rope.rows(start, end))
            start = end

        q, k, v = qkv.unbind(2)  # [B, S, H, D] views, row stride 3*inner
        if parallel is None:
            o = torch.empty((B, S, H, D), dtype=dtype, device=device)
            ops.attention_out(q, k, v, _mask(mask, B, S), cfg.softmax_scale, o, precision=self._precision)
        elif mask is not None:
            raise ValueError("a mask under context parallelism: the sharded attention takes none")
        else:
            o = parallel(q, k, v, cfg.softmax_scale, precision=self._precision)
        o3 = o.view(B, S, inner)

        outputs = {"x": None, "context": None}
        for name, _, spec, prefix in streams:
            start, end = rows[name]
            seg = o3[:, start:end]
            w = getattr(self, f"{prefix}_ow")
            if project and w is not None:
                y = torch.empty((B, end - start, w.shape[0]), dtype=dtype, device=device)
                _linear_into(seg, w, getattr(self, f"{prefix}_ob"), y)
                seg = y
            outputs[name] = seg
        return outputs["x"], outputs["context"]

    def extra_repr(self) -> str:
        """A one-line summary of the config."""
        c = self.config
        ctx = "none" if c.context is None else ("first" if c.context_first else "after x")
        return f"heads={c.heads}, dim_head={c.dim_head}, context={ctx}, dtype={c.dtype}" + self._precision_repr()


@dataclass
class CrossAttentionConfig(_HeadsConfig):
    """Shape and options of a :class:`QKNormCrossAttention`.

    heads, dim_head: H and D (inner = H * D).
    hidden_size: channels of ``x`` (the queries' input); out_features: the output
        projection's width (None: hidden_size); out_bias: whether it has a bias.
    context_size: channels of the context (the keys' and values' input).
    qkv_bias: whether the Q and K/V projections have a bias.
    q_norm / k_norm: RMSNorm of the queries / of the context's keys, or None.
    image_size: channels of the optional image context (a second K/V set whose attention
        is added to the first), or None; image_kv_bias, image_k_norm: its bias and key norm.
    scale: the softmax scale; None means 1/sqrt(dim_head).
    dtype: the parameters' dtype.
    attention_precision: ``"exact"`` or an 8-bit scheme (:mod:`.precision`).
    """

    heads: int
    dim_head: int
    hidden_size: int
    context_size: int
    out_features: Optional[int] = None
    out_bias: bool = True
    qkv_bias: bool = True
    q_norm: Optional[QKNorm] = None
    k_norm: Optional[QKNorm] = None
    image_size: Optional[int] = None
    image_kv_bias: bool = True
    image_k_norm: Optional[QKNorm] = None
    scale: Optional[float] = None
    dtype: torch.dtype = torch.float32
    attention_precision: str = "exact"

    def __post_init__(self):
        problems = []
        _check_common(problems, self.heads, self.dim_head, self.dtype, self.attention_precision)
        if self.hidden_size < 1 or self.context_size < 1 or (self.image_size is not None and self.image_size < 1):
            problems.append("hidden_size, context_size and image_size must be >= 1")
        if problems:
            raise ValueError("CrossAttentionConfig: " + "; ".join(problems))


class QKNormCrossAttention(AttentionPrecision, nn.Module):
    """Cross-attention with QK RMSNorm and an optional added image K/V set, on fused kernels
    (inference only); see the module docstring.

    Parameters (torch ``Linear`` layout; only those used exist):

    * ``attn_qw`` [inner, C], ``attn_qb``; ``attn_kvw`` [2*inner, Cc] (rows K, V; one GEMM
      fills ``kv [B, Sc, 2, H, D]``), ``attn_kvb``;
    * ``attn_ow`` [C_out, inner], ``attn_ob``;
    * ``norm_qw`` / ``norm_kw`` [width] if q_norm / k_norm are affine;
    * ``image_kvw`` [2*inner, Ci], ``image_kvb``, ``image_norm_kw`` [width] with an image context.

    Costs: a Q GEMM (2·B·Sq·C·inner FLOPs), a KV GEMM per context (2·B·Sc·Cc·2·inner), the
    norms as torch ops over q and k, one attention per context (the image one's output is
    added to the text one's: one B·Sq·inner add), and the output GEMM with its bias.
    """

    _precision_reference = "attn_qw"

    def __init__(self, config: CrossAttentionConfig, device=None):
        super().__init__()
        self.config = config
        c = config
        factory = dict(device=device, dtype=c.dtype)
        inner = c.inner_dim
        out = c.out_features or c.hidden_size

        def norm(spec):
            return _param(spec.width(c.heads, c.dim_head), **factory) if spec is not None and spec.affine else None

        self.attn_qw = _param(inner, c.hidden_size, **factory)
        self.attn_qb = _param(inner, **factory) if c.qkv_bias else None
        self.attn_kvw = _param(2 * inner, c.context_size, **factory)
        self.attn_kvb = _param(2 * inner, **factory) if c.qkv_bias else None
        self.attn_ow = _param(out, inner, **factory)
        self.attn_ob = _param(out, **factory) if c.out_bias else None
        self.norm_qw = norm(c.q_norm)
        self.norm_kw = norm(c.k_norm)
        image = c.image_size is not None
        self.image_kvw = _param(2 * inner, c.image_size, **factory) if image else None
        self.image_kvb = _param(2 * inner, **factory) if image and c.image_kv_bias else None
        self.image_norm_kw = norm(c.image_k_norm) if image else None
        self.reset_parameters()
        self._settle_precision()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (uniform ±1/sqrt(fan_in)) and the norms' weights to 1."""
        fan_in = {"attn_q": self.attn_qw, "attn_kv": self.attn_kvw, "attn_o": self.attn_ow, "image_kv": self.image_kvw}
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                bound = 1.0 / math.sqrt(fan_in[name[:-1]].shape[1])
                p.uniform_(-bound, bound)

    def weights_changed(self) -> None:
        """Nothing is derived from the weights here (the stand-ins call this after weight writes)."""

    def views(self) -> dict[str, torch.Tensor]:
        """Each projection's and norm's tensors as views of the fused parameters, by name:
        ``x.q``, ``x.out``, ``x.q_norm``, ``context.k``, ``context.v``, ``context.k_norm``,
        ``image.k``, ``image.v``, ``image.k_norm``, each with ``.weight`` / ``.bias``; absent
        when unused. Writing a view writes what runs."""
        inner = self.config.inner_dim
        found = {}

        def put(name, t):
            if t is not None:
                found[name] = t.data

        put("x.q.weight", self.attn_qw)
        put("x.q.bias", self.attn_qb)
        for stream, w, b in (("context", self.attn_kvw, self.attn_kvb), ("image", self.image_kvw, self.image_kvb)):
            if w is not None:
                put(f"{stream}.k.weight", w[:inner])
                put(f"{stream}.v.weight", w[inner:])
            if b is not None:
                put(f"{stream}.k.bias", b[:inner])
                put(f"{stream}.v.bias", b[inner:])
        put("x.out.weight", self.attn_ow)
        put("x.out.bias", self.attn_ob)
        put("x.q_norm.weight", self.norm_qw)
        put("context.k_norm.weight", self.norm_kw)
        put("image.k_norm.weight", self.image_norm_kw)
        return found

    def forward(self, x: torch.Tensor, context: torch.Tensor, image: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` [B, Sq, C] attending to ``context`` [B, Sc, Cc] (mask: None, ``[B, Sc]`` or
        broadcastable to ``[B, H, Sq, Sc]``), plus, with ``image`` [B, Si, Ci], an unmasked
        attention to the image tokens added before the output projection. Returns a new
        ``[B, Sq, C_out]`` tensor."""
        return _run_inference_only(lambda: self._forward(x, context, image, mask), self, (x, context, image, mask))

    def _kv(self, source, w, b, norm_w, norm):
        """(k, v) [B, S, H, D] views of one KV GEMM on ``source``, k normalised in place."""
        c = self.config
        B, S = source.shape[:2]
        kv = torch.empty((B, S, 2, c.heads, c.dim_head), dtype=w.dtype, device=w.device)
        ops.linear_out(source, w, b, None, 1.0, 1.0, kv.view(B, S, 2 * c.inner_dim))
        _normalize_rotate_(kv[:, :, :1], None if norm_w is None else norm_w.unsqueeze(0), norm, None)
        return kv.unbind(2)

    def _forward(self, x, context, image, mask):
        c = self.config
        H, D, inner = c.heads, c.dim_head, c.inner_dim
        dtype, device = self.attn_qw.dtype, self.attn_qw.device
        self._precision_on(device, dtype)
        x = _input(x, "x", c.hidden_size, dtype, device)
        context = _input(context, "context", c.context_size, dtype, device)
        B, Sq = x.shape[:2]
        if context.shape[0] != B:
            raise ValueError(f"context has batch {context.shape[0]} but x has {B}")
        if image is not None:
            if c.image_size is None:
                raise ValueError("this QKNormCrossAttention has no image K/V projections, but an image context "
                                 "was given")
            image = _input(image, "image", c.image_size, dtype, device)
            if image.shape[0] != B:
                raise ValueError(f"image has batch {image.shape[0]} but x has {B}")

        q = torch.empty((B, Sq, H, D), dtype=dtype, device=device)
        ops.linear_out(x, self.attn_qw, self.attn_qb, None, 1.0, 1.0, q.view(B, Sq, inner))
        _normalize_rotate_(q.unsqueeze(2), None if self.norm_qw is None else self.norm_qw.unsqueeze(0), c.q_norm, None)
        k, v = self._kv(context, self.attn_kvw, self.attn_kvb, self.norm_kw, c.k_norm)
        o = torch.empty((B, Sq, H, D), dtype=dtype, device=device)
        ops.attention_out(q, k, v, _mask(mask, B, context.shape[1]), c.softmax_scale, o, precision=self._precision)
        if image is not None:
            ki, vi = self._kv(image, self.image_kvw, self.image_kvb, self.image_norm_kw, c.image_k_norm)
            o.add_(ops.attention(q, ki, vi, None, c.softmax_scale, precision=self._precision)[0])
        return ops.linear(o.view(B, Sq, inner), self.attn_ow, self.attn_ob)

    def extra_repr(self) -> str:
        """A one-line summary of the config."""
        c = self.config
        image = f", image({c.image_size})" if c.image_size is not None else ""
        return (f"heads={c.heads}, dim_head={c.dim_head}, context({c.context_size}){image}, dtype={c.dtype}"
                + self._precision_repr())
