"""Attention forward on Stable Diffusion and DiT shapes: our ``ops.attention`` vs every SDPA backend.

    python benchmarks/bench_attention.py --out DIR [--shapes sd,dit,d128|NAMES] [--dtype fp16|bf16]
                                         [--values randn,grid,uniform] [--impls ours,cudnn,...] [--quick]
    python benchmarks/bench_attention.py --dry-run      # CPU, fp32, tiny shapes: checks the script

Shapes, each in its model family's dtype; --dtype fp16|bf16 runs every selected shape in that
one instead (the two d128 rows then merge):
  sd    (fp16)  SD1.5 / SD2.1 / SDXL self- and cross-attention (B=2, classifier-free guidance)
                and the VAE mid-block's 1x1x4096^2 d512
  dit   (bf16)  SD3-medium joint self 1x24x4429^2 d64 (4096 image + 333 text tokens), Flux.1
                1x24x4608^2 d128 (4096 + 512), Wan2.1-T2V-1.3B at 480x832x81 frames: self
                1x12x32760^2 d128 and cross 1x12x32760x512 d128 (the T5 tokens)
  d128          2x16x8192^2 d128, once in fp16 and once in bf16
--shapes takes group names and/or substrings of shape names and descriptions ("dit,d128",
"wan", "sd15,vae"); a group name selects its group only ("sd" is not a substring match for
"sd3"). Default: every shape.

Input values (--values, comma-separated; each shape runs once per kind, the kinds adjacent):
  randn    N(0, 1), the default
  grid     k/256 for k uniform over the integers in [-255, 255]: what the C harness feeds
           (csrc/tests/attention_harness.cu, Rng::grid); at most 8 significant bits, so exact
           in fp16 and bf16
  uniform  U(-1, 1) at full precision: grid's range with randn's full mantissas, which tells a
           value-range effect from a bit-pattern one
Why: a tensor core's power draw depends on the bits it multiplies; if the card reaches its power
limit, the SM clock drops and one kernel runs slower on busier data. To see whether it does, the
SM clock, the power draw and NVML's clock-limit reasons (sw_power_cap, hw_slowdown, ...) are
sampled every 50 ms during each timed measurement and once right after it (timing.GpuMonitor;
needs pynvml, from nvidia-ml-py; skipped without it), printed per row and stored per
implementation as gpu_eager / gpu_graph in bench_attention.json. NVML averages power over up to
1 s: use --budget-ms 1000 when the watts matter.

FLOPs = 4*B*H*Sq*Sk*D. Bytes = q and o once, k and v once, in the benchmark dtype.
Floors: FLOPs / 790 TFLOP/s and bytes / HBM (3.35 TB/s H100, 4.8 TB/s H200); see
/work/shared/KERNELS.md. "%floor" = floor / time.

Layouts, each implementation's best case:
- ours: q, k, v as our projections leave them: views of a packed qkv [B, S, 3, H, D]
  (self-attention) or q [B, Sq, H, D] + packed kv [B, Sk, 2, H, D] (cross-attention);
- SDPA: contiguous [B, H, S, D] tensors made outside the timed region.
Each SDPA backend is timed on its own (sdpa_kernel restricted to it), plus the default
dispatch; a backend that refuses a shape is reported as "n/a (reason)"; --impls times a subset.
Every output is compared with the SDPA math backend in fp32 (||out - ref|| / ||ref||), computed
on the GPU in chunks of at most 2^28 fp32 scores (1 GiB) over (B, H) and query rows. The largest,
Wan self, is 6.6 TFLOP in fp32 (TF32 off) and ~200 GB of score traffic: estimated under 1 s on
an H200, so every shape is checked in full; the time is printed ("ref N s") and stored as ref_s.
Shapes whose best eager time is under --graph-below-us are also timed under CUDA-graph
replay (--calls-per-graph calls captured per graph), where launch overhead disappears.
Inputs rotate over several sets so small shapes do not just measure the L2 cache.

Device time on an H200 (estimated from the per-measurement budget, not yet measured; the script
prints its total), process start-up included, the extension's build not: every shape at randn
~45 s; --shapes dit ~25 s; --shapes dit,d128 --values randn,grid ~40 s, ~1 min with
--budget-ms 1000. Only d128-8192 (~1.8 ms per call) and Wan self (~11 ms, 6.6 TFLOP) fill
their measurement budget; every other row stops at --iters.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

timing.add_repo_to_path()
from deepspeed_diffusers_attn import ops  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None


class Shape(NamedTuple):
    name: str
    group: str  # what --shapes selects by group name: "sd", "dit" or "d128"
    desc: str
    B: int
    H: int
    Sq: int
    Sk: int
    D: int
    is_self: bool  # packed qkv [B, S, 3, H, D]; else q [B, Sq, H, D] + packed kv [B, Sk, 2, H, D]
    dtype: str  # "fp16" / "bf16": the model family's; --dtype overrides it


SHAPES = [
    Shape("sd15-4096-d40", "sd", "SD1.5 self 2x8x4096^2 d40", 2, 8, 4096, 4096, 40, True, "fp16"),
    Shape("sd15-1024-d80", "sd", "SD1.5 self 2x8x1024^2 d80", 2, 8, 1024, 1024, 80, True, "fp16"),
    Shape("sd15-256-d160", "sd", "SD1.5 self 2x8x256^2 d160", 2, 8, 256, 256, 160, True, "fp16"),
    Shape("sd15-x77-d40", "sd", "SD1.5 cross 2x8x4096x77 d40", 2, 8, 4096, 77, 40, False, "fp16"),
    Shape("sd21-9216-d64", "sd", "SD2.1 self 2x5x9216^2 d64", 2, 5, 9216, 9216, 64, True, "fp16"),
    Shape("sdxl-4096-d64", "sd", "SDXL self 2x10x4096^2 d64", 2, 10, 4096, 4096, 64, True, "fp16"),
    Shape("sdxl-1024-d64", "sd", "SDXL self 2x20x1024^2 d64", 2, 20, 1024, 1024, 64, True, "fp16"),
    Shape("sdxl-x77-d64", "sd", "SDXL cross 2x10x4096x77 d64", 2, 10, 4096, 77, 64, False, "fp16"),
    Shape("vae-4096-d512", "sd", "VAE mid 1x1x4096^2 d512", 1, 1, 4096, 4096, 512, True, "fp16"),
    Shape("sd3-4429-d64", "dit", "SD3 joint self 1x24x4429^2 d64 (4096 image + 333 text)",
          1, 24, 4429, 4429, 64, True, "bf16"),
    Shape("flux-4608-d128", "dit", "Flux self 1x24x4608^2 d128 (4096 image + 512 text)",
          1, 24, 4608, 4608, 128, True, "bf16"),
    Shape("wan-32760-d128", "dit", "Wan2.1-1.3B self 1x12x32760^2 d128", 1, 12, 32760, 32760, 128, True, "bf16"),
    Shape("wan-x512-d128", "dit", "Wan2.1-1.3B cross 1x12x32760x512 d128", 1, 12, 32760, 512, 128, False, "bf16"),
    Shape("d128-8192", "d128", "d128 long 2x16x8192^2", 2, 16, 8192, 8192, 128, True, "fp16"),
    Shape("d128-8192", "d128", "d128 long 2x16x8192^2", 2, 16, 8192, 8192, 128, True, "bf16"),
]
GROUPS = ("sd", "dit", "d128")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
VALUES = ("randn", "grid", "uniform")

IMPLS = ["ours", "flash", "efficient", "cudnn", "default"]
_BACKEND_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
NOT_SELECTED = "not timed (--impls)"


def _list_arg(p, text, allowed, option):
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        p.error(f"{option}: {', '.join(bad) or 'empty'} not in {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for bench_attention.json / .png")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated group names ({', '.join(GROUPS)}) and/or substrings of shape "
                        "names / descriptions (default: every shape)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="run every shape in this dtype (default: each shape's own: sd fp16, dit bf16, "
                        "d128 both)")
    p.add_argument("--values", default="randn",
                   help=f"comma-separated input value kinds ({', '.join(VALUES)}); each shape runs once per "
                        "kind (default randn)")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma-separated implementations to time (default all: {', '.join(IMPLS)})")
    p.add_argument("--iters", type=int, default=None, help="max timed iterations (default 100, quick 30)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time budget per measurement (default 300 ms, quick 100 ms)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--graph-below-us", type=float, default=50.0,
                   help="also time under CUDA-graph replay when the best eager time is below this (default 50 us)")
    p.add_argument("--calls-per-graph", type=int, default=20, help="calls captured per CUDA graph (default 20)")
    p.add_argument("--replays", type=int, default=20, help="timed replays per graph (default 20)")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference check")
    p.add_argument("--precision", default="exact", choices=ops.attention_precisions(),
                   help="our attention's precision; the rows name it, and where the device cannot run it, "
                        "ours' error says why")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, tiny shapes: run every non-CUDA code path once")
    args = p.parse_args(argv)
    args.values = _list_arg(p, args.values, VALUES, "--values")
    args.impls = _list_arg(p, args.impls, IMPLS, "--impls")
    args.iters = args.iters or (30 if args.quick else 100)
    args.budget_ms = args.budget_ms or (100.0 if args.quick else 300.0)
    if args.dry_run:
        args.iters, args.budget_ms = 3, 20.0
        args.graph_below_us = math.inf  # walk the graph branch (time_graph returns None on CPU)
    return args


def select_shapes(filt, dtype=None):
    """The shapes ``filt`` names (group names, or substrings of shape names / descriptions),
    in table order; with ``dtype`` ("fp16" / "bf16") every one in that dtype, duplicates dropped."""
    keys = [k.strip().lower() for k in (filt or "").split(",") if k.strip()]

    def chosen(s):
        return not keys or any(
            k == s.group if k in GROUPS else (k in s.name.lower() or k in s.desc.lower()) for k in keys)

    out = []
    for s in SHAPES:
        s = s._replace(dtype=dtype) if dtype else s
        if chosen(s) and s not in out:
            out.append(s)
    return out


def shrink(shape):
    """A tiny CPU version of a shape for --dry-run (same D, same self/cross kind, same Sk for cross)."""
    sq = min(shape.Sq, 48)
    return shape._replace(desc=shape.desc + " [dry-run]", B=1, H=min(shape.H, 2), Sq=sq,
                          Sk=sq if shape.is_self else shape.Sk)


def label(res):
    """A row's name in charts: shape, dtype and (when not randn) the input values."""
    return f"{res['name']} {res['dtype']}" + ("" if res["values"] == "randn" else f" {res['values']}")


