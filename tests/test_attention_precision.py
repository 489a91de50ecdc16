"""The 8-bit attention precisions (``ops.attention(..., precision=...)``, issue 16).

The C reference (CPU) defines them (``csrc/include/dda.h``). Here an independent torch
emulation of that definition checks it on fresh random inputs: the quantized scores are
formed with the same float32 operations, so the two agree up to the softmax's float32
rounding (and, for FP8, an e4m3 rounding of p flipped by an ulp of ``expf``). The error
against float64 exact attention is bounded by the scheme's, measured in benchmarks/NOTES.md
("FP8 attention") as a multiple of bf16 attention's error on the same inputs.
"""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import ops
from deepspeed_diffusers_attn.attention import DeepSpeedDiffusersAttention, DeepSpeedDiffusersAttentionConfig

from conftest import requires_cuda
from test_dit_adapters import MODELS
from test_dit_adapters import run as run_dit
from test_ops import rel_err, sdpa_ref
from test_patch import make_unet, run_unet

QUANT_MIN = 2.0 ** -100  # DDA_ATTN_QUANT_MIN
V_BLOCK = 128  # DDA_ATTN_V_BLOCK


def quantize_int8(x, mu=None):
    """Rows of x [N, D] (float32) on the symmetric int8 grid: (values as float32, scales)."""
    y = x - mu if mu is not None else x
    a = y.abs().amax(-1)
    finite = torch.isfinite(y).all(-1)
    live = finite & (a >= QUANT_MIN)
    # (a Python number over a tensor is reciprocal() * number in torch: one rounding more)
    inv = torch.where(live, torch.full_like(a, 127.0) / torch.where(live, a, torch.ones_like(a)), torch.zeros_like(a))
    x8 = torch.round(y * inv[:, None]).clamp(-127, 127)
    x8 = torch.where(live[:, None], x8, torch.zeros_like(x8))
    scale = torch.where(finite, torch.where(live, a / 127.0, torch.zeros_like(a)), torch.full_like(a, math.nan))
    return x8, scale


