"""``python -m deepspeed_diffusers_attn``: the main job (:mod:`deepspeed_diffusers_attn.txt2img`).

The same code runs as ``python examples/txt2img.py``; ``--help`` lists the options.
"""
from .txt2img import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m deepspeed_diffusers_attn"))
