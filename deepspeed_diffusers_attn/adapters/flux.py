"""Adapter: Flux attention, diffusers ``FluxAttention`` run by ``FluxAttnProcessor``.

``FluxTransformer2DModel``'s double-stream blocks (text tokens through ``add_q_proj/
add_k_proj/add_v_proj/to_add_out``, image tokens through ``to_q/to_k/to_v/to_out``, attending
over ``[text; image]``) and single-stream blocks (``pre_only``: one stream of the already
concatenated tokens, no output projection; the block's MLP runs beside it). Per-head
``torch.nn.RMSNorm`` of q and k (``norm_q/norm_k``, ``norm_added_q/norm_added_k``), then RoPE
of every token's q and k with ``image_rotary_emb = (cos, sin)``, each ``[S, head_dim]``, as
diffusers' ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` with its defaults
(``use_real=True``, ``use_real_unbind_dim=-1``: pairs ``(x[2i], x[2i+1])`` rotated,
``y = x·cos + rot(x)·sin`` with ``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``).

Runs on :class:`~deepspeed_diffusers_attn.dit_attention.JointAttention` (context first): one
QKV GEMM per stream into one packed ``[B, S_txt + S_img, 3, H, D]`` buffer, RMSNorm and RoPE
in place in one fp32 pass per stream, attention on strided views, one output GEMM with its
bias per stream. As the processor does, a call without ``encoder_hidden_states`` returns the
attention output unprojected (``[B, S, inner]``) even where ``to_out`` exists, and the
attention mask is passed to the kernel as diffusers' dispatcher passes it to SDPA. A
double-stream module called without ``encoder_hidden_states`` (where the processor fails)
raises ValueError.

Context parallelism (diffusers' ``enable_parallelism``, before or after patching): the
attention runs over the ranks' token shards with :mod:`..context_parallel` (Ulysses or ring);
a mask then raises ValueError.

Declined: other processors (IP-Adapter's), a context-parallel config our attention does not run
(:func:`..context_parallel.for_parallel_config`), fused projections
(``fuse_qkv_projections``: call ``unfuse_qkv_projections`` first), LoRA (PEFT) layers on the
projections (these kernels do not run them; ``patch`` then asks the dispatcher bridge). The
processor's attention backend (``set_attention_backend``) is not consulted: a patched
module always runs our kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..context_parallel import processor_refusal
from ..dit_attention import JointAttention, Rope
from .joint_attention import (JOINT_NAMES, DiTStandIn, child, convert_with, has_hooks, head_reasons, joint_config,
                              load_fused, param_reasons, projection_reasons, qk_norm_spec, unwrap)

__all__ = ["NAME", "claims", "supports", "from_diffusers", "convert", "PatchedFluxAttention", "flux_rope"]

NAME = "FluxAttention"


def _classes():
    """(FluxAttention, FluxAttnProcessor), or None on a diffusers without them."""
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:  # pragma: no cover - diffusers before FluxAttention
        return None
    return FluxAttention, FluxAttnProcessor


def claims(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``FluxAttention`` (this adapter answers for it, even to decline)."""
    classes = _classes()
    return classes is not None and isinstance(module, classes[0])


