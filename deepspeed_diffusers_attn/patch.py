"""Swap diffusers ``Attention`` modules for :class:`DeepSpeedDiffusersAttention`, and back.

    report = patch(pipe)      # or patch(unet), or any nn.Module tree
    print(report)             # one row per Attention: patched / declined / already patched
    unpatch(pipe)             # puts the very same Attention objects back, bit-exactly

What a patched model looks like:

* Each supported ``Attention`` is replaced, in every parent that holds it, by a
  :class:`PatchedAttention`. It has one child, ``dda`` (the fused module), and keeps
  the original ``Attention`` unregistered in ``.original``, so nothing is counted twice
  by ``parameters()`` or ``state_dict()``.
* No weight memory is duplicated: the original's parameters (``to_q``, ``to_k``,
  ``to_v``, ``to_out[0]``, ``group_norm``) keep their Parameter objects, but their
  ``.data`` become views into the fused storage (values bit-identical, checked).
  ``model.to(...)`` / ``.half()`` move the fused tensors and re-point the views.
* ``state_dict()`` of a patched model has stock diffusers' keys and values (each
  :class:`PatchedAttention` gives its original's state dict, whose parameters are views of
  the fused tensors), so ``save_pretrained`` writes a checkpoint that stock diffusers
  loads bit-exactly. ``load_state_dict`` of a stock state dict updates the fused tensors
  through those views; a dict with the fused keys (``...attn1.dda.attn_qkvw``) loads too.
  ``named_parameters()`` lists the fused tensors.
* A patched module refuses to change attention processors (``set_processor`` raises;
  ``unet.set_attn_processor``, ``set_default_attn_processor``, IP-Adapter loading and,
  in recent diffusers, ``fuse_qkv_projections`` go through it), and refuses ``cross_attention_kwargs`` that
  could change the result. Modules with LoRA layers or custom processors are declined:
  fuse and unload LoRA (``pipe.fuse_lora(); pipe.unload_lora_weights()``) before patching,
  or load LoRA / IP-Adapter weights after :func:`unpatch` (PEFT does not find the
  projections of a patched module).

``patch`` (``fuse_blocks=True``, the default) also replaces diffusers ``GEGLU`` and
``torch.nn.GroupNorm`` modules by the fused stand-ins of :mod:`.blocks` (same Parameter
objects, same ``state_dict`` keys; originals kept in ``.original``), lets each
``Transformer2DModel`` keep its input's memory format, and gives each ``ResnetBlock2D`` a
forward that folds SiLU and the time-embedding add into its GroupNorm calls; :func:`unpatch`
undoes it.

``patch(pipe, cuda_graph=True)`` also runs ``unet.forward`` and ``vae.decode`` / ``vae.encode``
through shape-keyed CUDA graphs, and ``channels_last=True`` converts those modules to
channels-last; both are :mod:`.graphs` wrappers, removed by :func:`unpatch`.

Uses only public attributes of diffusers (``Attention``, its ``to_q/to_k/to_v/to_out``,
``group_norm``, ``heads``, ``processor``, and a pipeline's ``components``); these exist
from diffusers 0.29 on for models; 0.35.2 is the oldest version supported and tested
(older releases do not import with huggingface_hub 1.x, and pipelines before 0.35.2 do
not import with transformers 5).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn
from diffusers.models.attention_processor import Attention

from .attention import DeepSpeedDiffusersAttention
from .blocks import (ChannelsLastGroupNorm, FusedGEGLU, fusable_reasons, fuse_resnet, keep_output_layout,
                     restore_output_layout, restore_resnet)
from .graphs import DEFAULT_MAX_GRAPHS, _check_options, graph_module_forward, graphed_methods, ungraph_module

__all__ = ["patch", "unpatch", "PatchReport", "PatchRow", "PatchedAttention"]

PATCHED = "patched"
DECLINED = "declined"
ALREADY_PATCHED = "already patched"
RESTORED = "restored"

_UNPATCH_HINT = "call deepspeed_diffusers_attn.unpatch(model) first"


@dataclasses.dataclass(frozen=True)
class PatchRow:
    """One Attention module: its qualified name, what happened to it, and why."""

    name: str
    status: str
    reasons: tuple[str, ...] = ()


class PatchSummary(dict):
    """Counts per status (a dict); ``str()`` gives the one-line form."""

    def __str__(self) -> str:
        return ", ".join(f"{n} {status}" for status, n in self.items())


class PatchReport:
    """What :func:`patch` or :func:`unpatch` did, one row per Attention module."""

    def __init__(self, action: str, statuses: tuple[str, ...], rows: list[PatchRow], options: dict,
                 wrapped: tuple[str, ...] = (), blocks: dict | None = None,
                 blocks_declined: tuple[PatchRow, ...] = ()):
        self.action = action
        self.statuses = statuses
        self.rows = rows
        self.options = options
        self.wrapped = wrapped  # e.g. ("unet.forward", "vae.decode", "vae.encode"): methods (un)wrapped
        # GEGLU / GroupNorm modules replaced (patch) or restored (unpatch), by kind: {"GEGLU": 16, ...}
        self.blocks = dict(blocks or {})
        self.blocks_declined = tuple(blocks_declined)  # rows for GEGLU / GroupNorm modules left as they are

    def summary(self) -> PatchSummary:
        """Counts per status, e.g. ``{'patched': 140, 'declined': 0, 'already patched': 0}``."""
        counts = PatchSummary((s, 0) for s in self.statuses)
        for row in self.rows:
            counts[row.status] += 1
        return counts

    def names(self, status: str) -> list[str]:
        """The qualified names of the modules with this status."""
        return [row.name for row in self.rows if row.status == status]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PatchRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"PatchReport({self.action}: {self.summary()})"

    def __str__(self) -> str:
        head = f"deepspeed_diffusers_attn.{self.action}: {self.summary()}"
        if self.options:
            head += "  (" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + ")"
        if self.wrapped:
            verb = "wrapped" if self.action == "patch" else "unwrapped"
            head += f"\n{verb} (CUDA graph / channels-last): " + ", ".join(self.wrapped)
        if self.blocks:
            verb = "fused" if self.action == "patch" else "restored"
            head += f"\n{verb}: " + ", ".join(f"{kind} {n}" for kind, n in self.blocks.items())
            if self.action == "patch":
                head += " (GroupNorm: channels-last CUDA inputs; others run torch's group_norm)"
        for r in self.blocks_declined:
            head += f"\nnot fused: {r.name}: {'; '.join(r.reasons)}"
        if not self.rows:
            return head + "\n(no diffusers Attention modules " + (
                "found)" if self.action == "patch" else "to restore)")
        status_w = max(len("status"), *(len(r.status) for r in self.rows))
        name_w = max(len("module"), *(len(r.name) for r in self.rows))
        lines = [head, f"{'status':<{status_w}}  {'module':<{name_w}}  reasons"]
        for r in self.rows:
            lines.append(f"{r.status:<{status_w}}  {r.name:<{name_w}}  {'; '.join(r.reasons)}".rstrip())
        return "\n".join(lines)


class PatchedAttention(nn.Module):
    """Stands in for one diffusers ``Attention``, with its call signature, running ``dda``.

    ``dda`` is the fused :class:`DeepSpeedDiffusersAttention` (the only child);
    ``original`` is the replaced ``Attention``, kept unregistered for :func:`unpatch`.
    """

    def __init__(self, original: Attention, fused: DeepSpeedDiffusersAttention):
        super().__init__()
        self.dda = fused
        object.__setattr__(self, "_original", original)  # bypasses nn.Module registration
        self.train(original.training)
        self.register_load_state_dict_pre_hook(PatchedAttention._load_stock_keys)

    @property
    def original(self) -> Attention:
        """The diffusers ``Attention`` this module replaced (restored by :func:`unpatch`)."""
        return self._original

    @property
    def heads(self) -> int:
        """The original's head count (diffusers code reads ``attn.heads``)."""
        return self._original.heads

    def get_processor(self, return_deprecated_lora: bool = False):
        """The original's processor, so ``model.attn_processors`` keeps working (it is not used)."""
        return self._original.processor

    def set_processor(self, processor, *args, **kwargs) -> None:
        """Refused: a patched attention runs no processor (unpatch first to set one)."""
        raise RuntimeError(
            f"this Attention is patched by deepspeed_diffusers_attn and ignores processors; to set "
            f"{type(processor).__name__}, {_UNPATCH_HINT}")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **cross_attention_kwargs) -> torch.Tensor:
        """diffusers ``Attention.forward``'s signature, run by the fused module.

        hidden_states [B, S, C] or [B, C, H, W]; encoder_hidden_states [B, Sk, Cctx];
        attention_mask: diffusers' mask (bool or additive), e.g. [B, 1, Sk] from the UNet.
        ``cross_attention_kwargs`` that would change the result raise ValueError naming them.
        """
        _check_cross_attention_kwargs(cross_attention_kwargs)
        if isinstance(encoder_hidden_states, (tuple, list)):
            raise ValueError(
                "encoder_hidden_states is a tuple (IP-Adapter image embeddings); a patched attention "
                f"cannot apply IP-Adapter: {_UNPATCH_HINT}, then load the IP-Adapter")
        return self.dda(hidden_states, context=encoder_hidden_states, input_mask=attention_mask)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The original ``Attention``'s state dict: stock diffusers keys and values.

        Its parameters are views of the fused tensors, so the values are the ones that run;
        ``save_pretrained`` of a patched model therefore writes a stock checkpoint.
        """
        return self._original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @staticmethod
    def _load_stock_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
        # load_state_dict pre-hook: stock keys (``to_q.weight``...) are copied into the original's
        # parameters, which are views of the fused tensors, and taken out of the dict; the fused
        # parameters are then "loaded" from themselves. A dict with fused keys loads as is.
        stock = module._original.state_dict(prefix=prefix, keep_vars=True)
        if not any(key in state_dict for key in stock):
            return
        with torch.no_grad():
            for key, param in stock.items():
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict.pop(key)
                if value.shape != param.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(param.shape)}.")
                    continue
                param.copy_(value)
        for name, param in module.dda.named_parameters():
            state_dict.setdefault(f"{prefix}dda.{name}", param)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): move the fused tensors, then re-point the original's views.
        super()._apply(fn, recurse)
        for param, fused in _fused_sources(self._original, self.dda):
            param.data = fused
        return self

    def extra_repr(self) -> str:
        """Names the replaced module in ``print(model)``."""
        return f"original={type(self._original).__name__}(heads={self._original.heads})"


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


def _fused_sources(attn: Attention, fused: DeepSpeedDiffusersAttention):
    """(original parameter, the fused tensor holding its values) for each tensor the fused module copied.

    The fused tensors are detached views, in the layout ``DeepSpeedDiffusersAttention._linears``
    gives. A fused bias slice whose original is None (the fused module zero-fills it) has no pair.
    """
    projections = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    pairs = []
    for (w, b), linear in zip(fused._linears(), projections):  # the fused layout, in one place
        pairs.append((linear.weight, w.data))
        if b is not None:
            pairs.append((linear.bias, b.data))
    if getattr(fused, "norm_w", None) is not None:
        pairs += [(attn.group_norm.weight, fused.norm_w.data), (attn.group_norm.bias, fused.norm_b.data)]
    return [(p, t) for p, t in pairs if p is not None]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of the same width, for bit-exact comparison."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()])


def _share_reasons(attn: Attention, pairs) -> list[str]:
    """Why the original's parameters cannot become views of the fused tensors (empty if they can)."""
    covered = {id(p) for p, _ in pairs}
    reasons = [f"parameter {name} is not used by the fused module"
               for name, p in attn.named_parameters() if id(p) not in covered]
    reasons += [f"buffer {name} is not used by the fused module" for name, _ in attn.named_buffers()]
    for p, t in pairs:
        if (p.shape, p.dtype, p.device) != (t.shape, t.dtype, t.device) or not torch.equal(_bits(p), _bits(t)):
            reasons.append(f"internal: fused copy of a {tuple(p.shape)} {p.dtype} parameter differs from the original")
    return reasons


