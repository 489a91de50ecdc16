"""Attention forward on Stable Diffusion shapes: our ``ops.attention`` vs every SDPA backend.

    python benchmarks/bench_attention.py --out DIR [--shapes sd15,vae] [--quick] [--iters N]
    python benchmarks/bench_attention.py --dry-run      # CPU, fp32, tiny shapes: checks the script

FLOPs = 4*B*H*Sq*Sk*D. Bytes = q and o once, k and v once, in the benchmark dtype.
Floors: FLOPs / 790 TFLOP/s and bytes / HBM (3.35 TB/s H100, 4.8 TB/s H200); see
/work/shared/KERNELS.md. "%floor" = floor / time.

Layouts, each implementation's best case:
- ours: q, k, v as our projections leave them: views of a packed qkv [B, S, 3, H, D]
  (self-attention) or q [B, Sq, H, D] + packed kv [B, Sk, 2, H, D] (cross-attention);
- SDPA: contiguous [B, H, S, D] tensors made outside the timed region.
Each SDPA backend is timed on its own (sdpa_kernel restricted to it), plus the default
dispatch; a backend that refuses a shape is reported as "n/a (reason)". Every output is
compared with the SDPA math backend in fp32 (||out - ref|| / ||ref||).
Shapes whose best eager time is under --graph-below-us are also timed under CUDA-graph
replay (--calls-per-graph calls captured per graph), where launch overhead disappears.
Inputs rotate over several sets so small shapes do not just measure the L2 cache.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings

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

# (name, description, B, H, Sq, Sk, D, self-attention?)
SHAPES = [
    ("sd15-4096-d40", "SD1.5 self 2x8x4096^2 d40", 2, 8, 4096, 4096, 40, True),
    ("sd15-1024-d80", "SD1.5 self 2x8x1024^2 d80", 2, 8, 1024, 1024, 80, True),
    ("sd15-256-d160", "SD1.5 self 2x8x256^2 d160", 2, 8, 256, 256, 160, True),
    ("sd15-x77-d40", "SD1.5 cross 2x8x4096x77 d40", 2, 8, 4096, 77, 40, False),
    ("sd21-9216-d64", "SD2.1 self 2x5x9216^2 d64", 2, 5, 9216, 9216, 64, True),
    ("sdxl-4096-d64", "SDXL self 2x10x4096^2 d64", 2, 10, 4096, 4096, 64, True),
    ("sdxl-1024-d64", "SDXL self 2x20x1024^2 d64", 2, 20, 1024, 1024, 64, True),
    ("sdxl-x77-d64", "SDXL cross 2x10x4096x77 d64", 2, 10, 4096, 77, 64, False),
    ("vae-4096-d512", "VAE mid 1x1x4096^2 d512", 1, 1, 4096, 4096, 512, True),
    ("d128-8192", "d128 long 2x16x8192^2", 2, 16, 8192, 8192, 128, True),
]

IMPLS = ["ours", "flash", "efficient", "cudnn", "default"]
_BACKEND_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="directory for bench_attention.json / .png")
    p.add_argument("--shapes", default=None, help="comma-separated substrings of shape names")
    p.add_argument("--iters", type=int, default=None, help="max timed iterations (default 100, quick 30)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time budget per measurement (default 300 ms, quick 100 ms)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--graph-below-us", type=float, default=50.0,
                   help="also time under CUDA-graph replay when the best eager time is below this")
    p.add_argument("--calls-per-graph", type=int, default=20)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference check")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, tiny shapes: run every non-CUDA code path once")
    args = p.parse_args(argv)
    args.iters = args.iters or (30 if args.quick else 100)
    args.budget_ms = args.budget_ms or (100.0 if args.quick else 300.0)
    if args.dry_run:
        args.iters, args.budget_ms = 3, 20.0
        args.graph_below_us = math.inf  # walk the graph branch (time_graph returns None on CPU)
    return args


def select_shapes(filt):
    if not filt:
        return list(SHAPES)
    keys = [k.strip().lower() for k in filt.split(",") if k.strip()]
    return [s for s in SHAPES if any(k in s[0].lower() or k in s[1].lower() for k in keys)]


def shrink(shape):
    """A tiny CPU version of a shape for --dry-run (same D, same self/cross kind)."""
    name, desc, B, H, Sq, Sk, D, is_self = shape
    sq = min(Sq, 48)
    return (name, desc + " [dry-run]", 1, min(H, 2), sq, sq if is_self else Sk, D, is_self)


# ---------------------------------------------------------------------- inputs
def make_set(B, H, Sq, Sk, D, is_self, dtype, device, seed):
    """One input set: ours = (q, k, v) views of the packed projection output; sdpa = the
    same values as contiguous [B, H, S, D]."""
    g = torch.Generator(device=device).manual_seed(seed)
    if is_self:
        qkv = torch.randn(B, Sq, 3, H, D, device=device, dtype=dtype, generator=g)
        q, k, v = qkv.unbind(2)  # [B, S, H, D], row stride 3*H*D
    else:
        q = torch.randn(B, Sq, H, D, device=device, dtype=dtype, generator=g)
        kv = torch.randn(B, Sk, 2, H, D, device=device, dtype=dtype, generator=g)
        k, v = kv.unbind(2)  # [B, Sk, H, D], row stride 2*H*D
    sdpa = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, S, D]
    return {"ours": (q, k, v), "sdpa": sdpa}


@torch.inference_mode()
def reference(qs, ks, vs, max_elems=2**28):
    """SDPA math backend in fp32, chunked over (B, H) so the fp32 scores fit: [B, H, Sq, D]."""
    B, H, Sq, D = qs.shape
    Sk = ks.shape[2]
    q, k, v = (t.float().reshape(B * H, -1, D) for t in (qs, ks, vs))
    out = torch.empty(B * H, Sq, D, dtype=torch.float32, device=qs.device)
    step = max(1, max_elems // (Sq * Sk))
    ctx = sdpa_kernel([SDPBackend.MATH]) if sdpa_kernel is not None else contextlib.nullcontext()
    with ctx:
        for i in range(0, B * H, step):
            out[i : i + step] = F.scaled_dot_product_attention(q[i : i + step], k[i : i + step], v[i : i + step])
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
def bench_shape(shape, args, card, device, dtype):
    name, desc, B, H, Sq, Sk, D, is_self = shape
    cuda = device.type == "cuda"
    esize = torch.empty((), dtype=dtype).element_size()
    flops = 4.0 * B * H * Sq * Sk * D
    nbytes = float(esize * B * H * D * (2 * Sq + 2 * Sk))
    fl = timing.floors(flops, nbytes, card)
    rot = timing.Rotation(lambda i: make_set(B, H, Sq, Sk, D, is_self, dtype, device, 1000 + i),
                          int(nbytes), max_sets=2 if args.dry_run else 16)
    kernel = ops.attention_kernel_for(*rot.sets[0]["ours"][:3])  # the exact kernel for these tensors
    res = {
        "name": name, "desc": desc, "B": B, "H": H, "Sq": Sq, "Sk": Sk, "D": D,
        "layout": "packed qkv [B,S,3,H,D]" if is_self else "q [B,Sq,H,D] + packed kv [B,Sk,2,H,D]",
        "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "floor": fl, "kernel": kernel,
        "input_sets": rot.n, "impls": {},
    }
    ref = None
    if not args.no_check:
        ref = reference(*rot.sets[0]["sdpa"])

    def ours_fn():
        return ops.attention(*rot.next()["ours"])

    def sdpa_fn():
        return F.scaled_dot_product_attention(*rot.next()["sdpa"])

    for impl in IMPLS:
        r = res["impls"][impl] = {"eager_ms": None, "graph_ms": None, "rel_err": None, "error": None}
        fn = ours_fn if impl == "ours" else sdpa_fn
        try:
            ctx = contextlib.nullcontext() if impl == "ours" else backend_ctx(impl)
        except RuntimeError as e:
            r["error"] = timing.short_error(e)
            continue
        with ctx:
            if impl == "ours":
                out, err = probe(lambda: ops.attention(*rot.sets[0]["ours"])[0].transpose(1, 2))
            else:
                out, err = probe(lambda: F.scaled_dot_product_attention(*rot.sets[0]["sdpa"]))
            if err is not None:
                r["error"] = err
                continue
            if ref is not None:
                r["rel_err"] = timing.rel_err(out, ref)
            del out
            r["eager_ms"] = timing.time_eager(
                fn, warmup=10, iters=args.iters, budget_ms=args.budget_ms, use_cuda=cuda)

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
                    r["graph_ms"] = timing.time_graph(
                        fn, args.calls_per_graph, args.replays, budget_ms=2 * args.budget_ms, use_cuda=cuda)
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
    print(f"\n== {res['desc']}  ({res['gflop']:.2f} GFLOP, {res['mbytes']:.1f} MB, floor "
          f"{fl['floor_us']:.1f} us {fl['bound']}-bound; {res['input_sets']} input sets) kernel: {res['kernel']}")
    for impl, r in res["impls"].items():
        if r["eager_ms"] is None:
            print(f"  {impl:9s} n/a ({r['error']})")
            continue
        line = (f"  {impl:9s} eager {r['eager_ms'] * 1e3:9.1f} us {r['eager_tflops']:7.1f} TFLOP/s "
                f"{100 * r['eager_floor_frac']:5.1f}% floor  err {timing.fmt(r['rel_err'], '.1e')}")
        if r["graph_ms"] is not None:
            line += (f" | graph {r['graph_ms'] * 1e3:8.1f} us {r['graph_tflops']:7.1f} TFLOP/s "
                     f"{100 * r['graph_floor_frac']:5.1f}% floor")
        elif r.get("graph_error"):
            line += f" | graph n/a ({r['graph_error']})"
        print(line, flush=True)


def us(r, mode="eager"):
    ms = r[f"{mode}_ms"]
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def summary(results, card):
    """The compact final table (the device tool returns only the end of the output)."""
    lines = ["", "=" * 30 + " attention summary (us per call; speedup = best SDPA / ours) " + "=" * 30,
             timing.card_line(card),
             f"{'shape':14s} {'floor':>7s} {'ours':>8s} {'TF/s':>6s} {'%flr':>5s} {'flash':>8s} {'effic':>8s} "
             f"{'cudnn':>8s} {'default':>8s} {'best':>7s} {'speedup':>7s} {'err ours':>8s} {'err best':>8s}"]
    for res in results:
        im = res["impls"]
        o = im["ours"]
        best = res["best_backend_eager"]
        lines.append(
            f"{res['name']:14s} {res['floor']['floor_us']:6.1f}{res['floor']['bound'][0]} {us(o):>8s} "
            f"{timing.fmt(o['eager_tflops']):>6s} {timing.fmt(o['eager_floor_frac'] and 100 * o['eager_floor_frac']):>5s} "
            f"{us(im['flash']):>8s} {us(im['efficient']):>8s} {us(im['cudnn']):>8s} {us(im['default']):>8s} "
            f"{(best or '-'):>7s} {timing.fmt(res['speedup_eager'], '.2f'):>7s} "
            f"{timing.fmt(o['rel_err'], '.1e'):>8s} {timing.fmt(best and im[best]['rel_err'], '.1e'):>8s}")
    graphed = [r for r in results if r["graph_timed"]]
    if graphed:
        lines.append("-- CUDA-graph replay (us per call) --")
        lines.append(f"{'shape':14s} {'ours':>8s} {'flash':>8s} {'effic':>8s} {'cudnn':>8s} {'default':>8s} "
                     f"{'best':>7s} {'speedup':>7s} {'ours %flr':>9s}")
        for res in graphed:
            im = res["impls"]
            o = im["ours"]
            lines.append(
                f"{res['name']:14s} {us(o, 'graph'):>8s} {us(im['flash'], 'graph'):>8s} "
                f"{us(im['efficient'], 'graph'):>8s} {us(im['cudnn'], 'graph'):>8s} {us(im['default'], 'graph'):>8s} "
                f"{(res['best_backend_graph'] or '-'):>7s} {timing.fmt(res['speedup_graph'], '.2f'):>7s} "
                f"{timing.fmt(o['graph_floor_frac'] and 100 * o['graph_floor_frac']):>9s}")
    kernels = sorted({(r["kernel"], r["D"]) for r in results}, key=lambda t: t[1])
    lines.append("kernels: " + ", ".join(f"d{d}->{k}" for k, d in kernels))
    for r in results:
        for k, v in r["impls"].items():
            if v["eager_ms"] is None:
                lines.append(f"n/a {r['name']}:{k}: {(v['error'] or '')[:80]}")
    return "\n".join(lines)


def write_outputs(results, card, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    doc = {
        "card": card,
        "args": vars(args),
        "flop_formula": "4*B*H*Sq*Sk*D",
        "bytes_formula": "esize*B*H*D*(2*Sq + 2*Sk)  (q, o, k, v once each)",
        "floor_rates": {"matmul_flops": timing.MATMUL_FLOPS, "hbm_bytes_per_s": timing.hbm_bytes_per_s(card)},
        "shapes": results,
    }
    path = os.path.join(out_dir, "bench_attention.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")
    for mode, fname in (("eager", "bench_attention.png"), ("graph", "bench_attention_graph.png")):
        rows = [r for r in results if mode == "eager" or r["impls"]["ours"]["graph_ms"]]
        if not rows:
            continue
        series = {impl: [r["impls"][impl][f"{mode}_tflops"] for r in rows] for impl in IMPLS}
        title = f"attention forward TFLOP/s ({mode}), {card['name']}, torch {card['torch']}, cuDNN {card['cudnn']}"
        print(timing.bar_chart(os.path.join(out_dir, fname), title, [r["name"] for r in rows], series, "TFLOP/s"))


def main(argv=None):
    args = parse_args(argv)
    device, dtype, card = timing.setup("bench_attention", args)
    print(f"dtype {dtype}, iters <= {args.iters}, budget {args.budget_ms} ms per measurement, "
          f"graph below {args.graph_below_us} us ({args.calls_per_graph} calls/graph)")
    shapes = select_shapes(args.shapes)
    if args.dry_run:
        shapes = [shrink(s) for s in shapes]
    if not shapes:
        sys.exit(f"no shape matches --shapes {args.shapes!r}; names: {[s[0] for s in SHAPES]}")
    results = timing.run_all(shapes, lambda shape: bench_shape(shape, args, card, device, dtype), print_shape)
    if args.out:
        write_outputs(results, card, args, args.out)
    print(summary(results, card))
    return results


if __name__ == "__main__":
    main()