def e4m3(x):
    """float32 -> nearest e4m3fn value (ties to even), saturating at 448, as float32."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def emulate_head(q, k, v, mask, scale, precision):
    """One head, q [Sq, D], k/v [Sk, D] float32, mask [Sq, Sk] additive float32 or None:
    (o [Sq, D] float64, lse [Sq] float64) as dda.h defines the 8-bit precisions."""
    Sk = k.shape[0]
    q8, qs = quantize_int8(q)
    mu = (k.double().sum(0) / Sk).float()
    k8, ks = quantize_int8(k, mu)
    dot = (q8.double() @ k8.double().T).float()  # exact: |dot| < 2^24
    qss = qs * torch.tensor(scale, dtype=torch.float32)
    s = dot * ks[None, :] * qss[:, None]
    if mask is not None:
        s = s + mask
    shift = scale * (q.double() @ mu.double())  # lse of the scores before smoothing
    if precision == "int8-qk":
        s64 = s.double()
        m = s64.amax(-1, keepdim=True)
        p = torch.exp(s64 - m)
        l = p.sum(-1, keepdim=True)
        return (p @ v.double()) / l, (m + l.log()).squeeze(-1) + shift
    # fp8: 128-key blocks, p against the running max, v per block on the e4m3 grid
    Sq, D = q.shape
    acc = torch.zeros(Sq, D, dtype=torch.float64)
    l = torch.zeros(Sq, dtype=torch.float64)
    m = torch.full((Sq,), -math.inf, dtype=torch.float32)
    for j0 in range(0, Sk, V_BLOCK):
        sb, vb = s[:, j0 : j0 + V_BLOCK], v[j0 : j0 + V_BLOCK]
        a = vb.abs().amax()
        if not torch.isfinite(vb).all():
            v8, vs = torch.zeros_like(vb), torch.tensor(math.nan)
        elif a < QUANT_MIN:
            v8, vs = torch.zeros_like(vb), torch.tensor(0.0)
        else:
            v8, vs = e4m3(vb * (torch.full_like(a, 448.0) / a)), a / 448.0
        m_new = torch.maximum(m, sb.amax(-1))
        m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        corr = torch.where(m == -math.inf, torch.zeros_like(m), torch.exp(m - m_use))
        p = torch.exp(sb - m_use[:, None])  # float32, as the kernel
        p8 = e4m3(448.0 * p)
        block = (p8.double() @ v8.double()) * (vs / 448.0).double()
        acc = acc * corr.double()[:, None] + block
        l = l * corr.double() + p.double().sum(-1)
        m = m_new
    return acc / l[:, None], m.double() + l.log() + shift


def emulate(q, k, v, mask, scale, precision):
    """[B, Sq, H, D] inputs (mask broadcastable to [B, H, Sq, Sk], bool or float32)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if mask is not None:
        mask = mask.expand(B, H, Sq, Sk)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    o = torch.empty(B, Sq, H, D, dtype=torch.float64)
    lse = torch.empty(B, H, Sq, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            o[b, :, h], lse[b, h] = emulate_head(q[b, :, h], k[b, :, h], v[b, :, h],
                                                 None if mask is None else mask[b, h], scale, precision)
    return o, lse


def exact64(q, k, v, mask=None, scale=None):
    """Exact attention in float64 (test_ops' SDPA reference on float64 inputs)."""
    return sdpa_ref(q.double(), k.double(), v.double(), mask, scale)


def inputs(B, Sq, Sk, H, D, gen, packed=False):
    if packed and Sq == Sk:  # the fused projection's layout: strided views of one tensor
        return torch.randn(B, Sq, 3, H, D, generator=gen).unbind(2)
    return (torch.randn(B, Sq, H, D, generator=gen), torch.randn(B, Sk, H, D, generator=gen),
            torch.randn(B, Sk, H, D, generator=gen))


PRECISIONS = ("int8-qk", "fp8")


def test_precision_names():
    assert ops.attention_precisions() == ("exact", "int8-qk", "fp8")
    q = torch.randn(1, 4, 1, 8)
    assert ops.attention_kernel_for(q, q, q) == "cpu_reference"
    assert ops.attention_kernel_for(q, q, q, precision="fp8") == "cpu_reference (fp8)"
    with pytest.raises(RuntimeError, match='unknown precision "int4".*"exact", "int8-qk", "fp8"'):
        ops.attention(q, q, q, precision="int4")
    assert "unknown precision" in ops.attention_supported(q, q, q, precision="int4")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,Sq,Sk,H,D,mask", [
    (1, 1, 1, 1, 8, None),
    (2, 77, 77, 3, 40, None),
    (1, 33, 257, 2, 64, "add"),
    (2, 64, 77, 2, 72, "bool"),
    (1, 129, 129, 1, 128, None),
    (1, 5, 300, 1, 512, "add"),
])
def test_matches_the_definition(precision, B, Sq, Sk, H, D, mask):
    gen = torch.Generator().manual_seed(1000 * Sq + Sk + D)
    q, k, v = inputs(B, Sq, Sk, H, D, gen, packed=True)
    m = None
    if mask == "add":
        m = torch.randn(B, 1, Sq, Sk, generator=gen)
    elif mask == "bool":
        m = torch.rand(B, H, 1, Sk, generator=gen) > 0.3
        m[..., 0] = True
    scale = 1.0 / math.sqrt(D)
    out = torch.full_like(q, math.nan, memory_format=torch.contiguous_format)  # poisoned
    lse = torch.full((B, H, Sq), math.nan)
    ops.attention_out(q, k, v, m, scale, out, lse, precision=precision)
    o_ref, lse_ref = emulate(q, k, v, m, scale, precision)
    tol = 1e-5 if precision == "int8-qk" else 1e-4
    assert rel_err(out, o_ref) < tol
    assert (lse.double() - lse_ref).abs().max().item() < 1e-4
    # the quantization is real (one key has weight 1 whatever its score: int8-qk is exact then),
    # far from exact attention in float32, yet within the scheme's bound
    exact = ops.attention(q, k, v, m, scale)[0]
    err, exact_err = rel_err(out, exact64(q, k, v, m, scale)), rel_err(exact, exact64(q, k, v, m, scale))
    if Sk > 1 or precision == "fp8":
        assert err > 100 * exact_err
    assert err < (0.03 if precision == "int8-qk" else 0.08)
    # lse is that of the unsmoothed scores: near exact attention's
    lse_exact = ops.attention(q, k, v, m, scale, return_lse=True)[1]
    assert (lse - lse_exact).abs().max().item() < 0.05


