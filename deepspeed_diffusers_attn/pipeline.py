"""A StableDiffusionPipeline built offline from the real SD1.5 configs, and helpers to run it.

No checkpoint can be downloaded here, so the main job, the examples and the tests build the
exact SD1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random weights: the
shapes, and so the cost, are real; the images are not meaningful. The tokenizer is a
tiny in-memory character vocabulary (token ids are all the text encoder needs).

The run helpers are what the examples share: fixed starting latents, so that a stock and a
patched run of one pipeline can be compared pixel by pixel (``initial_latents``,
``generate``, ``max_pixel_difference``), and a wall-clock time per image
(``seconds_per_image``).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .configs import SD15_UNET, SD_VAE, scaled_down

__all__ = ["build_sd15_pipeline", "initial_latents", "generate", "seconds_per_image", "max_pixel_difference",
           "PROMPT"]

PROMPT = "a photograph of an astronaut riding a horse"


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


def initial_latents(pipe, size: int, seed: int = 1234) -> torch.Tensor:
    """The starting noise for a ``size`` x ``size`` image: [1, C, size/8, size/8] on the UNet's device and dtype.

    Drawn on the CPU from ``seed``, so every device and every run starts from the same values.
    """
    unet = pipe.unet
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, unet.config.in_channels, size // 8, size // 8, generator=gen)
    return latents.to(unet.device, unet.dtype)


def generate(pipe, latents: torch.Tensor, steps: int, prompt: str = PROMPT) -> np.ndarray:
    """One image from ``latents`` (not modified) as float pixels in [0, 1], [H, W, 3]."""
    size = 8 * latents.shape[-1]
    return pipe(prompt=prompt, num_inference_steps=steps, height=size, width=size, latents=latents.clone(),
                output_type="np").images[0]


def seconds_per_image(pipe, latents: torch.Tensor, steps: int, repeats: int = 1,
                      warmup: bool = True) -> tuple[np.ndarray, float]:
    """(the last image, median wall-clock seconds of ``repeats`` generations).

    ``warmup`` first runs one single-step generation untimed, so that one-time work (CUDA
    kernel loading, cuBLASLt plans, the workspace, CUDA-graph capture) stays out of the
    timing. On CUDA the clock is read after a device synchronisation.
    """
    cuda = latents.device.type == "cuda"
    if warmup:
        generate(pipe, latents, 1)
    times = []
    image = None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = generate(pipe, latents, steps)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return image, float(np.median(times))


def max_pixel_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest per-channel difference of two [0, 1] images, in 8-bit levels (0 to 255)."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * 255.0)
