"""DeepSpeedDiffusersAttention against diffusers' Attention (AttnProcessor2_0) on the same
weights. CPU in float32 (the C reference); the GPU variants skip without CUDA.

Tolerance: our error against a float64 run of the diffusers block must be at most 2x
diffusers' own error at the same precision (plus a tiny floor), see conftest."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conftest import assert_upcast_close, make_attention, max_err, requires_cuda
import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.attention import (
    DeepSpeedDiffusersAttention,
    DeepSpeedDiffusersAttentionConfig,
    DeepSpeedDiffusersAttentionFunction,
)
from deepspeed_diffusers_attn.workspace import ALIGN, get_workspace, workspace_nbytes

M = DeepSpeedDiffusersAttention


def _convert(attn):
    return dda.from_diffusers(attn)


def _run(module, x, context=None, mask=None):
    with torch.no_grad():
        return module(x, context, mask)


def _additive_mask(B, Sk, masked=3, device="cpu"):
    """The UNet's encoder_attention_mask: (1 - keep) * -10000, shaped (B, 1, Sk)."""
    keep = torch.ones(B, Sk, device=device)
    for b in range(B):
        keep[b, Sk - masked * (b + 1) :] = 0  # a different padding length per batch row
    return ((1 - keep) * -10000.0).unsqueeze(1)


# (query_dim, heads, dim_head, cross_attention_dim): SD1.5, SD2.1 and SDXL blocks.
SD_CONFIGS = {
    "sd15_320": (320, 8, 40, 768),
    "sd15_640": (640, 8, 80, 768),
    "sd15_1280": (1280, 8, 160, 768),
    "sd21_320": (320, 5, 64, 1024),
    "sdxl_640": (640, 10, 64, 2048),
}


@pytest.mark.parametrize("name", list(SD_CONFIGS))
def test_sd_self_attention(name):
    C, H, D, _ = SD_CONFIGS[name]
    attn = make_attention(C, H, D)
    assert type(attn.processor) is AttnProcessor2_0
    x = torch.randn(2, 64, C)
    assert_upcast_close(_run(_convert(attn), x), attn, x)


@pytest.mark.parametrize("name", list(SD_CONFIGS))
@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
def test_sd_cross_attention(name, mask_kind):
    C, H, D, Cctx = SD_CONFIGS[name]
    attn = make_attention(C, H, D, cross_attention_dim=Cctx)
    x, ctx = torch.randn(2, 48, C), torch.randn(2, 77, Cctx)
    mask = None
    if mask_kind is not None:
        mask = _additive_mask(2, 77)
        if mask_kind == "bool":
            mask = mask == 0  # True = attend
    out = _run(_convert(attn), x, ctx, mask)
    assert_upcast_close(out, attn, x, ctx, mask)


def test_mask_actually_masks():
    attn = make_attention(64, 2, 32, cross_attention_dim=48)
    m = _convert(attn)
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 9, 48)
    mask = _additive_mask(2, 9)
    assert max_err(_run(m, x, ctx, mask), _run(m, x, ctx)) > 1e-3
    # Changing masked-out keys changes nothing.
    ctx2 = ctx.clone()
    ctx2[0, -3:] = torch.randn(3, 48)
    assert max_err(_run(m, x, ctx2, mask)[0], _run(m, x, ctx, mask)[0]) < 1e-6


@pytest.mark.parametrize(
    "shape",
    ["B,Sk", "B,1,Sk", "B,Sq,Sk", "B*H,1,Sk", "B*H,Sq,Sk", "B,1,1,Sk", "B,H,Sq,Sk"],
)
def test_mask_shapes_self_attention(shape):
    B, S, H = 2, 11, 2
    attn = make_attention(32, H, 16)
    x = torch.randn(B, S, 32)
    dims = [eval(d, {"B": B, "H": H, "Sq": S, "Sk": S}) for d in shape.split(",")]
    mask = torch.randn(dims)
    ours = _run(_convert(attn), x, None, mask)
    if len(dims) == 4:  # diffusers' convention is 2-D/3-D; a 4-D mask means SDPA's broadcast
        full = mask.expand(B, H, S, S).reshape(B * H, S, S)
        assert_upcast_close(ours, attn, x, None, full)
    else:
        assert_upcast_close(ours, attn, x, None, mask)