@pytest.mark.parametrize("precision", PRECISIONS)
def test_error_against_bf16_attention(precision):
    """int8-qk within 4x, fp8 within 8x the error of torch's bf16 attention on the same inputs
    (d64, 1024 tokens; measured 2.9x and 6.6x on this seed, in line with NOTES.md's study)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = inputs(1, 1024, 1024, 2, 64, gen)
    q, k = q * 2 ** 0.5, k * 2 ** 0.5  # score std 2, as the study's "normal" inputs
    ref = exact64(q, k, v)
    bf16 = F.scaled_dot_product_attention(*(t.bfloat16().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err = rel_err(ops.attention(q, k, v, precision=precision)[0], ref)
    bound = 4.0 if precision == "int8-qk" else 8.0
    assert err < bound * rel_err(bf16, ref)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_k_is_smoothed(precision):
    """A per-channel offset on K leaves exact attention unchanged; smoothing removes it before
    quantizing, so the 8-bit result barely moves (unsmoothed, the offset would take most of
    the int8 range)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = inputs(1, 64, 200, 2, 64, gen)
    offset = torch.zeros(64)
    offset[[3, 17, 40, 41]] = 8.0
    a = ops.attention(q, k, v, precision=precision)[0]
    b = ops.attention(q, k + offset, v, precision=precision)[0]
    assert rel_err(b, a) < 1e-3
    assert rel_err(a, exact64(q, k, v)) > 1e-3  # quantized all the same


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero_rows_and_tiny_rows(precision):
    gen = torch.Generator().manual_seed(4)
    q, k, v = inputs(1, 8, 100, 1, 32, gen)
    q[0, 2] = 0.0  # scores 0: uniform weights, the mean of v
    q[0, 5] = 1e-39  # a subnormal row, below DDA_ATTN_QUANT_MIN: quantized as zero, the same
    q[0, 6] = 0.0
    q[0, 6, 0, 3] = 1e-37  # one tiny element among zeros (127 / 1e-37 would overflow float32)
    q[0, 7] *= 1e-20  # tiny but above the minimum: quantized as the row it scales
    out = ops.attention(q, k, v, precision=precision)[0]
    tol = 1e-6 if precision == "int8-qk" else 0.05
    for row in (2, 5, 6, 7):
        assert rel_err(out[0, row], v[0].mean(0)) < tol
    assert torch.isfinite(out).all()
    o_ref, _ = emulate(q, k, v, None, 1 / math.sqrt(32), precision)
    assert rel_err(out, o_ref) < 1e-4


