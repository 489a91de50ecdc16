"""DeepSpeedDiffusersAttention: a diffusers ``Attention`` (AttnProcessor2_0 semantics)
run as three fused ops: projection GEMM -> attention -> output GEMM.

Self-attention:   x [B,S,C] -> qkv [B,S,3,H,D] (one GEMM) -> attention on qkv.unbind(2)
                  -> o [B,S,H*D] -> y [B,S,C] = (o Wo^T + bo + residual) / rescale_output_factor
Cross-attention:  q [B,Sq,H,D] from x, kv [B,Sk,2,H,D] from the context (one GEMM),
                  optionally cached across calls (see DeepSpeedDiffusersAttention.kv_cache).

Inference only: the backward raises.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .precision import AttentionPrecision, precision_problem
from .workspace import Workspace, get_workspace

__all__ = [
    "LowRankGroup",
    "LowRankUpdates",
    "ImageKV",
    "unsupported_head_dim",
    "unsupported_device_dtype",
    "DeepSpeedDiffusersAttentionConfig",
    "DeepSpeedDiffusersAttentionFunction",
    "DeepSpeedDiffusersAttention",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

def _cpu_rule(dtype: torch.dtype, dim_head: int) -> str:
    """The attention op's capability rule on the CPU (the C ``dda_attention_supported_cpu``,
    through :func:`.ops.attention_kernel_name`) for this dtype and head dim, as a short
    reason ("" if taken)."""
    name = ops.attention_kernel_name("cpu", dtype, dim_head, 1)
    if not name.startswith("unsupported: "):
        return ""
    return name.removeprefix("unsupported: ").split("; got ")[0].removeprefix("dda.attention: ")


def unsupported_head_dim(dim_head: int) -> str:
    """Why the attention kernels cannot take this head dim ("" if they can), from the op's rule."""
    why = _cpu_rule(torch.float32, dim_head)
    return f"head_dim {dim_head}: {why}" if why else ""


def unsupported_device_dtype(device: torch.device, dtype: torch.dtype) -> str:
    """Why the ops cannot run in this dtype on this device ("" if they can)."""
    if dtype not in _DTYPES:
        return f"dtype {dtype}: need float32, float16 or bfloat16"
    if device.type not in ("cpu", "cuda"):
        return f"device {device}: need a CPU or CUDA device"
    if device.type == "cpu":
        return _cpu_rule(dtype, 64)  # the CPU reference's dtype rule
    return ""


