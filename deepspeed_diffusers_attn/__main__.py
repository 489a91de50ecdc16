"""The main job: ``python -m deepspeed_diffusers_attn [--steps N] [--out DIR] [--model PATH]``.

Builds a StableDiffusionPipeline from the real SD1.5 config with seeded random weights
(no downloads; ``--model PATH`` loads real weights from a local diffusers folder),
generates one image stock and one patched from the same latents, with the progress bar,
and prints seconds per image, the speedup and the max pixel difference. On a GPU the
patched run is ``patch(pipe, cuda_graph=True, channels_last=True)`` (our kernels, the
UNet and VAE as CUDA graphs, channels-last activations); stock is diffusers as is. It saves both
images and a PNG chart of the two timings. Without a GPU it runs a scaled-down config
on the CPU in float32, and says so: CPU timings compare the C reference kernels against
PyTorch's CPU attention, not our CUDA kernels.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from . import ops, patch, unpatch
from .pipeline import build_sd15_pipeline


def _generate(pipe, latents, steps, size):
    return pipe(prompt="a photograph of an astronaut riding a horse", num_inference_steps=steps,
                height=size, width=size, latents=latents.clone(), output_type="np").images[0]


def _timed(pipe, latents, steps, size, device, repeats):
    _generate(pipe, latents, 1, size)  # warm-up: kernels, plans, workspace
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = _generate(pipe, latents, steps, size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return image, float(np.median(times))


def _chart(path, stock_s, ours_s, title):
    """A two-bar PNG chart drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, top = 480, 300, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    peak = max(stock_s, ours_s)
    for i, (label, val, color) in enumerate([("stock diffusers", stock_s, (120, 120, 120)),
                                             ("patched", ours_s, (30, 110, 200))]):
        bar = int((h - top - 40) * val / peak)
        x0 = 80 + i * 180
        d.rectangle([x0, h - 30 - bar, x0 + 100, h - 30], fill=color)
        d.text((x0, h - 25), label, fill="black")
        d.text((x0, h - 45 - bar), f"{val:.3f} s/image", fill="black")
    img.save(path)


def main(argv=None):
    """Run the main job (see the module docstring); ``argv`` defaults to the command line."""
    ap = argparse.ArgumentParser(prog="python -m deepspeed_diffusers_attn", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--out", default="out", help="folder for the images and the chart")
    ap.add_argument("--model", default=None, help="a local diffusers SD1.5 folder (real weights)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations each (median; default 3 GPU, 1 CPU)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    steps = args.steps or (20 if cuda else 3)
    repeats = args.repeats or (3 if cuda else 1)
    if cuda:
        where = f"{torch.cuda.get_device_name()} (float16), SD1.5 config at 512x512"
    else:
        where = ("CPU ONLY: no GPU here, so this runs a SCALED-DOWN SD1.5 config in float32, "
                 "and the patched pipeline runs the C reference kernels")
    print(f"deepspeed_diffusers_attn main job on {where}; CUDA kernels built: {ops.cuda_built()}")

    if args.model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    else:
        pipe = build_sd15_pipeline(scaled=not cuda, seed=0)
    pipe = pipe.to(device, dtype)
    size = 8 * pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(1234)
    latents = torch.randn(1, pipe.unet.config.in_channels, size // 8, size // 8, generator=gen).to(device, dtype)

    print(f"stock diffusers: {steps} steps, {size}x{size}")
    stock_img, stock_s = _timed(pipe, latents, steps, size, device, repeats)
    options = dict(cuda_graph=True, channels_last=True) if cuda else {}
    report = patch(pipe, **options)
    print(f"{report.summary()}; fused {report.blocks}; options {report.options}")
    print(f"patched: {steps} steps, {size}x{size}")
    ours_img, ours_s = _timed(pipe, latents, steps, size, device, repeats)
    unpatch(pipe)

    diff = np.abs(stock_img.astype(np.float64) - ours_img.astype(np.float64)).max() * 255.0
    os.makedirs(args.out, exist_ok=True)
    from PIL import Image

    for name, img in (("stock.png", stock_img), ("patched.png", ours_img)):
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(os.path.join(args.out, name))
    _chart(os.path.join(args.out, "speedup.png"), stock_s, ours_s,
           f"SD1.5 {size}x{size}, {steps} steps, {'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU (scaled down)'}")
    print(f"stock:   {stock_s:.3f} s/image")
    print(f"patched: {ours_s:.3f} s/image")
    print(f"speedup: {stock_s / ours_s:.2f}x   max pixel difference: {diff:.3f} / 255")
    print(f"images and chart in {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
