"""DiT and video pipelines: SD3-medium, Flux.1-dev and Wan2.1-T2V-1.3B, stock diffusers vs ``patch(pipe)``.

    python examples/dit.py [--models sd3,flux,wan] [--steps N] [--height PX] [--width PX] [--frames N]
                           [--repeats N] [--out DIR] [--model PATH] [--no-graph] [--cpu]

Each pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline``) is built from the
real transformer and VAE configs (:mod:`.configs`) with seeded random weights, no downloads.
Text encoders are left out: the prompt embeddings are seeded random tensors of the shapes the
real encoders give (SD3: 77 CLIP + 256 T5 tokens, 4096 wide, pooled 2048; Flux: 512 T5 tokens,
pooled 768; Wan: 512 UMT5 tokens), passed as ``prompt_embeds``. Every pipeline generates once
stock and once patched from the same embeddings and the same seeded noise; the script prints
the patch report's counts, the max pixel difference between the two outputs and, on a GPU,
seconds per image (per video for Wan).

On a GPU: bfloat16, SD3 and Flux at 1024x1024, Wan at 480x832 with 33 frames (``--frames 81``
is Wan's full clip; it costs about 3x more per step), 20 steps; patched is
``patch(pipe, cuda_graph=True)`` (``--no-graph``: ``patch(pipe)``); stock is diffusers as is.
The random-weight outputs are noise, and bfloat16 roundings of two attention implementations
move 20 steps apart, so the difference is printed, not judged: the accuracy bound is
``tests/test_dit_gpu.py`` (error against a float64 run).

On a CPU (no GPU, or ``--cpu``): a correctness check in float32, not a speed comparison: tiny
configs of the same architectures (:func:`.configs.scaled_down`), 64x64 (Wan: 5 frames), 2 steps.
The difference must be within CPU_TOLERANCE (1/255); exit status 1 if not.

``--model PATH`` loads a local diffusers checkpoint folder of one of these pipelines instead
(its own text encoders encode a prompt). The building blocks (:data:`MODELS`,
:func:`build_model`, :func:`transformer_inputs`) are shared with ``benchmarks/bench_dit.py``
and ``tests/test_dit_gpu.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from . import patch, unpatch
from .configs import (FLUX1_DEV_TRANSFORMER, FLUX1_VAE, SD3_MEDIUM_TRANSFORMER, SD3_VAE,
                      WAN21_T2V_1_3B_TRANSFORMER, WAN21_VAE, scaled_down)
from .pipeline import PROMPT, max_pixel_difference
from .txt2img import _chart, _save_png

__all__ = ["DiTModel", "MODELS", "build_model", "cast_model", "transformer_inputs", "build_pipeline",
           "prompt_embeddings", "generate", "main", "CPU_TOLERANCE"]

# Largest accepted difference on the CPU, in 8-bit levels: both runs are float32, so a correct
# kernel differs by rounding only (far below one level), a wrong one by tens of levels.
CPU_TOLERANCE = 1.0
# The CPU check's sizes: pixels per side, video frames (4k + 1), text tokens.
SMALL_SIDE, SMALL_FRAMES, SMALL_TEXT_TOKENS = 64, 5, 16
VAE_SCALE = 8  # pixels per latent pixel (every VAE here); Wan's VAE also packs 4 frames into one
WAN_TIME_SCALE = 4


def _flow_match(**config):
    def make():
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**config)
    return make


def _unipc_flow(**config):
    def make():
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(**config)
    return make


@dataclasses.dataclass(frozen=True)
class DiTModel:
    """One model: its configs, default size, text shapes and how its pipeline runs."""

    key: str
    title: str
    repo: str  # the Hugging Face repo whose config.json files the configs are
    pipeline: str  # the diffusers pipeline class
    transformer: dict
    vae: dict
    height: int
    width: int
    frames: Optional[int]  # video frames (Wan); None for an image model
    text_tokens: int  # the text sequence the transformer attends to
    text_dim_key: str  # the transformer config key of the text embedding width
    pooled_dim_key: Optional[str]  # ... of the pooled text embedding (None: the model has none)
    cfg: bool  # the pipeline runs a second (negative) batch for classifier-free guidance
    guidance_scale: float
    scheduler: Callable  # () -> the scheduler of the real repo's scheduler_config.json

    def latent_shape(self, config: dict, batch: int, height: int, width: int, frames: Optional[int]) -> tuple:
        """The transformer's ``hidden_states`` shape for an image (video) of this size."""
        h, w = height // VAE_SCALE, width // VAE_SCALE
        if self.key == "flux":  # FluxPipeline packs 2x2 latent pixels into one token of 4 x 16 channels
            return (batch, (h // 2) * (w // 2), config["in_channels"])
        if self.key == "wan":
            return (batch, config["in_channels"], (frames - 1) // WAN_TIME_SCALE + 1, h, w)
        return (batch, config["in_channels"], h, w)

    def image_tokens(self, config: dict, height: int, width: int, frames: Optional[int]) -> int:
        """How many image (video) tokens the transformer's attention sees."""
        shape = self.latent_shape(config, 1, height, width, frames)
        if self.key == "flux":
            return shape[1]
        if self.key == "wan":
            pt, ph, pw = config["patch_size"]
            return (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
        return (shape[2] // config["patch_size"]) * (shape[3] // config["patch_size"])


MODELS = {
    "sd3": DiTModel(
        "sd3", "SD3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline",
        SD3_MEDIUM_TRANSFORMER, SD3_VAE, 1024, 1024, None,
        text_tokens=77 + 256,  # CLIP-L and CLIP-G (77, zero-padded to 4096 wide) then T5-XXL (256)
        text_dim_key="joint_attention_dim", pooled_dim_key="pooled_projection_dim", cfg=True,
        guidance_scale=7.0, scheduler=_flow_match(num_train_timesteps=1000, shift=3.0)),
    "flux": DiTModel(
        "flux", "Flux.1-dev", "black-forest-labs/FLUX.1-dev", "FluxPipeline",
        FLUX1_DEV_TRANSFORMER, FLUX1_VAE, 1024, 1024, None,
        text_tokens=512, text_dim_key="joint_attention_dim", pooled_dim_key="pooled_projection_dim",
        cfg=False,  # guidance-distilled: the scale is an input of the transformer
        guidance_scale=3.5,
        scheduler=_flow_match(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
    "wan": DiTModel(
        "wan", "Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline",
        WAN21_T2V_1_3B_TRANSFORMER, WAN21_VAE, 480, 832, 81,
        text_tokens=512, text_dim_key="text_dim", pooled_dim_key=None, cfg=True, guidance_scale=5.0,
        scheduler=_unipc_flow(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                              flow_shift=3.0, solver_order=2)),
}


def build_model(config: dict, *, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The diffusers model of ``config["_class_name"]``, weights drawn from ``seed`` directly on
    ``device`` (no CPU copy of a large model), then cast to ``dtype``; eval mode.

    Built in float32 and cast tensor by tensor, so the peak is the float32 model (48 GB for
    Flux.1-dev) plus one parameter. As ``from_pretrained(torch_dtype=...)`` does, the tensors of
    the class's ``_keep_in_fp32_modules`` (Wan: RoPE tables, time embedder, norms, modulation
    table) stay float32.
    """
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls.from_config(config)
    return cast_model(model, dtype).eval()


@torch.no_grad()
def cast_model(model, dtype: torch.dtype):
    """``model`` with its floating parameters and buffers cast to ``dtype`` in place, tensor by
    tensor, except those of the class's ``_keep_in_fp32_modules``, which become float32 (as
    ``from_pretrained(torch_dtype=...)`` loads them). Returns ``model``."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for prefix, module in model.named_modules():
        def target(name):
            return torch.float32 if any(k in f"{prefix}.{name}".split(".") for k in keep) else dtype

        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(target(name))
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                # A new tensor, not a .data swap: a buffer made as a view (SD3's pos_embed) would
                # keep its float32 base, which torch.compile's fake tensors reject.
                module._buffers[name] = b.to(target(name))
    return model


def transformer_inputs(model: DiTModel, config: dict, *, batch: int, height: int, width: int,
                       frames: Optional[int] = None, text_tokens: Optional[int] = None, device="cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 1) -> dict:
    """Keyword arguments of one transformer call as ``model``'s pipeline makes them, with seeded
    random latents and text embeddings (drawn on the CPU, so every device gets the same values).

    SD3: latents [B, 16, H/8, W/8], text [B, 333, 4096], pooled [B, 2048], float32 timesteps.
    Flux: packed latents [B, H/16 * W/16, 64], text [B, 512, 4096], pooled [B, 768], position
    ids (row and column of each image token; zeros for text), timestep t/1000 in the model dtype,
    guidance 3.5. Wan: latents [B, 16, (F-1)/4+1, H/8, W/8], text [B, 512, 4096], int64 timesteps.
    ``return_dict=False``, as the pipelines call it.
    """
    frames = frames or model.frames
    text_tokens = text_tokens or model.text_tokens
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    inputs = {"hidden_states": randn(*model.latent_shape(config, batch, height, width, frames)),
              "encoder_hidden_states": randn(batch, text_tokens, config[model.text_dim_key])}
    if model.pooled_dim_key:
        inputs["pooled_projections"] = randn(batch, config[model.pooled_dim_key])
    if model.key == "flux":
        h, w = height // (2 * VAE_SCALE), width // (2 * VAE_SCALE)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
        inputs["img_ids"] = ids.to(device, dtype)
        inputs["txt_ids"] = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
        inputs["timestep"] = torch.full((batch,), 0.5, device=device, dtype=dtype)
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch,), model.guidance_scale, device=device)
    elif model.key == "wan":  # UniPC's timesteps are int64
        inputs["timestep"] = torch.full((batch,), 500, device=device, dtype=torch.int64)
    else:
        inputs["timestep"] = torch.full((batch,), 500.0, device=device)
    inputs["return_dict"] = False
    return inputs


def build_pipeline(model: DiTModel, *, scaled: bool, device="cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """``model``'s pipeline with random-weight transformer and VAE (tiny ones if ``scaled``) on
    ``device`` in ``dtype``, its real scheduler, and no text encoders or tokenizers."""
    import diffusers

    transformer = build_model(scaled_down(model.transformer) if scaled else model.transformer,
                              device=device, dtype=dtype, seed=seed)
    vae = build_model(scaled_down(model.vae) if scaled else model.vae, device=device, dtype=dtype, seed=seed + 1)
    none = {}
    if model.key == "sd3":
        none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    elif model.key == "flux":
        none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2")}
    else:
        none = {"text_encoder": None, "tokenizer": None}
    pipe = getattr(diffusers, model.pipeline)(transformer=transformer, vae=vae, scheduler=model.scheduler(), **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(model: DiTModel, config: dict, *, text_tokens: Optional[int] = None, device="cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 2) -> dict:
    """Seeded random ``prompt_embeds`` (and pooled, and negative ones where the pipeline runs CFG)
    for one prompt, of the shapes ``model``'s text encoders give."""
    text_tokens = text_tokens or model.text_tokens
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    names = ["prompt_embeds"] + (["negative_prompt_embeds"] if model.cfg else [])
    kwargs = {name: randn(1, text_tokens, config[model.text_dim_key]) for name in names}
    if model.pooled_dim_key:
        for name in list(names):
            kwargs[name.replace("prompt_embeds", "pooled_prompt_embeds")] = randn(1, config[model.pooled_dim_key])
    return kwargs


def generate(pipe, model: DiTModel, prompt: dict, *, height: int, width: int, frames: Optional[int], steps: int,
             seed: int = 1234) -> np.ndarray:
    """One image [H, W, 3] (a video [F, H, W, 3] for Wan), float pixels in [0, 1], from the
    noise of ``seed`` (drawn on the CPU, so every run and device starts from the same values)."""
    kwargs = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=model.guidance_scale,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    if model.key == "wan":
        out = pipe(**prompt, num_frames=frames, **kwargs)
        return np.asarray(out.frames[0])
    return np.asarray(pipe(**prompt, **kwargs).images[0])


def seconds_per_output(pipe, model: DiTModel, prompt: dict, sizes: dict, steps: int, repeats: int,
                       cuda: bool) -> tuple[np.ndarray, float]:
    """(the last output, median seconds of ``repeats`` generations). On a GPU a one-step
    generation runs first, untimed (kernel loading, GEMM plans, CUDA-graph capture)."""
    if cuda:
        generate(pipe, model, prompt, steps=1, **sizes)
    times, out = [], None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(pipe, model, prompt, steps=steps, **sizes)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def describe(report) -> str:
    """The report's counts, then per pipeline component and attention family how many modules
    were patched / declined (with a declined group's first reason)."""
    groups: dict[tuple[str, str, str], list] = {}
    for row in report:
        groups.setdefault((row.name.split(".")[0], row.family or "?", row.status), []).append(row)
    parts = []
    for (component, family, status), rows in groups.items():
        why = f" ({rows[0].reasons[0]})" if status != "patched" and rows[0].reasons else ""
        parts.append(f"{component}: {len(rows)} {status} [{family}]{why}")
    counts = ", ".join(f"{n} {status}" for status, n in report.summary().items())
    return "; ".join([counts] + parts)


def _load_checkpoint(path: str, device, dtype):
    """A local diffusers checkpoint folder: (pipeline, its MODELS entry)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    for model in MODELS.values():
        if type(pipe).__name__ == model.pipeline:
            return pipe, model
    raise SystemExit(f"--model {path}: a {type(pipe).__name__}; this example runs "
                     f"{', '.join(m.pipeline for m in MODELS.values())}")


def _parser(prog: Optional[str]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 epilog="On a CPU this checks the kernels for correctness on tiny configs; "
                                        "its times are not a benchmark.")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 on GPU, 2 on CPU)")
    for side in ("height", "width"):
        ap.add_argument(f"--{side}", type=int, default=None,
                        help="pixels, a multiple of 16 (default: the model's; 64 on CPU)")
    ap.add_argument("--frames", type=int, default=None, help="Wan video frames, 4k+1 (default 33 on GPU, 5 on CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="timed generations each, median (default 1)")
    ap.add_argument("--out", default="out_dit", help="folder for the outputs and charts (default: out_dit)")
    ap.add_argument("--model", default=None, help="a local diffusers SD3 / Flux / Wan pipeline folder (real weights)")
    ap.add_argument("--no-graph", action="store_true", help="on a GPU, patch(pipe) without cuda_graph=True")
    ap.add_argument("--cpu", action="store_true", help="run the CPU correctness check even where a GPU is present")
    return ap


def _run_one(pipe, model: DiTModel, prompt: dict, sizes: dict, args, cuda: bool, out_dir: str) -> tuple[float, bool]:
    """Stock, then patched, generation of one pipeline; prints and saves. (difference, within tolerance)."""
    size = f"{sizes['height']}x{sizes['width']}" + (f", {sizes['frames']} frames" if sizes["frames"] else "")
    unit = "video" if sizes["frames"] else "image"
    print(f"\n{model.title} ({model.pipeline}), {size}, {args.steps} steps")
    stock, stock_s = seconds_per_output(pipe, model, prompt, sizes, args.steps, args.repeats, cuda)
    options = dict(cuda_graph=True) if cuda and not args.no_graph else {}
    report = patch(pipe, **options)
    print(f"  patch(pipe{''.join(f', {k}=True' for k in options)}): {describe(report)}")
    if report.wrapped:
        print(f"  CUDA-graphed: {', '.join(report.wrapped)}")
    ours, ours_s = seconds_per_output(pipe, model, prompt, sizes, args.steps, args.repeats, cuda)
    unpatch(pipe)
    finite = bool(np.isfinite(stock).all() and np.isfinite(ours).all())
    diff = max_pixel_difference(stock, ours) if finite else float("nan")
    ok = finite and (cuda or diff <= CPU_TOLERANCE)
    frame = (lambda v: v[len(v) // 2]) if sizes["frames"] else (lambda v: v)  # a video's middle frame
    _save_png(os.path.join(out_dir, f"{model.key}_stock.png"), frame(stock))
    _save_png(os.path.join(out_dir, f"{model.key}_patched.png"), frame(ours))
    if cuda:
        _chart(os.path.join(out_dir, f"{model.key}_speed.png"),
               f"{model.title} {size}, {args.steps} steps, {torch.cuda.get_device_name()}",
               [("stock diffusers", stock_s), ("patched", ours_s)],
               f"speedup {stock_s / ours_s:.2f}x, max pixel difference {diff:.3f} / 255")
        print(f"  stock:   {stock_s:.3f} s/{unit}")
        print(f"  patched: {ours_s:.3f} s/{unit}   speedup {stock_s / ours_s:.2f}x")
        print(f"  max pixel difference, patched vs stock: {diff:.3f} / 255 (bfloat16; not judged here)")
    else:
        verdict = "PASS" if ok else "FAIL"
        print(f"  max pixel difference, patched vs stock: {diff:.4f} / 255, "
              f"{'within' if ok else 'ABOVE'} the tolerance of {CPU_TOLERANCE:g} / 255: {verdict}")
        print(f"  times (not a benchmark): stock {stock_s:.3f} s/{unit}, patched {ours_s:.3f} s/{unit}")
    if not finite:
        print("  the output has NaN or Inf values")
    return diff, ok


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Run the example (see the module docstring). Returns the exit status: 0, or 1 when the CPU
    check finds a difference above CPU_TOLERANCE (or any output is not finite)."""
    args = _parser(prog).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    args.steps = args.steps or (20 if cuda else 2)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {list(MODELS)}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise SystemExit(f"--{name} must be a positive multiple of 16, got {value}")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % WAN_TIME_SCALE):
        raise SystemExit(f"--frames must be 4k+1 (1, 5, ..., 81), got {args.frames}")
    if cuda:
        print(f"DiT / video pipelines on {torch.cuda.get_device_name()} (bfloat16): stock diffusers vs "
              f"patch(pipe{'' if args.no_graph else ', cuda_graph=True'})")
    else:
        print("DiT / video pipelines: CPU correctness check (not a speed comparison), tiny configs in float32. "
              "Stock runs PyTorch's CPU ops; patched modules run our C reference kernels.")
    os.makedirs(args.out, exist_ok=True)

    worst, ok = 0.0, True
    if args.model:
        pipe, model = _load_checkpoint(args.model, device, dtype)
        keys, loaded = [model.key], pipe
    for key in keys:
        model = MODELS[key]
        frames = (args.frames or (33 if cuda else SMALL_FRAMES)) if model.frames else None
        sizes = {"height": args.height or (model.height if cuda else SMALL_SIDE),
                 "width": args.width or (model.width if cuda else SMALL_SIDE), "frames": frames}
        if args.model:
            pipe, prompt = loaded, {"prompt": PROMPT}
        else:
            pipe = build_pipeline(model, scaled=not cuda, device=device, dtype=dtype)
            prompt = prompt_embeddings(model, pipe.transformer.config, device=device, dtype=dtype,
                                       text_tokens=None if cuda else SMALL_TEXT_TOKENS)
        diff, good = _run_one(pipe, model, prompt, sizes, args, cuda, args.out)
        worst = max(worst, diff) if diff == diff else float("nan")
        ok = ok and good
        del pipe, prompt
        if cuda:
            torch.cuda.empty_cache()
    print(f"\n{'PASS' if ok else 'FAIL'}: worst max pixel difference {worst:.4f} / 255"
          + ("" if cuda else f" (tolerance {CPU_TOLERANCE:g} / 255)"))
    print(f"outputs: {os.path.abspath(args.out)}")
    return 0 if ok else 1
