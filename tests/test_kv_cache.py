"""The opt-in cross-attention K/V cache of DeepSpeedDiffusersAttention.

Every test checks both the counters (hit or miss, as expected) and the output: it must
equal, bit for bit, a run of the same module with the cache off on the same inputs, so a
stale K/V can never pass. CPU in float32 (the C reference); the GPU tests skip without CUDA.
"""
from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import make_attention, requires_cuda
import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.attention import DeepSpeedDiffusersAttention, DeepSpeedDiffusersAttentionConfig

M = DeepSpeedDiffusersAttention
B, SQ, C, H, D, SK, CCTX = 2, 9, 64, 2, 32, 7, 48
INNER = H * D


def _module(kv_cache=True, device="cpu", dtype=torch.float32, **kwargs):
    attn = make_attention(C, H, D, cross_attention_dim=CCTX, bias=True, device=device, dtype=dtype, **kwargs)
    return dda.from_diffusers(attn, kv_cache=kv_cache)


def _run(m, x, ctx, mask=None):
    with torch.no_grad():
        return m(x, ctx, mask)


def _uncached(m, x, ctx, mask=None):
    """m's output with the cache bypassed; the cached entry and the counters are kept
    (``m.kv_cache = False`` would free the entry, so the private flag is toggled)."""
    was = m._kv_cache_on
    m._kv_cache_on = False
    try:
        return _run(m, x, ctx, mask)
    finally:
        m._kv_cache_on = was


def _stats(m):
    return m.kv_cache_hits, m.kv_cache_misses


def _check(m, x, ctx, expect, mask=None):
    """Run m (cache on) and assert the lookup was ``expect`` ("hit"/"miss") and the output exact."""
    hits, misses = _stats(m)
    out = _run(m, x, ctx, mask)
    want = (hits + 1, misses) if expect == "hit" else (hits, misses + 1)
    assert _stats(m) == want, f"expected a {expect}: (hits, misses) {(hits, misses)} -> {_stats(m)}"
    ref = _uncached(m, x, ctx, mask)
    if out.device.type == "cpu":
        assert torch.equal(out, ref), f"output differs from the uncached run ({expect})"
    else:  # a GPU GEMM may pick another algorithm for another output address; stale K/V is far off
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    return out


