"""Where a UNet step's GPU time goes: a kernel breakdown from torch.profiler.

    python benchmarks/profile_unet.py --config sd15 [--variants stock+graph+cl,ours+graph+cl] [--steps 5] [--out profile_out]
    python benchmarks/profile_unet.py --config sdxl --lora 2 --skip-vae   # with 2 LoRA adapters
    python benchmarks/profile_unet.py --cpu-smoke     # tiny scaled-down model on the CPU: checks the code paths only

Conditions: bench_unet.py's (its builders, inputs and variant table): batch 2, fp16,
random weights from the real configs, one UNet step of --config, then the VAE decode
(batch 1) at --vae-px. Each variant is set up and called 3 times (so a graph is
captured), timed unprofiled (median of 10 calls, CUDA events: "step ms"), then --steps
calls are profiled with CPU and CUDA activity. Every GPU activity (kernels, memcpy,
memset) is summed by name, divided by --steps and put in a category by ``classify``.
Percentages are of the summed kernel time ("kernel ms"), not of the step: the difference
between step ms and kernel ms is GPU idle time.

Default variants: UNet stock+graph+cl and ours+graph+cl (the strongest setups without a
compiler), VAE stock+graph and ours+graph. CUPTI reports the kernels inside a CUDA-graph
replay; if a graphed variant shows fewer than MIN_KERNELS_PER_STEP kernels per step the
profiler did not see inside the replay, and that variant is profiled eagerly with the
same memory format instead ("stock+graph+cl" -> "stock+cl"); the "mode" row says which.

Names are the only evidence: a cuDNN convolution that runs as a plain GEMM kernel
(sm90_xmma_gemm_*) counts as GEMM, and a copy that changes layout cannot be told from one
that does not (both are "layout/copy"). The top-15 list of each variant shows the names.

Writes profile_<config>.json (every kernel name with its category, ms and count per
step) and profile_<config>.md (the printed tables) to --out. Expected to take about 30 s for
sd15 on an H100 (an estimate, not yet measured).
With --cpu-smoke the "kernels" are the CPU's aten::/dda:: ops (self time), so the numbers
mean nothing; it only checks that setup, profiling, classification and output run.
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
import timing  # noqa: E402  (benchmarks/timing.py: event timing, the card and versions)

timing.add_repo_to_path()

# (category, substrings of the lower-cased name). The first rule that matches wins, so the order
# matters: cuDNN's SDPA kernels also contain "fprop", cuDNN's convolutions "gemm", CUTLASS's fmha
# "cutlass", and torch.cat's kernel (CatArrayBatchedCopy) "copy". Ours are attention_fwd_* (CUDA)
# and dda::attention (CPU), the LoRA B side low_rank_kernel (CUDA) and dda::low_rank_accumulate
# (CPU); a bare "dda" would also match e.g. "...AddAnd...". Anything unmatched
# is "other" (elementwise, activations, upsampling, concatenation, memset, reductions).
RULES = (
    ("attention", ("attention", "flash", "fmha", "sdpa", "scaled_dot_product")),
    ("other", ("catarraybatchedcopy", "memset")),
    ("low_rank", ("low_rank",)),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "permute", "copy", "memcpy", "contiguous", "clone")),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd", "cudnn")),
    ("gemm", ("gemm", "gemv", "cutlass", "cublas", "xmma", "nvjet", "splitkreduce", "matmul", "addmm", "::mm",
              "bmm", "linear")),
    ("norm", ("norm", "rowwisemoments", "computefusedparams")),
)
LABELS = {"attention": "attention", "low_rank": "LoRA B side (dda low_rank)", "gemm": "GEMM", "conv": "convolution",
          "norm": "GroupNorm/LayerNorm",
          "layout": "layout/copy", "other": "elementwise/other"}
CATEGORIES = tuple(LABELS)

# GPU-timeline events that are waits, not work (only present when sync events are enabled).
NOT_WORK = ("Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event")
MIN_KERNELS_PER_STEP = 20  # a UNet step is ~1000 kernels, a VAE decode ~200; graph replay alone is 0-3
TOP = 15
# Those of bench_unet.unet_variants / vae_variants that can be profiled here (no torch.compile:
# Inductor's fused kernel names would defeat the rules).
UNET_VARIANTS = ("stock", "stock+cl", "stock+graph", "stock+graph+cl", "ours", "ours+cl", "ours+graph",
                 "ours+graph+cl")
VAE_VARIANTS = ("stock", "stock+graph", "ours", "ours+graph")


def classify(name: str) -> str:
    """The category of a kernel (or CPU op) name, by the first matching rule of RULES."""
    low = name.lower()
    for category, needles in RULES:
        if any(n in low for n in needles):
            return category
    return "other"


def eager_equivalent(variant: str) -> str:
    """The variant without its CUDA graph, same memory format ("ours+graph+cl" -> "ours+cl")."""
    return variant.replace("+graph", "")


# ---------------------------------------------------------------------- profiling
def activities(cuda: bool) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def profiled_work(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, µs) of every GPU activity; on the CPU, of every aten::/dda:: op (self time)."""
    from torch.autograd import DeviceType

    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == DeviceType.CUDA and not e.name.startswith(NOT_WORK)]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.device_type == DeviceType.CPU and e.name.startswith(("aten::", "dda::"))]