def _roots(obj) -> list[tuple[str, nn.Module]]:
    """(prefix, module) for an nn.Module, or for each nn.Module component of a diffusers pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [(name, m) for name, m in components.items() if isinstance(m, nn.Module)]
    raise TypeError(f"expected a diffusers pipeline or a torch.nn.Module, got {type(obj).__name__}")


def _sites(obj, kinds=(), *, want=None, stop=()) -> dict[int, list[tuple[str, nn.Module, str, nn.Module]]]:
    """Every place a module of ``kinds`` (or one ``want(module)`` picks) is held:
    id -> [(qualified name, parent, attribute, module)].

    Does not descend into such modules, nor into modules of ``stop``. A module held twice
    (shared) is listed with every parent. A root that matches is listed with parent None.
    """
    want = want or (lambda m: isinstance(m, kinds))
    found: dict[int, list] = {}
    seen: set[int] = set()

    def walk(prefix: str, parent: nn.Module) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for attr, child in parent.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if want(child):
                found.setdefault(id(child), []).append((name, parent, attr, child))
            elif not isinstance(child, stop):
                walk(name, child)

    for prefix, root in _roots(obj):
        if want(root):
            found.setdefault(id(root), []).append((prefix or type(root).__name__, None, None, root))
        elif not isinstance(root, stop):
            walk(prefix, root)
    return found


def _patch_one(attn: Attention, kv_cache: bool) -> tuple[PatchedAttention | None, list[str]]:
    reasons = DeepSpeedDiffusersAttention.supports(attn)
    if reasons:
        return None, reasons
    fused = DeepSpeedDiffusersAttention.from_diffusers(attn, kv_cache=kv_cache)
    pairs = _fused_sources(attn, fused)
    reasons = _share_reasons(attn, pairs)
    if reasons:
        return None, reasons
    for param, view in pairs:
        param.data = view  # frees the original storage; values are bit-identical (checked above)
    return PatchedAttention(attn, fused), []


def _graph_targets(obj) -> list[tuple[str, nn.Module, str]]:
    """(report name, module, method) to wrap: a UNet's ``forward``, a VAE's ``decode`` and ``encode``.

    In a pipeline, the components named ``unet`` and ``vae``; a module passed directly
    is wrapped if it is a ``UNet2DConditionModel`` or an ``AutoencoderKL``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    targets = []
    for prefix, module in _roots(obj):
        name = prefix or type(module).__name__
        if prefix == "unet" or (not prefix and isinstance(module, UNet2DConditionModel)):
            methods = ["forward"]
        elif prefix == "vae" or (not prefix and isinstance(module, AutoencoderKL)):
            methods = [m for m in ("decode", "encode") if callable(getattr(module, m, None))]
        else:
            methods = []
        targets += [(f"{name}.{m}", module, m) for m in methods]
    return sorted(targets, key=lambda target: target[0])


