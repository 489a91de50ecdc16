"""A StableDiffusionPipeline built offline from the real SD1.5 configs, with seeded random weights.

No checkpoint can be downloaded here, so the main job and the tests build the exact
SD1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random weights: the
shapes, and so the cost, are real; the images are not meaningful. The tokenizer is a
tiny in-memory character vocabulary (token ids are all the text encoder needs).
"""
from __future__ import annotations

import torch

from .configs import SD15_UNET, SD_VAE, scaled_down

__all__ = ["build_sd15_pipeline"]


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd15_pipeline(scaled: bool = False, seed: int = 0):
    """SD1.5's UNet, VAE and text encoder from their configs, weights drawn from ``seed``.

    ``scaled=True`` shrinks every part (same structure, head dims multiples of 8) so that a
    64x64 image takes seconds on a CPU. The pipeline is on the CPU in float32; move it
    with ``.to(device, dtype)``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = scaled_down(SD15_UNET) if scaled else dict(SD15_UNET)
    vae_config = scaled_down(SD_VAE) if scaled else dict(SD_VAE)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config).eval()
    vae = AutoencoderKL.from_config(vae_config).eval()
    hidden = unet_config["cross_attention_dim"]
    if scaled:
        text_config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=64, max_position_embeddings=77,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:  # openai/clip-vit-large-patch14, the SD1.5 text encoder
        text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                     hidden_act="quick_gelu", projection_dim=768,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(text_config).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
