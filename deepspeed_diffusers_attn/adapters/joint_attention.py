"""Adapter: SD3 / SD3.5 joint attention, diffusers ``Attention`` run by ``JointAttnProcessor2_0``.

``SD3Transformer2DModel``'s (and SD3 ControlNets') ``JointTransformerBlock.attn``: image
tokens through ``to_q/to_k/to_v/to_out``, text tokens through ``add_q_proj/add_k_proj/
add_v_proj/to_add_out`` (none for the last block's ``context_pre_only`` text stream), SD3.5's
per-head RMSNorm of q/k (``norm_q/norm_k``, ``norm_added_q/norm_added_k``), attending over
``[image; text]`` (diffusers' concatenation order); and SD3.5's dual-attention ``attn2``, the
same processor without a text stream. Both run on
:class:`~deepspeed_diffusers_attn.dit_attention.JointAttention`: one QKV GEMM per stream
into one packed ``[B, S_img + S_txt, 3, H, D]`` buffer, RMSNorm in place, attention on
strided views, an output GEMM with its bias per stream.

Like the processor, the stand-in ignores ``attention_mask``, ``attn.scale`` (the softmax
scale is 1/sqrt(head_dim)), ``residual_connection`` and ``rescale_output_factor``.

This file also holds what the DiT adapters share (:mod:`.flux` and :mod:`.wan` import it):
the checks of projections and norms, the stock-name to fused-view map that conversion and
weight sharing walk, and :class:`DiTStandIn`, the stand-in base with diffusers' processor
API. LoRA (PEFT) layers on these projections are not run by these kernels: a module with
one is declined at patch time, and a patched module given one later runs stock diffusers
(its ``stock_reason`` says why) until it is gone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..attention import unsupported_device_dtype, unsupported_head_dim
from ..context_parallel import for_parallel_config
from ..dit_attention import JointAttention, JointAttentionConfig, QKNorm, Stream
from .attention_processor import FusedAttnProcessor
from .stand_in import StandIn, parameter_identities, share_weights

__all__ = ["NAME", "claims", "supports", "from_diffusers", "convert", "PatchedJointAttention", "DiTStandIn",
           "JOINT_NAMES", "joint_config"]

NAME = "Attention (SD3 joint)"

JOINT_NAMES = (
    ("to_q", "x.q"), ("to_k", "x.k"), ("to_v", "x.v"), ("to_out.0", "x.out"),
    ("norm_q", "x.q_norm"), ("norm_k", "x.k_norm"),
    ("add_q_proj", "context.q"), ("add_k_proj", "context.k"), ("add_v_proj", "context.v"),
    ("to_add_out", "context.out"), ("norm_added_q", "context.q_norm"), ("norm_added_k", "context.k_norm"),
)
"""diffusers' child names of a joint attention module (SD3 ``Attention``, ``FluxAttention``)
and the :meth:`JointAttention.views` names their weights live in."""


# ---------------------------------------------------------------------- shared by the DiT adapters
def child(module: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at a dotted ``path`` (``"to_out.0"``) read from the registered children, or None."""
    for part in path.split("."):
        if module is None:
            return None
        module = module._modules.get(part)
    return module


