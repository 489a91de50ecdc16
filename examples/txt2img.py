"""The main job: stock diffusers vs ``deepspeed_diffusers_attn.patch(pipe)``, one text-to-image run each.

    python examples/txt2img.py --out out        (the same as python -m deepspeed_diffusers_attn)

On a GPU: SD1.5 at 512x512 in float16, ``patch(pipe, cuda_graph=True, channels_last=True)``
against stock; prints seconds per image, the speedup and the max pixel difference.
On a CPU: a correctness check of the C reference kernels on a scaled-down SD1.5 config in
float32 (not a speed comparison); prints the max pixel difference and whether it is within
the tolerance. Both write stock.png, patched.png and a chart to --out.

The code lives in the installed package, ``deepspeed_diffusers_attn/txt2img.py``, so that
``python -m deepspeed_diffusers_attn`` runs it without this folder; read it there. Its
steps, in short::

    pipe = build_sd15_pipeline(scaled=not cuda)            # or from_pretrained(--model)
    latents = initial_latents(pipe, size)
    stock, stock_s = seconds_per_image(pipe, latents, steps)
    patch(pipe, cuda_graph=True, channels_last=True)       # GPU; patch(pipe) on a CPU
    ours, ours_s = seconds_per_image(pipe, latents, steps)
    unpatch(pipe)
    max_pixel_difference(stock, ours)
"""
import sys

from deepspeed_diffusers_attn.txt2img import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/txt2img.py"))
