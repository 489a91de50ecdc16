"""DiT and video transformer step (SD3-medium, Flux.1-dev, Wan2.1-T2V-1.3B): stock diffusers vs ours,
eager / CUDA graph / torch.compile, with the share of the step spent in attention.

    python benchmarks/bench_dit.py [--models sd3,flux,wan] [--batch 1,2] [--variants NAMES] [--no-compile]
                                   [--layers N] [--frames N] [--budget-ms MS] [--out bench_dit_out]
    python benchmarks/bench_dit.py --dry-run     # CPU, tiny configs, float32: checks the script in seconds

Models (the transformer only, built from the real configs in deepspeed_diffusers_attn.configs,
seeded random weights drawn directly on the GPU, bfloat16; the cost is real, the outputs are not):

  sd3   SD3-medium at 1024x1024: 4096 image tokens + 333 text (77 CLIP + 256 T5), 24 joint blocks,
        24 heads x 64
  flux  Flux.1-dev at 1024x1024: 4096 image + 512 text tokens, 19 double-stream + 38 single-stream
        blocks, 24 heads x 128 (12B parameters, 24 GB)
  wan   Wan2.1-T2V-1.3B at 480x832, 81 frames: latent 21x60x104, 32760 tokens after 1x2x2 patching,
        30 blocks, 12 heads x 128, cross-attention to 512 text tokens

Inputs are seeded random tensors of the shapes each pipeline passes (latents, text embeddings,
pooled embeddings, timesteps, Flux's position ids and guidance), ``return_dict=False``. Batch:
``--batch 1,2``. Per denoising step of one prompt, SD3's pipeline makes one B=2 call
(classifier-free guidance concatenates the negative prompt), Wan's two B=1 calls (conditional,
then unconditional) and Flux.1-dev's one B=1 call (guidance-distilled: the scale is an input);
B=2 is then two prompts. One model is alive at a time, freed before the next.

Variants (--variants picks a subset; "stock" always runs, it is the reference):

  stock          diffusers as is (SDPA / diffusers' attention dispatch)
  stock+graph    + our CUDA-graph wrapper (deepspeed_diffusers_attn.graphs.graph_module_forward)
  stock+compile  torch.compile(model), default mode                          (not with --no-compile)
  ours           deepspeed_diffusers_attn.patch(model)
  ours+graph     patch(model, cuda_graph=True) (the same graph wrapper, over the patched model)
  ours+compile   patch(model), then torch.compile(model), default mode      (not with --no-compile)

Timing: ms per step is the median of CUDA-event-timed calls after warm-up (benchmarks/timing.py
``time_eager``; each measurement is cut to about --budget-ms, at least 3 timed calls); the first
call (CUDA-graph capture, or the compile) is timed on its own and excluded. Peak memory is
torch's max allocated bytes over the variant (weights included; the weights alone are in the
row). Every variant's output is compared with stock eager's (||out - ref|| / ||ref||).

Attention share: each eager and graph variant is run a second time with attention replaced by a
no-op that returns an uninitialised tensor of the output's shape (``torch.empty``, no kernel):
``torch.nn.functional.scaled_dot_product_attention`` (what diffusers' processors and its
native dispatch call) and our ``torch.ops.dda.attention`` / ``attention_out``, for stock and
ours alike, so a module that ours leaves to diffusers is counted too. attention ms = ms - ms
without attention; share = that / ms. It counts the attention kernels only (projections, norms
and RoPE stay), and the step without attention may overlap differently, so it is an estimate of
what attention costs in the step, not a kernel time. The eager rows also count the attention
calls each path served in one step. Compile variants get no share (a second compile per
variant would cost minutes). Attention ops registered under torch.ops.dda besides those two are
listed in the conditions as not removed.

Writes results.json after every row (a run cut short keeps what it measured) and results.png
(ms per variant, one block per model and batch, the attention share in each label) to --out.
Time on an H200: all models, --batch 1 --variants stock+graph,ours+graph --no-compile (with the
attention share) took 57 s; all variants at B=1,2 without compile is estimated at 4-5 minutes
(Wan at 32760 tokens is ~1 s per B=2 step); each torch.compile of a full model adds an
estimated 1-3 minutes (Flux the most), so the compile variants are best run on a subset
(--models, --batch, --variants) or with --layers.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (benchmarks/timing.py: event timing, card, charts)

timing.add_repo_to_path()

import bench_unet  # noqa: E402  (its per-config bar chart and variant teardown)
import deepspeed_diffusers_attn as dda  # noqa: E402
from deepspeed_diffusers_attn import ops  # noqa: E402
from deepspeed_diffusers_attn.configs import scaled_down, with_layers  # noqa: E402
from deepspeed_diffusers_attn.dit_example import MODELS, build_model, transformer_inputs  # noqa: E402
from deepspeed_diffusers_attn.graphs import (GraphFallbackWarning, graph_module_forward, graphed_methods,  # noqa: E402
                                             ungraph_module)

VARIANTS = ("stock", "stock+graph", "stock+compile", "ours", "ours+graph", "ours+compile")
NO_ATTENTION_VARIANTS = ("stock", "stock+graph", "ours", "ours+graph")
DTYPE = torch.bfloat16
# The dry run's sizes (CPU, tiny configs): pixels per side, Wan frames, text tokens.
DRY_SIDE, DRY_FRAMES, DRY_TEXT = 64, 5, 16
# The ops of ours that attention_removed() replaces; the other dda::attention* ops only answer queries.
REMOVED_DDA_OPS = ("attention", "attention_out")
QUERY_DDA_OPS = ("attention_backends", "attention_precisions", "attention_supported", "attention_kernel_for",
                 "attention_kernel_name")


# ---------------------------------------------------------------------- attention removed
class _OpStandIn:
    """Takes the place of an OpOverloadPacket ``torch.ops.dda.<name>``: callable, and ``.default`` too."""

    def __init__(self, fn):
        self.fn = fn
        self.default = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@contextlib.contextmanager
def attention_removed(counts: collections.Counter):
    """SDPA and our attention ops return uninitialised tensors of their outputs' shapes (no kernel
    runs); ``counts`` counts the calls per path. Restored on exit."""
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention
    namespace = torch.ops.dda
    saved = {name: namespace.__dict__.get(name) for name in REMOVED_DDA_OPS}

    def no_sdpa(query, key, value, *args, **kwargs):  # query [..., Sq, D], value [..., Sk, Dv]
        counts["sdpa"] += 1
        return query.new_empty(query.shape[:-1] + value.shape[-1:])

    def no_attention(q, k, v, mask=None, scale=None, return_lse=False, backend="auto", precision="exact"):
        # q [B, Sq, H, D]
        counts["dda.attention"] += 1
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,)
        return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(lse_shape, dtype=torch.float32)

    def no_attention_out(q, k, v, mask, scale, out, lse=None, backend="auto", precision="exact"):
        counts["dda.attention"] += 1

    functional.scaled_dot_product_attention = no_sdpa
    setattr(namespace, "attention", _OpStandIn(no_attention))
    setattr(namespace, "attention_out", _OpStandIn(no_attention_out))
    try:
        yield counts
    finally:
        functional.scaled_dot_product_attention = sdpa
        for name, packet in saved.items():
            if packet is None:
                delattr(namespace, name)  # the namespace makes the packet again on the next lookup
            else:
                setattr(namespace, name, packet)


def unremoved_attention_ops() -> list[str]:
    """Attention ops of torch.ops.dda that attention_removed() does not replace (added later)."""
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dda::")]
    return sorted(n for n in names if "attention" in n and n not in REMOVED_DDA_OPS + QUERY_DDA_OPS)


# ---------------------------------------------------------------------- variants
def variants(model, compile_options: dict) -> dict:
    """name -> (setup, teardown); ``setup()`` applies the variant and returns (callable, notes)."""
    def stock_graph():
        graph_module_forward(model)
        return model, {}

    def ours(**options):
        def setup():
            report = dda.patch(model, **options)
            notes = {"patch": report.summary(), "declined": _declined(report)}
            if options.get("cuda_graph"):
                if "forward" in graphed_methods(model):
                    notes["graph"] = f"patch(cuda_graph=True) wrapped {', '.join(report.wrapped)}"
                else:  # this patch() does not graph the transformer itself: the same wrapper by hand
                    graph_module_forward(model)
                    notes["graph"] = "graph_module_forward (patch(cuda_graph=True) did not wrap the transformer)"
            return model, notes
        return setup

    def compiled(patched: bool):
        def setup():
            notes = {}
            if patched:
                report = dda.patch(model)
                notes = {"patch": report.summary(), "declined": _declined(report)}
            return torch.compile(model, **compile_options), notes
        return setup

    def unpatch():
        ungraph_module(model)
        dda.unpatch(model)

    nothing = lambda: None  # noqa: E731
    return {
        "stock": (lambda: (model, {}), nothing),
        "stock+graph": (stock_graph, lambda: ungraph_module(model)),
        "stock+compile": (compiled(False), nothing),
        "ours": (ours(), unpatch),
        "ours+graph": (ours(cuda_graph=True), unpatch),
        "ours+compile": (compiled(True), unpatch),
    }


def _declined(report) -> dict:
    """family -> (count, first reason) of the declined rows."""
    out: dict = {}
    for row in report:
        if row.status == "declined":
            n, why = out.get(row.family, (0, row.reasons[0] if row.reasons else ""))
            out[row.family] = (n + 1, why)
    return out


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def free_memory(cuda: bool) -> None:
    """Give the last variant's (or model's) GPU memory back to the driver; nothing to do on the CPU."""
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()


def measure(name: str, setup, teardown, inputs: dict, ref, args, cuda: bool, no_attention: bool = False) -> dict:
    """Set up one variant, time its first call and its steady state, compare its output, tear down."""
    row = {"variant": name}
    counts = collections.Counter()
    start = time.perf_counter()
    context = attention_removed(counts) if no_attention else contextlib.nullcontext()
    try:
        with context, warnings.catch_warnings():
            if not cuda:  # the graph wrapper runs CPU inputs eagerly and says so; that is expected here
                warnings.simplefilter("ignore", GraphFallbackWarning)
            _sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fn, notes = setup()
            row.update(notes)
            call = lambda: fn(**inputs)[0]  # noqa: E731
            t0 = time.perf_counter()
            with torch.no_grad():
                out = call()
            _sync(cuda)
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            if no_attention and "graph" not in name:
                row["attention_calls"] = dict(counts)  # one forward's calls, by path
            with torch.no_grad():
                row["ms"] = round(timing.time_eager(call, warmup=3, iters=args.iters, budget_ms=args.budget_ms,
                                                    use_cuda=cuda), 3)
            if not no_attention:
                row["rel_err"] = None if ref is None else timing.rel_err(out, ref)
                row["finite"] = bool(torch.isfinite(out).all())
                row["_out"] = out
            if cuda:
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            wrapper = graphed_methods(model_of(fn)).get("forward") if model_of(fn) is not None else None
            if wrapper is not None:
                row["graph_stats"] = dict(wrapper.stats)
    except Exception as e:  # noqa: BLE001  (report and go on with the other variants)
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        row["traceback"] = traceback.format_exc()[-4000:]  # in results.json, for the cause
    finally:
        bench_unet.tear_down(row, teardown)
        torch._dynamo.reset()
        free_memory(cuda)
        row["variant_s"] = round(time.perf_counter() - start, 1)
    return row


def model_of(fn):
    """The nn.Module a variant's callable runs (the compiled wrapper's original), or None."""
    module = getattr(fn, "_orig_mod", fn)
    return module if isinstance(module, torch.nn.Module) else None


def bench_model(key: str, args, cuda: bool, emit) -> None:
    """Every selected variant of one model at every selected batch; ``emit(row)`` gets each result."""
    spec = MODELS[key]
    config = scaled_down(spec.transformer) if args.dry_run else dict(spec.transformer)
    if args.layers:
        config = with_layers(config, args.layers)
    device, dtype = ("cuda", DTYPE) if cuda else ("cpu", torch.float32)
    height, width = (DRY_SIDE, DRY_SIDE) if args.dry_run else (spec.height, spec.width)
    frames = (DRY_FRAMES if args.dry_run else args.frames) if spec.frames else None
    text = DRY_TEXT if args.dry_run else spec.text_tokens
    t0 = time.perf_counter()
    model = build_model(config, device=device, dtype=dtype, seed=0)
    _sync(cuda)
    build_s = round(time.perf_counter() - t0, 1)
    weights_gb = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    blocks = {k: config[k] for k in ("num_layers", "num_single_layers") if k in config}
    describe = {"model": key, "title": spec.title, "heads": config["num_attention_heads"],
                "head_dim": config["attention_head_dim"], "blocks": blocks, "height": height, "width": width,
                "frames": frames, "image_tokens": spec.image_tokens(config, height, width, frames),
                "text_tokens": text, "weights_gb": weights_gb, "build_s": build_s}
    compile_options = {"backend": args.compile_backend} if args.compile_backend else {}
    table = variants(model, compile_options)
    for batch in args.batches:
        inputs = transformer_inputs(spec, config, batch=batch, height=height, width=width, frames=frames,
                                    text_tokens=text, device=device, dtype=dtype)
        ref = None
        for name in VARIANTS:
            if name not in args.variants:
                continue
            row = measure(name, *table[name], inputs, ref, args, cuda)
            if name == "stock" and "_out" in row:
                ref, row["rel_err"] = row["_out"], 0.0
            row.pop("_out", None)
            if args.attention_share and name in NO_ATTENTION_VARIANTS and "ms" in row:
                bare = measure(name, *table[name], inputs, None, args, cuda, no_attention=True)
                if "ms" in bare:
                    row["ms_no_attention"] = bare["ms"]
                    row["attention_ms"] = round(row["ms"] - bare["ms"], 3)
                    row["attention_share"] = round(row["attention_ms"] / row["ms"], 3)
                    if "attention_calls" in bare:
                        row["attention_calls"] = bare["attention_calls"]
                else:
                    row["no_attention_error"] = bare.get("error")
            row.update(describe, batch=batch)
            emit(row)
        del inputs, ref
    del model, table
    free_memory(cuda)


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_stock = the same mode's stock ms / this row's ms (eager, graph, compile), per model and batch."""
    for r in rows:
        mode = r["variant"].split("+", 1)[1] if "+" in r["variant"] else ""
        base = next((b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"] and "ms" in b
                     and b["variant"] == ("stock+" + mode if mode else "stock")), None)
        if base is not None and "ms" in r:
            r["speedup_vs_stock"] = round(base["ms"] / r["ms"], 3)


