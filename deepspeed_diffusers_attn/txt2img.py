"""The main job: one text-to-image generation with stock diffusers and with ``patch(pipe)``, compared.

    python -m deepspeed_diffusers_attn [--steps N] [--size PX] [--repeats N] [--out DIR] [--model PATH]
    python examples/txt2img.py ...            (the same code)

Builds a StableDiffusionPipeline from the real SD1.5 config with seeded random weights (no
downloads; ``--model PATH`` loads real weights from a local diffusers folder), generates one
image with stock diffusers and one patched, from the same latents, and saves both images
and a chart of the two timings.

On a GPU (float16, 512x512, 20 steps) it is a speed comparison: the patched run is
``patch(pipe, cuda_graph=True, channels_last=True)`` (our kernels, the UNet and VAE replayed
as CUDA graphs, channels-last activations), stock is diffusers as is; it prints seconds per
image, the speedup and the max pixel difference.

Without a GPU it is a correctness check of the C reference kernels, not a speed comparison:
a scaled-down SD1.5 config in float32, ``patch(pipe)`` runs our fp32 C reference kernels
(written for clarity, not speed) against PyTorch's optimised CPU ops. It prints the max
pixel difference against stock and whether it is within CPU_TOLERANCE, and exits with
status 1 when it is not.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from . import ops, patch, unpatch
from .pipeline import build_sd15_pipeline, initial_latents, max_pixel_difference, seconds_per_image

__all__ = ["main", "CPU_TOLERANCE"]

# Largest accepted difference on the CPU, in 8-bit levels. Both runs are float32, so the
# images differ only by rounding (about 1e-3 of a level at 3 steps); a wrong kernel shows up
# as tens of levels. One level is the smallest change an 8-bit image can show.
CPU_TOLERANCE = 1.0

CPU_HEADLINE = "CPU correctness check of the C reference kernels (not a speed comparison)"
CPU_CHART_TITLE = "CPU: C reference kernels, correctness check; times are not a benchmark"


def _parser(prog: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 epilog="On a CPU this checks the C reference kernels for correctness; "
                                        "its times are not a benchmark.")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels, a multiple of 8 (default: the UNet's, 512 for SD1.5, 128 scaled down)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations each (median; default 3 GPU, 1 CPU)")
    ap.add_argument("--out", default="out", help="folder for the images and the chart (default: out)")
    ap.add_argument("--model", default=None, help="a local diffusers SD1.5 folder (real weights)")
    ap.add_argument("--cpu", action="store_true", help="run the CPU correctness check even where a GPU is present")
    return ap


def _load(model: str | None, cuda: bool):
    """The pipeline on its device: a local checkpoint, or SD1.5 with random weights (scaled down on a CPU)."""
    if model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16 if cuda else torch.float32,
                                                       local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        return pipe.to("cuda") if cuda else pipe
    pipe = build_sd15_pipeline(scaled=not cuda, seed=0)  # CPU, float32
    return pipe.to("cuda", torch.float16) if cuda else pipe


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _chart(path: str, title: str, bars: list[tuple[str, float]], footer: str) -> None:
    """A PNG bar chart of seconds per image, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, top = 560, 320, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    d.text((10, 28), footer, fill="black")
    peak = max(v for _, v in bars)
    for i, ((label, val), color) in enumerate(zip(bars, [(120, 120, 120), (30, 110, 200)])):
        bar = int((h - top - 50) * val / peak)
        x0 = 90 + i * 220
        d.rectangle([x0, h - 30 - bar, x0 + 120, h - 30], fill=color)
        d.text((x0, h - 25), label, fill="black")
        d.text((x0, h - 45 - bar), f"{val:.3f} s/image", fill="black")
    img.save(path)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the main job (see the module docstring). ``argv`` defaults to the command line.

    Returns the exit status: 0, or 1 when the CPU check finds a difference above CPU_TOLERANCE.
    """
    args = _parser(prog).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    steps = args.steps or (20 if cuda else 3)
    repeats = args.repeats or (3 if cuda else 1)
    if cuda:
        print(f"deepspeed_diffusers_attn main job on {torch.cuda.get_device_name()} (float16): "
              f"stock diffusers vs patch(pipe, cuda_graph=True, channels_last=True)")
    else:
        print(f"deepspeed_diffusers_attn main job: {CPU_HEADLINE}.")
        print(f"{'Forced to the CPU' if args.cpu else 'No GPU here'}: a scaled-down SD1.5 config in float32. Stock runs PyTorch's CPU ops; the patched "
              "pipeline runs our C reference kernels, written for clarity, not speed.")
    print(f"CUDA kernels built: {ops.cuda_built()}")

    pipe = _load(args.model, cuda)
    size = args.size or 8 * pipe.unet.config.sample_size
    if size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {size}")
    latents = initial_latents(pipe, size)

    print(f"stock diffusers: {steps} steps, {size}x{size}")
    # On a CPU the times only describe this run, so no untimed warm-up generation is spent.
    stock_img, stock_s = seconds_per_image(pipe, latents, steps, repeats, warmup=cuda)
    report = patch(pipe, **(dict(cuda_graph=True, channels_last=True) if cuda else {}))
    print(f"{report.summary()}; fused {report.blocks}; options {report.options}")
    print(f"patched{'' if cuda else ' (C reference kernels)'}: {steps} steps, {size}x{size}")
    ours_img, ours_s = seconds_per_image(pipe, latents, steps, repeats, warmup=cuda)
    unpatch(pipe)
    diff = max_pixel_difference(stock_img, ours_img)

    os.makedirs(args.out, exist_ok=True)
    paths = {name: os.path.join(args.out, name) for name in ("stock.png", "patched.png")}
    _save_png(paths["stock.png"], stock_img)
    _save_png(paths["patched.png"], ours_img)
    if cuda:
        chart = os.path.join(args.out, "speedup.png")
        _chart(chart, f"SD1.5 {size}x{size}, {steps} steps, GPU {torch.cuda.get_device_name()}",
               [("stock diffusers", stock_s), ("patched", ours_s)],
               f"speedup {stock_s / ours_s:.2f}x, max pixel difference {diff:.3f} / 255")
        print(f"stock:   {stock_s:.3f} s/image")
        print(f"patched: {ours_s:.3f} s/image")
        print(f"speedup: {stock_s / ours_s:.2f}x   max pixel difference: {diff:.3f} / 255")
        ok = True
    else:
        ok = diff <= CPU_TOLERANCE
        verdict = f"{'within' if ok else 'ABOVE'} the tolerance of {CPU_TOLERANCE:g} / 255: {'PASS' if ok else 'FAIL'}"
        chart = os.path.join(args.out, "cpu_check.png")
        _chart(chart, CPU_CHART_TITLE, [("stock (PyTorch CPU)", stock_s), ("patched (C reference)", ours_s)],
               f"SD1.5 scaled down, {size}x{size}, {steps} steps; max pixel difference {diff:.3f} / 255, "
               f"{'PASS' if ok else 'FAIL'}")
        print(f"max pixel difference, patched vs stock: {diff:.4f} / 255, {verdict}")
        print(f"times (not a benchmark): stock {stock_s:.3f} s/image, patched with the C reference kernels "
              f"{ours_s:.3f} s/image")
    print(f"images: {os.path.abspath(paths['stock.png'])}, {os.path.abspath(paths['patched.png'])}")
    print(f"chart:  {os.path.abspath(chart)}")
    return 0 if ok else 1
