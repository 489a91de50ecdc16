"""CPU emulation of low-precision attention forward, to choose the FP8 kernel's
quantization scheme by accuracy before writing it (issue 16).

    python tools/fp8_study.py --out /tmp/fp8            # Sq = Sk = 1024, 4 heads, d 40/64/80/128
    python tools/fp8_study.py --quick                   # Sq = Sk = 256, 2 heads, d 64

O = softmax(Q K^T * scale) V is computed per (batch, head) in float64 with an explicit
rounding at every point where the GPU kernel would round:

  inputs     bf16, or e4m3 / int8 grid values times an fp32 scale (per tensor or per block)
  S = Q K^T  summed over the head dim in k-steps of 32; the running sum rounded per step to
             fp32, or to "fp22" (1-8-13, Hopper's FP8 tensor-core accumulator); int8 is exact
  softmax    online over 128-key blocks in fp32: running max m, P = exp(S - m) <= 1, row sum l
             from the fp32 P (as FlashAttention-3 does), O rescaled by exp(m_old - m_new)
  P          rounded to bf16, or to e4m3 after scaling by 448 (P <= 1 would otherwise waste the
             format's upper range and fall into its subnormals)
  O += P V   summed over keys in k-steps of 32, running sum rounded per step as for S;
             "-2lvl": the fp22 sum is flushed into an fp32 accumulator every --flush keys
  output     O / l in fp32, rounded to bf16 for every scheme

The error of a scheme is ||O - O_ref|| / ||O_ref|| over all heads, O_ref in float64. The gate
here, an op-level proxy of issue 16's per-model gate (which compares whole-model outputs with
the model run in stock bf16, and so is looser): a scheme passes when its error is at most 2x the
bf16 scheme's error on the same inputs.

Zero padding of the head dim (40 -> 64, 80 -> 96 for k = 32) adds exact zeros to every sum
and is not emulated. Sq = Sk = 1024 keeps the CPU time to minutes; longer sequences add more
terms to each P V sum, which the accumulator model sees through the key count only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

F64 = torch.float64
E4M3_MAX = 448.0
INT8_MAX = 127.0
FP22_MANTISSA = 13
GATE_FACTOR = 2.0


# ---------------------------------------------------------------- rounding points

def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(F64)


def round_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(F64)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3fn value, saturating at +-448 (the kernel's cvt is satfinite)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(F64)


def round_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 grid: round half to even, clamp to +-127 (no -128, so the grid is symmetric)."""
    return torch.round(x).clamp(-INT8_MAX, INT8_MAX)


def round_mantissa(x: torch.Tensor, bits: int, mode: str = "trunc") -> torch.Tensor:
    """Keep `bits` explicit mantissa bits (fp32 exponent range, no subnormals).
    mode "trunc" rounds toward zero, the pessimistic reading of the reduced-precision
    accumulator (a bias that grows with the number of k-steps); "nearest" is round half even."""
    m, e = torch.frexp(x)                      # x = m * 2^e, |m| in [0.5, 1)
    s = float(2 ** (bits + 1))                 # bits + implicit bit significant bits
    m = torch.trunc(m * s) if mode == "trunc" else torch.round(m * s)
    return torch.ldexp(m, e) / s


def rounder(acc: str, acc_rounding: str):
    """The running-sum rounding of one accumulator kind: "fp32", "fp22" or "exact"."""
    if acc == "fp32":
        return round_fp32
    if acc == "fp22":
        return lambda x: round_mantissa(x, FP22_MANTISSA, acc_rounding)
    if acc == "exact":
        return lambda x: x
    raise ValueError(f"unknown accumulator {acc!r}; expected fp32, fp22 or exact")


# ---------------------------------------------------------------- quantizers

