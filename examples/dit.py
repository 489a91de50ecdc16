"""DiT and video pipelines (SD3-medium, Flux.1-dev, Wan2.1-T2V-1.3B): stock diffusers vs ``patch(pipe)``.

    python examples/dit.py [--models sd3,flux,wan] [--steps N] [--frames N] [--out DIR] [--model PATH]

On a GPU: each pipeline built from its real configs with seeded random weights, bfloat16,
SD3 / Flux at 1024x1024 and Wan at 480x832 (33 frames; ``--frames 81`` for the full clip),
random prompt embeddings of the real encoders' shapes; prints seconds per image (video), the
speedup of ``patch(pipe, cuda_graph=True)`` and the max pixel difference against stock.
On a CPU: a correctness check on tiny configs of the same architectures in float32 (exit
status 1 if a difference exceeds 1/255).

The code lives in the installed package, ``deepspeed_diffusers_attn/dit_example.py``; read
it there. Its steps, per model::

    pipe = build_pipeline(MODELS[key], scaled=not cuda)      # or from_pretrained(--model)
    prompt = prompt_embeddings(MODELS[key], pipe.transformer.config)
    stock = generate(pipe, model, prompt, ...)               # timed on a GPU
    patch(pipe, cuda_graph=True)                             # patch(pipe) on a CPU
    ours = generate(pipe, model, prompt, ...)
    unpatch(pipe)
    max_pixel_difference(stock, ours)
"""
import sys

from deepspeed_diffusers_attn.dit_example import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/dit.py"))