def test_vae_mid_block_4d():
    attn = make_attention(
        512, 1, 512, bias=True, norm_num_groups=32, residual_connection=True,
        rescale_output_factor=1.0, eps=1e-6, _from_deprecated_attn_block=True,
    )
    m = _convert(attn)
    assert m.config.norm_num_groups == 32 and m.config.residual_connection
    x = torch.randn(1, 512, 16, 16)
    out = _run(m, x)
    assert out.shape == x.shape and out.is_contiguous()
    assert_upcast_close(out, attn, x)


def test_4d_channels_last_stays_channels_last():
    attn = make_attention(64, 1, 64, bias=True, norm_num_groups=8, residual_connection=True)
    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    out = _run(_convert(attn), x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_upcast_close(out, attn, x)


@pytest.mark.parametrize("S", [1, 77, 97])
def test_odd_lengths(S):
    attn = make_attention(80, 2, 40, cross_attention_dim=80)
    x = torch.randn(2, S, 80)
    m = _convert(attn)
    assert m.config.is_cross_attention
    assert_upcast_close(_run(m, x), attn, x)  # cross block called without context
    ctx = torch.randn(2, S + 4, 80)
    assert_upcast_close(_run(m, x, ctx), attn, x, ctx)


def test_long_sequence_4097():
    attn = make_attention(16, 1, 16)
    x = torch.randn(1, 4097, 16)
    # The C reference sums P.V over the 4097 keys in sequence (in blocks of 64 with an
    # online rescale), PyTorch's CPU SDPA in a more balanced order: allow the expected
    # error of a sequential fp32 sum of Sk terms, sqrt(Sk) * 2^-24, as the floor.
    assert_upcast_close(_run(_convert(attn), x), attn, x)


def test_rescale_output_factor_and_residual():
    attn = make_attention(64, 2, 32, bias=True, residual_connection=True, rescale_output_factor=3.0)
    m = _convert(attn)
    x = torch.randn(2, 10, 64)
    assert_upcast_close(_run(m, x), attn, x)
    # The folded bias (attn_ob / factor) is cached and follows in-place updates.
    cached = m._out_bias(False)
    assert m._out_bias(False) is cached
    with torch.no_grad():
        attn.to_out[0].bias.add_(1.0)
        m.attn_ob.add_(1.0)
    assert_upcast_close(_run(m, x), attn, x)


def test_4d_input_without_group_norm():
    attn = make_attention(64, 2, 32, bias=True, residual_connection=True, rescale_output_factor=2.0)
    x = torch.randn(2, 64, 3, 5)
    out = _run(_convert(attn), x)
    assert out.shape == x.shape and out.is_contiguous()
    assert_upcast_close(out, attn, x)


def test_scale_with_attn_processor():
    # scale_qk=False: diffusers picks AttnProcessor and uses attn.scale = 1.
    attn = make_attention(64, 2, 32, scale_qk=False)
    assert type(attn.processor) is AttnProcessor and attn.scale == 1.0
    m = _convert(attn)
    assert m.config.softmax_scale == 1.0
    x = torch.randn(2, 9, 64)
    assert_upcast_close(_run(m, x), attn, x)
    attn.scale = 0.3
    m = _convert(attn)
    assert m.config.softmax_scale == 0.3
    assert_upcast_close(_run(m, x), attn, x)


def test_attn_processor_classic_with_mask():
    attn = make_attention(64, 2, 32, cross_attention_dim=40, processor=AttnProcessor())
    x, ctx, mask = torch.randn(2, 7, 64), torch.randn(2, 12, 40), _additive_mask(2, 12)
    assert_upcast_close(_run(_convert(attn), x, ctx, mask), attn, x, ctx, mask)


@pytest.mark.parametrize("cross", [None, 48])
def test_qkv_bias(cross):
    attn = make_attention(64, 4, 16, bias=True, out_bias=False, cross_attention_dim=cross)
    m = _convert(attn)
    assert m.attn_qkvb.shape == (3 * 64,) and m.attn_ob is None
    x = torch.randn(2, 13, 64)
    ctx = None if cross is None else torch.randn(2, 5, cross)
    assert_upcast_close(_run(m, x, ctx), attn, x, ctx)


def test_self_attention_block_given_a_context():
    attn = make_attention(64, 2, 32, bias=True)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 6, 64)
    assert_upcast_close(_run(_convert(attn), x, ctx), attn, x, ctx)


