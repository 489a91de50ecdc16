"""LoRA adapters on a patched (and, on a GPU, CUDA-graphed) Stable Diffusion pipeline.

    python examples/lora.py [--steps N] [--size PX] [--rank R] [--cpu]

Builds the offline SD1.5 pipeline (real config, seeded random weights; scaled down on a
CPU) and gives its UNet two PEFT LoRA adapters, "style" and "detail", with random weights
on every attention projection (as ``pipe.load_lora_weights`` would load real ones). Then:

1. A stock copy generates one image per adapter setting, the reference.
2. ``patch(pipe)`` (with ``cuda_graph=True, channels_last=True`` on a GPU) keeps the
   adapters on our fused projections. The same settings are generated again, switching
   with diffusers' own calls: ``set_adapters(["style"])``, ``set_adapters(["style",
   "detail"], weights=[1.0, 0.5])``, ``disable_lora()``. Under CUDA graphs the adapters'
   weights and factors live in fixed buffers that the graph reads at replay, so a switch
   rewrites a few numbers and replays the graph already captured.

It prints, per setting, the max pixel difference against stock, and the time of each
switch (the ``set_adapters`` call and the next generation's first step are included).
Exit status 1 if a difference exceeds the tolerance (1/255 on a CPU, 2/255 on a GPU).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.pipeline import build_sd15_pipeline, generate, initial_latents, max_pixel_difference

SETTINGS = [  # (name, adapter names, weights); None: adapters disabled
    ("style", ["style"], [1.0]),
    ("style + 0.5 detail", ["style", "detail"], [1.0, 0.5]),
    ("disabled", None, None),
    ("style again", ["style"], [1.0]),
]


def add_adapters(unet, rank: int) -> None:
    """Two random LoRA adapters on every attention projection of ``unet`` (PEFT, as diffusers loads them)."""
    from peft import LoraConfig

    for i, name in enumerate(("style", "detail")):
        torch.manual_seed(100 + i)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)


def apply(pipe, names, weights) -> None:
    """One adapter setting through diffusers' public calls."""
    if names is None:
        pipe.unet.disable_lora()
    else:
        pipe.unet.enable_lora()
        pipe.unet.set_adapters(names, weights=weights)


def run_settings(pipe, latents, steps: int) -> tuple[list, list[float]]:
    """(image per setting, seconds per setting: the switch and the whole generation)."""
    images, seconds = [], []
    for _, names, weights in SETTINGS:
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        apply(pipe, names, weights)
        images.append(generate(pipe, latents, steps))
        seconds.append(time.perf_counter() - t0)
    return images, seconds


def main(argv: list[str] | None = None) -> int:
    """Run the demonstration (see the module docstring); ``argv`` defaults to the command line."""
    ap = argparse.ArgumentParser(prog="python examples/lora.py", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 GPU, 2 CPU)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 8 (default 512 GPU, 64 CPU)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--cpu", action="store_true", help="run the CPU version even where a GPU is present")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    steps = args.steps or (20 if cuda else 2)
    size = args.size or (512 if cuda else 64)
    where = torch.cuda.get_device_name() if cuda else "CPU (scaled-down config, C reference kernels)"
    print(f"LoRA on a patched pipeline, {where}, {size}x{size}, {steps} steps")

    pipe = build_sd15_pipeline(scaled=not cuda, seed=0).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    add_adapters(pipe.unet, args.rank)
    latents = initial_latents(pipe, size)
    stock_images, stock_s = run_settings(copy.deepcopy(pipe), latents, steps)

    options = dict(cuda_graph=True, channels_last=True) if cuda else {}
    report = dda.patch(pipe, **options)
    print(f"patch({', '.join(f'{k}=True' for k in options)}): {report.summary()}")
    images, seconds = run_settings(pipe, latents, steps)
    if cuda:
        print(f"UNet graphs: {pipe.unet.forward.stats['captures']} captured, {pipe.unet.forward.num_graphs} kept")

    print(f"(the adapters move the stock image by {max_pixel_difference(stock_images[0], stock_images[2]):.2f} / 255)")
    tolerance = 2.0 if cuda else 1.0
    worst = 0.0
    for (name, _, _), ours, stock, s_ours, s_stock in zip(SETTINGS, images, stock_images, seconds, stock_s):
        diff = max_pixel_difference(ours, stock)
        worst = max(worst, diff)
        print(f"  {name:<20} max pixel difference vs stock {diff:.4f} / 255; "
              f"switch + generation {s_ours:.3f} s (stock {s_stock:.3f} s)")
    dda.unpatch(pipe)
    verdict = "PASS" if worst <= tolerance else "FAIL"
    print(f"{verdict}: worst difference {worst:.4f} / 255 (tolerance {tolerance} / 255)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
