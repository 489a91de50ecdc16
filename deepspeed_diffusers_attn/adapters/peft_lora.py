"""PEFT LoRA layers around a projection, read as low-rank updates for the fused kernels.

diffusers loads LoRA through PEFT (``load_lora_weights``, ``load_lora_adapter``,
``add_adapter``): each targeted ``nn.Linear`` becomes a ``peft.tuners.lora.Linear`` whose
``base_layer`` is the original Linear and whose ``lora_A[name]`` / ``lora_B[name]`` /
``scaling[name]`` hold each adapter. PEFT's own forward computes
``base(x) + sum over active adapters of scaling * lora_B(lora_A(dropout(x)))``; the fused
module computes the same as the fused base GEMM plus low-rank GEMMs
(:class:`~deepspeed_diffusers_attn.attention.LowRankUpdates`, built by :mod:`.lora_bank`).

Layers are recognised by duck typing (peft need not be importable). The state read is
PEFT's public one: ``active_adapters``, ``disable_adapters``, ``merged``, and the
per-adapter ``scaling``, ``use_dora``, ``lora_bias``, ``lora_variant`` and dropout.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_lora_layer", "base_linear", "adapter_tensors", "unsupported", "adapter_factors", "layer_factors"]


def is_lora_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a PEFT LoRA layer wrapping a base layer."""
    if type(m) is nn.Linear:  # the common case, asked on every call: no attribute probing
        return False
    return hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "scaling")


def base_linear(m: nn.Module) -> nn.Module:
    """The projection's own Linear: ``m``, or the base layer a LoRA layer wraps."""
    return m.base_layer if is_lora_layer(m) else m


def adapter_tensors(m: nn.Module) -> list[torch.Tensor]:
    """The adapter weights of a LoRA layer (everything but its base layer's); [] for a plain layer."""
    if not is_lora_layer(m):
        return []
    base = {id(t) for t in (*m.base_layer.parameters(), *m.base_layer.buffers())}
    return [t for t in (*m.parameters(), *m.buffers()) if id(t) not in base]


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training


def unsupported(m: nn.Module) -> str:
    """Why the fused kernels cannot reproduce this LoRA layer now ("" if they can)."""
    if not is_lora_layer(m):
        return ""
    if type(m.base_layer) is not nn.Linear:
        return f"its LoRA base layer is a {type(m.base_layer).__name__}, not an nn.Linear"
    for name in m.lora_A.keys():
        if getattr(m, "use_dora", {}).get(name) or getattr(m, "lora_bias", {}).get(name):
            return f"LoRA adapter {name!r} uses DoRA or a LoRA bias"
        if name in getattr(m, "lora_variant", {}):
            return f"LoRA adapter {name!r} is a LoRA variant"
        if _dropout_active(m.lora_dropout[name]):
            return f"LoRA adapter {name!r} has active dropout (training mode)"
    return ""


def adapter_factors(m: nn.Module) -> dict:
    """Each adapter of ``m`` with its factor in ``m``'s output now: its ``scaling`` (a number,
    or the 0-d tensor PEFT keeps for hotswapping) while it is active and the layer is neither
    disabled nor merged, else 0.0 ({} for a plain layer).

    As PEFT's forward does, a disabled layer with merged adapters is unmerged first (PEFT's
    forward adds nothing while disabled or merged: a merged adapter is in the base weights).
    """
    return layer_factors(m) if is_lora_layer(m) else {}


def layer_factors(m: nn.Module) -> dict:
    """:func:`adapter_factors` of a layer known to be a PEFT LoRA layer (no check: the bank
    asks this for every layer it holds on every adapter switch)."""
    # PEFT's own attributes read from __dict__ (its properties disable_adapters, merged and
    # active_adapters wrap them): this runs for every adapter layer of a model on each switch
    d = m.__dict__
    if d["_disable_adapters"] and d["merged_adapters"]:
        m.unmerge()
    names = m._modules["lora_A"]._modules.keys()
    if d["_disable_adapters"] or d["merged_adapters"]:
        return dict.fromkeys(names, 0.0)
    active = d["_active_adapter"]
    active = (active,) if isinstance(active, str) else active
    scaling = d["scaling"]
    return {name: scaling[name] if name in active else 0.0 for name in names}