def test_parameters_allocated_only_when_used():
    self_m = _convert(make_attention(64, 2, 32))
    names = {n for n, _ in self_m.named_parameters()}
    assert names == {"attn_qkvw", "attn_ow", "attn_ob"}
    assert self_m.attn_qkvw.shape == (192, 64) and self_m.attn_ow.shape == (64, 64)
    cross_m = _convert(make_attention(64, 2, 32, cross_attention_dim=48, bias=True, out_bias=False))
    names = {n for n, _ in cross_m.named_parameters()}
    assert names == {"attn_qw", "attn_kw", "attn_vw", "attn_qkvb", "attn_ow"}
    assert cross_m.attn_kw.shape == (64, 48) and cross_m._kv_weight() is not None
    vae_m = _convert(make_attention(64, 1, 64, norm_num_groups=8))
    assert {"norm_w", "norm_b"} <= {n for n, _ in vae_m.named_parameters()}
    assert not any(p.requires_grad for p in vae_m.parameters())


def test_kv_refused_after_dtype_round_trip():
    attn = make_attention(64, 2, 32, cross_attention_dim=48)
    m = _convert(attn).double().float()
    assert m._kv_weight() is not None
    m.load_state_dict(_convert(attn).state_dict())  # copies in place: stays fused
    assert m._kv_weight() is not None
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 48)
    assert_upcast_close(_run(m, x, ctx), attn, x, ctx)


def test_kv_not_adjacent_warns_once_and_stays_correct():
    attn = make_attention(64, 2, 32, cross_attention_dim=48, bias=True)
    m = _convert(attn)
    m.attn_vw = torch.nn.Parameter(m.attn_vw.detach().clone(), requires_grad=False)
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 48)
    with pytest.warns(UserWarning, match="not two adjacent halves"):
        out = _run(m, x, ctx)
    assert_upcast_close(out, attn, x, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(m, x, ctx)


def test_kv_adjacency_check_is_cached_until_a_weight_moves(monkeypatch):
    """The storage check behind the one-GEMM K/V projection runs once, not on every cross
    call; in-place writes are read through the cached fused view; re-pointing a weight (a new
    Parameter, ``.to()``) is seen at the next call."""
    checks = []
    real = M._kv_weight_uncached
    monkeypatch.setattr(M, "_kv_weight_uncached", staticmethod(lambda kw, vw: checks.append(1) or real(kw, vw)))
    attn = make_attention(64, 2, 32, cross_attention_dim=48, bias=True)
    m = _convert(attn)
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 48)

    def same_as_a_fresh_copy():
        fresh = _convert(attn)
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(_run(m, x, ctx), _run(fresh, x, ctx))

    for _ in range(3):
        assert_upcast_close(_run(m, x, ctx), attn, x, ctx)
    assert len(checks) == 1
    with torch.no_grad():
        m.attn_kw.mul_(2)  # in place: same layout, new values
    checks.clear()
    same_as_a_fresh_copy()
    assert len(checks) == 1  # the fresh copy's own check; m used its cached view
    m.attn_vw = torch.nn.Parameter(m.attn_vw.detach().clone(), requires_grad=False)
    checks.clear()
    with pytest.warns(UserWarning, match="not two adjacent halves"):
        same_as_a_fresh_copy()
    assert len(checks) == 2  # m noticed the move (and the fresh copy checked itself)
    m.double().float()  # _apply fuses K and V again
    assert m._kv_weight() is not None
    checks.clear()
    same_as_a_fresh_copy()
    assert len(checks) == 1


