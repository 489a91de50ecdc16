"""dda.low_rank_accumulate (LoRA's B side for every adapter of one input, one kernel) against
float64 references: the C reference on the CPU, the tensor-core kernel on CUDA.

Tolerance (STYLE.md 7): the op's error against float64 may be at most twice the error of
PyTorch's own sequential computation in the same dtype (one addmm per segment into out),
plus a floor of a few units of rounding of the result.
"""
import math

import pytest
import torch

from deepspeed_diffusers_attn import ops

from conftest import requires_cuda

# Unit roundoff of each storage dtype, doubled (one rounding of out, one of the fp32 sum).
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Segment layouts (r0, r1, col0, n) and the widths R of t and N of out.
LAYOUTS = {
    # one adapter on one projection
    "one": (64, 96, [(0, 64, 0, 96)]),
    # rank 1, odd columns
    "rank1": (1, 40, [(0, 1, 5, 33)]),
    # two adapters (ranks 4 and 20) on the same projection: one target, summed once
    "same_target": (24, 48, [(0, 4, 0, 48), (4, 24, 0, 48)]),
    # two adapters (ranks 32, 64) x Q, K, V of a fused projection: three targets of two segments
    "qkv": (288, 240, [(0, 32, 0, 80), (32, 64, 80, 80), (64, 96, 160, 80),
                       (96, 160, 0, 80), (160, 224, 80, 80), (224, 288, 160, 80)]),
    # odd col0 and n, rank 20 and 32, a gap of untouched columns between the targets
    "odd": (52, 130, [(0, 20, 3, 77), (20, 52, 88, 40)]),
    # two targets reading the same ranks
    "shared_ranks": (32, 64, [(0, 32, 0, 24), (0, 32, 40, 24)]),
}


def make_case(M, layout, dtype, device, seed=0, lead=None):
    """t [M, R], factors [R] (one value per segment's ranks), segments with b [n, r], out [M, N]."""
    R, N, segs = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (M,)
    t = torch.randn(*shape, R, generator=gen, dtype=torch.float64).to(device, dtype)
    out = torch.randn(*shape, N, generator=gen, dtype=torch.float64).to(device, dtype)
    factors = torch.zeros(R, dtype=torch.float32)
    segments = []
    for r0, r1, col0, n in segs:
        factors[r0:r1] = 0.25 + torch.rand((), generator=gen).item() * 1.5
        b = torch.randn(n, r1 - r0, generator=gen, dtype=torch.float64) / math.sqrt(r1 - r0)
        segments.append((r0, r1, col0, b.to(device, dtype)))
    return t, factors.to(device), segments, out


def targets_mask(N, segments, device):
    cols = torch.zeros(N, dtype=torch.bool, device=device)
    for _, _, col0, b in segments:
        cols[col0:col0 + b.shape[0]] = True
    return cols


def reference(t, factors, segments, out, alpha, dtype=torch.float64):
    """out + alpha * sum f t b^T: in float64 (dtype float64), or PyTorch's sequential addmm per
    segment in `dtype` (the tolerance's yardstick). 2-D [M, N]."""
    R, N = t.shape[-1], out.shape[-1]
    t2 = t.reshape(-1, R).to(dtype)
    res = out.reshape(-1, N).to(dtype).clone()
    for r0, r1, col0, b in segments:
        f = factors[r0].item()
        if f == 0.0:
            continue
        cols = slice(col0, col0 + b.shape[0])
        res[:, cols] = torch.addmm(res[:, cols], t2[:, r0:r1], b.to(dtype).T, alpha=alpha * f)
    return res


def assert_matches(got, t, factors, segments, out0, alpha):
    """got (the op's out) against float64 within 2x PyTorch's own error + a rounding floor; the
    columns outside every target unchanged, bit for bit."""
    N = out0.shape[-1]
    got2 = got.reshape(-1, N)
    ref = reference(t, factors, segments, out0, alpha)
    same = reference(t, factors, segments, out0, alpha, dtype=out0.dtype)
    err_torch = (same.double() - ref).abs().max().item()
    err = (got2.double() - ref).abs().max().item()
    floor = 2 * EPS[out0.dtype] * max(ref.abs().max().item(), 1.0)
    assert err <= 2 * err_torch + floor, f"error {err:.3g} vs torch's {err_torch:.3g} (floor {floor:.3g})"
    outside = ~targets_mask(N, segments, got.device)
    assert torch.equal(got2[:, outside], out0.reshape(-1, N)[:, outside]), "wrote outside the targets"


