"""Adapter: diffusers ``Attention`` run by ``AttnProcessor2_0`` or ``AttnProcessor``.

The UNet's (SD1.5 / SD2.1 / SDXL) transformer attention and the VAE's mid-block
attention. :func:`supports` lists why a module cannot be converted, :func:`from_diffusers`
builds the fused :class:`~deepspeed_diffusers_attn.attention.DeepSpeedDiffusersAttention`,
and :class:`PatchedAttention` is the stand-in that runs it with ``Attention.forward``'s
signature. Only diffusers' public attributes are read (with defaults, for older versions).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..attention import (DeepSpeedDiffusersAttention, DeepSpeedDiffusersAttentionConfig, ImageKV, LowRankUpdates,
                         unsupported_device_dtype, unsupported_head_dim)
from .. import factor_pool
from ..module_state import tuner_key
from . import peft_lora
from .lora_bank import LoraBank
from .stand_in import StandIn, parameter_identities, share_weights

__all__ = ["NAME", "claims", "supports", "from_diffusers", "convert", "PatchedAttention", "FusedAttnProcessor"]

NAME = "Attention"

_UNPATCH_HINT = "call deepspeed_diffusers_attn.unpatch(model) first"


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def claims(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Attention`` (this adapter answers for it, even to decline)."""
    return isinstance(module, _attention_class())


def _is_plain_linear(m) -> bool:
    m = peft_lora.base_linear(m)  # a PEFT LoRA layer runs on our kernels when its base is plain
    if type(m) is nn.Linear:
        return True
    # diffusers' LoRACompatibleLinear without a LoRA layer is a plain Linear.
    return type(m).__name__ == "LoRACompatibleLinear" and getattr(m, "lora_layer", None) is None


def _has_hooks(m) -> bool:
    return bool(
        getattr(m, "_forward_hooks", None)
        or getattr(m, "_forward_pre_hooks", None)
        or getattr(m, "_hf_hook", None) is not None
    )


