"""UNet step and VAE decode timings: stock diffusers vs ours, eager / CUDA graph / torch.compile.

    python benchmarks/bench_unet.py [--configs sd15,sd21,sdxl] [--compile] [--iters 20] [--out bench_out]

Conditions: batch 2 (classifier-free guidance), fp16, random weights from the real
configs (deepspeed_diffusers_attn.configs; the cost is real, the images would not be),
timestep a 0-d device tensor and ``return_dict=False`` as diffusers pipelines call it.
Configs: SD1.5 @ 512 (latent 64, text 77x768), SD2.1 @ 768 (latent 96, 77x1024), SDXL @
1024 (latent 128, 77x2048, added_cond_kwargs). ms/step is the median over ``--iters``
calls timed with CUDA events after 3 warm-up calls (so a graph's capture is not timed);
speedups are relative to stock + CUDA graph + channels-last, the strongest stock setup
without a compiler. Every variant's output is compared with stock eager (relative error,
||out - ref|| / ||ref||). Each row also gives the first call's seconds (graph capture, or
the compile for the compile variants), peak allocated memory and the variant's wall time.
Variants:

  stock            diffusers as is (SDPA attention)
  stock+graph      + our CUDA-graph wrapper (deepspeed_diffusers_attn.graphs), no attention patching
  stock+graph+cl   + channels-last weights and inputs
  stock+compile    torch.compile(unet, fullgraph=True)                     (--compile)
  stock+compile-ro torch.compile(unet, mode="reduce-overhead", fullgraph=True) (--compile)
  stock+compile-ro+cl  the same on channels-last weights and sample           (--compile)
  ours             deepspeed_diffusers_attn.patch(unet)
  ours+graph       + CUDA graph;  ours+graph+cl: + channels-last
  ours+compile-ro  patch, then torch.compile(mode="reduce-overhead", fullgraph=True) (--compile)
  ours+compile-ro+cl       the same on channels-last weights and sample        (--compile)
  ours-attn+compile-ro+cl  patch(fuse_blocks=False): our attention, inductor's own fusion of
                           GroupNorm / GEGLU / SiLU                            (--compile)
--variants picks a subset (comma-separated names; "stock" always runs: it is the reference).

Adapters (``--lora N``, ``--ip-adapter``): after the plain pass, each config runs again
with N PEFT LoRA adapters of rank ``--lora-rank`` (default 32) on every attention
projection, all active (weights 1.0, 0.5, ...), and/or a plain IP-Adapter (4 image
tokens on every cross-attention, scale 0.6), random weights loaded as diffusers loads
real ones (deepspeed_diffusers_attn.random_adapters); its rows are named e.g.
``sdxl+lora2+ip``. With LoRA, the graph variants also time an adapter switch: three
``set_adapters`` calls, each followed by one step; ``switch_ms`` is the median of
(the first step after ``set_adapters``) minus a step without a switch, both timed on the
host from an idle GPU to the end of their kernels (``step_idle_ms``: so the call's own host
time, which ``ms`` hides behind the previous step's kernels, is in both), ``set_adapters_ms`` the
median time of diffusers' ``set_adapters`` call itself (the same for stock and ours), and
``captures`` how many graphs the variant captured in all (ours: 1; stock: one per
adapter state). ``--adapters-only`` skips the plain pass.

VAE decode (batch 1) at 512 and 1024 px: stock and ours, eager, graphed and graphed channels-last. Writes
results.json after every variant (a run cut short by a timeout keeps what it measured) and
results.png at the end, to --out. Time on an H100: without --compile about 1-2 minutes for
all three configs; ``--configs sd15 --compile`` an estimated 4 minutes (three compiles of about
65 s each; the second stock compile reuses the first one's Triton kernels).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (benchmarks/timing.py: card and versions)

timing.add_repo_to_path()

import deepspeed_diffusers_attn as dda  # noqa: E402
from deepspeed_diffusers_attn import ops  # noqa: E402
from deepspeed_diffusers_attn.configs import SD15_UNET, SD21_UNET, SDXL_UNET, SD_VAE, sdxl_added_cond_shapes  # noqa: E402
from deepspeed_diffusers_attn.graphs import graph_module_forward, ungraph_module  # noqa: E402
from deepspeed_diffusers_attn.workspace import release_workspaces  # noqa: E402

CONFIGS = {  # name -> (unet config, latent size, image px)
    "sd15": (SD15_UNET, 64, 512),
    "sd21": (SD21_UNET, 96, 768),
    "sdxl": (SDXL_UNET, 128, 1024),
}
BASELINE = "stock+graph+cl"
BATCH = 2
DTYPE = torch.float16


def build(cls, config: dict, device: str = "cuda", dtype: torch.dtype = DTYPE):
    """A diffusers model from its config, initialised directly on ``device``, eval mode."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config)
    return model.to(dtype).eval()