def run(t, factors, segments, out, alpha):
    out0 = out.clone()
    ops.low_rank_accumulate(t, factors, segments, out, alpha)
    assert_matches(out, t, factors, segments, out0, alpha)


# --------------------------------------------------------------------------------- CPU --


@pytest.mark.parametrize("M", [1, 77, 4097])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu_matches_float64(M, layout):
    t, factors, segments, out = make_case(M, layout, torch.float32, "cpu")
    run(t, factors, segments, out, 0.7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["same_target", "qkv", "odd"])
def test_cpu_half_precision_reference(dtype, layout):
    t, factors, segments, out = make_case(77, layout, dtype, "cpu", seed=1)
    run(t, factors, segments, out, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [1.0001, 3.3, 1e-3, -0.7])
def test_cpu_16bit_conversions_round_like_torch(dtype, factor):
    """Every 16-bit pattern of b (subnormals, inf, NaN) through out = 0 + 1 * (factor * (1 * b)):
    the C reference's decoding and round-to-nearest-even encoding (overflow to inf, subnormal
    results) against torch's float32 -> dtype cast of the same fp32 value."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    b = bits.view(dtype).reshape(-1, 1)
    t = torch.ones(1, 1, dtype=dtype)
    out = torch.zeros(1, b.shape[0], dtype=dtype)
    ops.low_rank_accumulate(t, torch.tensor([factor]), [(0, 1, 0, b)], out, 1.0)
    expected = (b.float().reshape(1, -1) * torch.tensor(factor, dtype=torch.float32)).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    signed = (expected != 0) & ~expected.isnan()  # 0 + (-0) = +0, and a NaN's sign is unspecified
    assert torch.equal(out[signed].view(torch.int16) < 0, expected[signed].view(torch.int16) < 0)


def test_cpu_leading_dims_and_strided_out():
    """t [B, S, R] and out a column slice [B, S, N] of a wider buffer (row stride > N)."""
    t, factors, segments, out = make_case(0, "qkv", torch.float32, "cpu", lead=(2, 9))
    buf = torch.full((2, 9, 300), float("nan"))
    view = buf[..., 30:270]
    view.copy_(out)
    ops.low_rank_accumulate(t, factors, segments, view, 0.5)
    assert torch.isnan(buf[..., :30]).all() and torch.isnan(buf[..., 270:]).all(), "wrote outside out"
    assert_matches(view, t, factors, segments, out, 0.5)


def check_zero_factor_skips_inf(M, dtype, device):
    """A segment whose factor is 0 adds nothing, even with inf in its ranks of t (no 0 * inf).
    Returns the case (t, factors, segments, out after the call)."""
    t, factors, segments, out = make_case(M, "qkv", dtype, device)
    r0, r1 = segments[4][0], segments[4][1]
    t[:, r0:r1] = float("inf")
    factors[r0:r1] = 0.0
    out0 = out.clone()
    ops.low_rank_accumulate(t, factors, segments, out, 1.0)
    assert torch.isfinite(out).all()
    assert_matches(out, t, factors, segments, out0, 1.0)
    return t, factors, segments, out


def check_nan_factor_propagates(M, dtype, device):
    """A NaN factor gives NaN in its target's columns (3 .. 80) and nowhere else."""
    t, factors, segments, out = make_case(M, "odd", dtype, device)
    factors[0:20] = float("nan")  # the first target
    ops.low_rank_accumulate(t, factors, segments, out, 1.0)
    assert torch.isnan(out[:, 3:80]).all()
    assert torch.isfinite(out[:, 80:]).all()


def test_cpu_zero_factor_skips_inf():
    check_zero_factor_skips_inf(77, torch.float32, "cpu")


def test_cpu_all_zero_target_untouched():
    """A target whose factors are all 0 is not written at all (-0.0 and NaN in out stay)."""
    t, factors, segments, out = make_case(5, "same_target", torch.float32, "cpu")
    factors.zero_()
    out[0, 0] = -0.0
    out[1, 1] = float("nan")
    before = out.clone()
    ops.low_rank_accumulate(t, factors, segments, out, 1.0)
    assert torch.equal(out.view(torch.int32), before.view(torch.int32))


def test_cpu_nan_factor_propagates():
    check_nan_factor_propagates(33, torch.float32, "cpu")


def test_cpu_empty_rows_is_a_no_op():
    t, factors, segments, _ = make_case(1, "one", torch.float32, "cpu")
    ops.low_rank_accumulate(t[:0], factors, segments, torch.empty(0, 96), 1.0)