def supports(attn: nn.Module) -> list[str]:
    """Every reason the ``FluxAttention`` ``attn`` cannot be converted; empty if it can."""
    if not claims(attn):
        return [f"{type(attn).__name__} is not a diffusers FluxAttention"]
    processor = unwrap(attn.processor)
    reasons = []
    if type(processor) is not _classes()[1]:
        reasons.append(f"processor {type(processor).__name__} is not reproduced; only FluxAttnProcessor")
    reasons += processor_refusal(processor)
    if getattr(attn, "fused_projections", False) or child(attn, "to_qkv") is not None:
        reasons.append("fused projections (fuse_qkv_projections) are on; call unfuse_qkv_projections first")
    if has_hooks(attn):
        reasons.append("forward hooks on the FluxAttention module would be bypassed")
    context = attn.added_kv_proj_dim is not None
    # to_out is used when the module has one (pre_only modules have none)
    paths = ["to_q", "to_k", "to_v"] + (["to_out.0"] if not attn.pre_only or child(attn, "to_out") else [])
    if context:
        paths += ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    shared, inner = projection_reasons(attn, paths)
    reasons += shared
    if inner is None:
        return reasons
    to_q, to_k, to_v = attn.to_q, attn.to_k, attn.to_v
    head_dim = int(attn.head_dim)
    if inner % head_dim:
        reasons.append(f"inner dim {inner} is not a multiple of head_dim {head_dim}")
        return reasons
    reasons += head_reasons(inner // head_dim, inner)[1]
    if not to_q.in_features == to_k.in_features == to_v.in_features:
        reasons.append("to_q, to_k and to_v take different input widths")
    for p in (p for p in ("to_out.0", "to_add_out") if p in paths):
        if child(attn, p).in_features != inner:
            reasons.append(f"{p} takes {child(attn, p).in_features} channels, not the inner dim {inner}")
    if context:
        add = [child(attn, p) for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
        if any(m.out_features != inner for m in add) or len({m.in_features for m in add}) > 1:
            reasons.append("add_q_proj / add_k_proj / add_v_proj must map one width to the inner dim")
        reasons += qk_norm_spec(attn, "norm_added_q", "norm_added_k", head_dim)[1]
    reasons += qk_norm_spec(attn, "norm_q", "norm_k", head_dim)[1]
    return reasons + param_reasons(attn)


def from_diffusers(attn, **options) -> JointAttention:
    """A new :class:`JointAttention` computing what ``attn`` computes (``attn`` untouched: the
    weights are copied), on its device and dtype; ValueError naming the reasons when
    :func:`supports` is non-empty. ``options`` (patch's ``kv_cache``) are not used: Flux's text
    stream changes with the timestep (AdaLN), so its K/V cannot be cached."""
    reasons = supports(attn)
    if reasons:
        raise ValueError(f"cannot convert this {type(attn).__name__} to JointAttention: " + "; ".join(reasons))
    heads = attn.to_q.out_features // int(attn.head_dim)
    fused = JointAttention(joint_config(attn, heads, context_first=True), device=attn.to_q.weight.device)
    return load_fused(fused, attn, JOINT_NAMES)


def convert(attn, **options):
    """(the stand-in for ``attn``, []) with ``attn``'s weights now views of the fused ones, or
    (None, reasons) with ``attn`` untouched."""
    return convert_with(attn, supports(attn), from_diffusers, JOINT_NAMES, PatchedFluxAttention)


def flux_rope(image_rotary_emb, seq: int, head_dim: int) -> Optional[Rope]:
    """diffusers' ``image_rotary_emb = (cos, sin)`` (each ``[S, head_dim]``, read as
    ``apply_rotary_emb(..., use_real=True, use_real_unbind_dim=-1)`` reads it) as a :class:`Rope`
    of strided views, or None for None. ValueError for another form."""
    if image_rotary_emb is None:
        return None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        raise ValueError("image_rotary_emb must be None or a (cos, sin) pair of [S, head_dim] tensors, got "
                         f"{type(image_rotary_emb).__name__}")
    cos, sin = image_rotary_emb
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (seq, head_dim):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"image_rotary_emb {name} must be [S, head_dim] = [{seq}, {head_dim}] (the text and "
                             f"image tokens of this call), got {got}")
    # y[2i] = x[2i] cos[2i] - x[2i+1] sin[2i];  y[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
    return Rope(cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2])


class PatchedFluxAttention(DiTStandIn):
    """Stands in for one ``FluxAttention`` with its call signature and layout, running a
    :class:`JointAttention` (see :class:`~.joint_attention.DiTStandIn` and the module docstring)."""

    @property
    def _processor_class(self):
        return _classes()[1]

    @property
    def head_dim(self) -> int:
        """The original's head dim (Flux code reads ``attn.head_dim``)."""
        return self._original.head_dim

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None, **kwargs):
        """``FluxAttention.forward`` under ``FluxAttnProcessor``: a double-stream module takes
        encoder_hidden_states [B, S_txt, C] and returns ``(image output, text output)``, both
        projected; a single-stream one (no added K/V projections) returns the attention output
        of hidden_states [B, S, C] unprojected, ``[B, S, inner]``. Extra kwargs are ignored, as
        ``FluxAttention.forward`` drops those its processor does not take."""
        if not self._ours():
            return self._sync_original()(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                         **kwargs)
        cfg = self.dda.config
        if (encoder_hidden_states is None) != (cfg.context is None):
            raise ValueError("FluxAttnProcessor needs encoder_hidden_states exactly when the FluxAttention has added "
                             f"K/V projections (added_kv_proj_dim is {self._original.added_kv_proj_dim})")
        seq = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        rope = flux_rope(image_rotary_emb, seq, cfg.dim_head)
        project = encoder_hidden_states is not None
        y, y_context = self.dda(hidden_states, encoder_hidden_states, attention_mask, rope, project=project,
                                parallel=self._context_parallel())
        return (y, y_context) if project else y
