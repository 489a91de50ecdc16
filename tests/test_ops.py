"""The raw ops (torch.ops.dda.*) against float64 references, on CPU and (when present) CUDA.

Tolerances come from the error of PyTorch's own computation in the same precision
against the same float64 reference: ours may be at most twice that (STYLE.md 7),
with a floor of a few units of rounding for the cases where PyTorch happens to be exact.
"""
import math
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

from deepspeed_diffusers_attn import ops

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def sdpa_ref(q, k, v, mask, scale):
    """q [B,Sq,H,D], k/v [B,Sk,H,D] → [B,Sq,H,D], computed by torch in q's dtype (math path)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def packed_qkv(B, Sq, Sk, H, D, dtype, device, gen, cross):
    """q/k/v as the projection leaves them: views of packed [B,S,3,H,D] or [B,Sq,H,D]+[B,Sk,2,H,D]."""
    if not cross:
        qkv = torch.randn(B, Sq, 3, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
        return qkv.unbind(2)
    q = torch.randn(B, Sq, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    kv = torch.randn(B, Sk, 2, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    k, v = kv.unbind(2)
    return q, k, v


def make_mask(kind, B, H, Sq, Sk, gen, device):
    if kind is None:
        return None
    if kind == "add_b1k":  # what the UNet builds from an encoder attention mask: (B, 1, Sk)
        keep = torch.rand(B, 1, 1, Sk, generator=gen) > 0.3
        keep[..., 0] = True
        return ((~keep).double() * -10000.0).float().to(device)
    if kind == "add_full":
        return torch.randn(B, H, Sq, Sk, generator=gen).float().to(device)
    if kind == "bool_q":
        keep = torch.rand(B, 1, Sq, Sk, generator=gen) > 0.5
        keep[..., 0] = True
        return keep.to(device)
    raise ValueError(kind)


CPU_CASES = [
    # B, H, Sq, Sk, D, cross, mask
    (1, 1, 1, 1, 8, False, None),
    (2, 3, 77, 77, 40, False, None),
    (2, 2, 97, 77, 64, True, "add_b1k"),
    (1, 2, 65, 130, 80, True, "bool_q"),
    (2, 1, 33, 33, 128, False, "add_full"),
    (1, 2, 17, 77, 160, True, None),
    (1, 1, 70, 70, 512, False, "add_b1k"),
]


@pytest.mark.parametrize("B,H,Sq,Sk,D,cross,mask_kind", CPU_CASES)
def test_attention_cpu_matches_float64(B, H, Sq, Sk, D, cross, mask_kind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, H, Sq, Sk, D, cross, mask_kind)).encode()))
    q, k, v = packed_qkv(B, Sq, Sk, H, D, torch.float32, "cpu", gen, cross)
    mask = make_mask(mask_kind, B, H, Sq, Sk, gen, "cpu")
    scale = 1.0 / math.sqrt(D)
    out = torch.full((B, Sq, H, D), float("nan"))
    lse = torch.full((B, H, Sq), float("nan"))
    ops.attention_out(q, k, v, mask, scale, out, lse)
    ref = sdpa_ref(q.double(), k.double(), v.double(), mask if mask is None or mask.dtype == torch.bool else mask.double(), scale)
    torch_err = rel_err(sdpa_ref(q, k, v, mask, scale), ref)
    assert torch.isfinite(out).all(), "some outputs were not written"
    assert rel_err(out, ref) <= max(2 * torch_err, 8 * EPS[torch.float32])
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_rows_give_zero():
    gen = torch.Generator().manual_seed(1)
    q, k, v = packed_qkv(2, 9, 9, 2, 16, torch.float32, "cpu", gen, False)
    keep = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    keep[0, 0, 3] = False  # row 3 of batch 0 attends nothing
    out, lse = ops.attention(q, k, v, keep, None, return_lse=True)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))
    assert torch.isneginf(lse[0, :, 3]).all()
    assert torch.isfinite(out).all()
    additive = torch.zeros(2, 1, 1, 9)
    additive[1] = float("-inf")
    out2, _ = ops.attention(q, k, v, additive, None)
    assert torch.equal(out2[1], torch.zeros_like(out2[1]))
    assert torch.isfinite(out2[0]).all() and out2[0].abs().sum() > 0


def test_attention_default_scale_and_lse_shape():
    gen = torch.Generator().manual_seed(2)
    q, k, v = packed_qkv(1, 5, 7, 2, 24, torch.float32, "cpu", gen, True)
    out, lse = ops.attention(q, k, v)
    assert out.shape == (1, 5, 2, 24) and out.is_contiguous()
    assert lse.numel() == 0
    ref = sdpa_ref(q.double(), k.double(), v.double(), None, 24**-0.5)
    assert rel_err(out, ref) < 1e-5


LINEAR_CASES = [
    # M-shape, K, N, bias, residual, alpha, beta
    ((1, 1), 8, 8, False, False, 1.0, 1.0),
    ((2, 77), 320, 960, True, False, 1.0, 1.0),
    ((3, 5, 7), 40, 24, True, True, 0.5, 2.0),
    ((2, 33), 768, 640, False, True, 1.0, 1.0),
]


@pytest.mark.parametrize("lead,K,N,has_bias,has_res,alpha,beta", LINEAR_CASES)
def test_linear_cpu_matches_float64(lead, K, N, has_bias, has_res, alpha, beta):
    gen = torch.Generator().manual_seed(K * 1000 + N)
    x = torch.randn(*lead, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / math.sqrt(K)
    b = torch.randn(N, generator=gen) if has_bias else None
    r = torch.randn(*lead, N, generator=gen) if has_res else None
    y = ops.linear(x, w, b, r, alpha, beta)
    ref = alpha * (x.double() @ w.double().T)
    if r is not None:
        ref = ref + beta * r.double()
    if b is not None:
        ref = ref + b.double()
    mine = alpha * (x @ w.T) + (beta * r if r is not None else 0) + (b if b is not None else 0)
    assert y.shape == (*lead, N)
    assert rel_err(y, ref) <= max(2 * rel_err(mine, ref), 8 * EPS[torch.float32])


def test_linear_out_writes_a_strided_slice_only():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 32, generator=gen)
    w = torch.randn(48, 32, generator=gen)
    packed = torch.full((2, 11, 2, 48), float("nan"))
    ops.linear_out(x, w, None, None, 1.0, 0.0, packed[:, :, 1])
    assert torch.isnan(packed[:, :, 0]).all(), "wrote outside the slice"
    torch.testing.assert_close(packed[:, :, 1], x @ w.T, rtol=1e-5, atol=1e-5)


def _opcheck_samples(device, dtype):
    gen = torch.Generator().manual_seed(4)
    q, k, v = packed_qkv(2, 13, 9, 2, 16, dtype, device, gen, True)
    mask = torch.zeros(2, 1, 1, 9, device=device, dtype=torch.float32)
    x = torch.randn(2, 7, 16, generator=gen).to(device, dtype)
    w = torch.randn(24, 16, generator=gen).to(device, dtype)
    b = torch.randn(24, generator=gen).to(device, dtype)
    r = torch.randn(2, 7, 24, generator=gen).to(device, dtype)
    return [
        (torch.ops.dda.linear.default, (x, w, b, r, 0.5, 1.0)),
        (torch.ops.dda.linear.default, (x, w, None, None, 1.0, 0.0)),
        (torch.ops.dda.linear_out.default, (x, w, b, None, 1.0, 0.0, torch.empty(2, 7, 24, device=device, dtype=dtype))),
        (torch.ops.dda.attention.default, (q, k, v, mask, 0.25, True)),
        (torch.ops.dda.attention.default, (q, k, v, None, 0.25, False)),
        (torch.ops.dda.attention.default, (q, k, v, mask, 0.25, False, "generic" if device == "cuda" else "reference")),
        (
            torch.ops.dda.attention_out.default,
            (q, k, v, None, 0.25, torch.empty(2, 13, 2, 16, device=device, dtype=dtype),
             torch.empty(2, 2, 13, device=device)),
        ),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    for op, args in _opcheck_samples(device, dtype):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_cpu():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 32, generator=gen)
    w = torch.randn(96, 32, generator=gen)
    wo = torch.randn(32, 32, generator=gen)

    def block(x):
        qkv = ops.linear(x, w).view(2, 10, 3, 4, 8)
        q, k, v = qkv.unbind(2)
        o, _ = ops.attention(q, k, v, None, 0.3)
        return ops.linear(o.view(2, 10, 32), wo, None, x, 1.0, 1.0)

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_attention_backends_on_cpu():
    backends = ops.attention_backends()
    assert backends[:2] == ("auto", "reference")
    assert {"generic", "mma", "short", "d512", "sm90", "sm90_tma"} <= set(backends)
    gen = torch.Generator().manual_seed(9)
    q, k, v = packed_qkv(2, 13, 9, 2, 16, torch.float32, "cpu", gen, True)
    auto, _ = ops.attention(q, k, v)
    ref, _ = ops.attention(q, k, v, backend="reference")
    assert torch.equal(auto, ref)
    assert ops.attention_supported(q, k, v) == "" and ops.attention_supported(q, k, v, backend="reference") == ""
    assert ops.attention_kernel_for(q, k, v, backend="reference") == "cpu_reference"
    for family in backends[2:]:  # the CUDA families: refused on CPU tensors, naming why
        why = ops.attention_supported(q, k, v, backend=family)
        assert "CPU tensors run only the C reference" in why, why
        assert ops.attention_kernel_for(q, k, v, backend=family).startswith("unsupported: ")
        with pytest.raises(RuntimeError, match=f'backend "{family}" cannot run these inputs: CPU tensors'):
            ops.attention(q, k, v, backend=family)
    with pytest.raises(RuntimeError, match='unknown backend "fast"'):
        ops.attention(q, k, v, backend="fast")
    assert "multiple of 8 in [8, 512]" in ops.attention_supported(q[..., :12], k[..., :12], v[..., :12])
    assert "float32 only" in ops.attention_supported(q.half(), k.half(), v.half())


def test_torch_compile_fullgraph_backend_argument_cpu():
    gen = torch.Generator().manual_seed(10)
    q, k, v = packed_qkv(1, 6, 6, 2, 8, torch.float32, "cpu", gen, False)

    def f(q, k, v):
        return ops.attention(q, k, v, None, 0.5, backend="reference")[0] * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_attention_kernel_name_cpu():
    assert ops.attention_kernel_name("cpu", torch.float32, 40, 77) == "cpu_reference"
    assert ops.attention_kernel_name("cpu", torch.float16, 40, 77).startswith("unsupported")
    assert ops.attention_kernel_name("cpu", torch.float32, 44, 77).startswith("unsupported")
    assert isinstance(ops.cuda_built(), bool)


def test_attention_sizes_beyond_int32_are_named():
    # The C ABI's sizes are ints: B = 2^31 (stride-0 tensors, no memory) is refused with its
    # name, value and the limit, where a cast would have wrapped it to "B ... must be >= 1".
    big = 2**31
    q = torch.zeros(1, 1, 1, 8).expand(big, 1, 1, 8)
    out = torch.zeros(1, 1, 1, 8).expand(big, 1, 1, 8)
    msg = "B (q.size(0)) = 2147483648 is beyond the largest size the attention kernels take, 2^31 - 1 = 2147483647"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.attention(q, q, q)  # before allocating the [2^31, 1, 1, 8] output
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.attention_out(q, q, q, None, 1.0, out)
    assert msg in ops.attention_supported(q, q, q)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.attention_kernel_for(q, q, q)
    k = torch.zeros(1, 1, 1, 8).expand(1, big, 1, 8)
    assert "Sk (k.size(1)) = 2147483648 is beyond" in ops.attention_supported(q[:1], k, k)
    h = torch.zeros(1, 1, 1, 8).expand(1, 1, big, 8)
    assert "H (q.size(2)) = 2147483648 is beyond" in ops.attention_supported(h, h, h)


# ---------------------------------------------------------------- CUDA ----

GPU_ATTN_CASES = [
    # B, H, Sq, Sk, D, cross, mask
    (2, 8, 77, 77, 40, False, None),
    (2, 3, 97, 77, 40, True, "add_b1k"),
    (1, 2, 4097, 4097, 64, False, None),
    (2, 2, 1, 77, 80, True, None),
    (2, 2, 257, 1, 80, True, None),
    (1, 2, 300, 300, 128, False, "bool_q"),
    (2, 2, 256, 256, 160, False, "add_full"),
    (2, 1, 4097, 77, 160, True, "add_b1k"),
    (1, 1, 1000, 1000, 512, False, None),
    (1, 1, 77, 4097, 512, True, None),
    (1, 3, 333, 128, 96, True, "bool_q"),      # the short-key kernel at its 128-key bound
    (2, 2, 500, 100, 64, True, "add_full"),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,Sq,Sk,D,cross,mask_kind", GPU_ATTN_CASES)
def test_attention_cuda_matches_float64(B, H, Sq, Sk, D, cross, mask_kind, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, H, Sq, Sk, D, cross, mask_kind, dtype)).encode()))
    q, k, v = packed_qkv(B, Sq, Sk, H, D, dtype, "cuda", gen, cross)
    mask = make_mask(mask_kind, B, H, Sq, Sk, gen, "cuda")
    if mask is not None and mask.dtype != torch.bool and dtype != torch.float32:
        mask = mask.to(dtype)  # also exercises the fp16/bf16 additive-mask path
    scale = 1.0 / math.sqrt(D)
    out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=dtype)
    lse = torch.full((B, H, Sq), float("nan"), device="cuda")
    ops.attention_out(q, k, v, mask, scale, out, lse)
    torch.cuda.synchronize()
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref = sdpa_ref(q.double(), k.double(), v.double(), m64, scale)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_err = rel_err(sdpa_ref(q, k, v, mask, scale), ref)
    assert torch.isfinite(out).all(), "some outputs were not written"
    assert rel_err(out, ref) <= max(2 * torch_err, 4 * EPS[dtype])
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if m64 is not None:
        s = s.masked_fill(~m64, float("-inf")) if m64.dtype == torch.bool else s + m64
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-4, atol=1e-3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,K,N,has_bias,has_res,alpha,beta", LINEAR_CASES + [((2, 4096), 320, 960, True, True, 1.0, 1.0)])
def test_linear_cuda_matches_float64(lead, K, N, has_bias, has_res, alpha, beta, dtype):
    gen = torch.Generator().manual_seed(K * 7 + N)
    x = torch.randn(*lead, K, generator=gen).to("cuda", dtype)
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to("cuda", dtype)
    b = torch.randn(N, generator=gen).to("cuda", dtype) if has_bias else None
    r = torch.randn(*lead, N, generator=gen).to("cuda", dtype) if has_res else None
    y = torch.full((*lead, N), float("nan"), device="cuda", dtype=dtype)
    ops.linear_out(x, w, b, r, alpha, beta, y)
    ref = alpha * (x.double() @ w.double().T)
    if r is not None:
        ref = ref + beta * r.double()
    if b is not None:
        ref = ref + b.double()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mine = alpha * F.linear(x, w) + (beta * r if r is not None else 0) + (b if b is not None else 0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= max(2 * rel_err(mine, ref), 4 * EPS[dtype])


@requires_cuda
def test_cuda_kernel_name_reported():
    name = ops.attention_kernel_name("cuda", torch.float16, 40, 4096)
    assert name and not name.startswith("unsupported"), name
    assert ops.attention_kernel_name("cuda", torch.float16, 44, 77).startswith("unsupported")


# Shapes where the automatic dispatch takes each tensor-core kernel on a Hopper card
# with an sm_90a build (unmasked, Sk > 128: the TMA kernel), and where it does not.
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Sq,Sk,D,cross,expect", [
    (2, 10, 4097, 4097, 64, False, "tma_ws_sm90"),  # SDXL down1 self, odd length
    (2, 9, 2000, 3001, 128, True, "tma_ws_sm90"),   # d128, ragged Sq / Sk
    (2, 10, 4096, 77, 64, True, "short_sm80"),      # cross-attention: K / V resident, Q streamed
    (2, 8, 4097, 77, 40, True, "short_sm80"),       # SD1.5 cross, odd length
    (2, 4, 1000, 129, 64, True, "mma_sm80"),        # one key past the short kernel's bound
    (2, 8, 4097, 4097, 40, False, "tma_ws_sm90"),   # d40 at its own width (DP 48)
    (2, 8, 1025, 1025, 80, False, "tma_ws_sm90"),   # d80
    (2, 12, 2000, 2000, 96, False, "wgmma_sm90"),   # D 96: the cp.async Hopper kernel
])
def test_attention_cuda_kernel_choice_and_accuracy(B, H, Sq, Sk, D, cross, expect, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, H, Sq, Sk, D, dtype)).encode()))
    q, k, v = packed_qkv(B, Sq, Sk, H, D, dtype, "cuda", gen, cross)
    name = ops.attention_kernel_for(q, k, v)
    hopper = torch.cuda.get_device_capability()[0] == 9
    sm90 = hopper and "wgmma_sm90" in ops.attention_kernel_name("cuda", dtype, D, Sk)
    if expect in ("wgmma_sm90", "tma_ws_sm90") and not sm90:
        expect = "mma_sm80"  # pre-Hopper card, or a build without sm_90a
    if expect == "mma_sm80" and hopper and "tma_ws_sm90" in ops.attention_kernel_name("cuda", dtype, D, Sk):
        expect = "tma_ws_sm90"  # Sk > 128 on a Hopper build: the TMA kernel
    if expect == "wgmma_sm90" and B * H * ((Sq + 191) // 192) < torch.cuda.get_device_properties(0).multi_processor_count:
        expect = "mma_sm80"  # the cp.async kernel wants a full wave of 192-row blocks
    assert name.startswith(expect), name
    # the misaligned copy of q (offset by one element) must leave the tensor-core kernels
    q_mis = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)[1:].view(q.shape).copy_(q)
    assert ops.attention_kernel_for(q_mis, k, v).startswith("generic_simt"), ops.attention_kernel_for(q_mis, k, v)
    out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=dtype)
    ops.attention_out(q, k, v, None, 1.0 / math.sqrt(D), out, None)
    ref = sdpa_ref(q.double(), k.double(), v.double(), None, 1.0 / math.sqrt(D))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_err = rel_err(sdpa_ref(q, k, v, None, 1.0 / math.sqrt(D)), ref)
    assert torch.isfinite(out).all(), "some outputs were not written"
    assert rel_err(out, ref) <= max(2 * torch_err, 4 * EPS[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_cuda_head_major_layout_and_mask(dtype):
    # q/k/v as [B, H, S, D] tensors seen as [B, S, H, D] (the head the larger stride): the TMA
    # kernel maps them in (d, s, h, b) order. An additive mask moves the call off the TMA kernel.
    B, H, S, D = 2, 4, 1000, 64
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).to("cuda", dtype).transpose(1, 2)
               for _ in range(3))
    mask = torch.randn(B, 1, S, S, generator=gen, dtype=torch.float64).to("cuda", dtype)
    tma = torch.cuda.get_device_capability()[0] == 9 and "tma_ws_sm90" in ops.attention_kernel_name("cuda", dtype, D, S)
    assert ops.attention_kernel_for(q, k, v).startswith("tma_ws_sm90" if tma else "mma_sm80")
    assert not ops.attention_kernel_for(q, k, v, mask).startswith("tma_ws_sm90")
    for m in (None, mask):
        out = torch.full((B, S, H, D), float("nan"), device="cuda", dtype=dtype)
        ops.attention_out(q, k, v, m, 1.0 / math.sqrt(D), out, None)
        ref = sdpa_ref(q.double(), k.double(), v.double(), None if m is None else m.double(), 1.0 / math.sqrt(D))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            torch_err = rel_err(sdpa_ref(q, k, v, m, 1.0 / math.sqrt(D)), ref)
        assert torch.isfinite(out).all(), "some outputs were not written"
        assert rel_err(out, ref) <= max(2 * torch_err, 4 * EPS[dtype])


def test_attention_kernel_for_cpu():
    q, k, v = torch.randn(3, 1, 5, 2, 8).unbind(0)
    assert ops.attention_kernel_for(q, k, v) == "cpu_reference"
    with pytest.raises(RuntimeError):
        ops.attention_kernel_for(q, k[..., :4], v)


# The kernel names of each CUDA family (what attention_kernel_for reports).
FAMILY_PREFIX = {"generic": "generic_simt", "mma": "mma_sm80", "short": "short_sm80", "d512": "mma_d512",
                 "sm90": "wgmma_sm90", "sm90_tma": "tma_ws_sm90"}

# The same inputs through every family that takes them; the others must refuse, naming why.
BACKEND_CASES = [
    # B, H, Sq, Sk, D, cross, mask
    (2, 3, 200, 200, 64, False, None),        # generic, mma, sm90, sm90_tma
    (2, 2, 97, 77, 80, True, "add_b1k"),      # generic, short, mma, sm90 (a mask: no sm90_tma)
    (1, 2, 130, 300, 128, True, None),        # generic, mma, sm90, sm90_tma
    (1, 1, 100, 150, 512, False, None),       # generic, d512
    (2, 2, 33, 33, 40, False, "bool_q"),      # generic, short, mma, sm90
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,H,Sq,Sk,D,cross,mask_kind", BACKEND_CASES)
def test_attention_every_backend_same_inputs(B, H, Sq, Sk, D, cross, mask_kind, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("backends", B, H, Sq, Sk, D, mask_kind, dtype)).encode()))
    q, k, v = packed_qkv(B, Sq, Sk, H, D, dtype, "cuda", gen, cross)
    mask = make_mask(mask_kind, B, H, Sq, Sk, gen, "cuda")
    scale = 1.0 / math.sqrt(D)
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref = sdpa_ref(q.double(), k.double(), v.double(), m64, scale)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_err = rel_err(sdpa_ref(q, k, v, mask, scale), ref)
    if dtype == torch.float32:  # the same precision's other reference: our C reference's error
        cpu = [t.cpu() for t in (q, k, v)] + [None if mask is None else mask.cpu()]
        torch_err = max(torch_err, rel_err(ops.attention(*cpu, scale)[0], ref.cpu()))
    auto = ops.attention_kernel_for(q, k, v, mask)
    ran = []
    for family in ops.attention_backends()[2:]:
        why = ops.attention_supported(q, k, v, mask, backend=family)
        if why:
            assert ops.attention_kernel_for(q, k, v, mask, backend=family) == "unsupported: " + why
            with pytest.raises(RuntimeError, match=f'backend "{family}" cannot run these inputs'):
                ops.attention(q, k, v, mask, scale, backend=family)
            continue
        name = ops.attention_kernel_for(q, k, v, mask, backend=family)
        assert name.startswith(FAMILY_PREFIX[family]), (family, name)
        if name == auto:
            ran.append("auto")
        out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=dtype)
        lse = torch.full((B, H, Sq), float("nan"), device="cuda")
        ops.attention_out(q, k, v, mask, scale, out, lse, backend=family)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{family}: some outputs were not written"
        assert rel_err(out, ref) <= max(2 * torch_err, 4 * EPS[dtype]), family
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        if m64 is not None:
            s = s.masked_fill(~m64, float("-inf")) if m64.dtype == torch.bool else s + m64
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-4, atol=1e-3)
        ran.append(family)
    assert "generic" in ran and "auto" in ran, (ran, auto)  # auto is one of the named families
    if dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 8:
        assert ("d512" if D > 256 else "mma") in ran, ran
        if Sk <= 128:
            assert "short" in ran, ran
        hopper = "wgmma_sm90" in ops.attention_kernel_name("cuda", dtype, 64, 4096) or "tma_ws_sm90" in ops.attention_kernel_name("cuda", dtype, 64, 4096)
        if hopper and D <= 256:
            assert "sm90" in ran and ("sm90_tma" in ran) == (mask is None and D in (40, 64, 80, 128)), ran
    else:
        assert set(ran) == {"generic", "auto"}, ran


# Many short sequences: AnimateDiff-style temporal attention over 16 frames, B * H far beyond
# the 65535 of gridDim.y / z (262,150: SDXL's 10 heads over 26,215 pixel sequences).
MANY_SEQUENCE_CASES = [
    # B, H, Sq, Sk, D, cross
    (70000, 1, 16, 16, 64, False),
    (17500, 4, 16, 77, 40, True),
    (26215, 10, 16, 16, 64, False),
    (75000, 4, 16, 16, 40, False),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Sq,Sk,D,cross", MANY_SEQUENCE_CASES)
def test_attention_many_short_sequences(B, H, Sq, Sk, D, cross, dtype):
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(("many", B, H, Sq, Sk, D, cross)).encode()))
    if cross:
        q = torch.randn(B, Sq, H, D, generator=gen, device="cuda", dtype=dtype)
        k, v = torch.randn(B, Sk, 2, H, D, generator=gen, device="cuda", dtype=dtype).unbind(2)
    else:
        q, k, v = torch.randn(B, Sq, 3, H, D, generator=gen, device="cuda", dtype=dtype).unbind(2)
    scale = D**-0.5
    # Checked sequences: every head of the batch entries around b * H + h = 65535 and at both ends.
    bh = torch.tensor([0, 1, 65534, 65535, 65536, 65537, B * H // 2, B * H - 2, B * H - 1])
    picks = torch.unique(bh[bh < B * H] // H).cuda()
    qs, ks, vs = q[picks], k[picks], v[picks]
    ref = sdpa_ref(qs.double(), ks.double(), vs.double(), None, scale)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_err = rel_err(sdpa_ref(qs, ks, vs, None, scale), ref)
    lse_ref = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", qs.double(), ks.double()) * scale, -1)
    ran = []
    for backend in ["auto"] + list(ops.attention_backends()[2:]):
        why = ops.attention_supported(q, k, v, None, backend=backend)
        if why:
            assert "thread blocks" not in why, (backend, why)  # far below the grid limit
            continue
        out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=dtype)
        lse = torch.full((B, H, Sq), float("nan"), device="cuda")
        ops.attention_out(q, k, v, None, scale, out, lse, backend=backend)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"{backend}: some outputs were not written"
        assert rel_err(out[picks], ref) <= max(2 * torch_err, 4 * EPS[dtype]), backend
        torch.testing.assert_close(lse[picks].double(), lse_ref, rtol=1e-4, atol=1e-3)
        if backend == "auto":  # the functional op: the same kernel, bit for bit
            assert torch.equal(ops.attention(q, k, v, None, scale)[0], out)
        ran.append(backend)
        del out, lse
    assert "auto" in ran and "generic" in ran, ran


@requires_cuda
def test_attention_grid_beyond_2_31_blocks_names_the_count():
    # B * H = 2^32 (b, h) pairs over stride-0 (expanded) tensors: no memory, and every family
    # would need at least 2^32 thread blocks. Refused before any launch, stating the count.
    q = torch.zeros(1, 16, 1, 64, device="cuda", dtype=torch.float16).expand(2**20, 16, 4096, 64)
    out = torch.zeros(1, 16, 1, 64, device="cuda", dtype=torch.float16).expand(q.shape)
    why = ops.attention_supported(q, q, q)
    assert "needs 4294967296 thread blocks in one launch" in why, why
    assert "B x H = 1048576 x 4096" in why and "2^31 - 1 = 2147483647" in why, why
    assert ops.attention_kernel_for(q, q, q) == "unsupported: " + why
    for backend in ops.attention_backends()[2:]:
        reason = ops.attention_supported(q, q, q, backend=backend)
        assert reason, backend
        if "thread blocks" in reason:
            with pytest.raises(RuntimeError, match=f'backend "{backend}" cannot run these inputs: needs '):
                ops.attention_out(q, q, q, None, 0.125, out, backend=backend)
    with pytest.raises(RuntimeError, match="no attention kernel runs these inputs on this device: needs 4294967296"):
        ops.attention_out(q, q, q, None, 0.125, out)


@requires_cuda
def test_cuda_graph_capture_of_ops():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, 32, generator=gen).cuda().half()
    w = torch.randn(96, 32, generator=gen).cuda().half()

    def step():
        q, k, v = ops.linear(x, w).view(2, 64, 3, 4, 8).unbind(2)
        return ops.attention(q, k, v)[0]

    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture (plans, allocator)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    x.copy_(torch.randn(2, 64, 32, generator=gen).half())
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, step())
    assert not torch.equal(captured, eager)


@requires_cuda
def test_torch_compile_fullgraph_cuda():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 32, generator=gen).cuda().half()
    w = torch.randn(96, 32, generator=gen).cuda().half()

    def block(x):
        q, k, v = ops.linear(x, w).view(2, 64, 3, 4, 8).unbind(2)
        return ops.attention(q, k, v)[0]

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


def test_outputs_overlapping_inputs_are_refused():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(8, 8, generator=gen)
    buf = torch.randn(4, 16, generator=gen)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        ops.linear_out(buf[:, :8], w, None, None, 1.0, 0.0, buf[:, :8])
    dense = torch.randn(4, 8, generator=gen)
    with pytest.raises(RuntimeError, match="out must not overlap weight"):
        ops.linear_out(dense, w, None, None, 1.0, 0.0, w[:4])
    r = torch.randn(4, 8, generator=gen)
    expect = r + dense @ w.T
    ops.linear_out(dense, w, None, r, 1.0, 1.0, r)  # in place on the residual: allowed
    torch.testing.assert_close(r, expect)
    with pytest.raises(RuntimeError, match="out must not overlap residual"):
        big = torch.randn(5, 8, generator=gen)
        ops.linear_out(dense, w, None, big[1:], 1.0, 1.0, big[:4])
    q, k, v = packed_qkv(1, 6, 6, 2, 8, torch.float32, "cpu", gen, True)
    with pytest.raises(RuntimeError, match="out must not overlap k"):
        ops.attention_out(q, k, v, None, None, k)
    with pytest.raises(RuntimeError, match="lse must not overlap"):
        ops.attention_out(q, k, v, None, None, torch.empty_like(q), q.contiguous().view(-1)[: 2 * 6].view(1, 2, 6))


def _nan_cases(device, dtype, D=64, Sq=37, Sk=150):
    """(name, q, k, v, mask, scale): NaN in a q row, in a key, in an additive mask row, and as
    the scale; each against torch's float64 softmax, where NaN reaches whole rows."""
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, k, v = rnd(2, Sq, 3, D), rnd(2, Sk, 3, D), rnd(2, Sk, 3, D)
    q_nan = q.clone()
    q_nan[1, 5, 2, 7] = float("nan")
    k_nan = k.clone()
    k_nan[0, 40, 1, 3] = float("nan")
    mask = torch.zeros(2, 3, Sq, Sk, device=device, dtype=torch.float32)
    mask[0, 1, 9, :] = float("nan")
    mask[1, 2, 3, 17] = float("nan")
    return [("q", q_nan, k, v, None, None), ("k", q, k_nan, v, None, None), ("mask", q, k, v, mask, None),
            ("scale", q, k, v, None, float("nan"))]