def test_layer_ids_and_reset():
    a, b = M(DeepSpeedDiffusersAttentionConfig(32, 2, 16)), M(DeepSpeedDiffusersAttentionConfig(32, 2, 16))
    assert (a.layer_id, b.layer_id) == (0, 1)
    M.reset_layer_ids()
    assert M(DeepSpeedDiffusersAttentionConfig(32, 2, 16)).layer_id == 0


def _ws_bytes(*numels):
    return sum((n * 4 + ALIGN - 1) // ALIGN * ALIGN for n in numels)


def test_workspace_allocated_on_first_call_and_grows():
    cpu = torch.device("cpu")
    layer0 = _convert(make_attention(64, 2, 32))
    layer1 = _convert(make_attention(64, 2, 32, cross_attention_dim=48))
    assert layer0.layer_id == 0 and workspace_nbytes(cpu) == 0
    B, S, inner = 2, 33, 64
    _run(layer0, torch.randn(B, S, 64))
    # self-attention: qkv [B,S,3,H,D] + o [B,S,H,D]
    assert workspace_nbytes(cpu) == _ws_bytes(B * S * 3 * inner, B * S * inner)
    first = workspace_nbytes(cpu)
    _run(layer1, torch.randn(B, S, 64), torch.randn(B, 7, 48))  # needs less: no growth
    assert workspace_nbytes(cpu) == first
    _run(layer1, torch.randn(B, 2 * S, 64), torch.randn(B, 90, 48))  # needs more: grows
    assert workspace_nbytes(cpu) == _ws_bytes(B * 2 * S * inner, B * 90 * 2 * inner, B * 2 * S * inner)
    assert get_workspace(cpu).buffer is not None


def test_output_never_aliases_the_workspace():
    attn = make_attention(64, 2, 32)
    m = _convert(attn)
    x1, x2 = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    y1 = _run(m, x1)
    y1_copy = y1.clone()
    y2 = _run(m, x2)
    assert torch.equal(y1, y1_copy)
    assert y1.data_ptr() != y2.data_ptr()
    buf = get_workspace(torch.device("cpu")).buffer
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    assert not lo <= y2.data_ptr() < hi


def test_backward_raises():
    m = _convert(make_attention(64, 2, 32))
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = m(x)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()
    m.attn_ow.requires_grad_(True)
    y = m(torch.randn(2, 5, 64))
    with pytest.raises(RuntimeError, match="no_grad"):
        y.sum().backward()


def test_function_apply_directly():
    attn = make_attention(64, 2, 32)
    m = _convert(attn)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = DeepSpeedDiffusersAttentionFunction.apply(m, x, None, None, *m.parameters())
    assert_upcast_close(y, attn, x)


@pytest.mark.parametrize("kwargs", [{}, {"cross_attention_dim": 48, "bias": True}, {"norm_num_groups": 8}])
def test_from_diffusers_does_not_modify_original(kwargs):
    attn = make_attention(64, 2, 32, **kwargs)
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in attn.state_dict().items()}
    processor = attn.processor
    m = _convert(attn)
    after = attn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) and after[k].data_ptr() == ptrs[k], k
    assert attn.processor is processor
    ours = {p.data_ptr() for p in m.parameters()}
    assert not ours & set(ptrs.values())


def _reason(attn, fragment):
    reasons = dda.supports(attn)
    assert any(fragment in r for r in reasons), reasons
    with pytest.raises(ValueError, match="cannot convert"):
        dda.from_diffusers(attn)


