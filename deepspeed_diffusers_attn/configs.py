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
    if c["_class_name"] in _DIT_CLASSES:
        return _scaled_down_dit(c)
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


# ---------------------------------------------------------------------------- DiT and video models
# SD3-medium, Flux.1-dev and Wan2.1-T2V-1.3B: their transformers and VAEs, from the public
# config.json files of the repos named above each dict (written out, not downloaded), checked
# against the defaults of diffusers' classes (SD3Transformer2DModel, FluxTransformer2DModel,
# WanTransformer3DModel, AutoencoderKL, AutoencoderKLWan). Keys at their class default are kept
# when the real file lists them, so the dicts read like the files.

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json: 24 joint blocks of
# 24 heads x 64 (hidden 1536); the last block's text stream is context_pre_only (diffusers sets it).
SD3_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

# stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json: SD's VAE layout with 16
# latent channels and no quant convs.
SD3_VAE = {
    **SD_VAE,
    "force_upcast": True,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json: 19 double-stream and 38 single-stream
# blocks of 24 heads x 128 (hidden 3072), RoPE over (16, 56, 56) of the head dim, guidance
# distilled (guidance_embeds: the guidance scale is an input, no second batch for CFG).
FLUX1_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# black-forest-labs/FLUX.1-dev, vae/config.json: SD3's VAE with Flux's scale and shift.
FLUX1_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json: 30 blocks of 12 heads x 128
# (hidden 1536), self-attention with RMSNorm across heads on q/k and 3-D RoPE, cross-attention
# to 512 UMT5 tokens; latents patched 1x2x2.
WAN21_T2V_1_3B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, vae/config.json: a causal 3-D VAE, 4x in time, 8x in space
# (these are AutoencoderKLWan's defaults too).
WAN21_VAE = {
    "_class_name": "AutoencoderKLWan",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}

_DIT_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "WanTransformer3DModel", "AutoencoderKLWan")


def _scaled_down_dit(c: dict) -> dict:
    """:func:`scaled_down` for the DiT / video configs: 2 heads of 16 (hidden 32), two blocks of
    each kind (Flux: one double-stream, two single-stream), 32-wide text and pooled embeddings;
    the same latent channels, patching, norms and RoPE layout (Flux's axes 4+6+6 = 16)."""
    kind = c["_class_name"]
    if kind == "AutoencoderKLWan":
        c.update(base_dim=16, num_res_blocks=1)
        return c
    c.update(attention_head_dim=16, num_attention_heads=2)
    if kind == "SD3Transformer2DModel":
        c.update(num_layers=2, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
                 sample_size=8, pos_embed_max_size=16)
    elif kind == "FluxTransformer2DModel":
        c.update(num_layers=1, num_single_layers=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=[4, 6, 6])
    else:
        c.update(num_layers=2, text_dim=32, freq_dim=32, ffn_dim=64)
    return c


def with_layers(config: dict, layers: int) -> dict:
    """A transformer config with ``layers`` blocks of each kind (Flux: ``layers`` double-stream and
    ``2 * layers`` single-stream, its real 1:2 ratio), never more than the config has. Widths,
    heads and token counts stay, so each block costs what it does in the full model."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    c = copy.deepcopy(config)
    c["num_layers"] = min(layers, c["num_layers"])
    if "num_single_layers" in c:
        c["num_single_layers"] = min(2 * layers, c["num_single_layers"])
    return c