def unet_inputs(config: dict, latent: int, device: str = "cuda", dtype: torch.dtype = DTYPE) -> dict:
    """A UNet call's keyword arguments as a pipeline passes them (B=2, 77 text tokens)."""
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = {
        "sample": torch.randn(BATCH, 4, latent, latent, generator=gen, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(BATCH, 77, config["cross_attention_dim"], generator=gen,
                                             device=device, dtype=dtype),
        "return_dict": False,
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {k: torch.randn(s, generator=gen, device=device, dtype=dtype)
                                       for k, s in sdxl_added_cond_shapes(config, BATCH).items()}
    return inputs


def _nothing() -> None:
    return None


def unet_variants(unet) -> dict:
    """Every UNet variant: name -> (setup, teardown). ``setup()`` applies it and returns the callable.

    ``+cl`` without ``+graph`` is channels-last run eagerly (the graph wrapper with
    ``cuda_graph=False``); profile_unet.py falls back to it when the profiler cannot see
    inside a graph replay. bench_unet.py times UNET_BENCH.
    """
    def graph(**options):
        return lambda: (graph_module_forward(unet, **options), unet)[1]

    def ours(setup):
        return lambda: (dda.patch(unet), setup())[1]

    def compiled(**options):
        return lambda: torch.compile(unet, fullgraph=True, **options)

    def compiled_cl(**options):
        def setup():
            unet.to(memory_format=torch.channels_last)
            fn = torch.compile(unet, fullgraph=True, **options)
            return lambda sample, *a, **kw: fn(sample.contiguous(memory_format=torch.channels_last), *a, **kw)
        return setup

    contiguous = lambda: unet.to(memory_format=torch.contiguous_format)  # noqa: E731

    ungraph = lambda: ungraph_module(unet)  # noqa: E731
    unpatch = lambda: dda.unpatch(unet)  # noqa: E731
    both = lambda: (ungraph_module(unet), dda.unpatch(unet))  # noqa: E731
    eager_cl = dict(channels_last=True, cuda_graph=False)
    return {
        "stock": (lambda: unet, _nothing),
        "stock+cl": (graph(**eager_cl), ungraph),
        "stock+graph": (graph(), ungraph),
        "stock+graph+cl": (graph(channels_last=True), ungraph),
        "stock+compile": (compiled(), _nothing),
        "stock+compile-ro": (compiled(mode="reduce-overhead"), _nothing),
        "stock+compile-ro+cl": (compiled_cl(mode="reduce-overhead"), contiguous),
        "ours": (ours(lambda: unet), unpatch),
        "ours+cl": (ours(graph(**eager_cl)), both),
        "ours+graph": (ours(graph()), both),
        "ours+graph+cl": (ours(graph(channels_last=True)), both),
        "ours+compile-ro": (ours(compiled(mode="reduce-overhead")), unpatch),
        "ours+compile-ro+cl": (ours(compiled_cl(mode="reduce-overhead")), lambda: (contiguous(), unpatch())),
        "ours-attn+compile-ro+cl": (lambda: (dda.patch(unet, fuse_blocks=False),
                                             compiled_cl(mode="reduce-overhead")())[1],
                                    lambda: (contiguous(), unpatch())),
    }


UNET_BENCH = ("stock", "stock+graph", "stock+graph+cl", "stock+compile", "stock+compile-ro", "stock+compile-ro+cl",
              "ours", "ours+graph", "ours+graph+cl", "ours+compile-ro", "ours+compile-ro+cl", "ours-attn+compile-ro+cl")


def vae_variants(vae) -> dict:
    """VAE decode variants: name -> (setup, teardown); ``setup()`` returns the decode callable."""
    def graph(**options):
        return lambda: (graph_module_forward(vae, "decode", **options), vae.decode)[1]

    both = lambda: (ungraph_module(vae), dda.unpatch(vae))  # noqa: E731
    return {
        "stock": (lambda: vae.decode, _nothing),
        "stock+graph": (graph(), lambda: ungraph_module(vae)),
        "stock+graph+cl": (graph(channels_last=True), lambda: ungraph_module(vae)),
        "ours": (lambda: (dda.patch(vae), vae.decode)[1], lambda: dda.unpatch(vae)),
        "ours+graph": (lambda: (dda.patch(vae), graph()())[1], both),
        "ours+graph+cl": (lambda: (dda.patch(vae), graph(channels_last=True)())[1], both),
    }


def tear_down(row: dict, teardown) -> None:
    """Run a variant's teardown (an error goes into ``row["teardown_error"]``) and free the workspaces."""
    try:
        teardown()
    except Exception as e:  # noqa: BLE001  (report and go on with the other variants)
        row["teardown_error"] = f"{type(e).__name__}: {e}"
    release_workspaces()


def _synchronized_step(call, fn) -> float:
    """Seconds from the call to the end of its kernels, starting from an idle GPU (so the
    call's host time is not hidden behind the previous step's kernels, as it is in ``ms``)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        call(fn)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_switch(unet, fn, call, row: dict) -> None:
    """Time adapter switches on a LoRA UNet (see the module doc), then put the adapters back
    as they were: ``set_adapters_ms`` (diffusers' own call), ``switch_ms`` (the first step
    after it minus a step without a switch, both timed from an idle GPU), ``step_idle_ms``
    (that step) and ``captures``."""
    names = list(unet.peft_config)
    before = (list(unet.active_adapters()), [1.0] + [0.5] * (len(names) - 1))
    settings = [(names[:1], [1.0]), (names, [1.0] + [0.5] * (len(names) - 1)), (names[-1:], [0.8])]
    set_times, step_times, plain_times = [], [], []
    for adapters, weights in settings:
        plain_times.append(_synchronized_step(call, fn))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        unet.set_adapters(adapters, weights=weights)
        set_times.append(time.perf_counter() - t0)
        step_times.append(_synchronized_step(call, fn))
    unet.set_adapters(*before)
    row["set_adapters_ms"] = round(sorted(set_times)[1] * 1e3, 2)
    row["step_idle_ms"] = round(sorted(plain_times)[1] * 1e3, 2)
    row["switch_ms"] = round((sorted(step_times)[1] - sorted(plain_times)[1]) * 1e3, 2)
    stats = getattr(unet.forward, "stats", None)
    if stats is not None:
        row["captures"] = stats["captures"]


def run_variant(name: str, setup, teardown, call, ref, iters: int, after=None) -> dict:
    """Set up, time the first call (compile / capture) and the steady state, check the output;
    ``after(fn, row)`` runs last (the adapter-switch timing)."""
    row = {"variant": name}
    start = time.perf_counter()
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn = setup()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = call(fn).clone()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        if "compile" in name:
            row["compile_s"] = row["first_call_s"]  # the first call is where torch.compile compiles
        with torch.no_grad():
            row["ms"] = round(timing.time_eager(lambda: call(fn), warmup=3, iters=iters), 3)
        row["rel_err"] = None if ref is None else timing.rel_err(out, ref)
        row["finite"] = bool(torch.isfinite(out).all())
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["_out"] = out
        if after is not None:
            after(fn, row)
    except Exception as e:  # noqa: BLE001  (report and go on with the other variants)
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        tear_down(row, teardown)
        torch._dynamo.reset()
        row["variant_s"] = round(time.perf_counter() - start, 1)
    return row


IMAGE_EMBED_DIM = {"sd15": 1024, "sd21": 1024, "sdxl": 1280}  # the IP-Adapters' CLIP image encoders


def bench_unet(name: str, iters: int, compile_: bool, emit, only: set[str] | None = None,
               lora: int = 0, lora_rank: int = 32, ip_adapter: bool = False) -> None:
    """Every UNET_BENCH variant of config ``name`` (those in ``only``, and stock, if given),
    with ``lora`` adapters and an IP-Adapter if asked; ``emit(row)`` gets each result as it comes."""
    from diffusers import UNet2DConditionModel

    from deepspeed_diffusers_attn.random_adapters import add_random_ip_adapter, add_random_lora

    config, latent, px = CONFIGS[name]
    unet = build(UNet2DConditionModel, config)
    inputs = unet_inputs(config, latent)
    label = name
    if lora:
        add_random_lora(unet, names=[chr(ord("a") + i) for i in range(lora)], rank=lora_rank)
        unet.set_adapters(list(unet.peft_config), weights=[1.0] + [0.5] * (lora - 1))
        label += f"+lora{lora}"
    if ip_adapter:
        dim = add_random_ip_adapter(unet, image_embed_dim=IMAGE_EMBED_DIM[name])
        gen = torch.Generator(device="cuda").manual_seed(3)
        embeds = [torch.randn(BATCH, 1, dim, generator=gen, device="cuda", dtype=DTYPE)]
        inputs["added_cond_kwargs"] = {**inputs.get("added_cond_kwargs", {}), "image_embeds": embeds}
        label += "+ip"
    call = lambda fn: fn(**inputs)[0]  # noqa: E731
    table = unet_variants(unet)
    ref = None
    for vname in UNET_BENCH:
        if ("compile" in vname and not compile_) or (only and vname != "stock" and vname not in only):
            continue
        after = (lambda fn, row: measure_switch(unet, fn, call, row)) if lora and "graph" in vname else None
        row = run_variant(vname, *table[vname], call, ref, iters, after)
        if vname == "stock" and "_out" in row:
            ref, row["rel_err"] = row["_out"], 0.0
        row.pop("_out", None)
        row.update(config=label, px=px, latent=latent)
        emit(row)


def bench_vae(iters: int, emit) -> None:
    """VAE decode at 512 and 1024 px, every vae_variants entry; ``emit(row)`` gets each result."""
    from diffusers import AutoencoderKL

    vae = build(AutoencoderKL, SD_VAE)
    for px in (512, 1024):
        z = torch.randn(1, 4, px // 8, px // 8, device="cuda", dtype=DTYPE,
                        generator=torch.Generator(device="cuda").manual_seed(2))
        call = lambda fn: fn(z, return_dict=False)[0]  # noqa: E731
        ref = None
        for vname, (setup, teardown) in vae_variants(vae).items():
            row = run_variant(vname, setup, teardown, call, ref, max(5, iters // 2))
            if vname == "stock" and "_out" in row:
                ref, row["rel_err"] = row["_out"], 0.0
            row.pop("_out", None)
            row.update(config=f"vae-decode@{px}", px=px, latent=px // 8)
            emit(row)


def free_memory() -> None:
    """Return the last model's memory to the driver (it went with its bench function's frame)."""
    gc.collect()
    torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """speedup = baseline ms / variant ms, the baseline being stock+graph+cl (stock+graph where a config has no +cl row).

    Runs again after every row: a config's baseline may change as rows come, so old ratios go first.
    """
    for config in {r["config"] for r in rows}:
        group = [r for r in rows if r["config"] == config and "ms" in r]
        base = next((r for r in group if r["variant"] == BASELINE), None) or \
            next((r for r in group if r["variant"] == "stock+graph"), None)
        for r in group:
            for key in [k for k in r if k.startswith("speedup_vs_")]:
                del r[key]
            if base is not None:
                r["speedup_vs_" + base["variant"]] = round(base["ms"] / r["ms"], 3)


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['config']:>16} {row['variant']:<17} ERROR {row['error']}"
    err = "-" if row.get("rel_err") is None else f"{row['rel_err']:.2e}"
    first = "compile   " if "compile_s" in row else "first call"
    switch = (f"  switch +{row['switch_ms']:.2f} ms over a {row['step_idle_ms']:.1f} ms step from idle "
              f"(set_adapters {row['set_adapters_ms']:.1f} ms), "
              f"{row.get('captures', '?')} captures") if "switch_ms" in row else ""
    return (f"{row['config']:>16} {row['variant']:<17} {row['ms']:9.2f} ms  {first} {row['first_call_s']:7.2f} s  "
            f"peak {row['peak_mem_gb']:6.2f} GB  rel err vs stock {err}{'' if row['finite'] else '  NON-FINITE'}"
            f"{switch}  ({row['variant_s']:.0f} s)")


def chart(path: str, rows: list[dict], title: str) -> None:
    """Horizontal bars of ms per variant, one block per config (PIL only)."""
    from PIL import Image, ImageDraw

    configs = list(dict.fromkeys(r["config"] for r in rows))
    line, w, left = 16, 900, 190
    h = 40 + sum((1 + sum(1 for r in rows if r["config"] == c)) * line + 8 for c in configs)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    y = 32
    for c in configs:
        group = [r for r in rows if r["config"] == c]
        peak = max((r.get("ms", 0) for r in group), default=1) or 1
        d.text((10, y), c, fill="black")
        y += line
        for r in group:
            color = (30, 110, 200) if r["variant"].startswith("ours") else (130, 130, 130)
            d.text((20, y), r["variant"], fill="black")
            if "ms" in r:
                bar = int((w - left - 120) * r["ms"] / peak)
                d.rectangle([left, y + 2, left + bar, y + line - 3], fill=color)
                d.text((left + bar + 6, y), f"{r['ms']:.2f} ms", fill="black")
            else:
                d.text((left, y), "error", fill="red")
            y += line
        y += 8
    img.save(path)


def conditions() -> dict:
    info = timing.card_info()
    info.update(card=info["name"], batch=BATCH, dtype=str(DTYPE))
    try:
        info["attention_kernels"] = {f"D={d}": ops.attention_kernel_name("cuda", DTYPE, d, 4096)
                                     for d in (40, 64, 80, 160, 512)}
    except Exception as e:  # noqa: BLE001
        info["attention_kernels"] = f"unavailable: {e}"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sd15,sd21,sdxl", help="comma-separated subset of sd15,sd21,sdxl")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variants (~1 min each)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default=None, help="comma-separated UNet variant names (default: all)")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--lora", type=int, default=0, help="add a pass with N LoRA adapters on every attention projection")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--ip-adapter", action="store_true", help="add a pass with an IP-Adapter (with --lora: both)")
    parser.add_argument("--adapters-only", action="store_true", help="skip the pass without adapters")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_unet.py: no CUDA device (torch.cuda.is_available() is False); it times GPU runs only")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    only = {v.strip() for v in args.variants.split(",") if v.strip()} if args.variants else None
    if only and only - set(UNET_BENCH):
        raise SystemExit(f"unknown variants {sorted(only - set(UNET_BENCH))}; choose from {list(UNET_BENCH)}")
    os.makedirs(args.out, exist_ok=True)
    info = conditions()
    print(timing.card_line(info))
    print(json.dumps(info))
    t0 = time.perf_counter()
    rows = []

    def emit(row: dict) -> None:
        """Print a result and rewrite results.json with it (a timeout keeps what was measured)."""
        print(_fmt(row), flush=True)
        rows.append(row)
        add_ratios(rows)
        info["total_s"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"conditions": info, "rows": rows}, f, indent=1)

    adapters = dict(lora=args.lora, lora_rank=args.lora_rank, ip_adapter=args.ip_adapter)
    passes = ([] if args.adapters_only else [{}]) + ([adapters] if args.lora or args.ip_adapter else [])
    for name in names:
        for extra in passes:
            bench_unet(name, args.iters, args.compile, emit, only, **extra)
            free_memory()
    if not args.skip_vae:
        bench_vae(args.iters, emit)
    print(f"\n{timing.card_line(info)}\nspeedup vs {BASELINE}; > 1 is faster")
    for r in rows:
        ratio = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
        if ratio is not None:
            extra = f"  compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
            print(f"{r['config']:>16} {r['variant']:<17} {r['ms']:9.2f} ms  x{ratio:.2f}  "
                  f"peak {r['peak_mem_gb']:.2f} GB{extra}")
    chart(os.path.join(args.out, "results.png"), rows,
          f"UNet step / VAE decode, B={BATCH} fp16, {info['card']} (ms, lower is better)")
    print(f"wrote {args.out}/results.json, results.png ({info['total_s']} s)")


if __name__ == "__main__":
    main()