class _OpsOn(TorchDispatchMode):
    """Records the name of every op (aten or dda) that gets a tensor in ``target``'s storage."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.storage = target.untyped_storage().data_ptr()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage
               for t in tree_leaves((args, kwargs))):
            self.ops.append(str(func))
        return func(*args, **kwargs)


def _ops_on_context(m, x, ctx) -> list:
    with _OpsOn(ctx) as seen:
        _run(m, x, ctx)
    return seen.ops


# ------------------------------------------------------------------------------ API
def test_off_by_default_and_counts_nothing():
    m = _module(kv_cache=False)
    assert m.kv_cache is False
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    for _ in range(2):
        _run(m, x, ctx)
    assert _stats(m) == (0, 0) and m.kv_cache_nbytes == 0


def test_api_switches():
    cfg = DeepSpeedDiffusersAttentionConfig(hidden_size=C, heads=H, dim_head=D, cross_attention_dim=CCTX)
    assert M(cfg, kv_cache=True).kv_cache is True
    m = _module(kv_cache=False)
    assert m.enable_kv_cache() is m and m.kv_cache is True
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    _check(m, x, ctx, "miss")
    assert m.kv_cache_nbytes == B * SK * 2 * INNER * 4
    m.enable_kv_cache(False)
    assert m.kv_cache is False and m.kv_cache_nbytes == 0  # turning it off frees the tensor
    m.kv_cache = True
    _check(m, x, ctx, "miss")
    m.clear_kv_cache()
    assert m.kv_cache_nbytes == 0
    _check(m, x, ctx, "miss")


# ----------------------------------------------------------------- (3) same context hits
def test_same_context_hits_and_equals_uncached():
    m = _module()
    ctx = torch.randn(B, SK, CCTX)
    mask = torch.zeros(B, 1, SK)
    mask[:, :, -2:] = -10000.0
    _check(m, torch.randn(B, SQ, C), ctx, "miss")
    for step in range(3):  # new latents every step, same text
        _check(m, torch.randn(B, SQ, C), ctx, "hit", mask if step == 1 else None)
    other = _module(kv_cache=False)
    other.load_state_dict(m.state_dict())
    x = torch.randn(B, SQ, C)
    assert torch.equal(_run(m, x, ctx), _run(other, x, ctx))


def test_hit_makes_no_copy_of_the_context():
    """The lookup comes first: a non-contiguous context is made contiguous for the K/V GEMM
    on a miss only; a hit runs no op at all on it (only its metadata is read)."""
    m = _module()
    x = torch.randn(B, SQ, C)
    ctx = torch.randn(B, CCTX, SK).transpose(1, 2)  # [B, SK, CCTX], not contiguous
    assert _ops_on_context(m, x, ctx) == ["aten.clone.default"] and _stats(m) == (0, 1)
    assert _ops_on_context(m, x, ctx) == [] and _stats(m) == (1, 1)
    _check(m, x, ctx, "hit")
    ctx.mul_(2)  # a miss again: copied again
    assert _ops_on_context(m, x, ctx) == ["aten.clone.default"] and _stats(m) == (2, 2)


def test_cache_survives_other_layers_calls():
    """The cached K/V is the module's own tensor, not a workspace piece other layers overwrite."""
    m, n = _module(), _module(seed=1)
    ctx = torch.randn(B, SK, CCTX)
    _check(m, torch.randn(B, SQ, C), ctx, "miss")
    _run(n, torch.randn(B, 3 * SQ, C), torch.randn(B, 2 * SK, CCTX))  # reuses (and grows) the workspace
    _check(m, torch.randn(B, SQ, C), ctx, "hit")


# ------------------------------------------------------------------ (1) a new prompt
def test_new_context_tensor_recomputes():
    m = _module()
    x, ctx1, ctx2 = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX), torch.randn(B, SK, CCTX)
    out1 = _check(m, x, ctx1, "miss")
    out2 = _check(m, x, ctx2, "miss")
    assert not torch.equal(out1, out2)
    _check(m, x, ctx2, "hit")
    _check(m, x, ctx1, "miss")  # one entry per module: switching back recomputes
    _check(m, x, ctx1.clone(), "miss")  # equal values, new object: recomputes (correct, no saving)


# --------------------------------------------------------------- (2) in-place updates
@pytest.mark.parametrize(
    "update",
    [
        lambda t: t.add_(1),
        lambda t: t.copy_(torch.randn_like(t)),
        lambda t: t[1].mul_(2),  # through a view: views share the version counter
        lambda t: t.__setitem__((slice(None), 0), 0.5),
        lambda t: torch.randn(t.shape, out=t),
    ],
    ids=["add_", "copy_", "view_mul_", "setitem", "out="],
)
def test_in_place_context_update_recomputes(update):
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    before = _check(m, x, ctx, "miss")
    update(ctx)
    after = _check(m, x, ctx, "miss")
    assert not torch.equal(before, after)
    _check(m, x, ctx, "hit")


def test_static_context_buffer_refilled_with_copy_():
    """The CPU analogue of CUDA-graph replay: one static context buffer, refilled per prompt."""
    m = _module()
    static = torch.zeros(B, SK, CCTX)
    x = torch.randn(B, SQ, C)
    outs = []
    for prompt in (torch.randn(B, SK, CCTX) for _ in range(3)):
        static.copy_(prompt)
        outs.append(_check(m, x, static, "miss"))
        _check(m, x, static, "hit")
        assert torch.equal(outs[-1], _uncached(m, x, prompt))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