def _nan_reference(q, k, v, mask, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s + mask.double()
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())


def _check_nans(out, lse, ref, name):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"NaN in {name}: NaN rows differ from torch's"
    rows = torch.isnan(ref).any(-1)  # [B, Sq, H]
    assert torch.isnan(lse.permute(0, 2, 1)[rows]).all(), f"NaN in {name}: lse of NaN rows is not NaN"
    assert torch.isfinite(lse.permute(0, 2, 1)[~rows]).all()


@pytest.mark.parametrize("case", range(4))
def test_nan_propagates_like_torch_cpu(case):
    name, q, k, v, mask, scale = _nan_cases("cpu", torch.float32)[case]
    out, lse = ops.attention(q, k, v, mask, scale, return_lse=True)
    _check_nans(out, lse, _nan_reference(q, k, v, mask, scale), name)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,Sk", [(64, 150), (64, 77), (80, 300), (512, 64)])
def test_nan_propagates_like_torch_every_cuda_backend(D, Sk, dtype):
    checked = 0
    for name, q, k, v, mask, scale in _nan_cases("cuda", dtype, D=D, Sk=Sk):
        ref = _nan_reference(q, k, v, mask, scale)
        for backend in ops.attention_backends():
            if backend in ("auto", "reference") or ops.attention_supported(q, k, v, mask, backend):
                continue
            out, lse = ops.attention(q, k, v, mask, scale, return_lse=True, backend=backend)
            _check_nans(out, lse, ref, f"{name} ({backend}, D={D}, Sk={Sk}, {dtype})")
            checked += 1
    assert checked > 0
