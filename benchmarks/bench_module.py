"""One attention block: our DeepSpeedDiffusersAttention vs diffusers' Attention.

    python benchmarks/bench_module.py --out DIR [--cases sd15,vae] [--batch 1,2] [--quick]
    python benchmarks/bench_module.py --dry-run     # CPU, fp32, tiny sequences: checks the script

Cases (UNet blocks of SD1.5 / SDXL and the SD VAE's mid-block attention), each timed at every
batch size of --batch (default 1,2; each row shows its B). A pipeline's UNet runs at B=2 under
classifier-free guidance and its VAE decodes at B=1 per image; B=1 for the UNet is a
guidance-free or distilled step, B=2 for the VAE two images.

Implementations, all with the same (seeded random) weights:
- ours:  dda.from_diffusers(stock)
- stock: diffusers Attention with AttnProcessor2_0 (three projections, SDPA, out projection)
- fused: a copy of stock after ``fuse_projections()`` with FusedAttnProcessor2_0 (one QKV or
         KV projection), when this diffusers has them
Each is timed eagerly (CUDA events per call, median) and under CUDA-graph replay
(--calls-per-graph calls captured per graph, median replay / calls). Inputs rotate over
several sets. Outputs are compared with stock run in fp32 (||out - ref|| / ||ref||).
speedup = other / ours (> 1: ours is faster).

FLOPs = 2*B*Sq*C*inner (Q) + 2*B*Sk*Cctx*2*inner (K, V) + 4*B*H*Sq*Sk*D + 2*B*Sq*inner*C (out).
Bytes floor = input, context, output and weights once each.

Device time on an H200 (estimated, not yet measured; the script prints its total), after the
extension is built: the 7 cases at B=1,2 (14 rows) ~1 min, most of it process start-up and the
first call of each path: every call takes about 1 ms or less, so no measurement reaches its
budget.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
from typing import NamedTuple, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

timing.add_repo_to_path()
import deepspeed_diffusers_attn as dda  # noqa: E402
from deepspeed_diffusers_attn import DeepSpeedDiffusersAttention  # noqa: E402


class Case(NamedTuple):
    name: str
    desc: str
    S: int  # query tokens (the VAE: height * width of its square latent)
    C: int  # channels of the block's input
    heads: int
    dim_head: int
    context: Optional[Tuple[int, int]]  # (Sk, Cctx) of the cross-attention context; None for self
    vae: bool  # the VAE's attention block: [B, C, H, W] input, GroupNorm, residual
    B: int = 1  # set per row from --batch


CASES = [
    Case("sd15-d0-self", "SD1.5 down0 self S=4096 C=320 8x40", 4096, 320, 8, 40, None, False),
    Case("sd15-d0-cross", "SD1.5 down0 cross S=4096 C=320 ctx 77x768", 4096, 320, 8, 40, (77, 768), False),
    Case("sd15-d1-self", "SD1.5 down1 self S=1024 C=640 8x80", 1024, 640, 8, 80, None, False),
    Case("sdxl-d1-self", "SDXL down1 self S=4096 C=640 10x64", 4096, 640, 10, 64, None, False),
    Case("sdxl-d2-self", "SDXL down2 self S=1024 C=1280 20x64", 1024, 1280, 20, 64, None, False),
    Case("sdxl-d2-cross", "SDXL down2 cross S=1024 C=1280 ctx 77x2048", 1024, 1280, 20, 64, (77, 2048), False),
    Case("vae-mid-512", "VAE mid-block 512px [B,512,64,64] 1x512 GN32 res", 4096, 512, 1, 512, None, True),
]
IMPLS = ["ours", "stock", "fused"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for bench_module.json / .png")
    p.add_argument("--cases", default=None, help="comma-separated substrings of case names (default: all)")
    p.add_argument("--batch", default="1,2",
                   help="comma-separated batch sizes; every case is timed at each (default 1,2)")
    p.add_argument("--iters", type=int, default=None, help="max timed iterations (default 100, quick 30)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time budget per eager measurement (default 300 ms, quick 100 ms)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="default fp16")
    p.add_argument("--calls-per-graph", type=int, default=20, help="calls captured per CUDA graph (default 20)")
    p.add_argument("--replays", type=int, default=15, help="timed replays per graph (default 15)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timing")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, short sequences: run every non-CUDA code path once")
    args = p.parse_args(argv)
    try:
        args.batch = list(dict.fromkeys(int(b) for b in args.batch.split(",") if b.strip()))
    except ValueError:
        p.error(f"--batch: expected comma-separated integers, got {args.batch!r}")
    if not args.batch or min(args.batch) < 1:
        p.error(f"--batch: expected batch sizes >= 1, got {args.batch!r}")
    args.iters = args.iters or (30 if args.quick else 100)
    args.budget_ms = args.budget_ms or (100.0 if args.quick else 300.0)
    if args.dry_run:
        args.iters, args.budget_ms = 3, 20.0
    return args


def select_cases(filt, batches):
    """The cases ``filt`` names (substrings of names / descriptions), each at every batch size."""
    keys = [k.strip().lower() for k in (filt or "").split(",") if k.strip()]
    chosen = [c for c in CASES if not keys or any(k in c.name.lower() or k in c.desc.lower() for k in keys)]
    return [c._replace(B=b) for c in chosen for b in batches]


def shrink(case):
    """A CPU-sized case for --dry-run: S = 64 (8x8 for the VAE), everything else kept."""
    return case._replace(desc=case.desc + " [dry-run]", S=64)


# ---------------------------------------------------------------------- modules
def build_stock(case, seed=0):
    """A diffusers Attention as the SD UNet / VAE builds it, with seeded random weights (fp32, CPU)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    C, H, D, ctx = case.C, case.heads, case.dim_head, case.context
    torch.manual_seed(seed)
    if case.vae:
        attn = Attention(C, heads=H, dim_head=D, rescale_output_factor=1.0, eps=1e-6,
                         norm_num_groups=32, spatial_norm_dim=None, residual_connection=True,
                         bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    else:
        attn = Attention(C, cross_attention_dim=None if ctx is None else ctx[1], heads=H, dim_head=D,
                         dropout=0.0, bias=False, upcast_attention=False, out_bias=True)
    with torch.no_grad():
        for m in attn.modules():  # Linear weights keep their seeded default init (+-1/sqrt(fan_in))
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    attn.set_processor(AttnProcessor2_0())
    return attn.eval()


def make_fused(stock):
    """A copy of stock with fused projections, or (None, reason)."""
    try:
        from diffusers.models.attention_processor import FusedAttnProcessor2_0
    except ImportError:
        return None, "this diffusers has no FusedAttnProcessor2_0"
    if not hasattr(stock, "fuse_projections"):
        return None, "this diffusers Attention has no fuse_projections()"
    fused = copy.deepcopy(stock)
    try:
        fused.fuse_projections()
        fused.set_processor(FusedAttnProcessor2_0())
    except Exception as e:  # an older diffusers may refuse a single Attention
        return None, "fuse_projections failed: " + timing.short_error(e, 70)
    return fused, None


def case_flops_bytes(case, esize):
    B, S, C, H, D, ctx = case.B, case.S, case.C, case.heads, case.dim_head, case.context
    inner = H * D
    Sk, Cc = ctx if ctx is not None else (S, C)
    flops = 2.0 * B * (S * C * inner + Sk * Cc * 2 * inner + 2 * H * S * Sk * D + S * inner * C)
    weights = C * inner + Cc * 2 * inner + inner * C
    nbytes = float(esize * (2 * B * S * C + (B * Sk * Cc if ctx is not None else 0) + weights))
    return flops, nbytes


def make_inputs(case, dtype, device, seed):
    B, S, C, ctx = case.B, case.S, case.C, case.context
    g = torch.Generator(device=device).manual_seed(seed)
    if case.vae:
        side = int(math.isqrt(S))
        x = torch.randn(B, C, side, side, device=device, dtype=dtype, generator=g)
    else:
        x = torch.randn(B, S, C, device=device, dtype=dtype, generator=g)
    c = None if ctx is None else torch.randn(B, ctx[0], ctx[1], device=device, dtype=dtype, generator=g)
    return x, c


def math_sdpa():
    """SDPA restricted to its fp32 math backend (for the reference), if selectable."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def call(impl, mod, x, c):
    if impl == "ours":
        return mod(x, c)
    return mod(x, encoder_hidden_states=c)


# ---------------------------------------------------------------------- one case
def bench_case(case, args, card, device, dtype):
    B, S, C, H, D, ctx = case.B, case.S, case.C, case.heads, case.dim_head, case.context
    cuda = device.type == "cuda"
    esize = torch.empty((), dtype=dtype).element_size()
    flops, nbytes = case_flops_bytes(case, esize)
    fl = timing.floors(flops, nbytes, card)
    res = {"name": case.name, "desc": case.desc, "B": B, "S": S, "C": C, "heads": H, "dim_head": D,
           "context": list(ctx) if ctx else None, "gflop": flops / 1e9, "mbytes": nbytes / 1e6,
           "floor": fl, "impls": {}}

    with torch.inference_mode(False):  # modules get normal (not inference) parameters
        stock32 = build_stock(case)
        reasons = dda.supports(stock32)
        stock = copy.deepcopy(stock32).to(device=device, dtype=dtype)
        mods = {"stock": (stock, None)}
        try:
            mods["ours"] = (dda.from_diffusers(stock), None) if not reasons else \
                (None, "declined: " + "; ".join(reasons))
        except Exception as e:
            mods["ours"] = (None, "from_diffusers failed: " + timing.short_error(e, 70))
        mods["fused"] = make_fused(stock)
        stock32 = stock32.to(device)
    res["declined"] = reasons

    per_set = int(esize * (2 * B * S * C + (B * ctx[0] * ctx[1] if ctx else 0)))
    rot = timing.Rotation(lambda i: make_inputs(case, dtype, device, 100 + i), per_set,
                          max_sets=2 if args.dry_run else 8)
    x0, c0 = rot.sets[0]
    with math_sdpa():
        ref = stock32(x0.float(), encoder_hidden_states=None if c0 is None else c0.float())
    del stock32

    for impl in IMPLS:
        mod, why = mods[impl]
        r = res["impls"][impl] = {"eager_ms": None, "graph_ms": None, "rel_err": None, "error": why}
        if mod is None:
            continue
        try:
            out = call(impl, mod, x0, c0)
        except Exception as e:
            r["error"] = "forward failed: " + timing.short_error(e, 70)
            continue
        if out.shape != ref.shape:
            r["error"] = f"output shape {tuple(out.shape)} != stock {tuple(ref.shape)}"
            continue
        r["rel_err"] = timing.rel_err(out, ref)
        del out

        def fn(impl=impl, mod=mod):
            x, c = rot.next()
            return call(impl, mod, x, c)

        r["eager_ms"] = timing.time_eager(
                fn, warmup=10, iters=args.iters, budget_ms=args.budget_ms, use_cuda=cuda)
        if not args.no_graph:
            try:
                r["graph_ms"] = timing.time_graph(
                    fn, args.calls_per_graph, args.replays, budget_ms=2 * args.budget_ms, use_cuda=cuda)
                if r["graph_ms"] is None:
                    r["graph_error"] = "no CUDA"
            except Exception as e:
                r["graph_error"] = "capture failed: " + timing.short_error(e, 70)
                if device.type == "cuda":
                    torch.cuda.synchronize()

    for r in res["impls"].values():
        for mode in ("eager", "graph"):
            ms = r[f"{mode}_ms"]
            r[f"{mode}_tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
            r[f"{mode}_floor_frac"] = fl["floor_us"] / (ms * 1e3) if ms else None
    for mode in ("eager", "graph"):
        ours = res["impls"]["ours"][f"{mode}_ms"]
        for other in ("stock", "fused"):
            o = res["impls"][other][f"{mode}_ms"]
            res[f"speedup_vs_{other}_{mode}"] = o / ours if o and ours else None
    del rot, mods, stock, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def print_case(res):
    fl = res["floor"]
    print(f"\n== {res['desc']}, B={res['B']}  ({res['gflop']:.2f} GFLOP, {res['mbytes']:.1f} MB, floor "
          f"{fl['floor_us']:.1f} us {fl['bound']}-bound)")
    for impl, r in res["impls"].items():
        if r["eager_ms"] is None:
            print(f"  {impl:6s} n/a ({r['error']})")
            continue
        line = (f"  {impl:6s} eager {r['eager_ms'] * 1e3:8.1f} us ({100 * r['eager_floor_frac']:5.1f}% floor)"
                f"  err {timing.fmt(r['rel_err'], '.1e')}")
        if r["graph_ms"] is not None:
            line += f" | graph {r['graph_ms'] * 1e3:8.1f} us ({100 * r['graph_floor_frac']:5.1f}% floor)"
        elif r.get("graph_error"):
            line += f" | graph n/a ({r['graph_error']})"
        print(line, flush=True)


def us(r, mode):
    ms = r[f"{mode}_ms"]
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def summary(results, card):
    f = timing.fmt
    lines = ["", "=" * 24 + " module summary (us per call; speedup = other / ours, >1 = ours faster) " + "=" * 24,
             timing.card_line(card),
             f"{'case':14s} {'B':>2s} {'floor':>7s} | {'ours':>8s} {'stock':>8s} {'fused':>8s} "
             f"{'x stock':>7s} {'x fused':>7s} "
             f"| {'g ours':>8s} {'g stock':>8s} {'g fused':>8s} {'x stock':>7s} {'x fused':>7s} "
             f"| {'err ours':>8s} {'err stock':>9s}"]
    for res in results:
        im = res["impls"]
        lines.append(
            f"{res['name']:14s} {res['B']:2d} {res['floor']['floor_us']:6.1f}{res['floor']['bound'][0]} | "
            f"{us(im['ours'], 'eager'):>8s} {us(im['stock'], 'eager'):>8s} {us(im['fused'], 'eager'):>8s} "
            f"{f(res['speedup_vs_stock_eager'], '.2f'):>7s} {f(res['speedup_vs_fused_eager'], '.2f'):>7s} | "
            f"{us(im['ours'], 'graph'):>8s} {us(im['stock'], 'graph'):>8s} {us(im['fused'], 'graph'):>8s} "
            f"{f(res['speedup_vs_stock_graph'], '.2f'):>7s} {f(res['speedup_vs_fused_graph'], '.2f'):>7s} | "
            f"{f(im['ours']['rel_err'], '.1e'):>8s} {f(im['stock']['rel_err'], '.1e'):>9s}")
    for res in results:
        for k, v in res["impls"].items():
            if v["eager_ms"] is None:
                lines.append(f"n/a {res['name']} B={res['B']}:{k}: {(v['error'] or '')[:90]}")
            elif v.get("graph_error") and v["graph_error"] != "no CUDA":
                lines.append(f"graph n/a {res['name']} B={res['B']}:{k}: {v['graph_error'][:90]}")
    return "\n".join(lines)


def write_outputs(results, card, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    doc = {"card": card, "args": vars(args),
           "flop_formula": "2*B*(Sq*C*inner + Sk*Cctx*2*inner + 2*H*Sq*Sk*D + Sq*inner*C)",
           "bytes_formula": "esize*(2*B*Sq*C + B*Sk*Cctx + weights)",
           "floor_rates": {"matmul_flops": timing.MATMUL_FLOPS, "hbm_bytes_per_s": timing.hbm_bytes_per_s(card)},
           "cases": results}
    path = os.path.join(out_dir, "bench_module.json")
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {path}")
    series = {}
    for impl in IMPLS:
        for mode in ("eager", "graph"):
            series[f"{impl} {mode}"] = [r["impls"][impl][f"{mode}_ms"] and r["impls"][impl][f"{mode}_ms"] * 1e3
                                        for r in results]
    title = f"attention block, us per call (lower is better), {card['name']}, torch {card['torch']}"
    print(timing.bar_chart(os.path.join(out_dir, "bench_module.png"), title,
                           [f"{r['name']} B{r['B']}" for r in results], series, "us per call"))


def main(argv=None):
    args = parse_args(argv)
    device, dtype, card = timing.setup("bench_module", args)
    print(f"dtype {dtype}, batch {','.join(map(str, args.batch))}, iters <= {args.iters}, budget "
          f"{args.budget_ms} ms per eager measurement, "
          f"graph: {'off' if args.no_graph else f'{args.calls_per_graph} calls x {args.replays} replays'}")
    cases = select_cases(args.cases, args.batch)
    if not cases:
        sys.exit(f"no case matches --cases {args.cases!r}; names: {[c.name for c in CASES]}")
    if args.dry_run:
        cases = [shrink(c) for c in cases]
    results = timing.run_all(cases, lambda case: bench_case(case, args, card, device, dtype), print_case)
    if args.out:
        write_outputs(results, card, args, args.out)
    print(summary(results, card))
    return results


if __name__ == "__main__":
    main()
