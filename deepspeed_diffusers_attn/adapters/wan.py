"""Adapter: Wan attention, diffusers ``WanAttention`` run by ``WanAttnProcessor``.

``WanTransformer3DModel``'s blocks hold two:

* ``attn1``, self-attention: ``to_q/to_k/to_v`` (with biases), ``torch.nn.RMSNorm`` of q and
  of k across all heads (over the inner dim, before the heads are split), then the 3-D RoPE
  of ``rotary_emb = (freqs_cos, freqs_sin)`` (each ``[1, S, 1, head_dim]``) as the processor's
  own ``apply_rotary_emb``: ``y[2i] = x[2i]·cos[2i] - x[2i+1]·sin[2i+1]``, ``y[2i+1] =
  x[2i]·sin[2i+1] + x[2i+1]·cos[2i]``. It runs on
  :class:`~deepspeed_diffusers_attn.dit_attention.JointAttention` with one stream: one QKV
  GEMM into ``[B, S, 3, H, D]``, RMSNorm and RoPE in place in one fp32 pass, attention on
  strided views, the output GEMM with its bias.
* ``attn2``, cross-attention to the text tokens: Q from the video tokens, K/V from the text
  (the same norms, no RoPE); for I2V, ``add_k_proj/add_v_proj`` and ``norm_added_k`` project
  the image tokens (the first ``S - 512`` tokens of ``encoder_hidden_states``, as the
  processor splits them) for a second attention added to the first. It runs on
  :class:`~deepspeed_diffusers_attn.dit_attention.QKNormCrossAttention`.

Context parallelism (diffusers' ``enable_parallelism``, before or after patching): the
self-attention runs over the ranks' token shards with :mod:`..context_parallel` (Ulysses or
ring; diffusers keeps the cross-attention local); a mask then raises ValueError.

Declined: other processors, a context-parallel config our attention does not run
(:func:`..context_parallel.for_parallel_config`), fused projections
(``fuse_qkv_projections``: call ``unfuse_qkv_projections`` first), K/V heads of another size
(``cross_attention_dim_head`` != head dim), LoRA (PEFT) layers on the projections (these
kernels do not run them; ``patch`` then asks the dispatcher bridge). The processor's attention backend is not consulted: a patched module always
runs our kernel. Patch's ``kv_cache`` is not used: the text K/V GEMM is a small share of a
Wan step (512 text tokens against tens of thousands of video tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..context_parallel import processor_refusal
from ..dit_attention import (CrossAttentionConfig, JointAttention, JointAttentionConfig, QKNormCrossAttention, Rope,
                             Stream)
from .joint_attention import (DiTStandIn, child, convert_with, has_hooks, head_reasons, load_fused, param_reasons,
                              projection_reasons, qk_norm_spec, rms_norm_spec, unwrap)

__all__ = ["NAME", "claims", "supports", "from_diffusers", "convert", "PatchedWanAttention", "wan_rope",
           "TEXT_TOKENS"]

NAME = "WanAttention"

TEXT_TOKENS = 512
"""The text context length WanAttnProcessor assumes when it splits I2V image tokens off the front."""

SELF_NAMES = (("to_q", "x.q"), ("to_k", "x.k"), ("to_v", "x.v"), ("to_out.0", "x.out"),
              ("norm_q", "x.q_norm"), ("norm_k", "x.k_norm"))
"""A self-attention ``WanAttention``'s children and their :meth:`JointAttention.views` names."""

CROSS_NAMES = (("to_q", "x.q"), ("to_k", "context.k"), ("to_v", "context.v"), ("to_out.0", "x.out"),
               ("norm_q", "x.q_norm"), ("norm_k", "context.k_norm"),
               ("add_k_proj", "image.k"), ("add_v_proj", "image.v"), ("norm_added_k", "image.k_norm"))
"""A cross-attention ``WanAttention``'s children and their :meth:`QKNormCrossAttention.views` names."""


def _classes():
    """(WanAttention, WanAttnProcessor), or None on a diffusers without them."""
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
    except ImportError:  # pragma: no cover - diffusers before WanAttention
        return None
    return WanAttention, WanAttnProcessor