# ---------------------------------------------------------------- (4) weights change
def _replace_kv_with_new_fused_storage(m):
    kv = torch.cat([m.attn_kw.data, m.attn_vw.data]) * 1.5
    m.attn_kw = nn.Parameter(kv[:INNER], requires_grad=False)
    m.attn_vw = nn.Parameter(kv[INNER:], requires_grad=False)


def _load_state_dict(m):
    sd = {k: v * 0.5 if k in ("attn_kw", "attn_vw") else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.attn_kw.add_(0.1),
        lambda m: m.attn_vw.mul_(-1),
        lambda m: m.attn_kw.detach()[0].zero_(),  # detach() shares the version counter
        lambda m: m.attn_qkvb.add_(0.1),
        _load_state_dict,
        _replace_kv_with_new_fused_storage,
        pytest.param(
            lambda m: setattr(m.attn_vw, "data", m.attn_vw.data * 2),
            marks=pytest.mark.filterwarnings("ignore:.*not two adjacent halves"),
        ),
    ],
    ids=["kw_add_", "vw_mul_", "detach_zero_", "bias_add_", "load_state_dict", "new_parameters", "data_assign"],
)
def test_kv_weight_change_invalidates(change):
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    before = _check(m, x, ctx, "miss")
    with torch.no_grad():
        change(m)
    after = _check(m, x, ctx, "miss")
    assert not torch.equal(before, after)
    _check(m, x, ctx, "hit")


def test_q_or_out_weight_change_keeps_kv():
    """K/V do not depend on attn_qw / attn_ow: still a hit, and still exact."""
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    _check(m, x, ctx, "miss")
    with torch.no_grad():
        m.attn_qw.mul_(2)
        m.attn_ow.add_(0.1)
    _check(m, x, ctx, "hit")


def test_data_alias_write_needs_clear():
    """Documented limit: a write through ``.data`` skips the version counter; clear_kv_cache() fixes it."""
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    _check(m, x, ctx, "miss")
    m.attn_kw.data.add_(1.0)
    m.clear_kv_cache()
    _check(m, x, ctx, "miss")


def test_to_and_deepcopy():
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    _check(m, x, ctx, "miss")
    m.to(torch.float64).float()  # new storage: the cache is dropped
    assert m.kv_cache_nbytes == 0
    _check(m, x, ctx, "miss")
    c = copy.deepcopy(m)  # starts without the cache (its weights are other objects anyway)
    assert c.kv_cache and c.kv_cache_nbytes == 0 and c._kv_weight() is not None
    _check(c, x, ctx, "miss")
    _check(c, x, ctx, "hit")
    buf = io.BytesIO()
    torch.save(c, buf)  # weak references in the cache would not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.kv_cache_nbytes == 0 and loaded._kv_weight() is not None
    assert torch.equal(_check(loaded, x, ctx, "miss"), _run(c, x, ctx))


# ------------------------------------------------- (5) same data_ptr, different shape
def test_same_data_ptr_other_shape_recomputes():
    m = _module()
    big = torch.randn(4, SK, CCTX)
    _check(m, torch.randn(4, SQ, C), big, "miss")
    head = big[:B]  # same data_ptr, batch 2
    assert head.data_ptr() == big.data_ptr()
    _check(m, torch.randn(B, SQ, C), head, "miss")
    _check(m, torch.randn(B, SQ, C), head, "hit")
    shorter = head[:, : SK - 2]  # same data_ptr, fewer keys (strided: the module copies it)
    _check(m, torch.randn(B, SQ, C), shorter, "miss")
    _check(m, torch.randn(B, SQ, C), shorter, "hit")
    head.resize_(1, SK, CCTX)  # same object and data_ptr, new shape (and version)
    _check(m, torch.randn(1, SQ, C), head, "miss")


