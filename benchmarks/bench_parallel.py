"""Several GPUs for one generation: context parallel (Ulysses, ring) for DiTs, CFG-parallel for
SDXL, against the same patched model on one GPU, in the same run.

    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py [--cases wan,flux,sdxl] [--out bench_parallel_out]
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --dry-run    # CPU, gloo, tiny configs

Cases (bf16 DiTs, fp16 SDXL, random weights from the real configs, seeded alike on every rank):

  wan   Wan2.1-T2V-1.3B, 480x832, --frames (81: 32760 tokens), B=1: ulysses and ring
  flux  Flux.1-dev 1024x1024 (4096 + 512 tokens), B=1: ulysses and ring
  sdxl  SDXL UNet 1024x1024, B=2 (uncond + cond): cfg (one row per rank, one all-gather)

Per case every rank first runs the patched model on the whole input on its own GPU ("1 GPU":
the GPUs are independent, so this is the one-GPU time, measured in the same run), then the
same model parallel over the W ranks (diffusers' context-parallel hooks with our attention,
:func:`deepspeed_diffusers_attn.context_parallel.enable`; or :func:`.parallel.cfg_parallel`).
Reported: ms per step (median of CUDA-event-timed calls after warm-up, the slowest rank's),
speedup = 1-GPU ms / parallel ms, scaling efficiency = speedup / W, the share of the parallel
step's kernel time in communication kernels (NCCL, from torch.profiler, rank 0), peak memory
per rank (it includes the unsharded model kept for the 1-GPU run: an upper bound), and the
error of the parallel output against the 1-GPU output. Eager (no CUDA graphs: the exchanges
check shapes and failures on the host).

Failures: each step of a case (building it, the 1-GPU reference, making the parallel copy,
its first call, its timing, its profile) ends with the ranks' failure agreement
(:func:`deepspeed_diffusers_attn.parallel.raise_if_any_failed`), so a step that raises on
some ranks only is recorded as that row's error on every rank, and all go on to the next row
together. A rank that fails inside the model's forward between two of its exchanges leaves
the others in the next exchange until ``--timeout`` (the process group's timeout, also the
agreement's). Targets (issue): Wan 1.8x on
2 GPUs and 3.3x on 4, SDXL CFG 1.8x on 2, Flux 1.7x on 2.

The dry run (gloo on CPUs, scaled-down configs, float32) checks the code paths; its numbers
mean nothing. Writes results.json to --out (rank 0).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (benchmarks/timing.py: event timing, the card and versions)

timing.add_repo_to_path()

import deepspeed_diffusers_attn as dda  # noqa: E402
from deepspeed_diffusers_attn import context_parallel  # noqa: E402
from deepspeed_diffusers_attn.configs import SDXL_UNET, scaled_down, sdxl_added_cond_shapes  # noqa: E402
from deepspeed_diffusers_attn.dit_example import MODELS, build_model, transformer_inputs  # noqa: E402
from deepspeed_diffusers_attn.parallel import cfg_parallel, raise_if_any_failed  # noqa: E402

CASES = {"wan": ("ulysses", "ring"), "flux": ("ulysses", "ring"), "sdxl": ("cfg",)}
COMM = ("nccl", "allgather", "all_gather", "alltoall", "sendrecv")  # communication kernel names (lower case)


def slowest(ms: float, device: torch.device) -> float:
    """The largest of every rank's ``ms`` (a step ends when its slowest rank does)."""
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def per_rank(value: float, device: torch.device) -> list:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [round(float(x.item()), 3) for x in out]


def on_every_rank(step, device: torch.device, timeout: datetime.timedelta):
    """``step()`` on this rank, then the ranks' failure agreement: its result where it succeeded
    on every rank; else an exception on every rank (the failing rank's own error, RuntimeError
    naming that rank on the others)."""
    error, result = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001  (raised below, on every rank)
        error = e
    raise_if_any_failed(error, device, None, timeout, "bench_parallel")
    return result


def comm_share(call, cuda: bool) -> float | None:
    """Communication kernels' share of one profiled call's kernel time (None on the CPU)."""
    if not cuda:
        return None
    from torch.autograd import DeviceType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [(e.name.lower(), e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    total = sum(us for _, us in kernels)
    return round(sum(us for n, us in kernels if any(c in n for c in COMM)) / total, 4) if total else None


def build(case: str, args, device, cuda: bool):
    """(the patched model, its call's keyword arguments, the call) for ``case``."""
    if case == "sdxl":
        from diffusers import UNet2DConditionModel

        config = scaled_down(SDXL_UNET) if args.dry_run else dict(SDXL_UNET)
        dtype = torch.float16 if cuda else torch.float32
        torch.manual_seed(0)
        model = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
        size = 16 if args.dry_run else 128
        gen = torch.Generator().manual_seed(1)
        inputs = {"sample": torch.randn(2, 4, size, size, generator=gen).to(device, dtype),
                  "timestep": torch.tensor(500.0, device=device),
                  "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"],
                                                       generator=gen).to(device, dtype),
                  "added_cond_kwargs": {k: torch.randn(s, generator=gen).to(device, dtype)
                                        for k, s in sdxl_added_cond_shapes(config, 2).items()}}
        dda.patch(model)
        return model, inputs, lambda m: m(**inputs).sample
    spec = MODELS[case]
    config = scaled_down(dict(spec.transformer)) if args.dry_run else dict(spec.transformer)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(config, device=device, dtype=dtype)
    side = 64 if args.dry_run else None
    inputs = transformer_inputs(spec, config, batch=1, height=side or spec.height, width=side or spec.width,
                                frames=(5 if args.dry_run else args.frames) if spec.frames else None,
                                text_tokens=16 if args.dry_run else None, device=device, dtype=dtype)
    dda.patch(model)
    return model, inputs, lambda m: m(**inputs)[0]


