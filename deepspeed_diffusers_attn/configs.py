"""Real Stable Diffusion model configs, and scaled-down versions with the same structure.

The dicts are the public ``config.json`` files of the Hugging Face repos named below,
written out from knowledge of them (not downloaded), keeping the keys that matter
for the architecture; everything else takes diffusers' defaults.
diffusers' ``attention_head_dim`` is a head *count* here when ``num_attention_heads`` is
unset (a historical naming bug): SD1.5 has 8 heads (head dims 40/80/160), SD2.1 and
SDXL have head dim 64 (5/10/20 heads).
"""
from __future__ import annotations

import copy

# stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/CompVis), unet/config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-2-1, unet/config.json
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids * 256 + 1280 pooled text
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (also SD2.x's VAE)
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _heads(channels: list[int], old_channels: list[int], old_heads) -> list[int]:
    """Head counts for the shrunk channels: keep the real head dim if it fits, else the head count.

    SD2.1/SDXL (head dim 64) keep head dim 64 with fewer heads; SD1.5 keeps 8 heads
    (head dims 8/16/32 for 40/80/160). Every head dim is a multiple of 8.
    """
    if isinstance(old_heads, int):
        old_heads = [old_heads] * len(channels)
    heads = []
    for c, oc, oh in zip(channels, old_channels, old_heads):
        head_dim = oc // oh
        h = c // head_dim if c % head_dim == 0 and c >= head_dim else oh
        assert c % h == 0 and (c // h) % 8 == 0, (c, h)
        heads.append(h)
    return heads


def scaled_down(config: dict) -> dict:
    """The same architecture with fewer channels and layers: a 16x16 latent runs in seconds on a CPU.

    Keeps block types, attention kinds (self/cross, linear projection, upcast, SDXL's
    text_time embedding), the varied transformer depth and head dims that are multiples of 8.
    """
    c = copy.deepcopy(config)
    if c["_class_name"] == "AutoencoderKL":
        c["block_out_channels"] = [ch // 4 for ch in c["block_out_channels"]]  # 32/64/128/128, mid head dim 128
        c["layers_per_block"] = 1
        c["sample_size"] = 64
        return c
    old = c["block_out_channels"]
    c["block_out_channels"] = [ch // 5 for ch in old]  # 64/128/256(/256)
    c["attention_head_dim"] = _heads(c["block_out_channels"], old, c["attention_head_dim"])
    c["cross_attention_dim"] //= 16  # 48 / 64 / 128
    c["layers_per_block"] = 1
    c["sample_size"] = 16
    if "transformer_layers_per_block" in c:
        c["transformer_layers_per_block"] = [min(n, 2) for n in c["transformer_layers_per_block"]]  # [1, 2, 2]
    if c.get("addition_embed_type") == "text_time":
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        c["addition_time_embed_dim"] = 8
        c["projection_class_embeddings_input_dim"] = 6 * 8 + pooled // 16  # 48 + 80
    return c


def sdxl_added_cond_shapes(config: dict, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of SDXL's ``added_cond_kwargs`` (pooled text embeds, 6 time ids) for this config."""
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"text_embeds": (batch, pooled), "time_ids": (batch, 6)}