def unwrap(processor):
    """The stock processor a :class:`FusedAttnProcessor` reports, or ``processor`` itself."""
    return processor.stock if type(processor) is FusedAttnProcessor else processor


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` carries forward hooks (or accelerate's ``_hf_hook``) that our kernels would bypass."""
    return bool(getattr(m, "_forward_hooks", None) or getattr(m, "_forward_pre_hooks", None)
                or getattr(m, "_hf_hook", None) is not None)


def linear_reasons(module: nn.Module, paths, *, optional: bool = False) -> list[str]:
    """Why the projections at ``paths`` cannot run fused: each must be a plain ``nn.Linear``
    (a missing one is a reason unless ``optional``) without hooks."""
    reasons = []
    for path in paths:
        m = child(module, path)
        if m is None:
            if not optional:
                reasons.append(f"{path} is missing")
        elif type(m) is not nn.Linear:
            lora = hasattr(m, "base_layer") and hasattr(m, "lora_A")
            reasons.append(f"{path} is a {type(m).__name__}, not a plain nn.Linear"
                           + (" (LoRA / PEFT layers on DiT attention projections are not run by these kernels)"
                              if lora else ""))
        elif has_hooks(m):
            reasons.append(f"forward hooks on {path} would be bypassed")
    return reasons


def rms_norm_spec(m: Optional[nn.Module], width: int, name: str,
                  across_heads: bool = False) -> tuple[Optional[QKNorm], list[str]]:
    """(the :class:`QKNorm` that ``m`` computes over ``width`` channels, reasons it cannot).

    Taken: ``torch.nn.RMSNorm`` and diffusers' ``RMSNorm`` (without a bias) over exactly
    ``width`` channels (all heads' when ``across_heads``); None stays None."""
    if m is None:
        return None, []
    from diffusers.models.normalization import RMSNorm

    if has_hooks(m):
        return None, [f"forward hooks on {name} would be bypassed"]
    if type(m) is nn.RMSNorm:
        shape, eps, affine = tuple(m.normalized_shape), m.eps, m.weight is not None
    elif type(m) is RMSNorm:
        if m.bias is not None:
            return None, [f"{name} (diffusers RMSNorm) has a bias"]
        shape, eps, affine = tuple(m.dim), m.eps, m.weight is not None
    else:
        return None, [f"{name} is a {type(m).__name__}; only RMSNorm qk_norm is supported"]
    if shape != (width,):
        return None, [f"{name} normalises over {list(shape)}, expected [{width}]"]
    return QKNorm(across_heads=across_heads, eps=None if eps is None else float(eps), affine=affine), []


def qk_norm_spec(module: nn.Module, q: str, k: str, width: int, across_heads: bool = False):
    """(one :class:`QKNorm` for the norms at ``q`` and ``k``, reasons): both None, or both the
    same RMSNorm (eps, affine) over ``width`` channels."""
    (qs, qr), (ks, kr) = (rms_norm_spec(child(module, n), width, n, across_heads) for n in (q, k))
    reasons = qr + kr
    if reasons:
        return None, reasons
    if (qs is None) != (ks is None):
        return None, [f"{q} and {k} must both be set or both be None"]
    if qs is not None and qs != ks:
        return None, [f"{q} and {k} differ ({qs} vs {ks})"]
    return qs, []


def dropout_reasons(module: nn.Module) -> list[str]:
    """Why ``to_out[1:]`` would change the result: an extra module, or dropout active in training."""
    reasons = []
    to_out = child(module, "to_out")
    for m in list(to_out)[1:] if to_out is not None else ():
        if not isinstance(m, nn.Dropout):
            reasons.append(f"to_out holds an extra {type(m).__name__}")
        elif m.p > 0 and (m.training or module.training):
            reasons.append(f"to_out dropout p={m.p} is active in training mode (call .eval())")
    return reasons


def head_reasons(heads: int, inner: int) -> tuple[Optional[int], list[str]]:
    """(head_dim, reasons): inner must split into ``heads`` heads of a size the kernels take."""
    if heads < 1 or inner % heads:
        return None, [f"inner dim {inner} is not divisible by heads {heads}"]
    head_dim = inner // heads
    why = unsupported_head_dim(head_dim)
    return head_dim, [why] if why else []


def projection_reasons(attn: nn.Module, paths, kv_hint: str = "") -> tuple[list[str], Optional[int]]:
    """(reasons, inner): the checks every DiT attention's projections share. Each projection
    at ``paths`` must be a plain ``nn.Linear`` without hooks, ``to_out[1:]`` must not change
    the result, and K and V must be as wide as Q (``inner``, to_q's width; ``kv_hint`` is
    added to that reason). inner is None when a projection cannot run (the rest is then moot)."""
    bad = linear_reasons(attn, paths)
    reasons = bad + dropout_reasons(attn)
    if bad:
        return reasons, None
    to_q, to_k, to_v = (child(attn, p) for p in ("to_q", "to_k", "to_v"))
    inner = to_q.out_features
    if to_k.out_features != inner or to_v.out_features != inner:
        reasons.append(f"K/V width {to_k.out_features}/{to_v.out_features} differs from Q's {inner}{kv_hint}")
    return reasons, inner


def param_reasons(module: nn.Module) -> list[str]:
    """Why the module's parameters cannot run on our kernels: one dtype on one device that the ops take."""
    params = list(module.parameters())
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        return [f"parameters in {sorted(map(str, dtypes))} on {sorted(map(str, devices))}: need one dtype on one "
                "device"]
    if not params:
        return ["the module has no parameters"]
    why = unsupported_device_dtype(next(iter(devices)), next(iter(dtypes)))
    return [why] if why else []


def weight_pairs(module: nn.Module, names, views: dict) -> list:
    """(stock parameter, fused view) for every weight and bias of the children named in ``names``
    ((path, view name) pairs) that exist; a LoRA layer's base layer is read."""
    pairs = []
    for path, key in names:
        m = child(module, path)
        if m is None:
            continue
        m = m._modules.get("base_layer", m)
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is not None:
                pairs.append((p, views[f"{key}.{attr}"]))
    return pairs


def load_fused(fused: nn.Module, module: nn.Module, names) -> nn.Module:
    """``fused`` with every parameter zeroed, then each stock weight copied into its view (a fused
    bias slice whose stock projection has no bias stays 0); returns it, in ``module``'s training mode."""
    with torch.no_grad():
        for p in fused.parameters():
            p.zero_()
        for p, view in weight_pairs(module, names, fused.views()):
            view.copy_(p)
    fused.train(module.training)
    return fused


def convert_with(module: nn.Module, reasons: list, fused_factory, names, stand_in_class):
    """The shared ``convert``: (stand-in, []) with ``module``'s weights now views of the fused
    module's, or (None, reasons) with ``module`` untouched."""
    if reasons:
        return None, reasons
    fused = fused_factory(module)
    reasons = share_weights(module, weight_pairs(module, names, fused.views()))
    if reasons:
        return None, reasons
    return stand_in_class(module, fused, names), []


class DiTStandIn(StandIn):
    """The stand-in base of the DiT adapters (SD3, Flux, Wan): diffusers' processor API and the
    stock/fused weight pairing, read from the stock children named in ``names``.

    ``stock_reason`` is "" while our kernels run. It names why this module runs stock diffusers
    instead: a processor we do not reproduce was set (:meth:`set_processor`), or a projection or
    norm was replaced since patching (a PEFT LoRA layer: not run by these kernels). Subclasses
    set ``_processor_class`` (the stock processor they reproduce) and implement ``forward``,
    calling :meth:`_ours` first.
    """

    _processor_class: type = type(None)
    _parallel_owner = None  # the model whose _parallel_config applies (follow_parallel_config)

    def __init__(self, original: nn.Module, fused: nn.Module, names):
        super().__init__(original, fused)
        names = tuple((p, k) for p, k in names if child(original, p) is not None)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_types", tuple(type(child(original, p)) for p, _ in names))
        object.__setattr__(self, "_processor", FusedAttnProcessor(unwrap(original.processor)))
        object.__setattr__(self, "_processor_reason", "")

    def _shared_pairs(self) -> list:
        return weight_pairs(self, self._names, self.dda.views())

    def _pairs_key(self) -> tuple:
        return parameter_identities(child(self, path) for path, _ in self._names)

    @property
    def stock_reason(self) -> str:
        """Why this module runs stock diffusers now ("" while our kernels run)."""
        if self._processor_reason:
            return self._processor_reason
        for (path, _), kind in zip(self._names, self._types):
            m = child(self, path)
            if type(m) is not kind:
                return (f"{path} is now a {type(m).__name__} (LoRA / PEFT layers on DiT attention projections "
                        "are not run by these kernels)")
        return ""

    def _ours(self) -> bool:
        """True if our kernels run this call (the weight views checked first, outside tracing);
        False if the caller must run the original (:attr:`stock_reason`)."""
        if self.stock_reason:
            return False
        if not torch.compiler.is_compiling():
            self._check_views()
        return True

    @property
    def heads(self) -> int:
        """The original's head count (diffusers code reads ``attn.heads``)."""
        return self._original.heads

    @property
    def processor(self):
        """What runs: a :class:`FusedAttnProcessor` reporting the stock processor while our kernels
        run, the original's processor while this module runs stock."""
        return self._original.processor if self.stock_reason else self._processor

    def get_processor(self, return_deprecated_lora: bool = False):
        """:attr:`processor`, as diffusers' ``attn_processors`` collects it."""
        return self.processor

    def follow_parallel_config(self, model: nn.Module) -> None:
        """Read the context-parallel config from ``model`` (the diffusers model this stand-in sits
        in) too: diffusers' ``enable_parallelism`` records it there, but puts it on the processors
        of diffusers' attention classes only, which a stand-in is not. A plain reference, not a
        submodule (outside ``modules()`` and ``state_dict()``), so that a deep copy of the model
        follows its copy."""
        object.__setattr__(self, "_parallel_owner", model)

    def _context_parallel(self):
        """The attention serving the context-parallel config of the processor, else of the model
        (:meth:`follow_parallel_config`), as :func:`.context_parallel.for_parallel_config` maps it;
        None when neither has one."""
        config = getattr(unwrap(self.processor), "_parallel_config", None)
        if config is None and self._parallel_owner is not None:
            config = getattr(self._parallel_owner, "_parallel_config", None)
        return for_parallel_config(config)

    def _reproduced(self, processor):
        """The stock processor equivalent to ``processor`` that we reproduce, or None (a subclass may widen)."""
        return processor if type(processor) is self._processor_class else None

    def set_processor(self, processor, *args, **kwargs) -> None:
        """Give ``processor`` to the original; keep our kernels if we reproduce it, else run stock."""
        stock = unwrap(processor)
        reproduced = self._reproduced(stock)
        self._original.set_processor(reproduced if reproduced is not None else stock)
        if isinstance(stock, nn.Module):  # its weights belong in parameters() and state_dict()
            self._modules["processor"] = stock
        else:
            self._modules.pop("processor", None)
        if reproduced is None:
            reason = f"processor {type(stock).__name__} is not reproduced (only {self._processor_class.__name__})"
            object.__setattr__(self, "_processor_reason", reason)
        else:
            object.__setattr__(self, "_processor_reason", "")
            object.__setattr__(self, "_processor", FusedAttnProcessor(reproduced))

    def extra_repr(self) -> str:
        """Names the replaced module in ``print(model)``, and says when it runs stock."""
        stock = f", runs stock: {self.stock_reason}" if self.stock_reason else ""
        return f"original={type(self._original).__name__}(heads={self._original.heads}){stock}"


# ---------------------------------------------------------------------- SD3
def _joint_processors() -> tuple:
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

    return JointAttnProcessor2_0, FusedJointAttnProcessor2_0


def claims(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Attention`` run by a joint-attention processor
    (``JointAttnProcessor2_0`` and its variants): this adapter answers for it, even to decline."""
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and "JointAttnProcessor" in type(unwrap(module.processor)).__name__


def supports(attn: nn.Module) -> list[str]:
    """Every reason the SD3 joint ``Attention`` ``attn`` cannot be converted; empty if it can."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if not claims(attn):
        return [f"{type(attn).__name__} with {type(getattr(attn, 'processor', None)).__name__} is not an SD3 "
                "joint attention"]
    reasons = []
    processor = unwrap(attn.processor)
    if type(processor) is not JointAttnProcessor2_0:
        reasons.append(f"processor {type(processor).__name__} is not reproduced; only JointAttnProcessor2_0 "
                       "(a FusedJointAttnProcessor2_0 set on a patched model is)")
    if has_hooks(attn):
        reasons.append("forward hooks on the Attention module would be bypassed")
    context = child(attn, "add_q_proj") is not None or child(attn, "add_k_proj") is not None
    paths = ["to_q", "to_k", "to_v", "to_out.0"]
    if context:
        paths += ["add_q_proj", "add_k_proj", "add_v_proj"] + ([] if attn.context_pre_only else ["to_add_out"])
    shared, inner = projection_reasons(attn, paths)
    reasons += shared
    if inner is None:
        return reasons
    to_q, to_k, to_v, out = (child(attn, p) for p in paths[:4])
    head_dim, why = head_reasons(int(attn.heads), inner)
    reasons += why
    if not to_q.in_features == to_k.in_features == to_v.in_features:
        reasons.append("to_q, to_k and to_v take different input widths")
    if out.in_features != inner:
        reasons.append(f"to_out[0] takes {out.in_features} channels, not the inner dim {inner}")
    if context:
        add = [child(attn, p) for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
        if any(m.out_features != inner for m in add) or len({m.in_features for m in add}) > 1:
            reasons.append("add_q_proj / add_k_proj / add_v_proj must map one width to the inner dim")
        add_out = child(attn, "to_add_out")
        if not attn.context_pre_only and add_out.in_features != inner:
            reasons.append(f"to_add_out takes {add_out.in_features} channels, not the inner dim {inner}")
        if attn.context_pre_only and add_out is not None:
            reasons.append("to_add_out exists but context_pre_only is set, so JointAttnProcessor2_0 never uses it")
    if head_dim is not None:
        reasons += qk_norm_spec(attn, "norm_q", "norm_k", head_dim)[1]
        if context:
            reasons += qk_norm_spec(attn, "norm_added_q", "norm_added_k", head_dim)[1]
        elif child(attn, "norm_added_q") is not None or child(attn, "norm_added_k") is not None:
            reasons.append("norm_added_q / norm_added_k without a text stream")
    return reasons + param_reasons(attn)


def joint_config(attn: nn.Module, heads: int, context_first: bool) -> JointAttentionConfig:
    """The :class:`JointAttentionConfig` of a supported joint attention module (SD3 ``Attention``,
    ``FluxAttention``: the names of :data:`JOINT_NAMES`): the image stream, and the text stream
    when ``add_q_proj`` exists; an absent ``to_out`` / ``to_add_out`` leaves that stream unprojected."""
    head_dim = attn.to_q.out_features // heads

    def stream(paths: tuple, out_path: str, norms: tuple) -> Stream:
        q, k, v = (child(attn, p) for p in paths)
        out = child(attn, out_path)
        return Stream(in_features=q.in_features, qkv_bias=any(m.bias is not None for m in (q, k, v)),
                      out_features=None if out is None else out.out_features,
                      out_bias=out is not None and out.bias is not None,
                      qk_norm=qk_norm_spec(attn, *norms, head_dim)[0])

    x = stream(("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"))
    context = None
    if child(attn, "add_q_proj") is not None:
        context = stream(("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", ("norm_added_q", "norm_added_k"))
    return JointAttentionConfig(heads=heads, dim_head=head_dim, x=x, context=context, context_first=context_first,
                                dtype=attn.to_q.weight.dtype)


def from_diffusers(attn, **options) -> JointAttention:
    """A new :class:`JointAttention` computing what the SD3 joint ``attn`` computes (``attn``
    untouched: the weights are copied), on its device and dtype; ValueError naming the reasons
    when :func:`supports` is non-empty. ``options`` (patch's ``kv_cache``) are not used: the
    text stream is re-projected every step, as its tokens change with the timestep."""
    reasons = supports(attn)
    if reasons:
        raise ValueError(f"cannot convert this {type(attn).__name__} to JointAttention: " + "; ".join(reasons))
    fused = JointAttention(joint_config(attn, int(attn.heads), context_first=False), device=attn.to_q.weight.device)
    return load_fused(fused, attn, JOINT_NAMES)


def convert(attn, **options):
    """(the stand-in for ``attn``, []) with ``attn``'s weights now views of the fused ones, or
    (None, reasons) with ``attn`` untouched."""
    return convert_with(attn, supports(attn), from_diffusers, JOINT_NAMES, PatchedJointAttention)


class PatchedJointAttention(DiTStandIn):
    """Stands in for one SD3 joint ``Attention`` with its call signature and layout, running a
    :class:`JointAttention` (see :class:`DiTStandIn` and the module docstring)."""

    @property
    def _processor_class(self):
        return _joint_processors()[0]

    def _reproduced(self, processor):
        # FusedJointAttnProcessor2_0 is JointAttnProcessor2_0's math on concatenated projection
        # weights (fuse_qkv_projections); ours are fused already.
        joint, fused = _joint_processors()
        if type(processor) is fused:
            return joint()
        return processor if type(processor) is joint else None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """``Attention.forward`` under ``JointAttnProcessor2_0``: hidden_states [B, S_img, C] and
        encoder_hidden_states [B, S_txt, C_txt] give ``(image output, text output)`` (the text
        output unprojected when ``context_pre_only``); hidden_states alone give the image output.
        ``attention_mask`` and extra kwargs are ignored, as the processor ignores them."""
        if not self._ours():
            return self._sync_original()(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if encoder_hidden_states is not None and self.dda.config.context is None:
            raise ValueError("encoder_hidden_states given to a joint attention without add_q_proj / add_k_proj / "
                             "add_v_proj (an SD3.5 attn2 is self-attention only)")
        y, y_context = self.dda(hidden_states, encoder_hidden_states)
        return y if encoder_hidden_states is None else (y, y_context)