def _wrap(obj, cuda_graph: bool, channels_last: bool, max_graphs: int, clone_outputs: bool) -> tuple[str, ...]:
    wrapped = []
    for name, module, method in _graph_targets(obj):
        if method in graphed_methods(module):
            wrapped.append(f"{name} (already wrapped)")
            continue
        graph_module_forward(module, method, cuda_graph=cuda_graph, channels_last=channels_last,
                             max_graphs=max_graphs, clone_outputs=clone_outputs, name=name)
        wrapped.append(name)
    return tuple(wrapped)


_BLOCK_KINDS = {FusedGEGLU: "GEGLU", ChannelsLastGroupNorm: "GroupNorm"}


def _block_sites(obj, want) -> dict[int, list[tuple[str, nn.Module, str, nn.Module]]]:
    """:func:`_sites` for the modules ``want`` picks, never inside attention modules nor at a root."""
    found = _sites(obj, want=want, stop=(Attention, PatchedAttention))
    return {k: [p for p in places if p[1] is not None] for k, places in found.items()
            if any(p[1] is not None for p in places)}


def _fuse_blocks(obj) -> tuple[dict, tuple[PatchRow, ...]]:
    """Replace diffusers GEGLU and torch GroupNorm modules by the fused stand-ins of :mod:`.blocks`."""
    from diffusers.models.activations import GEGLU

    counts = {"GEGLU": 0, "GroupNorm": 0}
    declined = []
    for places in _block_sites(obj, lambda m: type(m) in (GEGLU, nn.GroupNorm)).values():
        name, _, _, module = places[0]
        reasons = fusable_reasons(module)
        if reasons:
            declined.append(PatchRow(name, DECLINED, tuple(reasons)))
            continue
        new = FusedGEGLU(module) if type(module) is GEGLU else ChannelsLastGroupNorm(module)
        new.train(module.training)
        for _, parent, attr, _ in places:
            setattr(parent, attr, new)
        counts[_BLOCK_KINDS[type(new)]] += 1
    counts["Transformer2D output layout"] = sum(keep_output_layout(m) for _, root in _roots(obj) for m in root.modules())
    counts["ResnetBlock2D norm+SiLU"] = sum(fuse_resnet(m) for _, root in _roots(obj) for m in root.modules())
    return {k: n for k, n in counts.items() if n}, tuple(declined)