def test_metadata_change_without_version_bump_recomputes():
    """``.data =`` keeps the tensor's object and version: only shape and strides tell."""
    m = _module()
    ctx = torch.randn(B, B, CCTX)  # Sk == B, so a transpose keeps the shape
    x = torch.randn(B, SQ, C)
    _check(m, x, ctx, "miss")
    version, ptr = ctx._version, ctx.data_ptr()
    ctx.data = ctx.data.transpose(0, 1)  # other strides (the module copies it to rows)
    assert (ctx._version, ctx.data_ptr(), ctx.shape) == (version, ptr, (B, B, CCTX))
    _check(m, x, ctx, "miss")
    ctx.data = ctx.data.transpose(0, 1)[:1]  # back to row strides, batch 1: same address
    assert (ctx._version, ctx.data_ptr(), ctx.shape) == (version, ptr, (1, B, CCTX))
    _check(m, x[:1], ctx, "miss")
    ctx.data = ctx.data[:, :1]  # same address, fewer keys
    assert (ctx._version, ctx.data_ptr(), ctx.shape) == (version, ptr, (1, 1, CCTX))
    _check(m, x[:1], ctx, "miss")


# ------------------------------------------- (6) freed, then a new tensor at the same address
def test_new_tensor_at_a_freed_tensors_address_misses():
    m = _module()
    x = torch.randn(B, SQ, C)
    memory = bytearray(B * SK * CCTX * 4)  # one block of memory seen by two tensors in turn

    first = torch.frombuffer(memory, dtype=torch.float32).view(B, SK, CCTX)
    first.copy_(torch.randn(B, SK, CCTX))
    _check(m, x, first, "miss")
    old_key, ptr = m._kv_entry.key, first.data_ptr()
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None, "the cache must not keep the context alive"

    second = torch.frombuffer(memory, dtype=torch.float32).view(B, SK, CCTX)
    second.copy_(torch.randn(B, SK, CCTX))
    # Everything but the identity matches: address, version (1), shape, strides, dtype, weights.
    assert second.data_ptr() == ptr
    assert m._kv_key(m._kv_sources(second), second.device) == old_key
    _check(m, x, second, "miss")
    _check(m, x, second, "hit")


# ------------------------------------------------------------------- bypass cases
def test_no_context_bypasses():
    attn = make_attention(C, H, D, cross_attention_dim=C, bias=True)  # context defaults to the input
    m = dda.from_diffusers(attn, kv_cache=True)
    x = torch.randn(B, SQ, C)
    _run(m, x, None)
    _run(m, x, None)
    assert _stats(m) == (0, 0) and m.kv_cache_nbytes == 0


def test_self_attention_block_given_a_context_caches():
    m = dda.from_diffusers(make_attention(C, H, D, bias=True), kv_cache=True)
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, C)
    _check(m, x, ctx, "miss")
    _check(m, x, ctx, "hit")
    with torch.no_grad():
        m.attn_qkvw[INNER:].add_(0.1)  # a view of attn_qkvw: bumps its version
    _check(m, x, ctx, "miss")
    _run(m, x, None)  # self-attention proper: nothing to cache
    assert _stats(m) == (1, 2)


def test_inference_tensors_bypass_with_a_warning():
    m = _module()
    x = torch.randn(B, SQ, C)
    with torch.inference_mode():
        ctx = torch.randn(B, SK, CCTX)
        with pytest.warns(UserWarning, match="inference tensors"):
            out = m(x, ctx)
        ctx.add_(1)  # invisible to any version counter: hence the bypass
        again = m(x, ctx)
    assert _stats(m) == (0, 0) and m.kv_cache_nbytes == 0
    assert not torch.equal(out, again)
    assert torch.equal(again, _uncached(m, x, ctx.clone()))


def test_compile_bypasses():
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, ctx)
        ctx.add_(1)
        out2 = compiled(x, ctx)
    assert _stats(m) == (0, 0) and m.kv_cache_nbytes == 0
    torch.testing.assert_close(out2, _uncached(m, x, ctx), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, out2)