# ---------------------------------------------------------------------- inputs
def draw(size, values, dtype, device, g):
    """A tensor of ``size`` with input values of kind ``values`` (see the module docstring)."""
    if values == "randn":
        return torch.randn(size, device=device, dtype=dtype, generator=g)
    if values == "grid":  # the C harness's Rng::grid; k/256 with |k| <= 255 is exact in fp16 and bf16
        k = torch.randint(-255, 256, size, device=device, dtype=torch.int16, generator=g)
        return k.to(dtype) / 256
    return (torch.rand(size, device=device, dtype=torch.float32, generator=g) * 2 - 1).to(dtype)


def make_set(shape, values, dtype, device, seed):
    """One input set: ours = (q, k, v) views of the packed projection output; sdpa = the
    same values as contiguous [B, H, S, D]."""
    B, H, Sq, Sk, D = shape.B, shape.H, shape.Sq, shape.Sk, shape.D
    g = torch.Generator(device=device).manual_seed(seed)
    if shape.is_self:
        qkv = draw((B, Sq, 3, H, D), values, dtype, device, g)
        q, k, v = qkv.unbind(2)  # [B, S, H, D], row stride 3*H*D
    else:
        q = draw((B, Sq, H, D), values, dtype, device, g)
        kv = draw((B, Sk, 2, H, D), values, dtype, device, g)
        k, v = kv.unbind(2)  # [B, Sk, H, D], row stride 2*H*D
    sdpa = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, S, D]
    return {"ours": (q, k, v), "sdpa": sdpa}