def bench_case(case: str, args, device, cuda: bool) -> list[dict]:
    world = dist.get_world_size()
    timeout = datetime.timedelta(seconds=args.timeout)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        if dist.get_rank() == 0:
            print(_fmt(row), flush=True)

    def error_text(e: BaseException) -> str:
        return f"{type(e).__name__}: {str(e)[:300]}"

    with torch.inference_mode():
        try:
            model, _, call = on_every_rank(lambda: build(case, args, device, cuda), device, timeout)
            ref, single = on_every_rank(lambda: (call(model).clone(), timing.time_eager(
                lambda: call(model), warmup=2, iters=args.iters, budget_ms=args.budget_ms, use_cuda=cuda)),
                device, timeout)
        except Exception as e:  # noqa: BLE001  (every rank raised: every mode's row says why)
            for mode in CASES[case]:
                report({"case": case, "mode": mode, "world": world, "error": error_text(e)})
            return rows
        single = slowest(single, device)
        for mode in CASES[case]:
            row = {"case": case, "mode": mode, "world": world, "one_gpu_ms": round(single, 3)}

            def parallel_copy():
                par = copy.deepcopy(model)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                if mode == "cfg":
                    cfg_parallel(par)
                else:
                    context_parallel.enable(par, mode)
                return par

            par = None
            try:
                par = on_every_rank(parallel_copy, device, timeout)
                out = on_every_rank(lambda: call(par), device, timeout)
                ms = on_every_rank(lambda: timing.time_eager(lambda: call(par), warmup=2, iters=args.iters,
                                                             budget_ms=args.budget_ms, use_cuda=cuda),
                                   device, timeout)
                share = on_every_rank(lambda: comm_share(lambda: call(par), cuda), device, timeout)
                ms = slowest(ms, device)
                row.update(ms=round(ms, 3), speedup=round(single / ms, 3), efficiency=round(single / ms / world, 3),
                           rel_err=timing.rel_err(out, ref), comm_share=share,
                           peak_mem_gb=per_rank(torch.cuda.max_memory_allocated() / 2**30, device) if cuda else None)
            except Exception as e:  # noqa: BLE001  (every rank raised the same step: all record it, go on)
                row["error"] = error_text(e)
            par = None  # the copy goes before the next mode makes its own
            report(row)
    return rows


def _fmt(r: dict) -> str:
    where = f"{r['case']:>4} {r['mode']:<7} W={r['world']}"
    if "error" in r:
        return f"{where} ERROR {r['error']}"
    share = "-" if r["comm_share"] is None else f"{100 * r['comm_share']:.1f}%"
    return (f"{where} 1 GPU {r['one_gpu_ms']:9.2f} ms  parallel {r['ms']:9.2f} ms  x{r['speedup']:.2f} "
            f"(efficiency {100 * r['efficiency']:.0f}%)  comm {share}  err {r['rel_err']:.2e}  "
            f"peak GB per rank {r['peak_mem_gb'] or '-'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--frames", type=int, default=81, help="Wan video frames, 4k+1 (81: 32760 tokens)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-ms", type=float, default=3000.0)
    p.add_argument("--out", default="bench_parallel_out")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds any collective may wait (the process group's timeout)")
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny configs, float32: check the code paths")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(cases) - set(CASES):
        p.error(f"unknown cases {sorted(set(cases) - set(CASES))}; choose from {list(CASES)}")
    if "RANK" not in os.environ:
        sys.exit("bench_parallel.py: run it under torchrun (torchrun --nproc-per-node 2 benchmarks/bench_parallel.py)")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit("bench_parallel.py: no CUDA device; use --dry-run to check the script on CPUs")
    if args.dry_run:
        args.iters, args.budget_ms = 2, 10.0
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    info = timing.card_info()
    info.update(card=info["name"] if cuda else "cpu (dry-run)", world=dist.get_world_size(), wan_frames=args.frames)
    if dist.get_rank() == 0:
        print(timing.card_line(info), flush=True)
    rows = [r for case in cases for r in bench_case(case, args, device, cuda)]
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"conditions": info, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}/results.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