def _fmt(r: dict) -> str:
    where = f"{r['model']:>4} B={r['batch']}"
    if "error" in r:
        return f"{where} {r['variant']:<14} ERROR {r['error']}"
    share = (f"attn {r['attention_ms']:8.2f} ms ({100 * r['attention_share']:4.1f}%)"
             if "attention_share" in r else f"{'attn -':<25}")
    err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.2e}"
    first = "compile" if "compile" in r["variant"] else "first"
    ratio = f"x{r['speedup_vs_stock']:.2f}" if "speedup_vs_stock" in r else "x -  "
    fallback = "  (calls ran eagerly, not graphed)" if r.get("graph_stats", {}).get("eager") else ""
    return (f"{where} {r['variant']:<14} {r['ms']:9.2f} ms  {share}  {ratio}  "
            f"peak {timing.fmt(r.get('peak_mem_gb'), '.1f')} GB  "
            f"err {err}{'' if r.get('finite', True) else ' NON-FINITE'}"
            f"  {first} {r['first_call_s']:.1f} s  ({r['variant_s']:.0f} s){fallback}")


def conditions(args, cuda: bool) -> dict:
    info = timing.card_info()
    info.update(card=info["name"] if cuda else "cpu (dry-run)", dtype=str(DTYPE if cuda else torch.float32),
                layers=args.layers, wan_frames=args.frames, compile_backend=args.compile_backend or "inductor",
                attention_share=args.attention_share, attention_ops_not_removed=unremoved_attention_ops())
    if cuda:
        try:
            info["attention_kernels"] = {f"D={d} Sk={s}": ops.attention_kernel_name("cuda", DTYPE, d, s)
                                         for d, s in ((64, 4429), (128, 4608), (128, 32760), (128, 512))}
        except Exception as e:  # noqa: BLE001
            info["attention_kernels"] = f"unavailable: {e}"
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--batch", default="1,2", help="comma-separated batch sizes (default 1,2)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (minutes each)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; the dry run uses eager)")
    p.add_argument("--no-attention-share", dest="attention_share", action="store_false",
                   help="skip the second, attention-free run of each eager / graph variant")
    p.add_argument("--layers", type=int, default=None,
                   help="build each transformer with N blocks of each kind (Flux: N double, 2N single)")
    p.add_argument("--frames", type=int, default=81, help="Wan video frames, 4k+1 (default 81: 32760 tokens)")
    p.add_argument("--iters", type=int, default=20, help="most timed calls per measurement")
    p.add_argument("--budget-ms", type=float, default=2500.0, help="about this long per measurement")
    p.add_argument("--out", default="bench_dit_out")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, float32: run the script's code paths")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {list(MODELS)}")
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batch needs positive integers, got {args.batch!r}")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    if set(chosen) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(chosen) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    args.variants = {"stock"} | {v for v in chosen if not (args.no_compile and "compile" in v)}
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error(f"--frames must be 4k+1 (1, 5, ..., 81), got {args.frames}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if args.dry_run:
        args.iters, args.budget_ms = 3, 20.0
        args.compile_backend = args.compile_backend or "eager"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("bench_dit.py: no CUDA device; use --dry-run to check the script on a CPU")
    if not cuda:
        torch.set_num_threads(1)  # tiny CPU ops: OpenMP threads only wait on each other
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    info = conditions(args, cuda)
    print(timing.card_line(info))
    if not cuda:
        print("dry run: tiny configs in float32 on the CPU, host-clock times; "
              "it checks the script, it is not a benchmark")
    print(json.dumps({k: v for k, v in info.items() if k != "attention_kernels"}))
    if info.get("attention_kernels"):
        print(f"our attention kernels: {info['attention_kernels']}")
    if info["attention_ops_not_removed"]:
        print(f"WARNING: attention ops the attention-share run does not remove: {info['attention_ops_not_removed']}")
    t0 = time.perf_counter()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        """Print a result and rewrite results.json with it (a run cut short keeps what was measured)."""
        rows.append(row)
        add_ratios(rows)
        print(_fmt(row), flush=True)
        info["total_s"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"conditions": info, "rows": rows}, f, indent=1)

    for key in args.models:
        bench_model(key, args, cuda, emit)

    print(f"\n{timing.card_line(info)}\nms per step (median); attn = ms - ms with attention removed; "
          "x = speedup over stock in the same mode (eager / graph / compile), > 1 is faster")
    for r in rows:
        print(_fmt(r))
    share = lambda r: f"  attn {100 * r['attention_share']:.0f}%" if "attention_share" in r else ""  # noqa: E731
    chart_rows = [{"config": f"{r['model']} B={r['batch']}", "ms": r["ms"], "variant": r["variant"] + share(r)}
                  for r in rows if "ms" in r]
    if chart_rows:
        bench_unet.chart(os.path.join(args.out, "results.png"), chart_rows,
                         f"DiT / video transformer step, {info['dtype']}, {info['card']} (ms, lower is better)")
    print(f"wrote {args.out}/results.json, results.png ({info['total_s'] if rows else 0} s)")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