@dataclass
class DeepSpeedDiffusersAttentionConfig:
    """Shape and options of one attention block (diffusers ``Attention`` names in brackets).

    hidden_size: channels C of the input [query_dim].
    heads, dim_head: H and D; inner = H * D. D must be a multiple of 8 in [8, 512].
    cross_attention_dim: channels of the context; None for self-attention, whose
        K/V weights are packed with Q in one ``attn_qkvw``.
    qkv_bias / out_bias: whether the Q/K/V projections / the output projection have a bias.
    scale: the softmax scale; None means 1/sqrt(dim_head).
    norm_num_groups: GroupNorm groups applied to the input first [group_norm], or None;
        norm_eps and norm_affine are its eps and affine.
    residual_connection: add the (un-normalised) input to the output.
    rescale_output_factor: divide the output (after the residual) by this.
    dtype: the parameters' dtype.
    attention_precision: ``"exact"`` or an 8-bit scheme of :func:`.ops.attention_precisions`
        (:mod:`.precision`: where the op cannot run it, the exact kernel runs and says why).
    """

    hidden_size: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int] = None
    qkv_bias: bool = False
    out_bias: bool = True
    scale: Optional[float] = None
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    norm_affine: bool = True
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: torch.dtype = torch.float32
    attention_precision: str = "exact"

    def __post_init__(self):
        problems = []
        if self.hidden_size < 1 or self.heads < 1:
            problems.append(f"hidden_size ({self.hidden_size}) and heads ({self.heads}) must be >= 1")
        head_dim_problem = unsupported_head_dim(self.dim_head)
        if head_dim_problem:
            problems.append(head_dim_problem)
        if self.cross_attention_dim is not None and self.cross_attention_dim < 1:
            problems.append(f"cross_attention_dim must be >= 1 or None, got {self.cross_attention_dim}")
        if self.norm_num_groups is not None and (
            self.norm_num_groups < 1 or self.hidden_size % self.norm_num_groups
        ):
            problems.append(
                f"norm_num_groups ({self.norm_num_groups}) must divide hidden_size ({self.hidden_size})"
            )
        if self.rescale_output_factor == 0:
            problems.append("rescale_output_factor must not be 0")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        why = precision_problem(self.attention_precision)
        if why:
            problems.append(why)
        if problems:
            raise ValueError("DeepSpeedDiffusersAttentionConfig: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        """heads * dim_head."""
        return self.heads * self.dim_head

    @property
    def is_cross_attention(self) -> bool:
        """True when the block has its own K/V input width (separate Q and KV weights)."""
        return self.cross_attention_dim is not None

    @property
    def softmax_scale(self) -> float:
        """The scale actually used: ``scale``, or 1/sqrt(dim_head)."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.dim_head)


class DeepSpeedDiffusersAttentionFunction(torch.autograd.Function):
    """The fused forward as an autograd node, so that a backward through it fails loudly.

    ``apply(module, input, context, input_mask, *weights)``: ``weights`` are the module's
    parameters, passed only so that autograd sees them; the forward reads them from
    ``module``. With low-rank updates, ``weights`` starts with the :class:`LowRankUpdates`,
    followed by the parameters and its A/B tensors. The module calls this only when autograd
    is recording; otherwise it runs the same forward directly.
    """

    @staticmethod
    def forward(ctx, module, input, context, input_mask, *weights):
        """Run ``module``'s fused forward (see DeepSpeedDiffusersAttention.forward)."""
        low_rank = weights[0] if weights and isinstance(weights[0], LowRankUpdates) else None
        return module._fused_forward(input, context, input_mask, low_rank)

    @staticmethod
    def backward(ctx, *grad_outputs):
        """Always raises: the kernels have no backward."""
        raise RuntimeError(
            "DeepSpeedDiffusersAttention is inference-only and has no backward. Run it under "
            "torch.no_grad() or torch.inference_mode(), or keep diffusers' Attention "
            "(dda.unpatch) to train."
        )


class DeepSpeedDiffusersAttention(AttentionPrecision, nn.Module):
    """A diffusers ``Attention`` block on fused kernels (inference only).

    Parameters (torch ``Linear`` layout, ``[out, in]``; only those used are allocated):
      self-attention:  ``attn_qkvw`` [3*inner, C] (rows: Q, K, V)
      cross-attention: ``attn_qw`` [inner, C]; ``attn_kw``, ``attn_vw`` [inner, Cctx], two
                       halves of one [2*inner, Cctx] storage so that one GEMM yields K and V
      ``attn_qkvb`` [3*inner] if the Q/K/V projections have a bias
      ``attn_ow`` [C, inner], ``attn_ob`` [C] if the output projection has a bias
      ``norm_w``, ``norm_b`` [C] if group_norm is used with affine
    Parameters do not require grad.

    The attention runs in :attr:`attention_precision` (:mod:`.precision`: the config's, where
    the op runs it on this device).

    Each instance takes the next ``layer_id`` from a class counter;
    :meth:`reset_layer_ids` restarts it at 0. Intermediates live in the workspace shared
    by all layers of a device and stream (see :mod:`.workspace`).

    K/V cache (opt-in: ``kv_cache=True`` in the constructor or in the converters,
    ``module.kv_cache = True`` or ``module.enable_kv_cache()``). A text-conditioned UNet
    gets the same context (``encoder_hidden_states``) at every denoising step, so the KV
    GEMM on it can run once and its result ``kv [B, Sk, 2, H, D]`` be reused. The cached
    ``kv`` is a tensor of this module (not in the shared workspace, so it survives other
    layers' calls); it is reused only while all of these are unchanged, and recomputed
    otherwise:

    * the context: the same tensor object (held by a weak reference, so a freed tensor
      whose memory is reused by a new one at the same address never hits), its
      ``data_ptr``, its version counter (``ctx.add_(1)``, ``ctx.copy_(other)`` and any
      in-place write through it or its views increments it), shape, strides, dtype and
      device;
    * the K/V weights (``attn_kw``/``attn_vw``, or ``attn_qkvw`` for a self-attention
      block given a context) and ``attn_qkvb``: the same Parameter objects, ``data_ptr``,
      version, shape, strides, dtype and device (in-place updates, ``load_state_dict``,
      reassignment and ``.data =`` all invalidate; ``.to()``/``.half()`` drop the cache);
    * on CUDA, the current stream (the cached kv is only read on the stream that wrote it).

    Not tracked, so call :meth:`clear_kv_cache` after them: writes through a ``.data``
    alias (``t.data.copy_(...)``; ``.data`` has its own version counter), including
    writes to a patched diffusers ``Attention``'s original parameters, which are
    ``.data`` views of this module's weights. The cache is bypassed (the KV GEMM runs
    through the workspace as without it; nothing is read or stored) when there is no
    context (K/V come from the input), under ``torch.compile`` tracing (the traced path
    never reads Python-side state), during CUDA-graph capture (a captured graph would
    freeze whichever branch ran; the graph always recomputes K/V, and its static context
    buffer is refilled with ``copy_`` between replays), and for inference tensors
    (created under ``torch.inference_mode()``: they have no version counter, so an
    in-place update could not be seen; a warning says so once; use ``torch.no_grad()``).
    Because the object is part of the key, pass the same context tensor at every step:
    a new view or copy of it recomputes (correct, but no saving). The lookup comes before
    any conversion of the context: a float32 context to a float16/bfloat16 module, or a
    non-contiguous one, is cast / copied only on a miss, so a hit reads nothing but its
    metadata.

    Memory: ``B * Sk * 2 * inner * element_size`` bytes per cross-attention layer, held
    until the cache is disabled or cleared, e.g. SD1.5 / SD2.1 at batch 2 (classifier-free
    guidance), Sk = 77, float16: 197,120 B (inner 320) / 394,240 B (640) / 788,480 B
    (1280) per layer, 7,687,680 B (7.3 MiB) for all 16 cross-attention layers
    (sum of inner = 12,480); SDXL (70 layers, sum of inner = 83,200): 51,251,200 B
    (48.9 MiB). ``kv_cache_hits`` and ``kv_cache_misses`` count lookups (plain ints;
    assign 0 to reset); :attr:`kv_cache_nbytes` is what is held now.
    """

    _next_layer_id = 0
    _precision_reference = "attn_ow"

    def __init__(self, config: DeepSpeedDiffusersAttentionConfig, device=None, *, kv_cache: bool = False):
        super().__init__()
        self.config = config
        self.layer_id = DeepSpeedDiffusersAttention._next_layer_id
        DeepSpeedDiffusersAttention._next_layer_id += 1

        C, inner = config.hidden_size, config.inner_dim
        factory = dict(device=device, dtype=config.dtype)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)

        if config.is_cross_attention:
            self.attn_qw = param(inner, C)
            kv = torch.empty(2 * inner, config.cross_attention_dim, **factory)
            self.attn_kw = nn.Parameter(kv[:inner], requires_grad=False)
            self.attn_vw = nn.Parameter(kv[inner:], requires_grad=False)
        else:
            self.attn_qkvw = param(3 * inner, C)
        self.attn_qkvb = param(3 * inner) if config.qkv_bias else None
        self.attn_ow = param(C, inner)
        self.attn_ob = param(C) if config.out_bias else None
        affine = config.norm_num_groups is not None and config.norm_affine
        self.norm_w = param(C) if affine else None
        self.norm_b = param(C) if affine else None

        self._ob_cache = None  # (key, attn_ob / rescale_output_factor)
        self._kv_weight_cache = None  # (key, attn_kw and attn_vw as one weight, or None); see _kv_weight
        self._warned_split_kv = False
        self._kv_cache_on = bool(kv_cache)
        self._kv_entry: Optional[_KVEntry] = None
        self._warned_kv_inference = False
        self.kv_cache_hits = 0
        self.kv_cache_misses = 0
        self.reset_parameters()
        self._settle_precision()

    @classmethod
    def reset_layer_ids(cls) -> None:
        """Restart the layer-ID counter, so the next instance gets ``layer_id`` 0."""
        DeepSpeedDiffusersAttention._next_layer_id = 0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (uniform +-1/sqrt(fan_in)) and GroupNorm (1, 0)."""
        for w, b in self.projections():
            bound = 1.0 / math.sqrt(w.shape[1])
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)
        if self.norm_w is not None:
            self.norm_w.fill_(1.0)
            self.norm_b.zero_()

    def projections(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The fused parameters as one (weight, bias) pair per projection: Q, K, V, output.

        Each weight [out, in] and bias [out] (None when that projection has no bias) is a
        view of the fused storage (``attn_qkvw`` / ``attn_qw`` + ``attn_kw`` + ``attn_vw``,
        ``attn_qkvb``, ``attn_ow``, ``attn_ob``): writing into it updates what the module runs.
        This is the fused layout's public description; converters copy into it.
        """
        inner = self.config.inner_dim
        qkvb = self.attn_qkvb
        b = (None, None, None) if qkvb is None else (qkvb[:inner], qkvb[inner : 2 * inner], qkvb[2 * inner :])
        if self.config.is_cross_attention:
            pairs = [(self.attn_qw, b[0]), (self.attn_kw, b[1]), (self.attn_vw, b[2])]
        else:
            w = self.attn_qkvw
            pairs = [(w[:inner], b[0]), (w[inner : 2 * inner], b[1]), (w[2 * inner :], b[2])]
        return pairs + [(self.attn_ow, self.attn_ob)]

    # ------------------------------------------------------------------ storage
    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() give every parameter its own storage; put K and V back
        # into one, so the KV projection stays a single GEMM.
        super()._apply(fn, recurse)
        self._kv_weight_cache = None  # its view would keep the old storage alive
        self._fuse_kv()
        self.clear_kv_cache()  # it would hold memory on the old device / in the old dtype
        return self

    def __getstate__(self):
        # For pickle and copy.deepcopy: the K/V cache holds weak references (which cannot be
        # pickled) to the original's tensors, so a copy starts without it.
        # The fused-weight view is dropped too (a copy would not share the copied weights' storage).
        state = self.__dict__.copy()
        state["_kv_entry"] = None
        state["_kv_weight_cache"] = None
        state.pop("_checked_groups", None)
        return state

    def __setstate__(self, state):
        # A copy gives attn_kw and attn_vw their own storages (Parameter.__deepcopy__ clones
        # each); fuse them again, as _apply does.
        super().__setstate__(state)
        self.__dict__.setdefault("_kv_weight_cache", None)  # a pickle from before it existed
        self._fuse_kv()

    @torch.no_grad()
    def _fuse_kv(self) -> None:
        if not self.config.is_cross_attention or self._kv_weight() is not None:
            return
        kv = torch.cat([self.attn_kw, self.attn_vw])
        inner = self.config.inner_dim
        self.attn_kw.data = kv[:inner]
        self.attn_vw.data = kv[inner:]

    def _kv_weight(self) -> Optional[torch.Tensor]:
        """attn_kw and attn_vw as one [2*inner, Cctx] weight, or None if not adjacent.

        Every K/V projection asks, so the answer is cached, keyed by the two tensors' data
        pointers, shapes, strides, dtypes and devices (attribute reads only; the full check
        below makes storage objects and a view, several times the cost). Sound because the
        cached view holds the fused storage: while it lives, no other storage can hold its
        addresses, so an unchanged key means attn_kw and attn_vw still lie in that storage
        at the same places (in-place writes change values, never the layout, and
        the view reads the same memory). Reassigning either weight (``.data =``, a new
        Parameter) changes a pointer and rebuilds the answer at the next call; until then
        the old view keeps the old storage alive (``.to()`` / ``.half()`` drop it at once).
        A cached None (not adjacent) only costs speed if it goes stale: K and V then take
        two GEMMs.
        """
        kw, vw = self.attn_kw, self.attn_vw
        key = (kw.data_ptr(), vw.data_ptr(), kw.shape, vw.shape, kw.stride(), vw.stride(),
               kw.dtype, vw.dtype, kw.device, vw.device)
        cached = self._kv_weight_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        fused = self._kv_weight_uncached(kw, vw)
        self._kv_weight_cache = (key, fused)
        return fused

    @staticmethod
    def _kv_weight_uncached(kw: torch.Tensor, vw: torch.Tensor) -> Optional[torch.Tensor]:
        if not (
            kw.is_contiguous()
            and vw.is_contiguous()
            and kw.shape == vw.shape
            and kw.dtype == vw.dtype
            and kw.device == vw.device
            and kw.untyped_storage().data_ptr() == vw.untyped_storage().data_ptr()
            and vw.storage_offset() == kw.storage_offset() + kw.numel()
        ):
            return None
        return kw.as_strided((2 * kw.shape[0], kw.shape[1]), (kw.shape[1], 1))

    def _out_bias(self, compiling: bool) -> Optional[torch.Tensor]:
        """attn_ob / rescale_output_factor, cached until attn_ob changes."""
        b, f = self.attn_ob, self.config.rescale_output_factor
        if b is None or f == 1.0:
            return b
        if compiling or b.is_inference():  # inference tensors have no version counter to key on
            return b / f
        key = (b.data_ptr(), b._version, b.dtype, b.device)
        if self._ob_cache is None or self._ob_cache[0] != key:
            with torch.no_grad():
                self._ob_cache = (key, b / f)
        return self._ob_cache[1]

    # ------------------------------------------------------------------ K/V cache
    @property
    def kv_cache(self) -> bool:
        """Whether the cross-attention K/V cache is on (see the class docstring).

        Setting it to False also frees the cached tensor.
        """
        return self._kv_cache_on

    @kv_cache.setter
    def kv_cache(self, enabled: bool) -> None:
        self._kv_cache_on = bool(enabled)
        if not self._kv_cache_on:
            self.clear_kv_cache()

    def enable_kv_cache(self, enabled: bool = True) -> "DeepSpeedDiffusersAttention":
        """Turn the K/V cache on (or off, freeing it); returns the module."""
        self.kv_cache = enabled
        return self

    def weights_changed(self) -> None:
        """Drop everything derived from the weights (the cached K/V, the scaled output bias, the
        fused K/V weight view): for writes the version counters cannot show, such as writes
        through another tensor viewing the same storage."""
        self.clear_kv_cache()
        self._ob_cache = None
        self._kv_weight_cache = None

    def clear_kv_cache(self) -> None:
        """Drop the cached K/V (the next call recomputes it); the counters are kept."""
        self._kv_entry = None

    @property
    def kv_cache_nbytes(self) -> int:
        """Bytes held by the cached K/V now (0 when empty)."""
        e = self._kv_entry
        return 0 if e is None else e.kv.numel() * e.kv.element_size()

    def _kv_sources(self, context: torch.Tensor) -> tuple:
        """The tensors the projected K/V depend on: the caller's context, then the weights."""
        ws = (self.attn_kw, self.attn_vw) if self.config.is_cross_attention else (self.attn_qkvw,)
        b = () if self.attn_qkvb is None else (self.attn_qkvb,)
        return (context, *ws, *b)

    def _kv_cache_usable(self, context: Optional[torch.Tensor], device: torch.device) -> bool:
        """False when the cache must be bypassed for this call (see the class docstring)."""
        if not self._kv_cache_on or context is None:
            return False
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        if any(t.is_inference() for t in self._kv_sources(context)):
            if not self._warned_kv_inference:
                self._warned_kv_inference = True
                warnings.warn(
                    "DeepSpeedDiffusersAttention: kv_cache is on but the context or the weights "
                    "are inference tensors (created under torch.inference_mode()), which have no "
                    "version counter, so in-place updates could not be detected; the K/V cache "
                    "is bypassed. Run the pipeline under torch.no_grad() to use it.",
                    stacklevel=4,
                )
            return False
        return True

    def _kv_key(self, sources: tuple, device: torch.device) -> tuple:
        """Everything but the identities that the cached K/V depend on."""
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        return (stream,) + tuple(
            (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device) for t in sources
        )

    def _cached_kv(self, context, B, Sk) -> Optional[torch.Tensor]:
        """kv [B, Sk, 2, H, D] from the cache (computing it on a miss), or None to bypass.

        context: the caller's tensor, the key. A hit only reads its metadata; a miss casts
        it / makes it contiguous for the GEMM as needed.
        """
        device = context.device
        if not self._kv_cache_usable(context, device):
            return None
        sources = self._kv_sources(context)
        key = self._kv_key(sources, device)
        e = self._kv_entry
        # Identities are compared with `is`: a weakref compares equal by its referent's ==.
        if e is not None and e.key == key and all(r() is t for r, t in zip(e.refs, sources)):
            self.kv_cache_hits += 1
            return e.kv
        self.kv_cache_misses += 1
        self._kv_entry = None  # free the old tensor before allocating the new one
        H, D = self.config.heads, self.config.dim_head
        dtype = self.attn_ow.dtype
        kv = torch.empty((B, Sk, 2, H, D), dtype=dtype, device=device)
        self._project_kv(_gemm_input(context, dtype), kv)
        self._kv_entry = _KVEntry(key, tuple(weakref.ref(t) for t in sources), kv)
        return kv

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        input_mask: Optional[torch.Tensor] = None,
        *,
        low_rank: Optional["LowRankUpdates"] = None,
        image_kv: tuple = (),
    ) -> torch.Tensor:
        """Attention of ``input`` over itself, or over ``context``.

        input: [B, S, C], or [B, C, H, W] (flattened to [B, H*W, C] and returned as
            [B, C, H, W] in the input's memory format, like diffusers).
        context: [B, Sk, Cctx] or None (then K/V come from the normalised input).
        input_mask: diffusers' ``attention_mask``: additive float (float32 or the module
            dtype) or bool (True = attend), shaped [B, Sk], [B, 1|Sq, Sk],
            [B*H, 1|Sq, Sk] (diffusers' convention: the same mask for every head unless
            given per head), or 4-D broadcastable to [B, H, Sq, Sk]. Never copied.
        low_rank: low-rank updates added to the projections (LoRA), see :class:`LowRankUpdates`:
            per input, one GEMM for every A matrix, then one per B accumulated into the fused
            projection's output.
        image_kv: IP-Adapter branches (:class:`ImageKV`), with a context only: each adds
            ``scale * attention(q, K_i, V_i)`` (no mask) to the attention output before the
            output projection.
        float32 input / context to a float16/bfloat16 module is cast; the output has the
        module's dtype and is a fresh tensor. Bad inputs raise TypeError (dtype) or
        ValueError (shape, device).
        """
        if image_kv:
            if context is None:
                raise ValueError("image_kv (IP-Adapter branches) needs a context: it is for cross-attention")
            low_rank = LowRankUpdates() if low_rank is None else low_rank
            low_rank = low_rank._replace(image=tuple(image_kv))
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return self._fused_forward(input, context, input_mask, low_rank)
        weights = tuple(self.parameters())
        if low_rank is not None:
            weights = (low_rank, *weights, *low_rank.tensors())
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in (input, context, *weights)):
            return DeepSpeedDiffusersAttentionFunction.apply(self, input, context, input_mask, *weights)
        return self._fused_forward(input, context, input_mask, low_rank)

    def _fused_forward(self, input, context, input_mask, low_rank=None) -> torch.Tensor:
        cfg = self.config
        dtype, device = self.attn_ow.dtype, self.attn_ow.device
        compiling = torch.compiler.is_compiling()
        self._precision_on(device, dtype)
        x = _check_input(input, "input", dtype, device)
        if x.dim() == 4:
            B, C, Hi, Wi = x.shape
            channels_last = x.is_contiguous(memory_format=torch.channels_last)
            x3 = x.flatten(2).transpose(1, 2)  # [B, H*W, C], a view
        elif x.dim() == 3:
            B, _, C = x.shape
            x3 = x
        else:
            raise ValueError(f"input must be [B, S, C] or [B, C, H, W], got shape {tuple(x.shape)}")
        if C != cfg.hidden_size:
            raise ValueError(
                f"input has {C} channels but the module expects hidden_size {cfg.hidden_size} "
                f"(input shape {tuple(x.shape)})"
            )
        Sq = x3.shape[1]
        if B == 0 or Sq == 0:
            raise ValueError(f"input is empty (shape {tuple(x.shape)}): batch and sequence must be >= 1")

        if cfg.norm_num_groups is None:
            h = x3 = _rows(x3)  # [B, Sq, C]
        else:
            # GroupNorm normalises over (channels of a group) x positions: run it on [B, C, ...].
            src = x if x.dim() == 4 else x3.transpose(1, 2)
            h = F.group_norm(src, cfg.norm_num_groups, self.norm_w, self.norm_b, cfg.norm_eps)
            h = _rows(h.flatten(2).transpose(1, 2))  # [B, Sq, C]

        ctx = None
        if context is not None:
            # Checked here but cast / made contiguous only where a GEMM reads it
            # (_gemm_input), so a K/V cache hit makes no copy of it.
            _check_tensor(context, "context", dtype, device)
            want = cfg.cross_attention_dim or cfg.hidden_size
            if context.dim() != 3 or context.shape[0] != B or context.shape[2] != want:
                raise ValueError(
                    f"context must be [B={B}, Sk, {want}], got shape {tuple(context.shape)}"
                )
            if context.shape[1] == 0:
                raise ValueError(f"context is empty (shape {tuple(context.shape)})")
            ctx = context
        elif cfg.is_cross_attention:
            if cfg.cross_attention_dim != cfg.hidden_size:
                raise ValueError(
                    f"this cross-attention module needs a context [B, Sk, {cfg.cross_attention_dim}]"
                )
            ctx = h  # diffusers: encoder_hidden_states defaults to the normalised input
        Sk = Sq if ctx is None else ctx.shape[1]
        H, inner = cfg.heads, cfg.inner_dim
        mask = _attention_mask(input_mask, B, H, Sq, Sk, dtype, device)

        residual = _rows(x3) if cfg.residual_connection else None
        f = cfg.rescale_output_factor
        ob = self._out_bias(compiling)

        low_rank = low_rank or None  # empty updates: the plain path
        if low_rank is not None and not compiling and self.__dict__.get("_checked_groups") is not low_rank.groups:
            low_rank.check(self, ctx is not None)  # once per groups object: the stand-ins reuse theirs
            self.__dict__["_checked_groups"] = low_rank.groups
        if compiling:
            o = self._attend_functional(h, None if ctx is None else _gemm_input(ctx, dtype), mask, B, Sq, Sk,
                                        low_rank)
        else:
            cacheable = context is not None and (low_rank is None or not low_rank.reads("context"))
            o = self._attend_workspace(h, ctx, mask, B, Sq, Sk, cacheable, low_rank)
        # y = (o Wo^T + bo + r) / f = (1/f) o Wo^T + (1/f) r + bo/f: one GEMM epilogue.
        o2 = o.view(B, Sq, inner)
        y = ops.linear(o2, self.attn_ow, ob, residual, 1.0 / f, 1.0 / f)
        if low_rank is not None:
            y = low_rank.apply("output", o2, {"out": y}, 1.0 / f, compiling)["out"]

        if x.dim() == 4:
            y = y.view(B, Hi, Wi, C).permute(0, 3, 1, 2)  # channels-last strides
            if not channels_last:
                y = y.contiguous()
        return y

    def _qkv_weights(self, fused: bool = True):
        """(wq [inner, C], bq, wkv [2*inner, Cctx] or None, (wk, wv), bkv); wkv is None
        when K and V are not adjacent, or when not ``fused`` (no storage inspection)."""
        inner = self.config.inner_dim
        b = self.attn_qkvb
        bq, bkv = (None, None) if b is None else (b[:inner], b[inner:])
        if self.config.is_cross_attention:
            wkv = self._kv_weight() if fused else None
            return self.attn_qw, bq, wkv, (self.attn_kw, self.attn_vw), bkv
        w = self.attn_qkvw
        return w[:inner], bq, w[inner:], (w[inner : 2 * inner], w[2 * inner :]), bkv

    def _attend_workspace(self, h, ctx, mask, B, Sq, Sk, cacheable=False, low_rank=None) -> torch.Tensor:
        """Projections and attention through the shared workspace; returns o [B, Sq, H, D].

        ctx: None (self-attention), or the K/V source [B, Sk, Cctx] as the caller passed it
        (any float32 cast and contiguous copy happen only if the K/V GEMM runs).
        cacheable: ctx is the caller's context, which keys the K/V cache.
        low_rank: :class:`LowRankUpdates` accumulated into the projections, or None.
        """
        H, D, inner = self.config.heads, self.config.dim_head, self.config.inner_dim
        dtype = h.dtype
        ws = get_workspace(h.device)
        scale = self.config.softmax_scale
        if ctx is None:
            shapes = [(B, Sq, 3, H, D), (B, Sq, H, D)]
            ws.reserve(Workspace.bytes_for(shapes, dtype))
            qkv = ws.take(shapes[0], dtype)
            o = ws.take(shapes[1], dtype)
            qkv3 = qkv.view(B, Sq, 3 * inner)
            ops.linear_out(h, self.attn_qkvw, self.attn_qkvb, None, 1.0, 1.0, qkv3)
            if low_rank is not None:
                targets = {name: qkv3[..., i * inner : (i + 1) * inner] for i, name in enumerate("qkv")}
                low_rank.apply("hidden", h, targets)
            q, k, v = qkv.unbind(2)  # [B, Sq, H, D] views with row stride 3*inner
            ops.attention_out(q, k, v, mask, scale, o, precision=self._precision)
            return o

        # The kv piece is reserved even when the cache serves K/V, so that an eager warm-up
        # sizes the workspace for a CUDA-graph capture (which bypasses the cache).
        shapes = [(B, Sq, H, D), (B, Sk, 2, H, D), (B, Sq, H, D)]
        ws.reserve(Workspace.bytes_for(shapes, dtype))
        q = ws.take(shapes[0], dtype)
        kv_ws = ws.take(shapes[1], dtype)
        o = ws.take(shapes[2], dtype)
        kv = self._cached_kv(ctx, B, Sk) if cacheable else None  # the module's own tensor, or None
        if kv is None:
            kv = kv_ws
            source = _gemm_input(ctx, dtype)
            self._project_kv(source, kv)
            if low_rank is not None:
                kv2 = kv.view(B, Sk, 2 * inner)
                low_rank.apply("context", source, {"k": kv2[..., :inner], "v": kv2[..., inner:]})
        wq, bq = self._qkv_weights(fused=False)[:2]
        ops.linear_out(h, wq, bq, None, 1.0, 1.0, q.view(B, Sq, inner))
        if low_rank is not None:
            low_rank.apply("hidden", h, {"q": q.view(B, Sq, inner)})
        k, v = kv.unbind(2)
        ops.attention_out(q, k, v, mask, scale, o, precision=self._precision)
        if low_rank is not None:
            for branch in low_rank.image:
                o.add_(self._image_attention(q, branch), alpha=branch.scale)
        return o

    def _image_attention(self, q: torch.Tensor, branch: "ImageKV") -> torch.Tensor:
        """attention(q, K, V) without a mask, K and V projected from an IP-Adapter branch's context."""
        B, H, D = q.shape[0], self.config.heads, self.config.dim_head
        ctx = branch.context.reshape(B, -1, branch.context.shape[-1])
        ctx = _gemm_input(ctx, q.dtype)
        k = ops.linear(ctx, branch.wk).view(B, -1, H, D)
        v = ops.linear(ctx, branch.wv).view(B, -1, H, D)
        return ops.attention(q, k, v, None, self.config.softmax_scale, precision=self._precision)[0]

    def _project_kv(self, ctx: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [B, Sk, 2, H, D] (contiguous) = the K and V projections of ctx [B, Sk, Cctx]."""
        B, Sk, inner = kv.shape[0], kv.shape[1], self.config.inner_dim
        _, _, wkv, (wk, wv), bkv = self._qkv_weights()
        if wkv is not None:
            ops.linear_out(ctx, wkv, bkv, None, 1.0, 1.0, kv.view(B, Sk, 2 * inner))
            return
        self._warn_split_kv()
        kv3 = kv.view(B, Sk, 2, inner)
        bk, bv = (None, None) if bkv is None else (bkv[:inner], bkv[inner:])
        ops.linear_out(ctx, wk, bk, None, 1.0, 1.0, kv3[:, :, 0])
        ops.linear_out(ctx, wv, bv, None, 1.0, 1.0, kv3[:, :, 1])

    def _attend_functional(self, h, ctx, mask, B, Sq, Sk, low_rank=None) -> torch.Tensor:
        """The same with fresh outputs (no workspace), for torch.compile tracing."""
        H, D, inner = self.config.heads, self.config.dim_head, self.config.inner_dim
        scale = self.config.softmax_scale
        if ctx is None and low_rank is None:
            qkv = ops.linear(h, self.attn_qkvw, self.attn_qkvb).view(B, Sq, 3, H, D)
            q, k, v = qkv.unbind(2)
        else:
            wq, bq, _, (wk, wv), bkv = self._qkv_weights(fused=False)
            bk, bv = (None, None) if bkv is None else (bkv[:inner], bkv[inner:])
            src = h if ctx is None else ctx
            q, k, v = ops.linear(h, wq, bq), ops.linear(src, wk, bk), ops.linear(src, wv, bv)
            if low_rank is not None:
                if ctx is None:
                    q, k, v = low_rank.apply("hidden", h, {"q": q, "k": k, "v": v}, functional=True).values()
                else:
                    q = low_rank.apply("hidden", h, {"q": q}, functional=True)["q"]
                    k, v = low_rank.apply("context", src, {"k": k, "v": v}, functional=True).values()
            q, k, v = q.view(B, Sq, H, D), k.view(B, Sk, H, D), v.view(B, Sk, H, D)
        o, _ = ops.attention(q, k, v, mask, scale, precision=self._precision)
        if low_rank is not None:
            for branch in low_rank.image:
                o = o + branch.scale * self._image_attention(q, branch)
        return o

    def _warn_split_kv(self) -> None:
        if not self._warned_split_kv:
            self._warned_split_kv = True
            warnings.warn(
                f"DeepSpeedDiffusersAttention layer {self.layer_id}: attn_kw and attn_vw are not "
                "two adjacent halves of one storage (was one of them reassigned?), so K and V "
                "take two GEMMs instead of one. Call module.float()/.to() or reassign both from "
                "one [2*inner, Cctx] tensor to fuse them again.",
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        """A one-line summary of the config."""
        c = self.config
        kind = f"cross({c.cross_attention_dim})" if c.is_cross_attention else "self"
        return (
            f"layer_id={self.layer_id}, {kind}, hidden_size={c.hidden_size}, heads={c.heads}, "
            f"dim_head={c.dim_head}, dtype={c.dtype}"
            + self._precision_repr()
        )


# ---------------------------------------------------------------------- helpers
class LowRankGroup(NamedTuple):
    """The low-rank updates (LoRA) of the projections that read one input, for :class:`LowRankUpdates`.

    ``t = x a^T`` is one GEMM for every adapter of those projections (their A matrices
    stacked along the rank), then every segment adds ``scale[r0] * t[..., r0:r1] b^T`` to its
    projection's output, all in one kernel (:func:`.ops.low_rank_accumulate`) that reads each
    output once and skips a segment whose scale is 0 (an inactive adapter adds nothing, not
    ``0 * inf``).

    input: which input the projections read: ``"hidden"`` (the normalised input: Q, and K/V
        in self-attention), ``"context"`` (K/V in cross-attention) or ``"output"`` (the
        attention output: the output projection).
    a: ``[R, in]``, contiguous, in the module's dtype and on its device.
    scale: ``[R]`` float32 on the same device, or None for 1: a segment's factor is
        ``scale[r0]`` (a fixed-address buffer, so a CUDA graph reads the current factors at replay).
    segments: ``((target, r0, r1, b), ...)``: target is ``"q"``, ``"k"``, ``"v"`` or ``"out"``;
        b ``[out_features, r1 - r0]`` contiguous.
    """

    input: str
    a: torch.Tensor
    scale: Optional[torch.Tensor]
    segments: tuple


class LowRankUpdates(NamedTuple):
    """Low-rank updates (LoRA) of the four projections, for ``forward(..., low_rank=...)``:
    :class:`LowRankGroup` s, at most one per input, plus the IP-Adapter branches."""

    groups: tuple = ()
    image: tuple = ()  # ImageKV branches, set by forward(..., image_kv=...)

    def __bool__(self) -> bool:
        return len(self.groups) > 0 or len(self.image) > 0  # (bool() of a tuple does not trace in torch 2.11)

    def reads(self, input: str) -> bool:
        """Whether a group reads ``input``."""
        return any(g.input == input for g in self.groups)

    def tensors(self) -> tuple:
        """Every tensor the updates read, in order (for autograd to see them)."""
        low = tuple(t for g in self.groups for t in (g.a, g.scale, *(seg[3] for seg in g.segments))
                    if t is not None)
        return low + tuple(t for branch in self.image for t in (branch.context, branch.wk, branch.wv))

    def check(self, module: "DeepSpeedDiffusersAttention", cross: bool) -> None:
        """ValueError unless every group fits ``module`` (inputs, widths, dtype, device)."""
        cfg = module.config
        dtype, device = module.attn_ow.dtype, module.attn_ow.device
        widths = {"hidden": cfg.hidden_size, "output": cfg.inner_dim,
                  "context": (cfg.cross_attention_dim or cfg.hidden_size) if cross else None}
        allowed = {"hidden": ("q",) if cross else ("q", "k", "v"), "context": ("k", "v"), "output": ("out",)}
        seen = set()
        for g in self.groups:
            if g.input not in widths or widths[g.input] is None or g.input in seen:
                raise ValueError(f"low_rank: group input {g.input!r} is unknown, repeated or has no source here")
            seen.add(g.input)
            if g.a.dim() != 2 or g.a.shape[1] != widths[g.input]:
                raise ValueError(f"low_rank: {g.input} group's a must be [R, {widths[g.input]}], got "
                                 f"{tuple(g.a.shape)}")
            for t in (g.a, *(seg[3] for seg in g.segments)):
                _check_tensor(t, "low_rank weight", dtype, device)
            t = g.scale
            if t is not None and (t.shape != (g.a.shape[0],) or t.dtype != torch.float32 or t.device != device):
                raise ValueError(f"low_rank: {g.input} group's scale must be a torch.float32 [{g.a.shape[0]}] "
                                 f"tensor on {device}")
            for target, r0, r1, b in g.segments:
                out = cfg.hidden_size if target == "out" else cfg.inner_dim
                if target not in allowed[g.input] or not 0 <= r0 < r1 <= g.a.shape[0] or b.shape != (out, r1 - r0):
                    raise ValueError(f"low_rank: segment {target!r} [{r0}:{r1}] with b {tuple(b.shape)} does "
                                     f"not fit the {g.input} group (a {tuple(g.a.shape)}, out {out})")

    def apply(self, input: str, x: torch.Tensor, outputs: dict, factor: float = 1.0,
              functional: bool = False) -> dict:
        """Add the updates of the group reading ``input`` (x ``[..., in]``) to ``outputs``
        (target -> tensor, scaled by ``factor``); in place into each output (a view of a fused
        result), or as new tensors when ``functional`` (torch.compile). Returns ``outputs``."""
        for g in self.groups:
            if g.input != input:
                continue
            t = ops.linear(x, g.a)
            if functional:
                _apply_functional(g, t, outputs, factor)
            else:
                _accumulate(g, t, outputs, factor)
        return outputs


def _per_segment(g: LowRankGroup, t: torch.Tensor, outputs: dict, factor: float, functional: bool,
                 segments=None) -> None:
    """One GEMM per segment, each adding ``factor * scale[r0] * t[..., r0:r1] b^T`` (nothing
    where ``scale[r0]`` is 0): into a new tensor per target when ``functional`` (torch.compile
    traces it), else in place. The same sums as :func:`.ops.low_rank_accumulate`, which the
    eager path runs instead where it can."""
    for target, r0, r1, b in (g.segments if segments is None else segments):
        part = t[..., r0:r1]
        if g.scale is not None:
            f = g.scale[r0 : r0 + 1]
            part = (part * f).to(t.dtype).masked_fill(f == 0, 0)
        if functional:
            outputs[target] = ops.linear(part, b, None, outputs[target], factor, 1.0)
        else:
            ops.linear_out(part, b, None, outputs[target], factor, 1.0, outputs[target])


def _apply_functional(g: LowRankGroup, t: torch.Tensor, outputs: dict, factor: float) -> None:
    """The traced form of :func:`_accumulate` (new tensors, one GEMM per segment)."""
    _per_segment(g, t, outputs, factor, functional=True)


def _fused_columns(outputs: dict, targets) -> Optional[tuple]:
    """(one tensor spanning the targets' columns, {target: first column}) when the targets'
    outputs are column blocks of the same rows of one tensor (the fused Q/K/V result), else None."""
    views = [outputs[name] for name in targets]
    first = views[0]
    if first.dim() < 2 or first.stride(-1) != 1:
        return None
    for v in views[1:]:
        if (v.shape != first.shape or v.stride() != first.stride() or v.dtype != first.dtype
                or v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
    lo = min(v.storage_offset() for v in views)
    hi = max(v.storage_offset() + v.shape[-1] for v in views)
    if hi - lo > first.stride(-2):  # the blocks must lie in one row
        return None
    out = first.as_strided((*first.shape[:-1], hi - lo), first.stride(), lo)
    return out, {name: v.storage_offset() - lo for name, v in zip(targets, views)}


def _accumulate(g: LowRankGroup, t: torch.Tensor, outputs: dict, factor: float) -> None:
    """Every segment of ``g`` into its output in place: one :func:`.ops.low_rank_accumulate`
    launch when the outputs are column blocks of one tensor and the segments fit one launch,
    else one launch per target; one GEMM per segment for a target with more segments than a
    launch takes, and for float32 on CUDA (the kernel runs float16 / bfloat16)."""
    if t.is_cuda and t.dtype == torch.float32:
        _per_segment(g, t, outputs, factor, functional=False)
        return
    scale = g.scale if g.scale is not None else torch.ones(t.shape[-1], dtype=torch.float32, device=t.device)
    targets = list(dict.fromkeys(seg[0] for seg in g.segments))
    fused = _fused_columns(outputs, targets) if len(g.segments) <= ops.LOW_RANK_MAX_SEGMENTS else None
    if fused is not None:
        out, col0 = fused
        ops.low_rank_accumulate(t, scale, [(r0, r1, col0[name], b) for name, r0, r1, b in g.segments], out,
                                factor)
        return
    for name in targets:
        segments = [seg for seg in g.segments if seg[0] == name]
        if len(segments) > ops.LOW_RANK_MAX_SEGMENTS:
            _per_segment(g, t, outputs, factor, functional=False, segments=segments)
        else:
            ops.low_rank_accumulate(t, scale, [(r0, r1, 0, b) for _, r0, r1, b in segments], outputs[name], factor)


class ImageKV(NamedTuple):
    """One IP-Adapter branch, for ``forward(..., image_kv=...)``: the attention output gains
    ``scale * attention(q, context wk^T, context wv^T)`` (no mask, the module's softmax scale).

    context: the image tokens [B, S_img, C_img] (or [B, n, S_img, C_img], flattened);
    wk, wv: [inner, C_img] without bias, contiguous, in the module's dtype.
    """

    context: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    scale: float


class _KVEntry(NamedTuple):
    """One cached K/V: the key's plain values, weak references to its tensors, and kv."""

    key: tuple
    refs: tuple  # weakref.ref to (context, *K/V weights), in _kv_sources order
    kv: torch.Tensor  # [B, Sk, 2, H, D]


def _check_tensor(t, name: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raises unless t is a tensor on the module device, in its dtype or float32 (which is
    cast to a float16/bfloat16 module's dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the module is on {device}")
    if t.dtype != dtype and not (t.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(
            f"{name} has dtype {t.dtype} but the module is {dtype}; pass {dtype}"
            + (" (float32 is cast)" if dtype != torch.float32 else "")
        )


def _check_input(t, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t checked (_check_tensor) and cast to the module dtype."""
    _check_tensor(t, name, dtype, device)
    return t if t.dtype == dtype else t.to(dtype)


def _gemm_input(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checked t [B, S, C] as a GEMM reads it: in the module dtype and contiguous
    (cast / copied only if it is not)."""
    return _rows(t if t.dtype == dtype else t.to(dtype))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [B, S, C] as the ops need it: contiguous (copied only if it is not)."""
    return t if t.is_contiguous() else t.contiguous()


def _attention_mask(mask, B, H, Sq, Sk, dtype, device) -> Optional[torch.Tensor]:
    """diffusers' attention_mask as a view broadcastable to [B, H, Sq, Sk].

    diffusers (prepare_attention_mask + AttnProcessor2_0) repeats a [N, ..., Sk] mask
    with N < B*H over heads (repeat_interleave) and views it as [B, H, -1, Sk]; for N == B
    that is the same mask for every head, which a size-1 head dim expresses without a copy.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"input_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in (torch.float32, dtype):
        raise TypeError(
            f"input_mask must be bool (True = attend) or an additive float mask "
            f"(float32 or {dtype}), got {mask.dtype}"
        )
    if mask.device != device:
        raise ValueError(f"input_mask is on {mask.device} but the module is on {device}")
    shape = tuple(mask.shape)
    bad = ValueError(
        f"input_mask of shape {shape} does not fit attention of batch {B}, {H} heads, "
        f"{Sq} queries and {Sk} keys: expected [B, Sk], [B or B*H, 1 or Sq, Sk], or 4-D "
        f"broadcastable to [B, H, Sq, Sk] = [{B}, {H}, {Sq}, {Sk}]"
    )
    if mask.dim() not in (2, 3, 4) or shape[-1] != Sk:
        raise bad
    if mask.dim() == 4:
        m = mask
    else:
        m = mask if mask.dim() == 3 else mask.unsqueeze(1)  # [N, 1|Sq, Sk]
        N = m.shape[0]
        if N == B:
            m = m.unsqueeze(1)  # [B, 1, 1|Sq, Sk]
        elif N == B * H:
            m = m.unflatten(0, (B, H))  # [B, H, 1|Sq, Sk]
        else:
            raise bad
    for have, want in zip(m.shape, (B, H, Sq, Sk)):
        if have not in (1, want):
            raise bad
    return m