def test_supports_accepts_plain_blocks():
    assert dda.supports(make_attention(64, 2, 32)) == []
    assert dda.supports(make_attention(64, 2, 32, cross_attention_dim=48, bias=True)) == []
    assert dda.supports(make_attention(64, 1, 64, norm_num_groups=8, residual_connection=True)) == []


def test_supports_declines_each_feature():
    from diffusers.models.attention_processor import AttnAddedKVProcessor, XFormersAttnProcessor

    _reason(make_attention(64, 2, 32, spatial_norm_dim=16), "spatial_norm")
    _reason(make_attention(64, 2, 32, qk_norm="layer_norm"), "qk_norm")
    _reason(make_attention(64, 2, 32, added_kv_proj_dim=24, processor=AttnAddedKVProcessor()), "added_kv_proj_dim")
    _reason(
        make_attention(64, 2, 32, added_kv_proj_dim=24, only_cross_attention=True,
                       processor=AttnAddedKVProcessor()),
        "only_cross_attention",
    )
    _reason(make_attention(64, 2, 32, cross_attention_dim=48, cross_attention_norm="layer_norm"), "norm_cross")
    _reason(make_attention(64, 2, 32, processor=XFormersAttnProcessor()), "XFormersAttnProcessor")
    _reason(make_attention(64, 4, 12), "head_dim 12")
    _reason(make_attention(1024, 1, 1024), "head_dim 1024")
    _reason(make_attention(64, 2, 32, kv_heads=1), "kv_heads")
    _reason(make_attention(64, 2, 32, out_dim=128), "out_dim")
    _reason(make_attention(64, 2, 32, is_causal=True), "is_causal")

    train = make_attention(64, 2, 32, dropout=0.1).train()
    _reason(train, "dropout")
    assert dda.supports(train.eval()) == []

    scaled = make_attention(64, 2, 32)
    scaled.scale = 0.5
    _reason(scaled, "ignores it")

    hooked = make_attention(64, 2, 32)
    hooked.register_forward_hook(lambda *a: None)
    _reason(hooked, "hooks")

    assert dda.supports(torch.nn.Linear(4, 4)) == ["Linear is not a diffusers attention module"]