def quantize(x: torch.Tensor, fmt: str, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (H, S, D) float64. Returns (grid values (H, S, D), fp32 scale per row (H, S, 1)) with
    x ~= grid * scale. block: rows of one head sharing a scale; None = one scale per head."""
    h, s, d = x.shape
    fmax = {"e4m3": E4M3_MAX, "int8": INT8_MAX}[fmt]
    rows = s if block is None else block
    if s % rows:
        raise ValueError(f"sequence length {s} is not a multiple of the scale block {rows}")
    amax = x.abs().reshape(h, s // rows, rows * d).amax(-1, keepdim=True)     # (H, nblk, 1)
    scale = round_fp32(torch.where(amax > 0, amax / fmax, torch.ones_like(amax)))
    scale = scale.repeat_interleave(rows, dim=1)                              # (H, S, 1)
    grid = round_e4m3(x / scale) if fmt == "e4m3" else round_int8(x / scale)
    return grid, scale


# ---------------------------------------------------------------- schemes

@dataclass(frozen=True)
class Scheme:
    name: str
    qk: str                 # input format of Q and K: "bf16", "e4m3" or "int8"
    pv: str                 # input format of P and V: "bf16" or "e4m3"
    q_block: int | None     # query rows per Q scale; None = per (b, h) tensor
    k_block: int | None     # keys per K scale; None = per (b, h) tensor
    v_block: int | None     # keys per V scale; None = per (b, h) tensor
    smooth_k: bool          # subtract K's per-channel mean over the head's tokens
    acc: str                # "fp32", "fp22" (one level) or "fp22-2lvl"


def schemes(q_block: int = 128, kv_block: int = 128) -> list[Scheme]:
    out = [
        Scheme("bf16", "bf16", "bf16", None, None, None, False, "fp32"),
        Scheme("fp8-tensor", "e4m3", "e4m3", None, None, None, False, "fp32"),
    ]
    block = [
        ("fp8-block", "e4m3", False),
        ("fp8-block-smoothK", "e4m3", True),
        ("int8-qk-fp8-pv", "int8", True),
    ]
    # One side low precision, the other bf16: where the error comes from, and SageAttention1's
    # choice (int8 Q K, 16-bit P V).
    out += [
        Scheme("bf16-qk-fp8-pv", "bf16", "e4m3", None, None, kv_block, False, "fp32"),
        Scheme("fp8-qk-bf16-pv", "e4m3", "bf16", q_block, kv_block, None, True, "fp32"),
        Scheme("int8-qk-bf16-pv", "int8", "bf16", q_block, kv_block, None, True, "fp32"),
        # One scale per query row and per key: S's dequant is an outer product, still cheap.
        Scheme("int8tok-qk-bf16-pv", "int8", "bf16", 1, 1, None, True, "fp32"),
        Scheme("int8tok-qk-fp8-pv", "int8", "e4m3", 1, 1, kv_block, True, "fp32"),
    ]
    for acc, suffix in (("fp32", ""), ("fp22", "-fp22"), ("fp22-2lvl", "-fp22-2lvl")):
        for name, qk, smooth in block:
            out.append(Scheme(name + suffix, qk, "e4m3", q_block, kv_block, kv_block, smooth, acc))
    return out


def gate(err: float, bf16_err: float, factor: float = GATE_FACTOR) -> tuple[float, bool]:
    """(ratio to the bf16 error, whether the scheme meets the gate)."""
    ratio = err / bf16_err
    return ratio, bool(ratio <= factor)


# ---------------------------------------------------------------- attention

def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention in float64. q: (H, Sq, D), k, v: (H, Sk, D)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rnd, step: int) -> torch.Tensor:
    """acc + a @ b with the running sum rounded by rnd after every k-step of `step` terms.
    a: (H, M, K), b: (H, K, N); the products of one k-step are summed exactly."""
    for s in range(0, a.shape[-1], step):
        acc = rnd(acc + a[..., s:s + step] @ b[..., s:s + step, :])
    return acc


def two_level(a: torch.Tensor, b: torch.Tensor, low, step: int, flush: int) -> torch.Tensor:
    """a @ b summed in `low` precision, flushed into an fp32 sum every `flush` terms."""
    hi = torch.zeros(a.shape[:-1] + b.shape[-1:], dtype=F64)
    for s in range(0, a.shape[-1], flush):
        part = accumulate(torch.zeros_like(hi), a[..., s:s + flush], b[..., s:s + flush, :], low, step)
        hi = round_fp32(hi + part)
    return hi


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Scheme, *,
            key_block: int = 128, k_step: int = 32, flush: int = 128,
            acc_rounding: str = "trunc", round_output: bool = True) -> torch.Tensor:
    """Attention forward of one scheme. q: (H, Sq, D), k, v: (H, Sk, D) float64.
    Returns O (H, Sq, D) as float64 holding bf16 values (fp32 values if not round_output)."""
    h, sq_len, d = q.shape
    sk_len = k.shape[1]
    if sk_len % key_block or (scheme.v_block is not None and scheme.v_block % key_block):
        raise ValueError(f"Sk={sk_len} and v_block={scheme.v_block} must be multiples of "
                         f"key_block={key_block}: one V scale per P V block")
    if key_block % flush:
        raise ValueError(f"flush={flush} must divide key_block={key_block}")
    if scheme.smooth_k:
        k = k - k.mean(dim=1, keepdim=True)

    if scheme.qk == "bf16":
        qg, qs = round_bf16(q), torch.ones(h, sq_len, 1, dtype=F64)
        kg, ks = round_bf16(k), torch.ones(h, sk_len, 1, dtype=F64)
    else:
        qg, qs = quantize(q, scheme.qk, scheme.q_block)
        kg, ks = quantize(k, scheme.qk, scheme.k_block)
    if scheme.pv == "bf16":
        vg, vs = round_bf16(v), torch.ones(h, sk_len, 1, dtype=F64)
        p_scale = 1.0
    else:
        vg, vs = quantize(v, "e4m3", scheme.v_block)
        p_scale = E4M3_MAX

    low = scheme.acc.removesuffix("-2lvl")
    qk_rnd = rounder("exact" if scheme.qk == "int8" else low, acc_rounding)
    pv_rnd = rounder(low, acc_rounding)
    kt = kg.transpose(-1, -2)
    if scheme.acc.endswith("-2lvl") and scheme.qk != "int8":
        raw = two_level(qg, kt, qk_rnd, k_step, flush)
    else:
        raw = accumulate(torch.zeros(h, sq_len, sk_len, dtype=F64), qg, kt, qk_rnd, k_step)
    s_all = round_fp32(round_fp32(raw * (qs * ks.transpose(-1, -2))) / math.sqrt(d))

    m = torch.full((h, sq_len, 1), -math.inf, dtype=F64)
    l = torch.zeros(h, sq_len, 1, dtype=F64)
    o = torch.zeros(h, sq_len, d, dtype=F64)       # fp32 registers; in V-scale units unless -2lvl
    v_prev = torch.ones(h, 1, 1, dtype=F64)
    for j in range(0, sk_len, key_block):
        s = s_all[..., j:j + key_block]
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = round_fp32(torch.exp(m - m_new))
        p = round_fp32(torch.exp(s - m_new))
        l = round_fp32(l * alpha + round_fp32(p.sum(-1, keepdim=True)))
        pg = round_bf16(p) if scheme.pv == "bf16" else round_e4m3(p * p_scale)
        vblk, v_cur = vg[:, j:j + key_block], vs[:, j:j + 1]
        if scheme.acc.endswith("-2lvl"):
            o = round_fp32(o * alpha + round_fp32(two_level(pg, vblk, pv_rnd, k_step, flush) * v_cur))
        else:
            # One accumulator across blocks: a new block's V scale is folded into the rescale.
            o = round_fp32(o * round_fp32(alpha * v_prev / v_cur))
            o = accumulate(o, pg, vblk, pv_rnd, k_step)
            v_prev = v_cur
        m = m_new
    if not scheme.acc.endswith("-2lvl"):
        o = round_fp32(o * v_prev)
    o = round_fp32(o / round_fp32(l * p_scale))
    return round_bf16(o) if round_output else o


# ---------------------------------------------------------------- inputs

DISTRIBUTIONS = {
    "normal": "q, k, v ~ N(0,1), q and k scaled so the score std q.k/sqrt(d) is 2",
    "outlier-k": "as normal, K with +8 offset on 4 channels (per-channel mean, as diffusion K shows)",
    "peaked": "as normal with score std 6: a few keys dominate each row",
}


def make_inputs(dist: str, heads: int, seq: int, dim: int, seed: int = 0, keys: int | None = None):
    """(q (heads, seq, dim), k, v (heads, keys, dim)) float64, seeded; keys defaults to seq."""
    keys = keys or seq
    g = torch.Generator().manual_seed(seed)
    score_std = {"normal": 2.0, "outlier-k": 2.0, "peaked": 6.0}[dist]
    q = torch.randn(heads, seq, dim, generator=g, dtype=F64) * math.sqrt(score_std)
    k = torch.randn(heads, keys, dim, generator=g, dtype=F64) * math.sqrt(score_std)
    v = torch.randn(heads, keys, dim, generator=g, dtype=F64)
    if dist == "outlier-k":
        chans = torch.randperm(dim, generator=g)[:4]
        k[..., chans] += 8.0
    return q, k, v


def rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o - ref).norm() / ref.norm())


# ---------------------------------------------------------------- study

def study(dims, dists, heads: int, seq: int, *, keys: int | None = None, q_block: int = 128, kv_block: int = 128,
          flush: int = 128, acc_rounding: str = "trunc", head_chunk: int = 4, seed: int = 0,
          log=None) -> list[dict]:
    """One record per (scheme, head dim, distribution): error, ratio to bf16, gate. For the
    fp22 schemes, acc_err is the distance to the same scheme with fp32 accumulation (same
    quantized inputs, fp32 outputs before the bf16 rounding, which would otherwise turn
    small differences into whole-ulp flips), relative to ||O_ref||: the accumulator's share."""
    records = []
    all_schemes = schemes(q_block, kv_block)
    for dim in dims:
        for dist in dists:
            q, k, v = make_inputs(dist, heads, seq, dim, seed, keys)
            ref = reference(q, k, v)
            errs, outs = {}, {}
            for sc in all_schemes:
                t0 = time.time()
                o = torch.cat([emulate(q[i:i + head_chunk], k[i:i + head_chunk], v[i:i + head_chunk],
                                       sc, flush=flush, acc_rounding=acc_rounding, round_output=False)
                               for i in range(0, heads, head_chunk)])
                errs[sc.name] = (rel_err(round_bf16(o), ref), time.time() - t0)
                outs[sc.name] = o
            base = errs["bf16"][0]
            for sc in all_schemes:
                err, secs = errs[sc.name]
                ratio, ok = gate(err, base)
                rec = {"scheme": sc.name, "dim": dim, "dist": dist, "rel_err": err,
                       "ratio_to_bf16": ratio, "pass": ok, "seconds": round(secs, 3)}
                sibling = sc.name.split("-fp22")[0]
                if sc.acc != "fp32":
                    rec["acc_err"] = float((outs[sc.name] - outs[sibling]).norm() / ref.norm())
                    rec["acc_ratio"] = rec["acc_err"] / base
                records.append(rec)
            if log:
                log(f"d={dim} {dist}: bf16 err {base:.2e}")
    return records


def table(records: list[dict]) -> str:
    """Rows: schemes. Columns: (distribution, head dim) ratio to bf16, '*' marks a gate failure.
    The bf16 row holds its absolute error."""
    return _table(records, "ratio_to_bf16", gated=True)


def acc_table(records: list[dict]) -> str:
    """Rows: fp22 schemes. Cells: the accumulator's own error (acc_err) over the bf16 error."""
    return _table([r for r in records if "acc_ratio" in r], "acc_ratio", gated=False)


def _table(records: list[dict], key: str, gated: bool) -> str:
    cols = sorted({(r["dist"], r["dim"]) for r in records},
                  key=lambda c: (list(DISTRIBUTIONS).index(c[0]), c[1]))
    names = list(dict.fromkeys(r["scheme"] for r in records))
    by = {(r["scheme"], r["dist"], r["dim"]): r for r in records}
    head = "| scheme | " + " | ".join(f"{d} d{n}" for d, n in cols) + (" | all pass |" if gated else " |")
    lines = [head, "|" + "---|" * (len(cols) + 1 + gated)]
    for name in names:
        cells = []
        for d, n in cols:
            r = by[(name, d, n)]
            if name == "bf16":
                cells.append(f"{r['rel_err']:.2e}")
            else:
                cells.append(f"{r[key]:.2f}" + (" *" if gated and not r["pass"] else ""))
        ok = all(by[(name, d, n)]["pass"] for d, n in cols)
        tail = f" | {'yes' if ok else 'no'} |" if gated else " |"
        lines.append(f"| {name} | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory for results.json")
    ap.add_argument("--quick", action="store_true", help="Sq = Sk = 256, 2 heads, d 64")
    ap.add_argument("--seq", type=int, default=1024, help="Sq = Sk")
    ap.add_argument("--keys", type=int, help="Sk when it differs from Sq")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dims", default="40,64,80,128")
    ap.add_argument("--dists", default=",".join(DISTRIBUTIONS))
    ap.add_argument("--q-block", type=int, default=128, help="query rows per Q scale")
    ap.add_argument("--kv-block", type=int, default=128, help="keys per K / V scale")
    ap.add_argument("--flush", type=int, default=128, help="keys per fp22 -> fp32 flush (-2lvl)")
    ap.add_argument("--acc-rounding", choices=("trunc", "nearest"), default="trunc",
                    help="fp22 accumulator rounding")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.heads, args.dims = 256, 2, "64"
    dims = [int(x) for x in args.dims.split(",")]
    dists = args.dists.split(",")
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.time()
    records = study(dims, dists, args.heads, args.seq, keys=args.keys, q_block=args.q_block, kv_block=args.kv_block,
                    flush=args.flush, acc_rounding=args.acc_rounding, seed=args.seed,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"CPU emulation, float64 with explicit rounding; Sq = {args.seq}, Sk = {args.keys or args.seq}, "
          f"{args.heads} heads, "
          f"Q block {args.q_block}, K/V block {args.kv_block}, fp22 {args.acc_rounding}, "
          f"flush {args.flush}; gate: error <= {GATE_FACTOR:g} x bf16 error ('*' = fails)")
    print(table(records))
    print("\nfp22 accumulator's own error / bf16 error (same quantized inputs, fp32 vs fp22 sums):")
    print(acc_table(records))
    print(f"{time.time() - t0:.0f} s, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = {"conditions": {**vars(args), "gate_factor": GATE_FACTOR, "fp22_mantissa_bits": FP22_MANTISSA,
                                 "torch": torch.__version__, "distributions": DISTRIBUTIONS,
                                 "schemes": [asdict(s) for s in schemes(args.q_block, args.kv_block)]},
                  "records": records}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