@torch.inference_mode()
def reference(qs, ks, vs, max_elems=2**28):
    """SDPA math backend in fp32: [B, H, Sq, D]. Chunked over (B, H), and over query rows
    where one head's Sq x Sk scores exceed ``max_elems``, so the fp32 scores of a chunk stay
    under ``max_elems`` (Wan self has 1.07e9 per head)."""
    B, H, Sq, D = qs.shape
    Sk = ks.shape[2]
    q, k, v = (t.reshape(B * H, -1, D) for t in (qs, ks, vs))
    out = torch.empty(B * H, Sq, D, dtype=torch.float32, device=qs.device)
    heads = max(1, max_elems // (Sq * Sk))
    rows = min(Sq, max(1, max_elems // Sk))
    ctx = sdpa_kernel([SDPBackend.MATH]) if sdpa_kernel is not None else contextlib.nullcontext()
    with ctx:
        for i in range(0, B * H, heads):
            kf, vf = k[i : i + heads].float(), v[i : i + heads].float()
            for r in range(0, Sq, rows):
                out[i : i + heads, r : r + rows] = F.scaled_dot_product_attention(
                    q[i : i + heads, r : r + rows].float(), kf, vf)
    return out.view(B, H, Sq, D)


def backend_ctx(impl):
    """The sdpa_kernel context restricting SDPA to ``impl``'s backend (nullcontext for default)."""
    if impl == "default":
        return contextlib.nullcontext()
    if sdpa_kernel is None:
        raise RuntimeError("torch.nn.attention.sdpa_kernel is not available in this torch")
    backend = getattr(SDPBackend, _BACKEND_NAMES[impl], None)
    if backend is None:
        raise RuntimeError(f"SDPBackend.{_BACKEND_NAMES[impl]} does not exist in torch {torch.__version__}")
    return sdpa_kernel([backend])


def probe(fn):
    """Run fn once; returns (output, None) or (None, reason) with torch's warnings as the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except Exception as e:  # a refusal must not end the benchmark
            reasons = [str(w.message).strip().splitlines()[0] for w in caught]
            # torch prints a header per backend and "runtime disabled" for the excluded ones.
            reasons = [r for r in reasons if r and not r.rstrip().endswith("because:")
                       and "runtime disabled" not in r]
            text = "; ".join(reasons) if reasons else timing.short_error(e)
            return None, text[:110] + ("..." if len(text) > 110 else "")


# ---------------------------------------------------------------------- one shape
def bench_shape(shape, values, args, card, device):
    """One row: ``shape`` with inputs of kind ``values``, every selected implementation."""
    B, H, Sq, Sk, D, is_self = shape.B, shape.H, shape.Sq, shape.Sk, shape.D, shape.is_self
    cuda = device.type == "cuda"
    dtype = torch.float32 if args.dry_run else DTYPES[shape.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    flops = 4.0 * B * H * Sq * Sk * D
    nbytes = float(esize * B * H * D * (2 * Sq + 2 * Sk))
    fl = timing.floors(flops, nbytes, card)
    rot = timing.Rotation(lambda i: make_set(shape, values, dtype, device, 1000 + i),
                          int(nbytes), max_sets=2 if args.dry_run else 16)
    kernel = ops.attention_kernel_for(*rot.sets[0]["ours"][:3], precision=args.precision)  # for these tensors
    res = {
        "name": shape.name, "group": shape.group, "desc": shape.desc,
        "dtype": shape.dtype, "run_dtype": str(dtype).replace("torch.", ""),  # float32 in a dry run
        "values": values, "B": B, "H": H, "Sq": Sq, "Sk": Sk, "D": D, "precision": args.precision,
        "layout": "packed qkv [B,S,3,H,D]" if is_self else "q [B,Sq,H,D] + packed kv [B,Sk,2,H,D]",
        "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "floor": fl, "kernel": kernel,
        "input_sets": rot.n, "ref_s": None, "impls": {},
    }
    ref = None
    if not args.no_check:
        t0 = time.perf_counter()
        ref = reference(*rot.sets[0]["sdpa"])
        if cuda:
            torch.cuda.synchronize()
        res["ref_s"] = time.perf_counter() - t0

    def ours_fn():
        return ops.attention(*rot.next()["ours"], precision=args.precision)

    def sdpa_fn():
        return F.scaled_dot_product_attention(*rot.next()["sdpa"])

    for impl in IMPLS:
        r = res["impls"][impl] = {"eager_ms": None, "graph_ms": None, "rel_err": None, "error": None,
                                  "gpu_eager": None, "gpu_graph": None}
        if impl not in args.impls:
            r["error"] = NOT_SELECTED
            continue
        fn = ours_fn if impl == "ours" else sdpa_fn
        try:
            ctx = contextlib.nullcontext() if impl == "ours" else backend_ctx(impl)
        except RuntimeError as e:
            r["error"] = timing.short_error(e)
            continue
        with ctx:
            if impl == "ours":
                out, err = probe(lambda: ops.attention(*rot.sets[0]["ours"], precision=args.precision)[0]
                                 .transpose(1, 2))
            else:
                out, err = probe(lambda: F.scaled_dot_product_attention(*rot.sets[0]["sdpa"]))
            if err is not None:
                r["error"] = err
                continue
            if ref is not None:
                r["rel_err"] = timing.rel_err(out, ref)
            del out
            with timing.GpuMonitor(cuda) as mon:
                r["eager_ms"] = timing.time_eager(
                    fn, warmup=10, iters=args.iters, budget_ms=args.budget_ms, use_cuda=cuda)
            r["gpu_eager"] = mon.summary()

    timed = [r["eager_ms"] for r in res["impls"].values() if r["eager_ms"] is not None]
    res["graph_timed"] = bool(timed) and min(timed) * 1e3 < args.graph_below_us
    if res["graph_timed"]:
        for impl in IMPLS:
            r = res["impls"][impl]
            if r["eager_ms"] is None:
                continue
            fn = ours_fn if impl == "ours" else sdpa_fn
            try:
                with contextlib.nullcontext() if impl == "ours" else backend_ctx(impl):
                    with timing.GpuMonitor(cuda) as mon:
                        r["graph_ms"] = timing.time_graph(
                            fn, args.calls_per_graph, args.replays, budget_ms=2 * args.budget_ms, use_cuda=cuda)
                    r["gpu_graph"] = mon.summary()
                if r["graph_ms"] is None:
                    r["graph_error"] = "no CUDA"
            except Exception as e:
                r["graph_error"] = "capture failed: " + timing.short_error(e, 70)
                torch.cuda.synchronize()

    for r in res["impls"].values():
        for mode in ("eager", "graph"):
            ms = r[f"{mode}_ms"]
            r[f"{mode}_tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
            r[f"{mode}_floor_frac"] = fl["floor_us"] / (ms * 1e3) if ms else None
    for mode in ("eager", "graph"):
        ours = res["impls"]["ours"][f"{mode}_ms"]
        cands = [(r[f"{mode}_ms"], k) for k, r in res["impls"].items() if k != "ours" and r[f"{mode}_ms"]]
        best = min(cands) if cands else None
        res[f"best_backend_{mode}"] = best[1] if best else None
        res[f"speedup_{mode}"] = best[0] / ours if best and ours else None
    del rot, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def print_shape(res):
    fl = res["floor"]
    ref = "" if res["ref_s"] is None else f"; ref {res['ref_s']:.1f} s"
    precision = "" if res["precision"] == "exact" else f", ours in {res['precision']}"
    print(f"\n== {res['desc']} {res['dtype']}, {res['values']} inputs{precision}  ({res['gflop']:.2f} GFLOP, "
          f"{res['mbytes']:.1f} MB, floor {fl['floor_us']:.1f} us {fl['bound']}-bound; {res['input_sets']} "
          f"input sets{ref}) kernel: {res['kernel']}")
    for impl, r in res["impls"].items():
        if r["eager_ms"] is None:
            print(f"  {impl:9s} {r['error']}" if r["error"] == NOT_SELECTED else f"  {impl:9s} n/a ({r['error']})")
            continue
        line = (f"  {impl:9s} eager {r['eager_ms'] * 1e3:9.1f} us {r['eager_tflops']:7.1f} TFLOP/s "
                f"{100 * r['eager_floor_frac']:5.1f}% floor  err {timing.fmt(r['rel_err'], '.1e')}")
        if r["gpu_eager"]:
            line += f"  {timing.gpu_text(r['gpu_eager'])}"
        if r["graph_ms"] is not None:
            line += (f" | graph {r['graph_ms'] * 1e3:8.1f} us {r['graph_tflops']:7.1f} TFLOP/s "
                     f"{100 * r['graph_floor_frac']:5.1f}% floor")
        elif r.get("graph_error"):
            line += f" | graph n/a ({r['graph_error']})"
        print(line, flush=True)


def us(r, mode="eager"):
    ms = r[f"{mode}_ms"]
    if ms is None:
        return "-" if r["error"] == NOT_SELECTED else "n/a"
    return f"{ms * 1e3:.1f}"


def gpu_cells(r):
    """Median SM MHz and W of an implementation's eager measurement, as table cells."""
    g = r["gpu_eager"] or {}
    return timing.fmt(g.get("sm_mhz_median"), ".0f"), timing.fmt(g.get("power_w_median"), ".0f")


def summary(results, card):
    """The compact final table (the device tool returns only the end of the output)."""
    f = timing.fmt
    lines = ["", "=" * 30 + " attention summary (us per call; speedup = best SDPA / ours) " + "=" * 30,
             timing.card_line(card),
             f"{'shape':14s} {'dtype':5s} {'values':7s} {'floor':>7s} {'ours':>8s} {'TF/s':>6s} {'%flr':>5s} "
             f"{'flash':>8s} {'effic':>8s} {'cudnn':>8s} {'default':>8s} {'best':>7s} {'speedup':>7s} "
             f"{'err ours':>8s} {'err best':>8s} {'MHz':>5s} {'W':>4s}"]
    for res in results:
        im = res["impls"]
        o = im["ours"]
        best = res["best_backend_eager"]
        mhz, watts = gpu_cells(o)
        lines.append(
            f"{res['name']:14s} {res['dtype']:5s} {res['values']:7s} "
            f"{res['floor']['floor_us']:6.1f}{res['floor']['bound'][0]} {us(o):>8s} "
            f"{f(o['eager_tflops']):>6s} {f(o['eager_floor_frac'] and 100 * o['eager_floor_frac']):>5s} "
            f"{us(im['flash']):>8s} {us(im['efficient']):>8s} {us(im['cudnn']):>8s} {us(im['default']):>8s} "
            f"{(best or '-'):>7s} {f(res['speedup_eager'], '.2f'):>7s} "
            f"{f(o['rel_err'], '.1e'):>8s} {f(best and im[best]['rel_err'], '.1e'):>8s} {mhz:>5s} {watts:>4s}")
    lines.append("(MHz, W: median SM clock and power draw during ours' eager measurement)")
    graphed = [r for r in results if r["graph_timed"]]
    if graphed:
        lines.append("-- CUDA-graph replay (us per call) --")
        lines.append(f"{'shape':14s} {'dtype':5s} {'values':7s} {'ours':>8s} {'flash':>8s} {'effic':>8s} "
                     f"{'cudnn':>8s} {'default':>8s} {'best':>7s} {'speedup':>7s} {'ours %flr':>9s}")
        for res in graphed:
            im = res["impls"]
            o = im["ours"]
            lines.append(
                f"{res['name']:14s} {res['dtype']:5s} {res['values']:7s} {us(o, 'graph'):>8s} "
                f"{us(im['flash'], 'graph'):>8s} {us(im['efficient'], 'graph'):>8s} {us(im['cudnn'], 'graph'):>8s} "
                f"{us(im['default'], 'graph'):>8s} {(res['best_backend_graph'] or '-'):>7s} "
                f"{f(res['speedup_graph'], '.2f'):>7s} "
                f"{f(o['graph_floor_frac'] and 100 * o['graph_floor_frac']):>9s}")
    lines += values_comparison(results)
    kernels = sorted({(r["kernel"], r["D"], r["dtype"]) for r in results}, key=lambda t: (t[1], t[2]))
    lines.append("kernels: " + ", ".join(f"d{d} {t}->{k}" for k, d, t in kernels))
    for r in results:
        for k, v in r["impls"].items():
            if v["eager_ms"] is None and v["error"] != NOT_SELECTED:
                lines.append(f"n/a {r['name']} {r['dtype']}:{k}: {(v['error'] or '')[:80]}")
    return "\n".join(lines)


def values_comparison(results):
    """One line per shape and dtype run with more than one kind of input values: ours'
    eager TFLOP/s and the median SM clock and power for each kind, side by side."""
    rows = {}
    for r in results:
        rows.setdefault((r["name"], r["dtype"]), []).append(r)
    lines = []
    for (name, dt), rs in rows.items():
        if len(rs) < 2:
            continue
        cells = []
        for r in rs:
            o = r["impls"]["ours"]
            g = o["gpu_eager"]
            clock = f" ({timing.gpu_text(g)})" if g else ""
            cells.append(f"{r['values']} {timing.fmt(o['eager_tflops'])}{clock}")
        lines.append(f"{name} {dt}: " + " | ".join(cells))
    if lines:
        lines.insert(0, "-- ours by input values (eager TFLOP/s; median SM clock, power, limit reasons) --")
    return lines


def write_outputs(results, card, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    doc = {
        "card": card,
        "args": vars(args),
        "flop_formula": "4*B*H*Sq*Sk*D",
        "bytes_formula": "esize*B*H*D*(2*Sq + 2*Sk)  (q, o, k, v once each)",
        "floor_rates": {"matmul_flops": timing.MATMUL_FLOPS, "hbm_bytes_per_s": timing.hbm_bytes_per_s(card)},
        "values_kinds": {"randn": "N(0, 1)", "grid": "k/256, k uniform in [-255, 255] (the C harness's Rng::grid)",
                         "uniform": "U(-1, 1)"},
        "gpu_monitor": "impls.*.gpu_eager / gpu_graph: NVML SM clock (MHz), power (W) and clock-limit "
                       "reasons sampled every 50 ms during the measurement and once right after it",
        "shapes": results,
    }
    suffix = "" if args.precision == "exact" else f"_{args.precision}"  # runs of each precision side by side
    path = os.path.join(out_dir, f"bench_attention{suffix}.json")
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {path}")
    for mode, fname in (("eager", f"bench_attention{suffix}.png"), ("graph", f"bench_attention{suffix}_graph.png")):
        rows = [r for r in results if mode == "eager" or r["impls"]["ours"]["graph_ms"]]
        if not rows:
            continue
        series = {impl: [r["impls"][impl][f"{mode}_tflops"] for r in rows] for impl in args.impls}
        title = f"attention forward TFLOP/s ({mode}), {card['name']}, torch {card['torch']}, cuDNN {card['cudnn']}"
        if args.precision != "exact":
            title += f", ours in {args.precision}"
        print(timing.bar_chart(os.path.join(out_dir, fname), title, [label(r) for r in rows], series, "TFLOP/s"))


def main(argv=None):
    args = parse_args(argv)
    device, _, card = timing.setup("bench_attention", args)
    shapes = select_shapes(args.shapes, args.dtype)
    if not shapes:
        sys.exit(f"no shape matches --shapes {args.shapes!r}; groups: {list(GROUPS)}, "
                 f"names: {list(dict.fromkeys(s.name for s in SHAPES))}")
    if args.dry_run:
        shapes = [shrink(s) for s in shapes]
    dtypes = "fp32 (dry run)" if args.dry_run else (args.dtype or "per shape")
    print(f"dtype {dtypes}, values {','.join(args.values)}, impls {','.join(args.impls)}, iters <= {args.iters}, "
          f"budget {args.budget_ms} ms per measurement, graph below {args.graph_below_us} us "
          f"({args.calls_per_graph} calls/graph)")
    rows = [(s, v) for s in shapes for v in args.values]
    results = timing.run_all(rows, lambda row: bench_shape(row[0], row[1], args, card, device), print_shape)
    if args.out:
        write_outputs(results, card, args, args.out)
    print(summary(results, card))
    return results


if __name__ == "__main__":
    main()