def breakdown(work: list[tuple[str, float]], steps: int) -> dict:
    """Per-step totals: by category and by kernel name (sorted by time)."""
    by_name: dict[str, list] = {}
    for name, us in work:
        acc = by_name.setdefault(name, [0.0, 0])
        acc[0] += us
        acc[1] += 1
    total_ms = sum(us for us, _ in by_name.values()) / steps / 1e3
    cats = {c: {"ms": 0.0, "pct": 0.0, "count": 0.0} for c in CATEGORIES}
    kernels = []
    for name, (us, n) in by_name.items():
        cat = classify(name)
        ms = us / steps / 1e3
        cats[cat]["ms"] += ms
        cats[cat]["count"] += n / steps
        kernels.append({"name": name, "category": cat, "ms": round(ms, 4), "count": round(n / steps, 2),
                        "pct": round(100 * ms / total_ms, 2) if total_ms else 0.0})
    for c in cats.values():
        c["pct"] = round(100 * c["ms"] / total_ms, 2) if total_ms else 0.0
        c["ms"] = round(c["ms"], 4)
        c["count"] = round(c["count"], 2)
    kernels.sort(key=lambda k: -k["ms"])
    return {"kernel_ms": round(total_ms, 4), "kernel_count": round(len(work) / steps, 2),
            "categories": cats, "kernels": kernels}


def profile_variant(name: str, table: dict, call, steps: int, cuda: bool, fallback: bool = True) -> dict:
    """Set up ``table[name]``, warm up, time, profile ``steps`` calls, tear down; errors are recorded."""
    import bench_unet as bu

    if not cuda and "+graph" in name:  # graphs need CUDA: the smoke run takes the eager path directly
        name = eager_equivalent(name)
    setup, teardown = table[name]
    res = {"variant": name, "mode": "graph replay" if "+graph" in name else "eager"}
    t0 = time.perf_counter()
    try:
        fn = setup()
        with torch.no_grad():
            for _ in range(3):
                call(fn)
            if cuda:
                torch.cuda.synchronize()
            res["step_ms"] = round(timing.time_eager(lambda: call(fn), warmup=1, iters=10, use_cuda=cuda), 3)
            with torch.profiler.profile(activities=activities(cuda)) as prof:
                for _ in range(steps):
                    call(fn)
                if cuda:
                    torch.cuda.synchronize()
        res.update(breakdown(profiled_work(prof, cuda), steps))
    except Exception as e:  # noqa: BLE001  (report and go on with the other variants)
        res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        bu.tear_down(res, teardown)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if fallback and "+graph" in name and "error" not in res:
        visible = sum(k["count"] for k in res["kernels"] if not k["name"].startswith(("Memcpy", "Memset")))
        if visible < MIN_KERNELS_PER_STEP:
            eager = profile_variant(eager_equivalent(name), table, call, steps, cuda, fallback=False)
            eager["mode"] = (f"eager, for {name}: the profiler saw {visible:g} kernels per step "
                             "inside the graph replay")
            return eager
    return res