def claims(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``WanAttention`` (this adapter answers for it, even to decline)."""
    classes = _classes()
    return classes is not None and isinstance(module, classes[0])


def _is_cross(attn) -> bool:
    return bool(attn.is_cross_attention) or child(attn, "add_k_proj") is not None


def supports(attn: nn.Module) -> list[str]:
    """Every reason the ``WanAttention`` ``attn`` cannot be converted; empty if it can."""
    if not claims(attn):
        return [f"{type(attn).__name__} is not a diffusers WanAttention"]
    processor = unwrap(attn.processor)
    reasons = []
    if type(processor) is not _classes()[1]:
        reasons.append(f"processor {type(processor).__name__} is not reproduced; only WanAttnProcessor")
    reasons += processor_refusal(processor)
    if getattr(attn, "fused_projections", False) or any(child(attn, p) is not None
                                                       for p in ("to_qkv", "to_kv", "to_added_kv")):
        reasons.append("fused projections (fuse_qkv_projections) are on; call unfuse_qkv_projections first")
    if has_hooks(attn):
        reasons.append("forward hooks on the WanAttention module would be bypassed")
    image = child(attn, "add_k_proj") is not None or child(attn, "add_v_proj") is not None
    paths = ["to_q", "to_k", "to_v", "to_out.0"] + (["add_k_proj", "add_v_proj"] if image else [])
    shared, inner = projection_reasons(attn, paths, " (cross_attention_dim_head != head dim)")
    reasons += shared
    if inner is None:
        return reasons
    to_q, to_k, to_v, out = (child(attn, p) for p in paths[:4])
    reasons += head_reasons(int(attn.heads), inner)[1]
    if to_k.in_features != to_v.in_features:
        reasons.append("to_k and to_v take different input widths")
    if not _is_cross(attn) and to_k.in_features != to_q.in_features:
        reasons.append("a self-attention whose to_k takes another width than to_q")
    if out.in_features != inner:
        reasons.append(f"to_out[0] takes {out.in_features} channels, not the inner dim {inner}")
    reasons += qk_norm_spec(attn, "norm_q", "norm_k", inner, across_heads=True)[1]
    if image:
        add_k, add_v = child(attn, "add_k_proj"), child(attn, "add_v_proj")
        if add_k.out_features != inner or add_v.out_features != inner or add_k.in_features != add_v.in_features:
            reasons.append("add_k_proj / add_v_proj must map one width to the inner dim")
        reasons += rms_norm_spec(child(attn, "norm_added_k"), inner, "norm_added_k", across_heads=True)[1]
    return reasons + param_reasons(attn)


def from_diffusers(attn, **options) -> nn.Module:
    """A new fused module computing what ``attn`` computes (``attn`` untouched: the weights are
    copied), on its device and dtype: a :class:`JointAttention` for a self-attention, a
    :class:`QKNormCrossAttention` for a cross-attention. ValueError naming the reasons when
    :func:`supports` is non-empty; ``options`` (patch's ``kv_cache``) are not used."""
    reasons = supports(attn)
    if reasons:
        raise ValueError(f"cannot convert this {type(attn).__name__}: " + "; ".join(reasons))
    heads, inner = int(attn.heads), attn.to_q.out_features
    head_dim, dtype, device = inner // heads, attn.to_q.weight.dtype, attn.to_q.weight.device
    qk_norm = qk_norm_spec(attn, "norm_q", "norm_k", inner, across_heads=True)[0]
    out = attn.to_out[0]
    if not _is_cross(attn):
        x = Stream(in_features=attn.to_q.in_features,
                   qkv_bias=any(m.bias is not None for m in (attn.to_q, attn.to_k, attn.to_v)),
                   out_features=out.out_features, out_bias=out.bias is not None, qk_norm=qk_norm)
        fused = JointAttention(JointAttentionConfig(heads=heads, dim_head=head_dim, x=x, dtype=dtype), device=device)
        return load_fused(fused, attn, SELF_NAMES)
    add_k = child(attn, "add_k_proj")
    config = CrossAttentionConfig(
        heads=heads, dim_head=head_dim, hidden_size=attn.to_q.in_features, context_size=attn.to_k.in_features,
        out_features=out.out_features, out_bias=out.bias is not None,
        qkv_bias=any(m.bias is not None for m in (attn.to_q, attn.to_k, attn.to_v)),
        q_norm=qk_norm, k_norm=qk_norm,
        image_size=None if add_k is None else add_k.in_features,
        image_kv_bias=add_k is not None and (add_k.bias is not None or attn.add_v_proj.bias is not None),
        image_k_norm=rms_norm_spec(child(attn, "norm_added_k"), inner, "norm_added_k", across_heads=True)[0],
        dtype=dtype)
    return load_fused(QKNormCrossAttention(config, device=device), attn, CROSS_NAMES)


def convert(attn, **options):
    """(the stand-in for ``attn``, []) with ``attn``'s weights now views of the fused ones, or
    (None, reasons) with ``attn`` untouched."""
    reasons = supports(attn)
    names = CROSS_NAMES if not reasons and _is_cross(attn) else SELF_NAMES
    return convert_with(attn, reasons, from_diffusers, names, PatchedWanAttention)


def wan_rope(rotary_emb, seq: int, head_dim: int) -> Optional[Rope]:
    """diffusers' Wan ``rotary_emb = (freqs_cos, freqs_sin)`` (each ``[1, S, 1, head_dim]``) as
    a :class:`Rope` of strided views reproducing the processor's reading of them, or None for
    None. ValueError for another form."""
    if rotary_emb is None:
        return None
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        raise ValueError("rotary_emb must be None or a (freqs_cos, freqs_sin) pair of [1, S, 1, head_dim] tensors, "
                         f"got {type(rotary_emb).__name__}")
    tables = []
    for name, t in zip(("freqs_cos", "freqs_sin"), rotary_emb):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) not in ((1, seq, 1, head_dim), (seq, head_dim)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rotary_emb {name} must be [1, S, 1, head_dim] = [1, {seq}, 1, {head_dim}], got {got}")
        tables.append(t.reshape(seq, head_dim))
    cos, sin = tables
    # y[2i] = x[2i] cos[2i] - x[2i+1] sin[2i+1];  y[2i+1] = x[2i+1] cos[2i] + x[2i] sin[2i+1]
    return Rope(cos[:, 0::2], sin[:, 1::2], cos[:, 0::2], sin[:, 1::2])


class PatchedWanAttention(DiTStandIn):
    """Stands in for one ``WanAttention`` with its call signature and layout, running a
    :class:`JointAttention` (self-attention) or a :class:`QKNormCrossAttention` (cross-attention);
    see :class:`~.joint_attention.DiTStandIn` and the module docstring."""

    @property
    def _processor_class(self):
        return _classes()[1]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        """``WanAttention.forward`` under ``WanAttnProcessor``: hidden_states [B, S, C] attending to
        themselves (with ``rotary_emb``) or, in a cross-attention, to encoder_hidden_states
        (``[B, S_img + 512, C]`` with I2V image tokens first). Returns [B, S, C]."""
        if not self._ours():
            return self._sync_original()(hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if kwargs:
            raise TypeError(f"WanAttnProcessor takes no arguments {sorted(kwargs)}")
        if isinstance(self.dda, JointAttention):
            if encoder_hidden_states is not None:
                raise ValueError("encoder_hidden_states given to a self-attention WanAttention (attn1); only the "
                                 "cross-attention (attn2) is patched to take a context")
            rope = wan_rope(rotary_emb, hidden_states.shape[1], self.dda.config.dim_head)
            return self.dda(hidden_states, None, attention_mask, rope, parallel=self._context_parallel())[0]
        if rotary_emb is not None:
            raise ValueError("rotary_emb given to a cross-attention WanAttention; the model passes none")
        context, image = encoder_hidden_states, None
        if self.dda.config.image_size is not None:
            if context is None:
                raise ValueError("an I2V WanAttention needs encoder_hidden_states (image tokens, then 512 text tokens)")
            split = context.shape[1] - TEXT_TOKENS
            if split < 1:
                raise ValueError(f"an I2V WanAttention's encoder_hidden_states hold image tokens then {TEXT_TOKENS} "
                                 f"text tokens; got {context.shape[1]} tokens")
            image, context = context[:, :split], context[:, split:]
        elif context is None:
            context = hidden_states  # the processor projects K/V from hidden_states then
        return self.dda(hidden_states, context, image, attention_mask)
