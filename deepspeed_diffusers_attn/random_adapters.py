"""Seeded random LoRA and IP-Adapter weights for a UNet, loaded the way diffusers loads real ones.

Real checkpoints cannot be downloaded here, so the benchmarks, tests and examples give a
model adapters with the shapes and layout of real ones and seeded random values:

* :func:`add_random_lora`: PEFT LoRA adapters, through ``add_adapter`` (what
  ``load_lora_weights`` ends in), on the attention projections by default;
* :func:`add_random_ip_adapter`: an IP-Adapter (the plain "ip-adapter_sd15" /
  "ip-adapter_sdxl" kind: an image projection to 4 tokens and ``to_k_ip`` / ``to_v_ip`` on
  every cross-attention), as a state dict in the checkpoint's own format, loaded by the
  UNet's IP-Adapter loader (what ``pipe.load_ip_adapter`` calls after reading the file).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATTENTION_PROJECTIONS", "add_random_lora", "ip_adapter_state_dict", "add_random_ip_adapter"]

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""PEFT target names of every attention projection of a diffusers UNet."""


def add_random_lora(model: nn.Module, names=("a", "b"), rank: int = 32, targets=ATTENTION_PROJECTIONS,
                    seed: int = 100, std: float | None = None) -> None:
    """Add one PEFT LoRA adapter per name to ``model`` (``lora_alpha = rank``: scaling 1).

    A and B are drawn from N(0, std^2) with ``std = 1/sqrt(in_features)`` for A and
    ``1/sqrt(rank)`` for B unless ``std`` is given, so each adapter changes a projection's
    output by about as much as its base weights do: a test sees it, an fp16 run stays finite.
    The adapters land in the model's dtype and device, as PEFT puts them.
    """
    from peft import LoraConfig

    for i, name in enumerate(names):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), adapter_name=name)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for module in model.modules():
                lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
                if lora_a is None or name not in lora_a:
                    continue
                for w, fan in ((lora_a[name].weight, lora_a[name].weight.shape[1]), (lora_b[name].weight, rank)):
                    values = torch.randn(w.shape, generator=gen) * (std if std is not None else fan ** -0.5)
                    w.copy_(values.to(w.dtype))


def ip_adapter_state_dict(unet: nn.Module, image_embed_dim: int, seed: int = 200) -> dict:
    """A plain IP-Adapter checkpoint for ``unet`` with seeded random values, in the checkpoint's
    own format: ``{"image_proj": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"},
    "ip_adapter": {"<k>.to_k_ip.weight", "<k>.to_v_ip.weight"}}``, k = 1, 3, 5... over the
    cross-attention processors in ``attn_processors`` order (as diffusers numbers them)."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tokens = 4

    def rand(*shape, fan):
        return torch.randn(shape, generator=gen) * fan ** -0.5

    image_proj = {"proj.weight": rand(cross * tokens, image_embed_dim, fan=image_embed_dim),
                  "proj.bias": torch.zeros(cross * tokens),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key = {}, 1
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            inner = module.to_k.out_features if hasattr(module.to_k, "out_features") else \
                module.to_k.base_layer.out_features
            ip[f"{key}.to_k_ip.weight"] = rand(inner, cross, fan=cross)
            ip[f"{key}.to_v_ip.weight"] = rand(inner, cross, fan=cross)
            key += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


def add_random_ip_adapter(unet: nn.Module, image_embed_dim: int = 1024, scale: float = 0.6,
                          seed: int = 200) -> int:
    """Load a random plain IP-Adapter into ``unet`` (see :func:`ip_adapter_state_dict`) with
    diffusers' own loader, at ``scale`` on every layer; returns ``image_embed_dim``.

    The UNet then takes ``added_cond_kwargs["image_embeds"] = [tensor [B, 1, image_embed_dim]]``
    (what a pipeline passes for one image per prompt). The loader is the UNet's private
    ``_load_ip_adapter_weights``, which ``pipe.load_ip_adapter`` calls after reading the file.
    """
    state_dict = ip_adapter_state_dict(unet, image_embed_dim, seed)
    param = next(unet.parameters())
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    for module in (unet.encoder_hid_proj, *unet.attn_processors.values()):  # the new modules, where the UNet is
        if isinstance(module, nn.Module):
            module.to(param.device, param.dtype)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale") and isinstance(processor.scale, list):
            processor.scale = [scale] * len(processor.scale)
    return image_embed_dim