# ---------------------------------------------------------------------- sections
def profile_section(title: str, variants: list[str], table: dict, call, steps: int, cuda: bool) -> dict:
    """Profile each of ``variants`` from ``table``; prints a line per variant as it ends."""
    out = {"section": title, "variants": []}
    for v in variants:
        res = profile_variant(v, table, call, steps, cuda)
        out["variants"].append(res)
        print(_progress(title, res), flush=True)
    return out


def profile_unet(config_name: str, variants: list[str], steps: int, device: str, dtype, smoke: bool,
                 lora: int = 0, lora_rank: int = 32) -> dict:
    """One section: the UNet of ``config_name``, with ``lora`` PEFT adapters of ``lora_rank`` on
    every attention projection when asked (bench_unet's adapters and weights)."""
    from diffusers import UNet2DConditionModel

    import bench_unet as bu
    from deepspeed_diffusers_attn.configs import scaled_down
    from deepspeed_diffusers_attn.random_adapters import add_random_lora

    config, latent, px = bu.CONFIGS[config_name]
    if smoke:
        config, latent, px = scaled_down(config), 16, 128
    unet = bu.build(UNet2DConditionModel, config, device, dtype)
    inputs = bu.unet_inputs(config, latent, device, dtype)
    label = config_name
    if lora:
        add_random_lora(unet, names=[chr(ord("a") + i) for i in range(lora)], rank=lora_rank)
        unet.set_adapters(list(unet.peft_config), weights=[1.0] + [0.5] * (lora - 1))
        label += f"+lora{lora} (rank {lora_rank})"
    return profile_section(f"UNet {label} @ {px} px, B={bu.BATCH} (latent {latent})", variants,
                           bu.unet_variants(unet), lambda fn: fn(**inputs)[0], steps, device == "cuda")