def _processor_classes() -> tuple:
    """The processors we reproduce: plain attention, with or without attn.scale, and IP-Adapter's."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0

    return AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0


def _is_ip_adapter(processor) -> bool:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return type(processor) is IPAdapterAttnProcessor2_0


def supports(attn, *, adapters: bool = True) -> list[str]:
    """Every reason the diffusers ``Attention`` ``attn`` cannot be converted; empty if it can.

    ``adapters=False`` leaves out the LoRA adapters' reasons (a patched module runs stock
    while it has such an adapter: :attr:`PatchedAttention.stock_reason`)."""
    from diffusers.models.attention_processor import AttnProcessor

    if not claims(attn):
        return [f"{type(attn).__name__} is not a diffusers Attention"]

    def get(name, default=None):
        return getattr(attn, name, default)

    reasons = []
    if get("spatial_norm") is not None:
        reasons.append("spatial_norm (spatial_norm_dim) is not supported")
    if get("norm_q") is not None or get("norm_k") is not None:
        reasons.append("qk_norm (norm_q / norm_k) is not supported")
    if get("added_kv_proj_dim") is not None or any(get(n) is not None for n in ("add_q_proj", "add_k_proj", "add_v_proj")):
        reasons.append("added_kv_proj_dim (add_k_proj / add_v_proj) is not supported")
    if get("only_cross_attention", False):
        reasons.append("only_cross_attention is not supported")
    if get("norm_cross") is not None:
        reasons.append("cross_attention_norm (norm_cross) is not supported")
    if get("to_add_out") is not None or get("context_pre_only") is not None:
        reasons.append("joint attention (context_pre_only / to_add_out) is not supported")
    if get("is_causal", False):
        reasons.append("is_causal is not supported")
    processor = _unwrap(get("processor"))
    if type(processor) not in _processor_classes():
        reasons.append(f"processor {type(processor).__name__} is custom; only AttnProcessor2_0, "
                       "AttnProcessor and IPAdapterAttnProcessor2_0 are reproduced")
    if _has_hooks(attn):
        reasons.append("forward hooks on the Attention module would be bypassed")

    to_out = get("to_out")
    projections = {
        "to_q": get("to_q"),
        "to_k": get("to_k"),
        "to_v": get("to_v"),
        "to_out[0]": to_out[0] if to_out is not None and len(to_out) > 0 else None,
    }
    bad = False
    for name, m in projections.items():
        if m is None:
            reasons.append(f"{name} is missing (pre_only or only_cross_attention)")
            bad = True
        elif not _is_plain_linear(m):
            reasons.append(f"{name} is a {type(m).__name__}, not a plain nn.Linear or a PEFT LoRA layer "
                           "around one")
            bad = True
        elif adapters and (problem := peft_lora.unsupported(m)):
            reasons.append(f"{name}: {problem}")
        elif _has_hooks(m) or _has_hooks(peft_lora.base_linear(m)):
            reasons.append(f"forward hooks on {name} would be bypassed")
    if bad:
        return reasons

    to_q, to_k, to_v, out0 = (peft_lora.base_linear(m) for m in projections.values())
    heads = int(get("heads", 0) or 0)
    inner = to_q.out_features
    head_dim = None
    if heads < 1 or inner % heads:
        reasons.append(f"inner dim {inner} is not divisible by heads {heads}")
    else:
        head_dim = inner // heads
        if unsupported_head_dim(head_dim):
            reasons.append(unsupported_head_dim(head_dim))
    if to_k.out_features != inner or to_v.out_features != inner:
        reasons.append(f"K/V width {to_k.out_features}/{to_v.out_features} differs from Q's {inner} "
                       "(kv_heads / grouped-query attention is not supported)")
    if to_k.in_features != to_v.in_features:
        reasons.append("to_k and to_v take different input widths")
    if out0.in_features != inner or out0.out_features != to_q.in_features:
        reasons.append(f"to_out[0] maps {out0.in_features} -> {out0.out_features}; expected "
                       f"{inner} -> {to_q.in_features} (out_dim != query_dim is not supported)")
    for m in list(to_out)[1:]:
        p = getattr(m, "p", 0.0)
        if isinstance(m, nn.Dropout) and p > 0 and (m.training or attn.training):
            reasons.append(f"to_out dropout p={p} is active in training mode (call .eval())")
        elif not isinstance(m, nn.Dropout):
            reasons.append(f"to_out holds an extra {type(m).__name__}")

    group_norm = get("group_norm")
    if group_norm is not None and (type(group_norm) is not nn.GroupNorm or group_norm.num_channels != to_q.in_features):
        reasons.append("group_norm is not an nn.GroupNorm over query_dim channels")

    adapters = {id(t) for m in projections.values() for t in peft_lora.adapter_tensors(m)}
    params = [p for p in attn.parameters() if id(p) not in adapters]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        reasons.append(f"parameters in {sorted(map(str, dtypes))} on {sorted(map(str, devices))}: need one dtype "
                       "on one device")
    else:
        problem = unsupported_device_dtype(next(iter(devices)), next(iter(dtypes)))
        if problem:
            reasons.append(problem)

    if (head_dim is not None and type(processor) is not AttnProcessor
            and not math.isclose(float(get("scale", head_dim**-0.5)), head_dim**-0.5, rel_tol=1e-6)):
        reasons.append(f"attn.scale = {get('scale')} but {type(processor).__name__} ignores it and uses "
                       f"1/sqrt({head_dim}); set AttnProcessor() to apply attn.scale")
    return reasons


def from_diffusers(attn, *, kv_cache: bool = False) -> DeepSpeedDiffusersAttention:
    """A new fused module computing what ``attn`` computes, on ``attn``'s device and dtype.

    ``attn`` is not modified: the weights are copied into new fused storage. Honoured:
    heads, dim_head (inner_dim / heads), Q/K/V and output biases, the scale (``attn.scale``
    under AttnProcessor, 1/sqrt(dim_head) under AttnProcessor2_0, as diffusers does),
    group_norm, residual_connection, rescale_output_factor and cross-attention.
    ``upcast_attention`` / ``upcast_softmax`` hold by construction: our scores, softmax
    and accumulation are always fp32. ``kv_cache`` turns on the K/V cache (see
    :class:`~deepspeed_diffusers_attn.attention.DeepSpeedDiffusersAttention`). Projections
    wrapped in PEFT LoRA layers give their base weights; the adapters are not part of the
    fused module (the stand-in passes them per call). Raises ValueError listing the reasons
    when :func:`supports` is non-empty.
    """
    from diffusers.models.attention_processor import AttnProcessor

    reasons = supports(attn)
    if reasons:
        raise ValueError(f"cannot convert this {type(attn).__name__} to DeepSpeedDiffusersAttention: "
                         + "; ".join(reasons))
    to_q, to_k, to_v, out0 = (peft_lora.base_linear(m) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))
    heads = int(attn.heads)
    inner = to_q.out_features
    cross = bool(getattr(attn, "is_cross_attention", to_k.in_features != to_q.in_features))
    gn = getattr(attn, "group_norm", None)
    config = DeepSpeedDiffusersAttentionConfig(
        hidden_size=to_q.in_features,
        heads=heads,
        dim_head=inner // heads,
        cross_attention_dim=to_k.in_features if cross else None,
        qkv_bias=any(m.bias is not None for m in (to_q, to_k, to_v)),
        out_bias=out0.bias is not None,
        scale=float(attn.scale) if type(_unwrap(attn.processor)) is AttnProcessor else None,
        norm_num_groups=gn.num_groups if gn is not None else None,
        norm_eps=gn.eps if gn is not None else 1e-5,
        norm_affine=gn.affine if gn is not None else True,
        residual_connection=bool(getattr(attn, "residual_connection", False)),
        rescale_output_factor=float(getattr(attn, "rescale_output_factor", 1.0)),
        dtype=to_q.weight.dtype,
    )
    module = DeepSpeedDiffusersAttention(config, device=to_q.weight.device, kv_cache=kv_cache)
    with torch.no_grad():
        for (w, b), src in zip(module.projections(), (to_q, to_k, to_v, out0)):
            w.copy_(src.weight)
            if b is not None and src.bias is not None:
                b.copy_(src.bias)
            elif b is not None:
                b.zero_()  # e.g. to_q has a bias but to_k has none
        if module.norm_w is not None:
            module.norm_w.copy_(gn.weight)
            module.norm_b.copy_(gn.bias)
    module.train(attn.training)
    return module


def _projections(attn) -> tuple:
    """``attn``'s four projections as they are now (plain, or wrapped in LoRA layers); read
    from the registered children directly, since the stand-in asks on every call."""
    m = attn._modules
    return m["to_q"], m["to_k"], m["to_v"], m["to_out"]._modules["0"]


def _shared_pairs(attn, fused: DeepSpeedDiffusersAttention) -> list:
    """(stock parameter, the fused view holding its values) for each tensor the fused module copied.

    ``attn``: the original or its stand-in (the same children). A fused bias slice whose
    original is None (the fused module zero-fills it) has no pair.
    """
    pairs = []
    for (w, b), m in zip(fused.projections(), _projections(attn)):
        linear = peft_lora.base_linear(m)
        pairs.append((linear.weight, w.data))
        if b is not None:
            pairs.append((linear.bias, b.data))
    if fused.norm_w is not None:
        pairs += [(attn.group_norm.weight, fused.norm_w.data), (attn.group_norm.bias, fused.norm_b.data)]
    return [(p, t) for p, t in pairs if p is not None]


def convert(attn, *, kv_cache: bool = False) -> tuple[PatchedAttention | None, list[str]]:
    """(the stand-in for ``attn``, []) with ``attn``'s weights now views of the fused ones,
    or (None, reasons) with ``attn`` untouched."""
    reasons = supports(attn)
    if reasons:
        return None, reasons
    fused = from_diffusers(attn, kv_cache=kv_cache)
    keep = [t for m in _projections(attn) for t in peft_lora.adapter_tensors(m)]
    if isinstance(attn.processor, nn.Module):
        keep += [*attn.processor.parameters(), *attn.processor.buffers()]
    reasons = share_weights(attn, _shared_pairs(attn, fused), keep)
    if reasons:
        return None, reasons
    return PatchedAttention(attn, fused), []


class FusedAttnProcessor:
    """What ``attn_processors`` reports for a patched ``Attention``: our fused kernels run.

    ``stock`` is the diffusers processor whose math they reproduce (``AttnProcessor2_0``
    when built with no argument). Handing it back to ``set_attn_processor`` keeps our
    kernels; called directly on an ``Attention`` (after ``unpatch``), it runs ``stock``.

    diffusers decides what a model's processors allow by comparing their classes with its
    own lists (``set_default_attn_processor``, ``fuse_qkv_projections``, the IP-Adapter
    loader's ``p.__class__()``), so ``p.__class__`` answers the stock class; ``type(p)`` and
    ``repr(p)`` show what runs.
    """

    @property
    def __class__(self):
        return type(self.stock)

    def __reduce__(self):
        # pickle's default reduction reads __class__, which answers the stock class
        return FusedAttnProcessor, (self.stock,)

    def __init__(self, stock=None):
        if stock is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            stock = AttnProcessor2_0()
        object.__setattr__(self, "stock", stock)
        object.__setattr__(self, "serial", next(_serials))  # distinct per object, for graph keys

    def __getattr__(self, name):
        # the stock processor's values (an IP-Adapter's scale, to_k_ip...) read through
        if name == "stock":
            raise AttributeError(name)
        return getattr(self.stock, name)

    def __setattr__(self, name, value):
        # ... and written through: set_ip_adapter_scale sets .scale on what attn_processors gave
        setattr(self.stock, name, value)

    def __call__(self, attn, *args, **kwargs):
        """Runs the stock processor on a diffusers ``Attention``."""
        return self.stock(attn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FusedAttnProcessor(stock={type(self.stock).__name__})"


_serials = itertools.count()


def _reported(processor):
    """What ``attn_processors`` shows while our kernels run: a :class:`FusedAttnProcessor`
    for a plain processor; a processor that is a module (IP-Adapter's, with weights) itself,
    so diffusers' calls on it (``set_ip_adapter_scale``) reach it directly."""
    return processor if isinstance(processor, nn.Module) else FusedAttnProcessor(processor)


def _unwrap(processor):
    return processor.stock if type(processor) is FusedAttnProcessor else processor


class PatchedAttention(StandIn):
    """Stands in for one diffusers ``Attention``, with its call signature and layout, running ``dda``.

    Its children are the original's (``to_q``, ``to_k``, ``to_v``, ``to_out``, and
    ``group_norm`` where present), whose parameters view the fused tensors of ``dda``, the
    fused :class:`DeepSpeedDiffusersAttention` (see :class:`~.stand_in.StandIn`);
    ``original`` is the replaced ``Attention``, given back by ``unpatch``.

    LoRA. PEFT finds the projections here as in stock diffusers, so adapters load before or
    after patching, and every adapter call (``set_adapters``, ``disable_lora``,
    ``fuse_lora``, ``delete_adapters``...) acts on them. The adapters' A weights live in a
    :class:`~.lora_bank.LoraBank` (PEFT's tensors become views of it) and their factors in
    a fixed vector of the model-wide :mod:`..factor_pool`, which each call (and each graph
    replay, through :meth:`graph_state`) brings up to date; the fused module adds them as
    low-rank updates: the fused Q/K/V and output GEMMs stay, one GEMM computes every A of
    the projections reading one input, and one kernel adds every B of them into the fused
    result. An adapter we cannot reproduce
    (DoRA, LoRA bias, active dropout) makes the module run stock for as long as it is there,
    and :attr:`stock_reason` says so.

    diffusers' processor API keeps its meaning. :meth:`get_processor` (and so the model's
    ``attn_processors``) reports what runs: while our kernels run, a
    :class:`FusedAttnProcessor` for a plain processor and an IP-Adapter processor itself
    (its math and weights are what run, on our kernels); the original's processor while it
    runs stock. :meth:`set_processor` gives the processor to the original and asks
    :func:`supports` again: a processor we reproduce (``AttnProcessor2_0``,
    ``AttnProcessor``, ``IPAdapterAttnProcessor2_0``, ``FusedAttnProcessor2_0``, our own
    report) keeps our kernels, with its scale rule; any other (a custom one) makes this
    module run stock diffusers with that processor, until a supported one is set again.
    """

    def __init__(self, original, fused: DeepSpeedDiffusersAttention):
        super().__init__(original, fused)
        # plain attributes, never registered (a reported IP-Adapter processor is the original's child)
        object.__setattr__(self, "_processor", _reported(original.processor))
        object.__setattr__(self, "_processor_reason", "")
        object.__setattr__(self, "_reason_cache", (None, ""))
        object.__setattr__(self, "_lora", LoraBank())
        object.__setattr__(self, "_cross_call", fused.config.is_cross_attention)

    def _shared_pairs(self) -> list:
        return _shared_pairs(self, self.dda)

    def _pairs_key(self) -> tuple:
        return parameter_identities((*_projections(self), self._modules.get("group_norm")))

    @property
    def stock_reason(self) -> str:
        """Why this module runs stock diffusers now ("" while our kernels run)."""
        if self._processor_reason:
            return self._processor_reason
        # The adapters' rules change only with the adapters (each projection's layer and its
        # adapter names) or the training flag (dropout): cached on those, since graph keys
        # read this on every call.
        projections = _projections(self)
        children = [m._modules for m in projections]  # dict reads: this runs on every call
        key = (self.training, projections, tuple(tuple(d["lora_A"]._modules) for d in children if "lora_A" in d))
        cached_key, reason = self._reason_cache
        if cached_key != key:
            reason = ""
            for name, m in zip(("to_q", "to_k", "to_v", "to_out[0]"), projections):
                problem = peft_lora.unsupported(m)
                if problem:
                    reason = f"{name}: {problem}"
                    break
            object.__setattr__(self, "_reason_cache", (key, reason))
        return reason

    def _weights_token(self) -> tuple:
        # fuse_lora / unfuse_lora merge adapters into the stock weights through .data
        return tuple(tuple(m.__dict__.get("merged_adapters", ())) for m in _projections(self))

    @property
    def heads(self) -> int:
        """The original's head count (diffusers code reads ``attn.heads``)."""
        return self._original.heads

    @property
    def processor(self):
        """What runs (see the class doc): our report of the processor, or the original's processor
        while this module runs stock."""
        return self._original.processor if self.stock_reason else self._processor

    def get_processor(self, return_deprecated_lora: bool = False):
        """What runs (see :attr:`processor`), as diffusers' ``attn_processors`` collects it."""
        return self.processor

    def set_processor(self, processor, *args, **kwargs) -> None:
        """Give ``processor`` to the original; keep our kernels if we reproduce it, else run stock."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

        stock = _unwrap(processor)
        if type(stock) is FusedAttnProcessor2_0:  # AttnProcessor2_0's math on fused projections: ours are
            stock = AttnProcessor2_0()
        self._original.set_processor(stock)
        if isinstance(stock, nn.Module):  # its weights (IP-Adapter's) belong in parameters() and state_dict()
            self._modules["processor"] = stock
        else:
            self._modules.pop("processor", None)
        reasons = supports(self._sync_original(), adapters=False)
        object.__setattr__(self, "_processor_reason", "; ".join(reasons))
        if not reasons:
            self.dda.config.scale = float(self._original.scale) if type(stock) is AttnProcessor else None
            object.__setattr__(self, "_processor", _reported(stock))  # a new object: graph keys see the change

    @property
    def lora_bank(self) -> LoraBank:
        """The fixed-address LoRA weights and factors of this module's projections."""
        return self._lora

    def _lora_spec(self, cross: bool) -> tuple:
        q, k, v, out = _projections(self)
        if cross:  # K and V read the context
            return ("hidden", (("q", q),)), ("context", (("k", k), ("v", v))), ("output", (("out", out),))
        return ("hidden", (("q", q), ("k", k), ("v", v))), ("output", (("out", out),))

    def _low_rank(self, cross: bool) -> LowRankUpdates | None:
        if cross != self._cross_call:  # a self-attention module given a context: K/V read it
            object.__setattr__(self, "_cross_call", cross)
        if torch.compiler.is_compiling():  # traced: the adapters' state becomes guards, as stock PEFT's does
            groups = LoraBank.stacked(self._lora_spec(cross), self.dda.attn_ow.dtype)
        else:
            groups = self._sync_lora(cross)[0]
            factor_pool.flush()  # the factors a switch staged, before this call's kernels read them
        return LowRankUpdates(groups) if groups else None

    def _sync_lora(self, cross: bool) -> tuple:
        w = self.dda.attn_ow
        return self._lora.sync(lambda: self._lora_spec(cross), _projections(self), cross, w.dtype, w.device)

    def graph_state(self) -> tuple:
        """The LoRA state a captured graph depends on (:mod:`.module_state`): brings the bank's
        factors up to date and returns its identity, or the adapters' state where they are
        not banked (running stock, or stacked per call)."""
        if self.stock_reason:
            return ("stock", tuple(tuner_key(m) for m in _projections(self) if peft_lora.is_lora_layer(m)))
        return self._sync_lora(self._cross_call)[1]

    def graph_state_covers(self) -> tuple:
        """The projections whose adapter state :meth:`graph_state` accounts for."""
        return _projections(self)

    def restore(self) -> nn.Module:
        """As :meth:`StandIn.restore`, with the adapter weights given their own storage again."""
        self._lora.release()
        return super().restore()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask: torch.Tensor | None = None, **cross_attention_kwargs) -> torch.Tensor:
        """diffusers ``Attention.forward``'s signature, run by the fused module (or by the
        original while :attr:`stock_reason` is set).

        hidden_states [B, S, C] or [B, C, H, W]; encoder_hidden_states [B, Sk, Cctx];
        attention_mask: diffusers' mask (bool or additive), e.g. [B, 1, Sk] from the UNet.
        ``cross_attention_kwargs`` that would change our result raise ValueError naming them.
        """
        context, image_kv, stock = encoder_hidden_states, (), self.stock_reason
        if not stock and _is_ip_adapter(self._original.processor):
            context, image_kv, stock = _ip_branches(self._original.processor, encoder_hidden_states,
                                                    cross_attention_kwargs, self.dda.attn_ow.dtype)
        if stock:
            return self._sync_original()(hidden_states, encoder_hidden_states, attention_mask,
                                         **cross_attention_kwargs)
        _check_cross_attention_kwargs(cross_attention_kwargs)
        if isinstance(context, (tuple, list)):
            raise ValueError(
                "encoder_hidden_states is a tuple (IP-Adapter image embeddings), but this Attention runs "
                "our kernels with a plain processor: load the IP-Adapter (pipe.load_ip_adapter) first")
        if not torch.compiler.is_compiling():
            self._check_views()
        cross = self.dda.config.is_cross_attention or context is not None
        return self.dda(hidden_states, context=context, input_mask=attention_mask, low_rank=self._low_rank(cross),
                        image_kv=image_kv)

    def extra_repr(self) -> str:
        """Names the replaced module in ``print(model)``, and says when it runs stock."""
        stock = f", runs stock: {self.stock_reason}" if self.stock_reason else ""
        return f"original={type(self._original).__name__}(heads={self._original.heads}){stock}"


def _ip_branches(processor, encoder_hidden_states, kwargs: dict, dtype: torch.dtype):
    """(text context, IP-Adapter branches as :class:`ImageKV`, why this call runs stock or "").

    As ``IPAdapterAttnProcessor2_0``: ``encoder_hidden_states`` is ``(text, [image tokens per
    adapter])``, or (deprecated) one tensor whose last ``num_tokens[0]`` tokens are the image's;
    a branch whose scale is 0 is skipped. Per-image masks (``ip_adapter_masks``) and per-image
    scale lists run stock.
    """
    if encoder_hidden_states is None:
        return None, (), "IP-Adapter attention without encoder_hidden_states"
    if isinstance(encoder_hidden_states, tuple):
        text, images = encoder_hidden_states
    else:
        end = encoder_hidden_states.shape[1] - processor.num_tokens[0]
        text, images = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
    if kwargs.get("ip_adapter_masks") is not None:
        return text, (), "ip_adapter_masks (per-image masks) are applied by stock diffusers"
    branches = []
    for image, scale, to_k, to_v in zip(images, processor.scale, processor.to_k_ip, processor.to_v_ip):
        if isinstance(scale, (list, tuple)):
            return text, (), "per-image IP-Adapter scales are applied by stock diffusers"
        if scale == 0:
            continue
        wk, wv = to_k.weight, to_v.weight
        if wk.dtype != dtype:
            wk, wv = wk.to(dtype), wv.to(dtype)
        branches.append(ImageKV(image, wk, wv, float(scale)))
    return text, tuple(branches), ""


def _check_cross_attention_kwargs(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key == "temb":
            continue  # stock processors use temb only through spatial_norm, which is never patched
        if key == "scale" and (value is None or (isinstance(value, (int, float)) and value == 1)):
            continue
        if key in ("ip_adapter_masks", "ip_hidden_states") and value is None:
            continue
        raise ValueError(
            f"cross_attention_kwargs[{key!r}] = {value!r} would change the attention result, and a "
            f"patched attention cannot apply it ('scale' is the LoRA scale, 'ip_*' are IP-Adapter "
            f"inputs; others are unknown to deepspeed_diffusers_attn); {_UNPATCH_HINT}")