def test_bad_call_does_not_disturb_the_cache():
    m = _module()
    x, ctx = torch.randn(B, SQ, C), torch.randn(B, SK, CCTX)
    _check(m, x, ctx, "miss")
    with pytest.raises(ValueError):
        _run(m, x, torch.randn(B, SK, CCTX + 1))
    _check(m, x, ctx, "hit")


# --------------------------------------------------------------------------- GPU
@requires_cuda
def test_gpu_fp16_cache_with_fp32_context_streams_and_graph_capture():
    m = _module(device="cuda", dtype=torch.float16)
    x = torch.randn(B, SQ, C, device="cuda", dtype=torch.float16)
    ctx32 = torch.randn(B, SK, CCTX, device="cuda")  # fp32: cast inside, on a miss only
    assert "aten._to_copy.default" in _ops_on_context(m, x, ctx32) and _stats(m) == (0, 1)
    assert _ops_on_context(m, x, ctx32) == [] and _stats(m) == (1, 1)  # a hit: no cast
    _check(m, x, ctx32, "hit")
    ctx32.mul_(0.5)
    _check(m, x, ctx32, "miss")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _check(m, x, ctx32, "miss")  # another stream: recomputed there, never read across streams
        _check(m, x, ctx32, "hit")

        static_x = x.clone()
        static_ctx = torch.randn(B, SK, CCTX, device="cuda", dtype=torch.float16)
        _run(m, static_x, static_ctx)  # warm-up on the capturing stream
        graph = torch.cuda.CUDAGraph()
        stats = _stats(m)
        with torch.cuda.graph(graph, stream=side):
            static_out = _run(m, static_x, static_ctx)
        assert _stats(m) == stats  # capture bypasses the cache: the graph always projects K/V
        for _ in range(2):
            prompt = torch.randn(B, SK, CCTX, device="cuda", dtype=torch.float16)
            static_ctx.copy_(prompt)
            graph.replay()
            torch.testing.assert_close(static_out, _uncached(m, static_x, prompt), rtol=2e-3, atol=2e-3)
            _check(m, static_x, static_ctx, "miss")  # eager after a refill recomputes too
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def test_patch_kv_cache_option_on_a_unet():
    """patch(unet, kv_cache=True): every cross-attention computes K/V once per context tensor;
    outputs equal the uncached patched UNet's bit for bit, and a new prompt recomputes."""
    from diffusers import UNet2DConditionModel

    import deepspeed_diffusers_attn as dda
    from deepspeed_diffusers_attn.configs import SD15_UNET, scaled_down

    torch.manual_seed(0)
    config = scaled_down(SD15_UNET)
    unet = UNet2DConditionModel.from_config(config).eval()
    sample = torch.randn(2, 4, config["sample_size"], config["sample_size"])
    ctx = torch.randn(2, 77, config["cross_attention_dim"])
    with torch.no_grad():
        dda.patch(unet)
        plain = [unet(sample, t, ctx).sample for t in (10, 500)]
        dda.unpatch(unet)
        report = dda.patch(unet, kv_cache=True)
        assert report.options["kv_cache"] is True
        cached = [unet(sample, t, ctx).sample for t in (10, 500)]
        layers = [m.dda for m in unet.modules() if dda.adapters.is_stand_in(m) and m.dda.config.is_cross_attention]
        assert layers and all(m.kv_cache for m in layers)
        assert all(m.kv_cache_misses == 1 and m.kv_cache_hits == 1 for m in layers)
        for a, b in zip(plain, cached):
            assert torch.equal(a, b)
        other = unet(sample, 10, ctx + 1).sample  # a new prompt: a miss in every layer
        assert all(m.kv_cache_misses == 2 for m in layers)
        assert not torch.equal(other, cached[0])
    dda.unpatch(unet)