def profile_vae(px: int, variants: list[str], steps: int, device: str, dtype, smoke: bool) -> dict:
    from diffusers import AutoencoderKL

    import bench_unet as bu
    from deepspeed_diffusers_attn.configs import SD_VAE, scaled_down

    config = scaled_down(SD_VAE) if smoke else SD_VAE
    px = 64 if smoke else px
    vae = bu.build(AutoencoderKL, config, device, dtype)
    z = torch.randn(1, 4, px // 8, px // 8, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(2))
    return profile_section(f"VAE decode @ {px} px, B=1", variants, bu.vae_variants(vae),
                           lambda fn: fn(z, return_dict=False)[0], steps, device == "cuda")


# ---------------------------------------------------------------------- tables
def _progress(section: str, res: dict) -> str:
    if "error" in res:
        return f"{section}: {res['variant']}: ERROR {res['error']}"
    return (f"{section}: {res['variant']} ({res['mode']}): step {res['step_ms']:.2f} ms, kernels "
            f"{res['kernel_ms']:.2f} ms in {res['kernel_count']:g} launches ({res['wall_s']:.0f} s)")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _short(name: str, width: int = 100) -> str:
    name = name[5:] if name.startswith("void ") else name
    return name if len(name) <= width else name[: width - 3] + "..."


def category_table(section: dict) -> list[str]:
    """Markdown: one row per category, (ms, %, count) per variant side by side."""
    vs = section["variants"]
    head = "| category | " + " | ".join(f"{_cell(v['variant'])} ms | % | n" for v in vs) + " |"
    lines = [f"### {section['section']}", "", head, "|---|" + "---:|---:|---:|" * len(vs)]
    for c in CATEGORIES:
        cells = []
        for v in vs:
            s = v.get("categories", {}).get(c)
            cells.append("- | - | -" if s is None else f"{s['ms']:.3f} | {s['pct']:.1f}% | {s['count']:g}")
        lines.append(f"| {LABELS[c]} | " + " | ".join(cells) + " |")
    cells = ["- | - | -" if "error" in v else f"**{v['kernel_ms']:.3f}** | 100% | {v['kernel_count']:g}" for v in vs]
    lines.append("| **kernel sum** | " + " | ".join(cells) + " |")
    cells = ["- | | " if "error" in v else f"{v['step_ms']:.3f} | {100 * v['kernel_ms'] / v['step_ms']:.0f}% busy | "
             for v in vs]
    lines.append("| step (unprofiled) | " + " | ".join(cells) + " |")
    lines.append("| mode | " + " | ".join(_cell(v.get("error") or v["mode"]) + " | | " for v in vs) + " |")
    return lines + [""]


def top_table(section: dict, res: dict) -> list[str]:
    """Markdown: the TOP kernels of one variant by time per step."""
    lines = [f"#### {section['section']}: {res['variant']}, top {TOP} kernels", "",
             "| # | kernel | category | ms/step | % | n/step |", "|---:|---|---|---:|---:|---:|"]
    for i, k in enumerate(res.get("kernels", [])[:TOP], 1):
        lines.append(f"| {i} | `{_cell(_short(k['name']))}` | {LABELS[k['category']]} | {k['ms']:.3f} | "
                     f"{k['pct']:.1f}% | {k['count']:g} |")
    return lines + [""]


def report(info: dict, sections: list[dict], title: str) -> list[str]:
    """The whole markdown: conditions, per-variant top lists, then the category tables (last, so a
    log's tail shows them)."""
    lines = [f"## {title}", "", timing.card_line(info), ""]
    for s in sections:
        for v in s["variants"]:
            if "error" not in v:
                lines += top_table(s, v)
    for s in sections:
        lines += category_table(s)
    return lines


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd15", choices=("sd15", "sd21", "sdxl"))
    parser.add_argument("--variants", default="stock+graph+cl,ours+graph+cl",
                        help="UNet variants (bench_unet.unet_variants, compile ones excluded)")
    parser.add_argument("--vae-variants", default="stock+graph,ours+graph")
    parser.add_argument("--vae-px", type=int, default=512, help="VAE decode size in pixels (multiple of 8)")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="profiled calls per variant")
    parser.add_argument("--lora", type=int, default=0,
                        help="profile the UNet with N PEFT LoRA adapters on every attention projection")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="scaled-down fp32 models on the CPU, CPU ops instead of kernels: checks the code only")
    parser.add_argument("--out", default="profile_out")
    args = parser.parse_args()
    unet_vs = [v.strip() for v in args.variants.split(",") if v.strip()]
    vae_vs = [v.strip() for v in args.vae_variants.split(",") if v.strip()]
    bad = [v for v in unet_vs if v not in UNET_VARIANTS] + [v for v in vae_vs if v not in VAE_VARIANTS]
    if bad or args.steps < 1 or args.vae_px % 8:
        sys.exit(f"profile_unet.py: bad arguments {bad or ''}; UNet variants: {', '.join(UNET_VARIANTS)}; "
                 f"VAE variants: {', '.join(VAE_VARIANTS)}; --steps >= 1; --vae-px a multiple of 8")
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("profile_unet.py: no CUDA device (torch.cuda.is_available() is False); "
                 "use --cpu-smoke to check the script on a CPU")

    import bench_unet as bu  # imports deepspeed_diffusers_attn (the built extension)

    device, dtype = ("cuda", bu.DTYPE) if cuda else ("cpu", torch.float32)
    info = timing.card_info()
    info.update(card=info["name"], dtype=str(dtype), steps=args.steps, cpu_smoke=args.cpu_smoke,
                rules=[[c, list(n)] for c, n in RULES])
    print(timing.card_line(info), flush=True)
    t0 = time.perf_counter()
    sections = [profile_unet(args.config, unet_vs, args.steps, device, dtype, args.cpu_smoke, args.lora,
                             args.lora_rank)]
    if cuda:
        gc.collect()  # the UNet went with profile_unet's frame
        torch.cuda.empty_cache()
    if not args.skip_vae:
        sections.append(profile_vae(args.vae_px, vae_vs, args.steps, device, dtype, args.cpu_smoke))
    info["total_s"] = round(time.perf_counter() - t0, 1)

    stem = (f"profile_{args.config}" + (f"_lora{args.lora}" if args.lora else "")
            + ("_cpu_smoke" if args.cpu_smoke else ""))
    title = (f"Kernel time per call, {args.config}, {info['card']}"
             + (" (CPU SMOKE RUN: CPU ops, scaled-down model; not a measurement)" if args.cpu_smoke else ""))
    lines = report(info, sections, title)
    print("\n" + "\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"conditions": info, "sections": sections}, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/{stem}.json, {stem}.md ({info['total_s']} s)")
    if any("error" in v for s in sections for v in s["variants"]):
        sys.exit("profile_unet.py: some variants failed (see ERROR above)")


if __name__ == "__main__":
    main()