def _unfuse_blocks(obj) -> dict:
    counts: dict[str, int] = {}
    resnets = sum(restore_resnet(m) for _, root in _roots(obj) for m in root.modules())
    if resnets:
        counts["ResnetBlock2D norm+SiLU"] = resnets
    for places in _block_sites(obj, lambda m: type(m) in _BLOCK_KINDS).values():
        module = places[0][3]
        module.original.train(module.training)
        for _, parent, attr, _ in places:
            setattr(parent, attr, module.original)
        counts[_BLOCK_KINDS[type(module)]] = counts.get(_BLOCK_KINDS[type(module)], 0) + 1
    layout = sum(restore_output_layout(m) for _, root in _roots(obj) for m in root.modules())
    if layout:
        counts["Transformer2D output layout"] = layout
    return counts


@torch.no_grad()
def patch(obj, *, cuda_graph: bool = False, channels_last: bool = False, kv_cache: bool = False,
          fuse_blocks: bool = True, max_graphs: int = DEFAULT_MAX_GRAPHS,
          clone_outputs: bool = True) -> PatchReport:
    """Replace every supported diffusers ``Attention`` in ``obj`` by a :class:`PatchedAttention`.

    ``obj``: a diffusers pipeline (each nn.Module component is searched: unet, vae,
    transformer...; text encoders have no diffusers Attention) or any nn.Module.
    Unsupported modules stay as they are and are listed as declined, with reasons.
    Patching a patched model is a no-op ("already patched" rows).

    ``cuda_graph=True`` also runs the pipeline's ``unet.forward`` and ``vae.decode`` /
    ``vae.encode`` (or those of a UNet2DConditionModel / AutoencoderKL passed directly)
    through CUDA graphs keyed by input signature, at most ``max_graphs`` per method
    (LRU), outputs cloned unless ``clone_outputs=False``: see :mod:`.graphs`.
    ``channels_last=True`` converts those modules' 4-D weights to channels-last and
    their 4-D inputs likewise (with or without graphs). :func:`unpatch` undoes both.
    ``kv_cache=True`` lets each patched cross-attention compute K/V of the text context
    once and reuse them while the same context tensor comes back unchanged (keyed by its
    identity, version counter, shape and the K/V weights; see
    :class:`DeepSpeedDiffusersAttention`): B·77·2·inner·2 bytes per cross-attention layer in
    fp16 (7.3 MiB for SD1.5 at B=2, 49 MiB for SDXL). Inside CUDA graphs the cache is
    bypassed (a graph recomputes K/V). Writes that bypass the version counter (``.data``)
    need ``clear_kv_cache()`` on the modules.
    ``fuse_blocks=True`` (default) also replaces diffusers ``GEGLU`` modules by
    :class:`.blocks.FusedGEGLU` and ``torch.nn.GroupNorm`` modules (outside attention
    modules) by :class:`.blocks.ChannelsLastGroupNorm`, and lets each ``Transformer2DModel``
    keep its input's memory format (:func:`.blocks.keep_output_layout`), and lets each
    ``ResnetBlock2D`` run ``GroupNorm -> SiLU`` and ``+ time embedding -> GroupNorm -> SiLU``
    as one op each (:func:`.blocks.fuse_resnet`); ``report.blocks`` counts them. GEGLU modules with adapter layers, and modules with forward hooks, are left
    alone and listed in ``report.blocks_declined``.
    """
    options = {"cuda_graph": cuda_graph, "channels_last": channels_last, "kv_cache": kv_cache,
               "fuse_blocks": fuse_blocks}
    for key, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"patch({key}=...) must be a bool, got {value!r}")
    _check_options(max_graphs=max_graphs, clone_outputs=clone_outputs)
    _roots(obj)  # TypeError for an unsupported object, before anything changes
    DeepSpeedDiffusersAttention.reset_layer_ids()  # this call's new layers are numbered from 0
    rows = []
    for places in _sites(obj, (Attention, PatchedAttention)).values():
        name, _, _, module = places[0]
        if isinstance(module, PatchedAttention):
            rows.append(PatchRow(name, ALREADY_PATCHED))
            continue
        if places[0][1] is None:
            rows.append(PatchRow(name, DECLINED, ("it is the object passed to patch(); pass its parent",)))
            continue
        wrapper, reasons = _patch_one(module, kv_cache)
        if wrapper is None:
            rows.append(PatchRow(name, DECLINED, tuple(reasons)))
            continue
        for _, parent, attr, _ in places:
            setattr(parent, attr, wrapper)
        rows.append(PatchRow(name, PATCHED))
    blocks, blocks_declined = _fuse_blocks(obj) if fuse_blocks else ({}, ())
    wrapped = _wrap(obj, cuda_graph, channels_last, max_graphs, clone_outputs) if cuda_graph or channels_last else ()
    return PatchReport("patch", (PATCHED, DECLINED, ALREADY_PATCHED), rows, options, wrapped, blocks,
                       blocks_declined)