def test_cpu_bad_inputs_raise_clear_errors():
    t, factors, segments, out = make_case(8, "qkv", torch.float32, "cpu")
    b0 = segments[0][3]

    def call(segs=segments, t=t, factors=factors, out=out):
        ops.low_rank_accumulate(t, factors, segs, out, 1.0)

    most = ops.LOW_RANK_MAX_SEGMENTS  # the Python side's copy of the C limit, which the glue enforces
    with pytest.raises(RuntimeError, match=f"1 to {most} segments"):
        call([segments[0]] * (most + 1))
    with pytest.raises(RuntimeError, match=f"1 to {most} segments"):
        call([])
    one = segments[0]
    same = [(one[0], one[1], one[2], one[3])] * most  # the limit itself is taken
    call(same)
    with pytest.raises(RuntimeError, match=r"segment 0 has ranks \[r0, r1\) = \[280, 320\)"):
        call([(280, 320, 0, torch.randn(80, 40))])
    with pytest.raises(RuntimeError, match=r"segment 0 has ranks"):
        call([(5, 5, 0, torch.randn(80, 0))])
    with pytest.raises(RuntimeError, match=r"b\[0\] must be \[n, r1 - r0\] = \[n, 32\]"):
        call([(0, 32, 0, torch.randn(80, 16))])
    with pytest.raises(RuntimeError, match=r"b\[0\] must be contiguous"):
        call([(0, 32, 0, torch.randn(32, 80).T)])
    with pytest.raises(RuntimeError, match=r"writes columns \[col0, col0 \+ n\) = \[200, 280\) but out has N = 240"):
        call([(0, 32, 200, b0)])
    with pytest.raises(RuntimeError, match="overlap without being the same target"):
        call([(0, 32, 0, b0), (32, 64, 40, segments[1][3])])
    with pytest.raises(RuntimeError, match="factors must be a contiguous float32"):
        call(factors=factors.double())
    with pytest.raises(RuntimeError, match="factors must be a contiguous float32"):
        call(factors=factors[:10])
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        call(out=out.double())
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        call([(0, 32, 0, b0.double())])
    with pytest.raises(RuntimeError, match="same number of rows"):
        call(out=torch.randn(9, 240))
    with pytest.raises(RuntimeError, match="t must be float32, float16 or bfloat16"):
        call(t=t.double(), out=out.double(), segs=[(0, 32, 0, b0.double())])
    with pytest.raises(RuntimeError, match="must not overlap"):
        big = torch.randn(8, 288)
        call(t=big, out=big[:, :240])


def test_cpu_opcheck():
    t, factors, segments, out = make_case(7, "qkv", torch.float32, "cpu")
    b = [s[3] for s in segments]
    r0 = [s[0] for s in segments]
    r1 = [s[1] for s in segments]
    col0 = [s[2] for s in segments]
    torch.library.opcheck(torch.ops.dda.low_rank_accumulate.default, (t, factors, b, r0, r1, col0, 0.5, out))


def test_cpu_torch_compile_fullgraph():
    t, factors, segments, out = make_case(13, "qkv", torch.float32, "cpu", lead=(1, 13))

    def f(t, factors, out):
        y = out * 1.0
        ops.low_rank_accumulate(t, factors, segments, y, 0.5)
        return y + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(t, factors, out), f(t, factors, out), rtol=0, atol=0)


# -------------------------------------------------------------------------------- CUDA --


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 77, 4097])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_matches_float64(dtype, M, layout):
    t, factors, segments, out = make_case(M, layout, dtype, "cuda")
    run(t, factors, segments, out, 0.7)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 4, 8, 20, 24, 32, 64, 72, 130, 200])
