"""Swap a pipeline's diffusers attention modules for our fused stand-ins, and back.

    report = patch(pipe)      # or patch(unet), or any nn.Module tree
    print(report)             # one row per attention module: patched / bridged / declined / already patched
    unpatch(pipe)             # puts the very same modules back, bit-exactly

``patch`` walks the pipeline's models and, for every attention module, asks the
adapter of its family (:mod:`.adapters`; the first that claims it answers) to convert
it. This file decides nothing about a family: what is supported, how a module converts
and what runs in its place live in that family's adapter. Every attention module gets
a row in the report: patched, declined with the adapter's reasons (the module keeps
running stock diffusers), or already patched.

What a patched model looks like:

* Each converted module is replaced, in every parent that holds it, by its adapter's
  stand-in (:class:`.adapters.StandIn`), which keeps the original's layout: the
  original's children (``to_q``, ``to_k``, ``to_v``, ``to_out``...) are registered in it
  under the same names, the fused module ``.dda`` is not registered, and the original is
  kept in ``.original`` for :func:`unpatch`. So ``parameters()``, ``named_modules()`` and
  ``state_dict()`` are stock diffusers' (``save_pretrained`` writes a stock checkpoint,
  ``load_state_dict`` takes one), and PEFT finds the projections.
* No weight memory is duplicated: the stock parameters keep their Parameter objects, but
  their ``.data`` become views into the fused storage (values bit-identical, checked), so
  writing them writes what the kernels read. ``model.to(...)`` / ``.half()`` move the
  fused tensors and re-point the views; storage replaced otherwise (``load_state_dict(...,
  assign=True)``) is copied into the fused tensors at the next call.
* LoRA (PEFT, as diffusers loads it) runs on our kernels, loaded before or after
  ``patch``: the adapters' A weights live in one fixed buffer per input (one GEMM for all
  of Q/K/V's), their factors in a fixed vector brought up to date on every call, and the
  updates are added to the fused projections' results (:mod:`.adapters.lora_bank`); every
  adapter call (``set_adapters``, ``disable_lora``, ``fuse_lora``, ``delete_adapters``,
  ``unload_lora``...) keeps its meaning, and under ``cuda_graph=True`` switching adapters
  replays the same graph.
* diffusers' processor API keeps its meaning on a patched ``Attention``
  (:class:`.adapters.attention_processor.PatchedAttention`): ``attn_processors`` reports
  what runs; ``set_attn_processor`` / ``set_default_attn_processor`` /
  ``fuse_qkv_projections`` with a processor we reproduce keep our kernels, and any other
  processor (``load_ip_adapter``'s, a custom one), like an adapter we cannot reproduce
  (DoRA), makes that module run stock diffusers (``patch`` again lists it as "already
  patched" with "runs stock: <why>"), until that changes. ``cross_attention_kwargs`` that
  would change our result raise.

``patch`` (``fuse_blocks=True``, the default) also replaces diffusers ``GEGLU`` and
``torch.nn.GroupNorm`` modules by the fused stand-ins of :mod:`.blocks` (same Parameter
objects, same ``state_dict`` keys; originals kept in ``.original``), lets each
``Transformer2DModel`` keep its input's memory format, and gives each ``ResnetBlock2D`` a
forward that folds SiLU and the time-embedding add into its GroupNorm calls; :func:`unpatch`
undoes it.

``patch(pipe, cuda_graph=True)`` also runs ``unet.forward``, ``vae.decode`` / ``vae.encode``
and a ControlNet pipeline's ``controlnet.forward`` (each net of several) through
shape-keyed CUDA graphs, and ``channels_last=True`` converts those modules to
channels-last; both are :mod:`.graphs` wrappers, removed by :func:`unpatch`.

Uses only public attributes of diffusers (a pipeline's ``components``; the adapters read
their modules' public attributes); 0.35.2 is the oldest diffusers version supported and tested
(older releases do not import with huggingface_hub 1.x, and pipelines before 0.35.2 do
not import with transformers 5).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn
from . import adapters
from .attention import DeepSpeedDiffusersAttention
from .blocks import (ChannelsLastGroupNorm, FusedGEGLU, fusable_reasons, fuse_resnet, keep_output_layout,
                     restore_output_layout, restore_resnet)
from .precision import AttentionPrecision, check_precision
from .graphs import (DEFAULT_MAX_GRAPHS, check_not_distributed, check_options, graph_module_forward, graphed_methods,
                     ungraph_module)

__all__ = ["patch", "unpatch", "PatchReport", "PatchRow"]

PATCHED = "patched"
BRIDGED = "bridged"  # kept in place, diffusers' code, its dispatch_attention_fn calls on our kernel
DECLINED = "declined"
ALREADY_PATCHED = "already patched"
RESTORED = "restored"

@dataclasses.dataclass(frozen=True)
class PatchRow:
    """One attention module: its qualified name, what happened to it, why, and its family
    (the adapter's ``NAME``; empty for block rows)."""

    name: str
    status: str
    reasons: tuple[str, ...] = ()
    family: str = ""


class PatchSummary(dict):
    """Counts per status (a dict); ``str()`` gives the one-line form."""

    def __str__(self) -> str:
        return ", ".join(f"{n} {status}" for status, n in self.items())


class PatchReport:
    """What :func:`patch` or :func:`unpatch` did, one row per attention module."""

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
        """Counts per status, e.g. ``{'patched': 140, 'declined': 0, 'already patched': 0}``
        (``'bridged'`` follows ``'patched'`` when a module was bridged)."""
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
            return head + "\n(no diffusers attention modules " + (
                "found)" if self.action == "patch" else "to restore)")
        status_w = max(len("status"), *(len(r.status) for r in self.rows))
        name_w = max(len("module"), *(len(r.name) for r in self.rows))
        family_w = max(len("family"), *(len(r.family) for r in self.rows))
        lines = [head, f"{'status':<{status_w}}  {'module':<{name_w}}  {'family':<{family_w}}  reasons"]
        for r in self.rows:
            lines.append(f"{r.status:<{status_w}}  {r.name:<{name_w}}  {r.family:<{family_w}}  "
                         f"{'; '.join(r.reasons)}".rstrip())
        return "\n".join(lines)


def _roots(obj) -> list[tuple[str, nn.Module]]:
    """(prefix, module) for an nn.Module, or for each nn.Module component of a diffusers pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [(name, m) for name, m in components.items() if isinstance(m, nn.Module)]
    raise TypeError(f"expected a diffusers pipeline or a torch.nn.Module, got {type(obj).__name__}")


def _root_of(obj, name: str) -> nn.Module:
    """The root of :func:`_roots` (the model, or the pipeline component) that holds the module
    at qualified name ``name``."""
    roots = _roots(obj)
    return next((m for prefix, m in roots if not prefix or name == prefix or name.startswith(prefix + ".")),
                roots[0][1])


def _bridged_notes(attention_precision: str) -> tuple[str, ...]:
    """A bridged row's note on the precision asked: bridged calls run exact attention."""
    return ("attention precision exact: bridged calls run it",) if attention_precision != "exact" else ()


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


def _is_attention(module: nn.Module) -> bool:
    return adapters.is_stand_in(module) or adapters.adapter_for(module) is not None


def _family(module: nn.Module) -> str:
    adapter = adapters.adapter_for(module)
    return adapter.NAME if adapter is not None else ""


def _graph_targets(obj) -> list[tuple[str, nn.Module, str]]:
    """(report name, module, method) to wrap: a UNet's ``forward``, a VAE's ``decode`` and
    ``encode``, a ControlNet's ``forward`` (each net of a ``MultiControlNetModel``), a DiT or
    video transformer's ``forward``.

    In a pipeline, the components named ``unet``, ``vae``, ``controlnet``, ``transformer`` and
    ``transformer_2`` (Wan 2.2's second expert); a module passed directly is wrapped if it is a
    ``UNet2DConditionModel``, an ``AutoencoderKL``, a ControlNet or a transformer of
    :data:`_GRAPHED_TRANSFORMERS`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    targets = []
    for prefix, module in _roots(obj):
        name = prefix or type(module).__name__
        if prefix == "unet" or (not prefix and isinstance(module, UNet2DConditionModel)):
            targets.append((f"{name}.forward", module, "forward"))
        elif prefix == "vae" or (not prefix and isinstance(module, AutoencoderKL)):
            targets += [(f"{name}.{m}", module, m) for m in ("decode", "encode") if callable(getattr(module, m, None))]
        elif prefix == "controlnet" or (not prefix and _is_controlnet(module)):
            nets = getattr(module, "nets", None)  # MultiControlNetModel runs each of its nets in turn
            if isinstance(nets, nn.ModuleList):
                targets += [(f"{name}.nets.{i}.forward", net, "forward") for i, net in enumerate(nets)]
            else:
                targets.append((f"{name}.forward", module, "forward"))
        elif prefix in ("transformer", "transformer_2") or (not prefix and _is_graphed_transformer(module)):
            targets.append((f"{name}.forward", module, "forward"))
    return sorted(targets, key=lambda target: target[0])


# Transformers that patch(cuda_graph=True) graphs when passed directly (in a pipeline, the
# component's name decides): their forward takes tensors and plain values only.
_GRAPHED_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "WanTransformer3DModel")


def _is_graphed_transformer(module: nn.Module) -> bool:
    import diffusers

    classes = tuple(getattr(diffusers, n) for n in _GRAPHED_TRANSFORMERS if hasattr(diffusers, n))
    return isinstance(module, classes)


def _is_controlnet(module: nn.Module) -> bool:
    try:
        from diffusers import ControlNetModel
    except ImportError:  # pragma: no cover - every supported diffusers has it
        return False
    return isinstance(module, ControlNetModel) or type(module).__name__.startswith("MultiControlNet")


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


def _attention_kinds(obj) -> tuple[type, ...]:
    """The classes of the attention modules in ``obj`` (block fusion never looks inside them)."""
    kinds = set()
    for _, root in _roots(obj):
        for m in root.modules():
            if adapters.adapter_for(m) is not None:
                kinds.add(type(m))
    return tuple(kinds)


def _block_sites(obj, want) -> dict[int, list[tuple[str, nn.Module, str, nn.Module]]]:
    """:func:`_sites` for the modules ``want`` picks, never inside attention modules nor at a root."""
    found = _sites(obj, want=want, stop=(adapters.StandIn,) + _attention_kinds(obj))
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
        if isinstance(module, ChannelsLastGroupNorm):
            original = module.restore()
        else:  # FusedGEGLU shares its one child (proj) with the original
            original = module.original
            original.train(module.training)
        for _, parent, attr, _ in places:
            setattr(parent, attr, original)
        counts[_BLOCK_KINDS[type(module)]] = counts.get(_BLOCK_KINDS[type(module)], 0) + 1
    layout = sum(restore_output_layout(m) for _, root in _roots(obj) for m in root.modules())
    if layout:
        counts["Transformer2D output layout"] = layout
    return counts


@torch.no_grad()
def patch(obj, *, cuda_graph: bool = False, channels_last: bool = False, kv_cache: bool = False,
          fuse_blocks: bool = True, max_graphs: int = DEFAULT_MAX_GRAPHS,
          clone_outputs: bool = True, attention_precision: str = "exact") -> PatchReport:
    """Replace every supported diffusers attention module in ``obj`` by its adapter's stand-in.

    ``obj``: a diffusers pipeline (each nn.Module component is searched: unet, vae,
    transformer...; text encoders have no diffusers Attention) or any nn.Module.
    Unsupported modules stay as they are and are listed as declined, with their adapter's
    reasons; attention modules of a family no adapter serves are listed as declined too.
    Patching a patched model is a no-op ("already patched" rows).

    ``cuda_graph=True`` also runs the pipeline's ``unet.forward``, ``vae.decode`` /
    ``vae.encode``, ``controlnet.forward`` and ``transformer.forward`` (or those of a
    UNet2DConditionModel / AutoencoderKL / ControlNet / SD3, Flux or Wan transformer passed
    directly) through CUDA graphs keyed by input signature, at most ``max_graphs`` per method
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
    as one op each (:func:`.blocks.fuse_resnet`); ``report.blocks`` counts them. GEGLU modules with
    adapter layers, and modules with forward hooks, are left alone and listed in
    ``report.blocks_declined``.
    ``attention_precision`` (``"exact"``, or an 8-bit scheme of
    :func:`.ops.attention_precisions`) is asked of every module converted now
    (:mod:`.precision`); each row says what runs: a module whose device has no kernel of that
    precision runs the exact one, and its row and a warning say why. Bridged modules run
    exact attention; an already patched module keeps the precision it was patched with.
    """
    options = {"cuda_graph": cuda_graph, "channels_last": channels_last, "kv_cache": kv_cache,
               "fuse_blocks": fuse_blocks}
    for key, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"patch({key}=...) must be a bool, got {value!r}")
    check_options(max_graphs=max_graphs, clone_outputs=clone_outputs)
    check_precision(attention_precision)
    if attention_precision != "exact":
        options["attention_precision"] = attention_precision
    _roots(obj)  # TypeError for an unsupported object, before anything changes
    DeepSpeedDiffusersAttention.reset_layer_ids()  # this call's new layers are numbered from 0
    rows = []
    for places in _sites(obj, want=_is_attention).values():
        name, _, _, module = places[0]
        if adapters.is_bridged(module):
            rows.append(PatchRow(name, ALREADY_PATCHED, ("bridged",) + _bridged_notes(attention_precision),
                                 _family(module)))
            continue
        if adapters.is_stand_in(module):
            stock = getattr(module, "stock_reason", "")
            notes = (f"runs stock: {stock}",) if stock else ()
            fused = getattr(module, "dda", None)
            if isinstance(fused, AttentionPrecision) and fused.config.attention_precision != attention_precision:
                notes += (f"attention precision {fused.attention_precision} (kept from the first patch; unpatch to "
                          "change it)",)
            rows.append(PatchRow(name, ALREADY_PATCHED, notes, _family(module.original)))
            continue
        claimers = adapters.candidates(module)
        if places[0][1] is None:
            rows.append(PatchRow(name, DECLINED, ("it is the object passed to patch(); pass its parent",),
                                 claimers[0].NAME))
            continue
        declined = []  # (adapter, reasons) of the claimers that declined, in order
        for adapter in claimers:
            stand_in, reasons = adapter.convert(module, kv_cache=kv_cache)
            if stand_in is not None:
                break
            declined.append((adapter, reasons))
        # a later adapter's row also says why the earlier ones declined
        earlier = tuple(f"{a.NAME} adapter: {r}" for a, rs in declined for r in rs)
        if stand_in is None:
            only = len(declined) == 1
            rows.append(PatchRow(name, DECLINED, tuple(declined[0][1]) if only else earlier, claimers[0].NAME))
            continue
        if stand_in is module:  # converted in place: bridged
            rows.append(PatchRow(name, BRIDGED, tuple(reasons) + earlier + _bridged_notes(attention_precision),
                                 adapter.NAME))
            continue
        fused = getattr(stand_in, "dda", None)
        if attention_precision != "exact" and isinstance(fused, AttentionPrecision):
            fused._ask_precision(attention_precision)
            earlier += (fused.precision_note(),)
        for _, parent, attr, _ in places:
            setattr(parent, attr, stand_in)
        if hasattr(stand_in, "follow_parallel_config"):  # DiT stand-ins: enable_parallelism on the model
            stand_in.follow_parallel_config(_root_of(obj, name))
        rows.append(PatchRow(name, PATCHED, earlier, adapter.NAME))
    blocks, blocks_declined = _fuse_blocks(obj) if fuse_blocks else ({}, ())
    wrapped = _wrap(obj, cuda_graph, channels_last, max_graphs, clone_outputs) if cuda_graph or channels_last else ()
    statuses = (PATCHED, BRIDGED, DECLINED, ALREADY_PATCHED) if any(r.status == BRIDGED for r in rows) \
        else (PATCHED, DECLINED, ALREADY_PATCHED)
    return PatchReport("patch", statuses, rows, options, wrapped, blocks, blocks_declined)


@torch.no_grad()
def unpatch(obj) -> PatchReport:
    """Put back the original attention modules that :func:`patch` replaced in ``obj``.

    Their parameters get independent storage again, with the fused tensors' current
    values (bit-identical to before patching unless the model was changed meanwhile),
    on the fused tensors' current device and dtype. A model with nothing patched is
    left alone (the report has no rows). Graph / channels-last wrappers added by
    :func:`patch` are removed first: the original bound methods come back, the graphs
    are freed, the weights' memory format is restored (``report.wrapped`` lists them).
    Fused GEGLU / GroupNorm stand-ins give way to their originals (``report.blocks``).
    """
    for _, module, method in _graph_targets(obj):  # before anything changes
        check_not_distributed(module, method)
    wrapped = []
    for name, module, method in _graph_targets(obj):
        if ungraph_module(module, method):
            wrapped.append(name)
    rows = []
    for places in _sites(obj, (adapters.StandIn,)).values():
        name, _, _, stand_in = places[0]
        original = stand_in.restore()
        for _, parent, attr, _ in places:
            if parent is not None:
                setattr(parent, attr, original)
        reasons = ("it is the object passed to unpatch(); use its .original",) if places[0][1] is None else ()
        rows.append(PatchRow(name, RESTORED, reasons, _family(original)))
    for places in _sites(obj, want=adapters.is_bridged).values():
        name, _, _, module = places[0]
        rows.append(PatchRow(name, RESTORED, ("bridged",), _family(adapters.unbridge(module))))
    blocks = _unfuse_blocks(obj)
    return PatchReport("unpatch", (RESTORED,), rows, {}, tuple(wrapped), blocks)