def test_supports_declines_lora_wrapped_projection():
    class LoraLinear(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = torch.nn.Linear(base.in_features, 4, bias=False)
            self.lora_B = torch.nn.Linear(4, base.out_features, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    attn = make_attention(64, 2, 32)
    attn.to_q = LoraLinear(attn.to_q)
    _reason(attn, "to_q is a LoraLinear")


def test_compile_fullgraph():
    attn = make_attention(64, 2, 32, cross_attention_dim=48, bias=True)
    m = _convert(attn)
    compiled = torch.compile(m, fullgraph=True)
    x, ctx, mask = torch.randn(2, 9, 64), torch.randn(2, 7, 48), _additive_mask(2, 7, masked=2)
    with torch.no_grad():
        out = compiled(x, ctx, mask)
    assert_upcast_close(out, attn, x, ctx, mask)
    self_attn = make_attention(64, 1, 64, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0)
    compiled = torch.compile(_convert(self_attn), fullgraph=True)
    x4 = torch.randn(1, 64, 4, 5)
    with torch.no_grad():
        out = compiled(x4)
    assert_upcast_close(out, self_attn, x4)


# --------------------------------------------------------------------------- GPU
SD_GPU = {
    "sd15_d40_self": (320, 8, 40, None, 2, 1024, None),
    "sd15_d80_cross": (640, 8, 80, 768, 2, 1024, 77),
    "sd15_d160_self": (1280, 8, 160, None, 2, 256, None),
    "sdxl_d64_cross": (640, 10, 64, 2048, 2, 1024, 77),
    "odd_4097": (320, 5, 64, None, 1, 4097, None),
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SD_GPU))
def test_gpu_low_precision_vs_fp64(name, dtype):
    C, H, D, Cctx, B, S, Sk = SD_GPU[name]
    attn = make_attention(C, H, D, cross_attention_dim=Cctx, bias=True, device="cuda", dtype=dtype)
    x = torch.randn(B, S, C, device="cuda", dtype=dtype)
    ctx = None if Cctx is None else torch.randn(B, Sk, Cctx, device="cuda", dtype=dtype)
    mask = None if Cctx is None else _additive_mask(B, Sk, device="cuda").to(dtype)  # as the UNet casts it
    out = _run(_convert(attn), x, ctx, mask)
    assert out.dtype == dtype
    assert_upcast_close(out, attn, x, ctx, mask, floor=1e-3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_vae_mid_block(dtype):
    attn = make_attention(512, 1, 512, bias=True, norm_num_groups=32, residual_connection=True,
                          device="cuda", dtype=dtype)
    x = torch.randn(1, 512, 32, 32, device="cuda", dtype=dtype)
    assert_upcast_close(_run(_convert(attn), x), attn, x, floor=1e-3)


@requires_cuda
def test_gpu_fp32_input_is_cast_to_fp16_module():
    attn = make_attention(320, 8, 40, cross_attention_dim=768, device="cuda", dtype=torch.float16)
    m = _convert(attn)
    x = torch.randn(2, 64, 320, device="cuda")
    ctx = torch.randn(2, 77, 768, device="cuda")
    out = _run(m, x, ctx)
    assert out.dtype == torch.float16
    assert torch.equal(out, _run(m, x.half(), ctx.half()))
    assert_upcast_close(out, attn, x.half(), ctx.half(), floor=1e-3)


@requires_cuda
def test_gpu_to_cuda_keeps_kv_fused_and_matches_cpu():
    attn = make_attention(64, 2, 32, cross_attention_dim=48)
    m = _convert(attn)
    x, ctx = torch.randn(2, 9, 64), torch.randn(2, 7, 48)
    cpu_out = _run(m, x, ctx)
    m = m.cuda()
    assert m._kv_weight() is not None
    gpu_out = _run(m, x.cuda(), ctx.cuda())
    assert max_err(gpu_out.cpu(), cpu_out) < 1e-4


@requires_cuda
def test_gpu_capture_takes_its_scratch_from_the_graph_pool():
    """PyTorch's recipe: warm up on a side stream, capture on the graph's own stream (no
    workspace there). The captured call's scratch comes from the graph's pool: the eager
    workspace does not grow, and a later eager call that grows it does not disturb replays."""
    m = _convert(make_attention(64, 2, 32, device="cuda"))
    static = torch.randn(2, 64, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _run(m, static)
    torch.cuda.current_stream().wait_stream(side)
    eager_bytes = workspace_nbytes("cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run(m, static)
    assert workspace_nbytes("cuda") == eager_bytes
    _run(m, torch.randn(4, 256, 64, device="cuda"))  # grows the eager workspace of this stream
    assert workspace_nbytes("cuda") > eager_bytes
    for _ in range(2):
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _run(m, static))


@requires_cuda
def test_gpu_compile_fullgraph():
    attn = make_attention(320, 8, 40, cross_attention_dim=768, device="cuda", dtype=torch.float16)
    compiled = torch.compile(_convert(attn), fullgraph=True)
    x = torch.randn(2, 256, 320, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = compiled(x, ctx)
    assert_upcast_close(out, attn, x, ctx, floor=1e-3)


def test_inference_mode_with_rescale_and_out_bias():
    """Parameters created under torch.inference_mode() have no version counter; the cached
    out-bias / rescale_output_factor must not need one."""
    attn = make_attention(32, 2, 16, bias=True, rescale_output_factor=2.0)
    x = torch.randn(1, 5, 32)
    with torch.inference_mode():
        m = _convert(attn)
        out = m(x)
    assert_upcast_close(out, attn, x)
