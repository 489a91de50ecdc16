"""Bad inputs: each raises a specific exception with a message a user can act on, and the
module keeps working afterwards (a good call after each bad one gives the same result)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_attention, requires_cuda
from deepspeed_diffusers_attn import ops
import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.attention import (
    DeepSpeedDiffusersAttention,
    DeepSpeedDiffusersAttentionConfig,
)

B, S, C, H, D, SK, CCTX = 2, 9, 64, 2, 32, 7, 48


@pytest.fixture
def block():
    """A cross-attention module, good inputs and its output on them."""
    m = dda.from_diffusers(make_attention(C, H, D, cross_attention_dim=CCTX, bias=True))
    x, ctx = torch.randn(B, S, C), torch.randn(B, SK, CCTX)
    mask = torch.zeros(B, 1, SK)
    mask[:, :, -2:] = -10000.0
    with torch.no_grad():
        good = m(x, ctx, mask)
    return m, x, ctx, mask, good


def _still_works(block):
    m, x, ctx, mask, good = block
    with torch.no_grad():
        again = m(x, ctx, mask)
    assert torch.isfinite(again).all()
    assert torch.equal(again, good)


def _qkv(Sq=S, Sk=SK, h=H, d=D):
    return torch.randn(B, Sq, h, d), torch.randn(B, Sk, h, d), torch.randn(B, Sk, h, d)


# name -> (call(m, x, ctx, mask), exception type, message fragment)
MODULE_CASES = {
    "int_input": (lambda m, x, c, k: m(x.long(), c, k), TypeError, "dtype torch.int64"),
    "float64_input": (lambda m, x, c, k: m(x.double(), c, k), TypeError, "torch.float64"),
    "float64_context": (lambda m, x, c, k: m(x, c.double(), k), TypeError, "context has dtype"),
    "not_a_tensor": (lambda m, x, c, k: m(x.tolist(), c, k), TypeError, "must be a torch.Tensor"),
    "input_channels": (lambda m, x, c, k: m(x[..., :32], c, k), ValueError, "expects hidden_size 64"),
    "context_channels": (lambda m, x, c, k: m(x, c[..., :40], k), ValueError, "context must be [B=2, Sk, 48]"),
    "context_batch": (lambda m, x, c, k: m(x, c[:1], k), ValueError, "context must be [B=2"),
    "input_2d": (lambda m, x, c, k: m(x[0], c, k), ValueError, "[B, S, C] or [B, C, H, W]"),
    "input_5d": (lambda m, x, c, k: m(x[:, :, :, None, None], c, k), ValueError, "[B, S, C] or [B, C, H, W]"),
    "empty_batch": (lambda m, x, c, k: m(x[:0], c[:0], k), ValueError, "input is empty"),
    "empty_sequence": (lambda m, x, c, k: m(x[:, :0], c, k), ValueError, "input is empty"),
    "empty_context": (lambda m, x, c, k: m(x, c[:, :0], None), ValueError, "context is empty"),
    "missing_context": (lambda m, x, c, k: m(x, None, None), ValueError, "needs a context"),
    "mask_wrong_keys": (lambda m, x, c, k: m(x, c, k[..., :5]), ValueError, "does not fit"),
    "mask_int": (lambda m, x, c, k: m(x, c, k.long()), TypeError, "must be bool"),
    "mask_float64": (lambda m, x, c, k: m(x, c, k.double()), TypeError, "got torch.float64"),
    "mask_bad_batch": (lambda m, x, c, k: m(x, c, torch.zeros(3, 1, SK)), ValueError, "does not fit"),
    "mask_not_broadcastable": (lambda m, x, c, k: m(x, c, torch.zeros(B, 5, SK)), ValueError, "does not fit"),
    "mask_4d_wrong_heads": (lambda m, x, c, k: m(x, c, torch.zeros(B, 3, S, SK)), ValueError, "does not fit"),
    "mask_1d": (lambda m, x, c, k: m(x, c, torch.zeros(SK)), ValueError, "does not fit"),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_rejects(block, name):
    call, exc, fragment = MODULE_CASES[name]
    m, x, ctx, mask, _ = block
    with torch.no_grad(), pytest.raises(exc) as info:
        call(m, x, ctx, mask)
    assert fragment in str(info.value), str(info.value)
    _still_works(block)


# name -> (call(), exception type, message fragment); the ops' own (C++) checks.
OP_CASES = {
    "linear_float64": (
        lambda: ops.linear(torch.randn(4, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)),
        RuntimeError, "float32 only",
    ),
    "linear_noncontiguous_weight": (
        lambda: ops.linear(torch.randn(4, 8), torch.randn(8, 16).t()), RuntimeError, "weight must be contiguous",
    ),
    "linear_k_mismatch": (
        lambda: ops.linear(torch.randn(4, 8), torch.randn(16, 9)), RuntimeError, "must match weight",
    ),
    "linear_dtype_mix": (
        lambda: ops.linear(torch.randn(4, 8), torch.randn(16, 8).double()), RuntimeError, "same dtype",
    ),
    "linear_out_aliases_x": (
        lambda: (lambda t: ops.linear_out(t, torch.randn(8, 8), None, None, 1.0, 1.0, t))(torch.randn(4, 8)),
        RuntimeError, "out must not overlap x",
    ),
    "attention_head_mismatch": (
        lambda: ops.attention(torch.randn(B, S, H, D), *_qkv(h=H + 1)[1:]), RuntimeError, "must match q's batch, heads",
    ),
    "attention_head_dim_mismatch": (
        lambda: ops.attention(torch.randn(B, S, H, D), *_qkv(d=D + 8)[1:]), RuntimeError, "must match q's batch, heads",
    ),
    "attention_v_shape": (
        lambda: ops.attention(*_qkv()[:2], torch.randn(B, SK + 1, H, D)), RuntimeError, "v must have k's shape",
    ),
    "attention_head_dim_12": (lambda: ops.attention(*_qkv(d=12)), RuntimeError, "multiple of 8"),
    "attention_head_dim_520": (lambda: ops.attention(*_qkv(Sq=2, Sk=2, d=520)), RuntimeError, "multiple of 8 in [8, 512]"),
    "attention_out_wrong_shape": (
        lambda: ops.attention_out(*_qkv(), None, None, torch.empty(B, S, H, D + 8)), RuntimeError, "out must have q's shape",
    ),
    "attention_lse_wrong_shape": (
        lambda: ops.attention_out(*_qkv(), None, None, torch.empty(B, S, H, D), torch.empty(B, S, H)),
        RuntimeError, "lse must be a contiguous float32 [B, H, Sq]",
    ),
    "attention_lse_wrong_dtype": (
        lambda: ops.attention_out(*_qkv(), None, None, torch.empty(B, S, H, D), torch.empty(B, H, S).double()),
        RuntimeError, "lse must be",
    ),
    "attention_mask_not_broadcastable": (
        lambda: ops.attention(*_qkv(), torch.zeros(B, H, S, SK + 1)), RuntimeError, "mask must broadcast",
    ),
    "attention_mask_int": (
        lambda: ops.attention(*_qkv(), torch.zeros(B, 1, 1, SK, dtype=torch.int32)), RuntimeError, "mask must be bool",
    ),
    "attention_mask_5d": (
        lambda: ops.attention(*_qkv(), torch.zeros(1, B, H, S, SK)), RuntimeError, "mask must broadcast",
    ),
    "attention_3d_q": (lambda: ops.attention(torch.randn(B, S, H * D), *_qkv()[1:]), RuntimeError, "q must be [B, Sq, H, D]"),
    "attention_empty": (lambda: ops.attention(*_qkv(Sq=0)), RuntimeError, "empty input"),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_rejects(block, name):
    call, exc, fragment = OP_CASES[name]
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    _still_works(block)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(hidden_size=64, heads=4, dim_head=12), "head_dim 12: head dim must be a multiple of 8"),
        (dict(hidden_size=64, heads=1, dim_head=520), "head_dim 520: head dim must be a multiple of 8 in [8, 512]"),
        (dict(hidden_size=64, heads=0, dim_head=64), "must be >= 1"),
        (dict(hidden_size=64, heads=2, dim_head=32, norm_num_groups=7), "must divide hidden_size"),
        (dict(hidden_size=64, heads=2, dim_head=32, rescale_output_factor=0.0), "must not be 0"),
        (dict(hidden_size=64, heads=2, dim_head=32, dtype=torch.float64), "dtype must be"),
    ],
)
def test_config_rejects(block, kwargs, fragment):
    with pytest.raises(ValueError, match="DeepSpeedDiffusersAttentionConfig") as info:
        DeepSpeedDiffusersAttentionConfig(**kwargs)
    assert fragment in str(info.value)
    _still_works(block)


@pytest.mark.parametrize("heads, dim_head, fragment", [(4, 12, "head_dim 12"), (1, 1024, "head_dim 1024")])
def test_from_diffusers_rejects_head_dim(block, heads, dim_head, fragment):
    attn = make_attention(heads * dim_head, heads, dim_head)
    with pytest.raises(ValueError, match="cannot convert") as info:
        dda.from_diffusers(attn)
    assert fragment in str(info.value) and "multiple of 8 in [8, 512]" in str(info.value)
    _still_works(block)


@requires_cuda
def test_device_mix(block):
    m, x, ctx, mask, _ = block
    with torch.no_grad():
        with pytest.raises(ValueError, match="is on cuda"):
            m(x.cuda(), ctx, mask)
        with pytest.raises(ValueError, match="input_mask is on cuda"):
            m(x, ctx, mask.cuda())
    with pytest.raises(RuntimeError, match="same device"):
        ops.linear(torch.randn(4, 8, device="cuda"), torch.randn(16, 8))
    _still_works(block)


def test_not_a_tensor_with_grad_enabled(block):
    m, x, ctx, mask, _ = block
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        m(x.tolist(), ctx, mask)
    with pytest.raises(TypeError, match="context has dtype torch.int64"):
        m(x.requires_grad_(), ctx.long(), mask)
    x.requires_grad_(False)
    _still_works(block)
