"""tools/fp8_study.py, the CPU emulation that picks the FP8 attention scheme (issue 16).

CPU, float64, small shapes (Sq = Sk = 256, 2 heads): the reference matches torch SDPA, each
rounding point keeps values it can represent, the bf16 yardstick's error is where bf16
should be, K smoothing leaves exact attention unchanged and helps on outlier channels, the
two-level accumulator bounds the fp22 error, and the gate follows the ratio.
"""
from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import fp8_study as fs  # noqa: E402

F64 = torch.float64
SEQ, HEADS, DIM = 256, 2, 64


def by_name(name: str) -> fs.Scheme:
    return next(s for s in fs.schemes() if s.name == name)


def error(scheme: fs.Scheme, dist: str) -> float:
    q, k, v = fs.make_inputs(dist, HEADS, SEQ, DIM)
    return fs.rel_err(fs.emulate(q, k, v, scheme), fs.reference(q, k, v))


def test_reference_matches_sdpa_in_float64():
    q, k, v = fs.make_inputs("normal", HEADS, SEQ, DIM)
    k, v = k[:, :200], v[:, :200]                              # Sk != Sq
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fs.reference(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_e4m3_keeps_every_finite_e4m3_value():
    bits = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    vals = bits.view(torch.float8_e4m3fn).to(F64)
    vals = vals[~vals.isnan()]
    assert vals.abs().max() == fs.E4M3_MAX
    assert torch.equal(fs.round_e4m3(vals), vals)
    assert torch.equal(fs.round_e4m3(torch.tensor([1000.0, -1000.0], dtype=F64)),
                       torch.tensor([448.0, -448.0], dtype=F64))        # saturates, no NaN


def test_bf16_fp32_int8_keep_their_values():
    x = torch.randn(1000, dtype=F64)
    b, f = x.to(torch.bfloat16).to(F64), x.to(torch.float32).to(F64)
    assert torch.equal(fs.round_bf16(b), b)
    assert torch.equal(fs.round_fp32(f), f)
    ints = torch.arange(-127, 128, dtype=F64)
    assert torch.equal(fs.round_int8(ints), ints)
    assert fs.round_int8(torch.tensor([200.0], dtype=F64)).item() == 127


def test_fp22_keeps_14_significant_bits_and_truncates_the_15th():
    keep = torch.tensor([1 + 2.0 ** -13, -(3 - 2.0 ** -12), 2.0 ** 40 * (1 + 2.0 ** -13), 0.0], dtype=F64)
    assert torch.equal(fs.round_mantissa(keep, 13), keep)
    x = torch.tensor([1 + 2.0 ** -14 + 2.0 ** -20, -(1 + 2.0 ** -14 + 2.0 ** -20)], dtype=F64)
    assert fs.round_mantissa(x, 13, "trunc").tolist() == [1.0, -1.0]
    assert fs.round_mantissa(x, 13, "nearest").tolist() == [1 + 2.0 ** -13, -(1 + 2.0 ** -13)]


@pytest.mark.parametrize("fmt,block", [("e4m3", 128), ("e4m3", None), ("int8", 64), ("int8", 1)])
def test_quantize_round_trips_values_on_its_grid(fmt, block):
    """x = grid * 2^e with each block's amax on the format's max: the scale is 2^e exactly."""
    g = torch.Generator().manual_seed(1)
    fmax = fs.E4M3_MAX if fmt == "e4m3" else fs.INT8_MAX
    raw = torch.randn(2, 256, 64, generator=g, dtype=F64) * 40
    grid = fs.round_e4m3(raw) if fmt == "e4m3" else fs.round_int8(raw)
    rows = 256 if block is None else block
    grid[:, ::rows, 0] = fmax                                   # every block reaches amax
    scale = 2.0 ** torch.randint(-6, 6, (2, 256 // rows, 1, 1), generator=g).to(F64)
    x = (grid.reshape(2, 256 // rows, rows, 64) * scale).reshape(2, 256, 64)
    got, s = fs.quantize(x, fmt, block)
    assert torch.equal(got, grid)
    assert torch.equal(got * s, x)


def test_bf16_yardstick_error_is_in_the_bf16_range():
    for dist in fs.DISTRIBUTIONS:
        assert 1e-3 < error(by_name("bf16"), dist) < 1e-2, dist


def test_smoothing_k_leaves_exact_attention_unchanged():
    q, k, v = fs.make_inputs("outlier-k", HEADS, SEQ, DIM)
    smoothed = k - k.mean(dim=1, keepdim=True)
    torch.testing.assert_close(fs.reference(q, smoothed, v), fs.reference(q, k, v), rtol=1e-10, atol=1e-12)


def test_smoothing_k_reduces_the_quantized_error_on_outlier_channels():
    for plain, smooth in [("fp8-block", "fp8-block-smoothK"),
                          (fs.Scheme("int8-nosmooth", "int8", "e4m3", 128, 128, 128, False, "fp32"),
                           by_name("int8-qk-fp8-pv"))]:
        plain = by_name(plain) if isinstance(plain, str) else plain
        smooth = by_name(smooth) if isinstance(smooth, str) else smooth
        assert error(smooth, "outlier-k") < 0.85 * error(plain, "outlier-k"), smooth.name


def test_two_level_accumulation_bounds_the_fp22_truncation_error():
    """4096 positive terms: one truncating fp22 sum drifts low in proportion to the number of
    k-steps; flushing into fp32 every 128 terms keeps it near one block's drift."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 4, 4096, generator=g, dtype=F64)
    b = torch.rand(1, 4096, 8, generator=g, dtype=F64)
    exact = a @ b
    fp22 = fs.rounder("fp22", "trunc")
    one = fs.accumulate(torch.zeros_like(exact), a, b, fp22, 32)
    two = fs.two_level(a, b, fp22, 32, 128)
    e1 = float(((one - exact) / exact).abs().max())
    e2 = float(((two - exact) / exact).abs().max())
    assert e1 > 10 * 2.0 ** -14                      # 128 k-steps of truncation add up
    assert e2 < e1 / 4


def test_gate_follows_the_ratio():
    assert fs.gate(0.02, 0.01) == (2.0, True)
    ratio, ok = fs.gate(0.0201, 0.01)
    assert ratio == pytest.approx(2.01) and not ok


def test_study_records_gate_and_a_per_tensor_fp8_scheme_fails_it():
    records = fs.study([DIM], ["normal"], HEADS, SEQ)
    rec = {r["scheme"]: r for r in records}
    assert rec["bf16"]["ratio_to_bf16"] == 1.0 and rec["bf16"]["pass"]
    for r in records:
        assert r["pass"] == (r["rel_err"] <= fs.GATE_FACTOR * rec["bf16"]["rel_err"])
    # e4m3 keeps 3 mantissa bits to bf16's 7: per-element rounding 16x coarser.
    assert not rec["fp8-tensor"]["pass"] and rec["fp8-tensor"]["ratio_to_bf16"] > 8
    assert rec["int8tok-qk-bf16-pv"]["ratio_to_bf16"] < rec["fp8-qk-bf16-pv"]["ratio_to_bf16"]
    assert all("acc_err" in r for r in records if "-fp22" in r["scheme"])
    table = fs.table(records)
    assert table.count("\n") == len(records) + 1 and "fp8-tensor" in table and math.isfinite(rec["bf16"]["rel_err"])


@pytest.mark.parametrize("scheme", fs.schemes(), ids=lambda s: s.name)
def test_every_scheme_is_exact_attention_without_its_rounding(monkeypatch, scheme):
    """With every rounding point made the identity, each scheme's emulation is the float64
    reference: the scales, the P scale, the V-block scale folds and the two-level flush
    all cancel, so any error a scheme reports comes from its rounding alone."""
    identity = lambda x, *args, **kwargs: x  # noqa: E731
    for name in ("round_bf16", "round_fp32", "round_e4m3", "round_int8", "round_mantissa"):
        monkeypatch.setattr(fs, name, identity)
    q, k, v = fs.make_inputs("outlier-k", HEADS, SEQ, DIM)
    torch.testing.assert_close(fs.emulate(q, k, v, scheme), fs.reference(q, k, v), rtol=1e-11, atol=1e-12)


def test_fp8_error_is_where_e4m3_puts_it():
    """e4m3 keeps 3 mantissa bits to bf16's 7: the all-fp8 scheme lands near 2^4 = 16x bf16's error."""
    ratio = error(by_name("fp8-tensor"), "normal") / error(by_name("bf16"), "normal")
    assert 10 < ratio < 20, ratio