def test_fp8_tiny_v_block():
    """A v block of one 1e-37 among zeros (448 / 1e-37 would overflow float32) is all zero."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = inputs(1, 4, 200, 1, 16, gen)
    v[0, :128] = 0.0
    v[0, 5, 0, 2] = 1e-37
    out = ops.attention(q, k, v, precision="fp8")[0]
    assert torch.isfinite(out).all()
    o_ref, _ = emulate(q, k, v, None, 0.25, "fp8")
    assert rel_err(out, o_ref) < 1e-4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_inputs(precision):
    """dda.h: a non-finite q element makes its row NaN; a non-finite k element every row (through
    the channel mean); a NaN in v reaches its column (int8-qk, as exact attention) or, for fp8,
    every column of the rows its v block reaches."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = inputs(1, 6, 150, 2, 16, gen)
    qn = q.clone()
    qn[0, 1, 0, 3] = math.inf
    out = ops.attention(qn, k, v, precision=precision)[0]
    assert out[0, 1, 0].isnan().all() and torch.isfinite(out[0, :, 1]).all()
    assert torch.isfinite(out[0, [0, 2, 3, 4, 5], 0]).all()
    kn = k.clone()
    kn[0, 7, 1, 2] = math.nan
    out = ops.attention(q, kn, v, precision=precision)[0]
    assert out[0, :, 1].isnan().all() and torch.isfinite(out[0, :, 0]).all()
    vn = v.clone()
    vn[0, 9, 0, 4] = math.nan
    out = ops.attention(q, k, vn, precision=precision)[0]
    assert out[0, :, 0, 4].isnan().all() and torch.isfinite(out[0, :, 1]).all()
    others = out[0, :, 0, [d for d in range(16) if d != 4]]
    assert others.isnan().all() if precision == "fp8" else torch.isfinite(others).all()
    scale_nan = ops.attention(q, k, v, scale=math.nan, precision=precision)[0]
    assert scale_nan.isnan().all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lse_merges_split_keys(precision):
    """Keys attended in two halves (each smoothed by its own mean) and merged through their lse
    are as accurate as one call over all keys, as the ring's merge needs: the second half's
    keys carry channel offsets, so the halves' smoothing shifts differ by far more than the
    quantization error."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = inputs(1, 40, 256, 2, 64, gen)
    k[:, 128:] += torch.linspace(-3, 3, 64)
    ref = exact64(q, k, v)
    whole = ops.attention(q, k, v, precision=precision)[0]
    (o1, l1), (o2, l2) = (ops.attention(q, k[:, s], v[:, s], return_lse=True, precision=precision)
                          for s in (slice(0, 128), slice(128, 256)))
    w1, w2 = (torch.sigmoid(d).transpose(1, 2).unsqueeze(-1) for d in (l1 - l2, l2 - l1))
    merged = o1 * w1 + o2 * w2
    assert rel_err(merged, ref) < 2 * rel_err(whole, ref)


def test_fully_masked_row_is_zero():
    gen = torch.Generator().manual_seed(6)
    q, k, v = inputs(1, 4, 50, 1, 16, gen)
    keep = torch.ones(1, 1, 4, 50, dtype=torch.bool)
    keep[0, 0, 2] = False
    for precision in PRECISIONS:
        out, lse = ops.attention(q, k, v, keep, return_lse=True, precision=precision)
        assert (out[0, 2] == 0).all() and lse[0, 0, 2].item() == -math.inf
        assert torch.isfinite(out[0, [0, 1, 3]]).all()


def test_traces_under_compile():
    gen = torch.Generator().manual_seed(8)
    q, k, v = inputs(1, 16, 16, 2, 32, gen)

    def f(q, k, v):
        return ops.attention(q, k, v, precision="int8-qk")[0] * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert torch.equal(got, f(q, k, v))


@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_refuses_8_bit(precision):
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
    why = ops.attention_supported(q, q, q, precision=precision)
    assert "no CUDA kernel computes the 8-bit precisions" in why
    assert ops.attention_kernel_for(q, q, q, precision=precision) == "unsupported: " + why
    with pytest.raises(RuntimeError, match="no CUDA kernel computes the 8-bit precisions"):
        ops.attention(q, q, q, precision=precision)
    assert ops.attention_supported(q, q, q) == ""


# ------------------------------------------------------------------ modules and patch()
def test_module_settles_its_precision_on_every_move():
    cfg = DeepSpeedDiffusersAttentionConfig(hidden_size=32, heads=2, dim_head=16, attention_precision="int8-qk")
    m = DeepSpeedDiffusersAttention(cfg)
    assert m.attention_precision == "int8-qk" and "attention_precision=int8-qk" in repr(m)
    x = torch.randn(2, 50, 32)
    exact = DeepSpeedDiffusersAttention(DeepSpeedDiffusersAttentionConfig(hidden_size=32, heads=2, dim_head=16))
    exact.load_state_dict(m.state_dict())
    with torch.no_grad():
        err = rel_err(m(x), exact(x))
    assert 1e-5 < err < 0.05
    with pytest.warns(UserWarning, match="'int8-qk' cannot run on cpu in torch.float16 .*the exact kernel runs"):
        m.half()  # the CPU reference computes float32 only
    assert m.attention_precision == "exact" and "float32 only" in m.precision_note()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.float()
    assert m.attention_precision == "int8-qk" and m.precision_note() == "attention precision int8-qk"
    with pytest.raises(ValueError, match="attention_precision must be one of"):
        DeepSpeedDiffusersAttentionConfig(hidden_size=32, heads=2, dim_head=16, attention_precision="fp4")


def test_copies_keep_and_settle_the_precision():
    cfg = DeepSpeedDiffusersAttentionConfig(hidden_size=32, heads=2, dim_head=16, attention_precision="fp8")
    m = DeepSpeedDiffusersAttention(cfg)
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        want = m(x)
        assert torch.equal(copy.deepcopy(m)(x), want)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.attention_precision == "fp8" and torch.equal(loaded(x), want)
    for p in loaded.parameters():  # cast through .data: no _apply, the next call settles again
        p.data = p.data.half()
    with pytest.warns(UserWarning, match="'fp8' cannot run on cpu in torch.float16"):
        assert loaded._precision_on(loaded.attn_ow.device, loaded.attn_ow.dtype) == "exact"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_unet_runs_the_precision_asked(precision):
    unet, inputs = make_unet("sd15")
    dda.patch(unet)
    exact = run_unet(unet, inputs)
    again = dda.patch(unet, attention_precision=precision)  # already patched: keeps exact, and says so
    assert all("attention precision exact (kept from the first patch" in " ".join(r.reasons) for r in again)
    dda.unpatch(unet)
    report = dda.patch(unet, attention_precision=precision)
    assert report.options["attention_precision"] == precision
    patched = [r for r in report if r.status == "patched"]
    assert patched and all(f"attention precision {precision}" in r.reasons for r in patched)
    out = run_unet(unet, inputs)
    assert 1e-6 < rel_err(out, exact) < 0.05
    dda.unpatch(unet)
    with pytest.raises(ValueError, match="attention_precision must be one of"):
        dda.patch(unet, attention_precision="int4")


@pytest.mark.parametrize("kind", ["sd3.5", "flux", "wan-i2v"])
def test_patch_dit_runs_the_precision_asked(kind):
    model, inputs = MODELS[kind]()
    dda.patch(model)
    exact = run_dit(model, inputs)
    dda.unpatch(model)
    report = dda.patch(model, attention_precision="int8-qk")
    rows = [r for r in report if r.status == "patched"]
    assert rows and all("attention precision int8-qk" in r.reasons for r in rows)
    assert 1e-6 < rel_err(run_dit(model, inputs), exact) < 0.05
    dda.unpatch(model)


@requires_cuda
def test_patch_on_cuda_runs_exact_and_says_why():
    unet, inputs = make_unet("sd15")
    unet = unet.cuda().half()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs["sample"], inputs["encoder_hidden_states"] = inputs["sample"].half(), inputs["encoder_hidden_states"].half()
    dda.patch(unet)
    exact = run_unet(unet, inputs)
    dda.unpatch(unet)
    with pytest.warns(UserWarning, match="'fp8' cannot run on cuda"):
        report = dda.patch(unet, attention_precision="fp8")
    rows = [r for r in report if r.status == "patched"]
    assert rows and all(any(n.startswith("attention precision exact: 'fp8' cannot run here: no CUDA kernel")
                            for n in r.reasons) for r in rows)
    assert torch.equal(run_unet(unet, inputs), exact)
    dda.unpatch(unet)


def test_precision_gate_tool(tmp_path):
    """tools/precision_gate.py: every module of a (scaled-down) Flux ran each precision, the
    8-bit errors are real and inside the gate, and the rows land in JSON."""
    import json
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    import precision_gate

    assert precision_gate.main(["--models", "flux", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "precision_gate.json").read_text())
    assert all(m["ran it"] == m["attention modules"] > 0 and not m["first other"] for m in row["modules"].values())
    assert row["ours exact"] < 1e-5 < row["ours int8-qk"] < row["ours fp8"] < 2 * row["stock bfloat16"]
    assert row["passes"] == {"int8-qk": True, "fp8": True}