def test_cuda_ranks_and_wide_targets(dtype, r):
    """Ranks below, at and above one 64-rank chunk (130, 200: several chunks and a tail), targets
    wider than one 128-column tile (296 = 2 full + a partial tile), two adapters on one target.
    The resident kernel runs r = 8, 24 (ranks zero-padded to 16), 32 and 64 (two adapters: its
    limit of 128 ranks a target); the general one r = 72 (past it) and the ranks that are not
    multiples of 8."""
    gen = torch.Generator().manual_seed(r)
    M, N = 200, 700
    t = torch.randn(M, 2 * r, generator=gen).to("cuda", dtype)
    out = torch.randn(M, N, generator=gen).to("cuda", dtype)
    factors = torch.cat([torch.full((r,), 0.8), torch.full((r,), -1.3)]).cuda()
    segs = [(0, r, 8, torch.randn(296, r, generator=gen).div(math.sqrt(r)).to("cuda", dtype)),
            (r, 2 * r, 8, torch.randn(296, r, generator=gen).div(math.sqrt(r)).to("cuda", dtype)),
            (0, r, 400, torch.randn(256, r, generator=gen).div(math.sqrt(r)).to("cuda", dtype))]
    run(t, factors, segs, out, 1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_misaligned_pointers_and_strides(dtype):
    """Element-wise fallbacks: t and out at odd offsets with odd row strides, b at an odd
    element offset (2-byte aligned only), ranks at r0 not a multiple of 8."""
    gen = torch.Generator().manual_seed(3)
    M, R, N = 150, 45, 203
    tbuf = torch.randn(M, R + 3, generator=gen).to("cuda", dtype)
    t = tbuf[:, 1:1 + R]
    obuf = torch.randn(M, N + 5, generator=gen).to("cuda", dtype)
    out = obuf[:, 3:3 + N]
    factors = torch.rand(R, generator=gen).add(0.5).cuda()
    factors[:13] = 0.6
    factors[13:45] = 1.4

    def odd_b(n, r):
        flat = torch.randn(n * r + 1, generator=gen).div(math.sqrt(r)).to("cuda", dtype)
        return flat[1:].view(n, r)

    segs = [(0, 13, 0, odd_b(100, 13)), (13, 45, 0, odd_b(100, 32)), (13, 45, 130, torch.randn(
        64, 32, generator=gen).div(math.sqrt(32)).to("cuda", dtype))]
    before = obuf.clone()
    out0 = out.clone()
    ops.low_rank_accumulate(t, factors, segs, out, 0.9)
    assert torch.equal(obuf[:, :3], before[:, :3]) and torch.equal(obuf[:, 3 + N:], before[:, 3 + N:])
    assert_matches(out, t, factors, segs, out0, 0.9)


@requires_cuda
def test_cuda_sixteen_segments():
    gen = torch.Generator().manual_seed(7)
    M, r = 333, 16
    R, N = 16 * r, 4 * 136
    t = torch.randn(M, R, generator=gen).cuda().half()
    out = torch.randn(M, N, generator=gen).cuda().half()
    factors = torch.rand(16, generator=gen).add(0.2).repeat_interleave(r).cuda()
    segs = [(s * r, (s + 1) * r, (s % 4) * 136, torch.randn(136, r, generator=gen).div(4).cuda().half())
            for s in range(16)]
    run(t, factors, segs, out, 1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_zero_factor_inf_nan_and_untouched(dtype):
    t, factors, segments, out = check_zero_factor_skips_inf(97, dtype, "cuda")

    factors.zero_()  # every factor 0: nothing written, bit for bit
    before = out.clone()
    ops.low_rank_accumulate(t, factors, segments, out, 1.0)
    assert torch.equal(out.view(torch.int16), before.view(torch.int16))

    check_nan_factor_propagates(97, dtype, "cuda")


@requires_cuda
def test_cuda_graph_replays_with_new_factors():
    """Capture once; changing the factors tensor in place (a segment to 0, then back) changes
    what the replay adds."""
    t, factors, segments, out = make_case(4097, "qkv", torch.float16, "cuda")
    base = out.clone()
    ops.low_rank_accumulate(t, factors, segments, out, 1.0)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(base)
        ops.low_rank_accumulate(t, factors, segments, out, 1.0)
    saved = factors.clone()
    r0, r1 = segments[1][0], segments[1][1]
    for step in ("as captured", "segment 1 off", "back on", "scaled"):
        if step == "segment 1 off":
            factors[r0:r1] = 0.0
        elif step == "back on":
            factors.copy_(saved)
        elif step == "scaled":
            factors.mul_(-2.0)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, t, factors, segments, base, 1.0)


@requires_cuda
def test_cuda_large_m():
    """300,001 rows (4,688 row tiles, a partial last one) x 3 targets."""
    t, factors, segments, out = make_case(300_001, "qkv", torch.bfloat16, "cuda", seed=5)
    run(t, factors, segments, out, 1.0)


@requires_cuda
def test_cuda_float32_refused_clearly():
    t, factors, segments, out = make_case(4, "one", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.low_rank_accumulate(t, factors, segments, out, 1.0)


@requires_cuda
def test_cuda_opcheck_and_compile():
    t, factors, segments, out = make_case(50, "qkv", torch.float16, "cuda")
    b = [s[3] for s in segments]
    args = (t, factors, b, [s[0] for s in segments], [s[1] for s in segments], [s[2] for s in segments], 0.5, out)
    torch.library.opcheck(torch.ops.dda.low_rank_accumulate.default, args)

    def f(t, factors, out):
        y = out * 1.0
        ops.low_rank_accumulate(t, factors, segments, y, 0.5)
        return y

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(t, factors, out), f(t, factors, out), rtol=0, atol=0)