@torch.no_grad()
def unpatch(obj) -> PatchReport:
    """Put back the original ``Attention`` objects that :func:`patch` replaced in ``obj``.

    Their parameters get independent storage again, with the fused tensors' current
    values (bit-identical to before patching unless the model was changed meanwhile),
    on the fused tensors' current device and dtype. A model with nothing patched is
    left alone (the report has no rows). Graph / channels-last wrappers added by
    :func:`patch` are removed first: the original bound methods come back, the graphs
    are freed, the weights' memory format is restored (``report.wrapped`` lists them).
    Fused GEGLU / GroupNorm stand-ins give way to their originals (``report.blocks``).
    """
    wrapped = []
    for name, module, method in _graph_targets(obj):
        if ungraph_module(module, method):
            wrapped.append(name)
    rows = []
    for places in _sites(obj, (PatchedAttention,)).values():
        name, _, _, wrapper = places[0]
        original = wrapper.original
        for param, fused in _fused_sources(original, wrapper.dda):
            param.data = fused.clone()
        original.train(wrapper.training)
        for _, parent, attr, _ in places:
            if parent is not None:
                setattr(parent, attr, original)
        reasons = ("it is the object passed to unpatch(); use its .original",) if places[0][1] is None else ()
        rows.append(PatchRow(name, RESTORED, reasons))
    blocks = _unfuse_blocks(obj)
    return PatchReport("unpatch", (RESTORED,), rows, {}, tuple(wrapped), blocks)
