"""GEGLU and channels-last GroupNorm: the ops against float64 references, their errors,
the module stand-ins, and what patch(fuse_blocks=True) / unpatch do to a UNet."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from torch import nn

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import ops
from deepspeed_diffusers_attn.blocks import ChannelsLastGroupNorm, FusedGEGLU, fuse_resnet, keep_output_layout
from deepspeed_diffusers_attn.configs import SD15_UNET, scaled_down

from conftest import requires_cuda

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def geglu_ref(x, approximate=False):
    value, gate = x.double().chunk(2, dim=-1)
    return value * F.gelu(gate, approximate="tanh" if approximate else "none")


def poisoned_cache(nbytes: int, device="cuda"):
    """Leave a NaN-filled block of this size in the caching allocator, so the next
    allocation of that size (an op's output) starts poisoned."""
    torch.full((nbytes // 2 + 1,), float("nan"), dtype=torch.float16, device=device)


# --------------------------------------------------------------------- GEGLU (CPU)
@pytest.mark.parametrize("M,N", [(1, 1), (77, 7), (5, 40), (33, 320)])
@pytest.mark.parametrize("approximate", [False, True])
def test_geglu_cpu_matches_float64(M, N, approximate):
    gen = torch.Generator().manual_seed(M * 1000 + N)
    big = torch.randn(M, 2 * N + 3, generator=gen) * 3
    x = big[:, : 2 * N]  # rows strided by 2N + 3
    y = ops.geglu(x, approximate)
    assert y.shape == (M, N) and y.dtype == torch.float32
    ref = geglu_ref(x, approximate)
    torch_err = rel_err(geglu_ref(x.float(), approximate).float(), ref)  # fp32 rounding of the result
    assert rel_err(y, ref) <= max(4 * torch_err, 8 * EPS[torch.float32])


def test_geglu_leading_dims_and_errors():
    x = torch.randn(2, 3, 8)
    assert ops.geglu(x).shape == (2, 3, 4)
    with pytest.raises(RuntimeError, match="even"):
        ops.geglu(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="float32 only"):
        ops.geglu(torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="contiguous in its last dim"):
        ops.geglu(torch.randn(8, 4).t())


# ----------------------------------------------------------------- GroupNorm (CPU)
def gn_ref(x, G, w, b, eps, silu, shift=None):
    x = x.double() if shift is None else x.double() + shift.double().reshape(*shift.shape[:2], 1, 1)
    y = F.group_norm(x, G, None if w is None else w.double(), None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


def stock_gn(x, G, w, b, eps, silu, shift=None):
    """What stock diffusers computes in x's dtype: (x + shift) rounded, GroupNorm, SiLU."""
    x = x if shift is None else x + shift.reshape(*shift.shape[:2], 1, 1)
    y = F.group_norm(x, G, w, b, eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("N,C,H,W,G", [(1, 8, 1, 1, 2), (2, 12, 3, 5, 4), (3, 40, 7, 9, 8), (2, 64, 16, 16, 32)])
@pytest.mark.parametrize("affine,silu,shifted", [(True, False, False), (False, True, False), (True, True, False),
                                                 (True, True, True), (False, False, True)])
def test_group_norm_cpu_matches_float64(N, C, H, W, G, affine, silu, shifted):
    gen = torch.Generator().manual_seed(N * 100 + C)
    x = (torch.randn(N, C, H, W, generator=gen) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=gen) if affine else None
    b = torch.randn(C, generator=gen) if affine else None
    # a time embedding as a ResnetBlock2D adds it: [N, C, 1, 1] (or [N, C]), a large offset included
    shift = (torch.randn(N, C, generator=gen) * 3 + 10).reshape(N, C, 1, 1) if shifted else None
    y = ops.group_norm(x, G, w, b, 1e-5, silu, shift)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    ref = gn_ref(x, G, w, b, 1e-5, silu, shift)
    torch_err = rel_err(stock_gn(x, G, w, b, 1e-5, silu, shift), ref)
    assert rel_err(y, ref) <= max(4 * torch_err, 16 * EPS[torch.float32])
    if shifted:  # the 2-D form is the same call; one row expanded over the samples (stride 0) too
        assert torch.equal(ops.group_norm(x, G, w, b, 1e-5, silu, shift.reshape(N, C)), y)
        row = shift.reshape(N, C)[:1].expand(N, C)
        assert torch.equal(ops.group_norm(x, G, w, b, 1e-5, silu, row),
                           ops.group_norm(x, G, w, b, 1e-5, silu, row.contiguous()))


def test_group_norm_errors():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match="channels-last"):
        ops.group_norm(x, 2)  # NCHW
    xc = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="must divide"):
        ops.group_norm(xc, 3)
    with pytest.raises(RuntimeError, match=r"\[C\]"):
        ops.group_norm(xc, 2, torch.ones(7))
    with pytest.raises(RuntimeError, match="shift must be"):
        ops.group_norm(xc, 2, shift=torch.ones(2, 7))
    with pytest.raises(RuntimeError, match="shift must be"):
        ops.group_norm(xc, 2, shift=torch.ones(8, 2).t())  # channels not contiguous
    assert "must be channels-last contiguous" in ops.group_norm_supported(x, 2)
    assert ops.group_norm_supported(xc, 2) == ""
    assert "must divide" in ops.group_norm_supported(xc, 3)
    assert "float32 only" in ops.group_norm_supported(xc.half(), 2)
    assert "shift must be" in ops.group_norm_supported(xc, 2, shift=torch.ones(2, 7))
    assert ops.group_norm_supported(xc, 2, shift=torch.ones(2, 8, 1, 1)) == ""


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        y = torch.ops.dda.group_norm(x, 2, None, None, 1e-5, False)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        z = torch.ops.dda.geglu(torch.empty(3, 5, 16), False)
        assert z.shape == (3, 5, 8)


# ------------------------------------------------------------------ modules, patch
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(scaled_down(SD15_UNET)).eval()
    for p in unet.parameters():  # non-trivial norms and biases
        p.data.normal_(0, 0.2)
    return unet


def unet_inputs(unet, channels_last=False):
    gen = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    sample = torch.randn(2, 4, size, size, generator=gen)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    return dict(sample=sample, timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen),
                return_dict=False)


def test_patch_fuses_blocks_and_unpatch_restores():
    unet = tiny_unet()
    keys = list(unet.state_dict())
    originals = {n: m for n, m in unet.named_modules() if type(m) in (GEGLU, nn.GroupNorm)}
    n_geglu = sum(type(m) is GEGLU for m in originals.values())
    report = dda.patch(unet)
    assert report.blocks["GEGLU"] == n_geglu > 0
    assert report.blocks["GroupNorm"] > 0 and report.blocks["Transformer2D output layout"] > 0
    n_resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert report.blocks["ResnetBlock2D norm+SiLU"] == n_resnets > 0
    assert "fused: GEGLU" in str(report)
    assert not any(type(m) in (GEGLU, nn.GroupNorm) for n, m in unet.named_modules() if "dda" not in n)
    # the same Parameter objects, the same state_dict keys outside attention: nothing duplicated
    assert [k for k in unet.state_dict() if ".attn" not in k] == [k for k in keys if ".attn" not in k]
    for name, module in unet.named_modules():
        if isinstance(module, (FusedGEGLU, ChannelsLastGroupNorm)):
            assert module.original is originals[name]
            if isinstance(module, ChannelsLastGroupNorm):
                assert module.weight is originals[name].weight
    back = dda.unpatch(unet)
    assert back.blocks["GEGLU"] == n_geglu and back.blocks["ResnetBlock2D norm+SiLU"] == n_resnets
    assert not any("forward" in vars(m) for m in unet.modules())
    for name, module in unet.named_modules():
        if name in originals:
            assert module is originals[name]
    assert not any("_get_output_for_continuous_inputs" in vars(m) for m in unet.modules())
    assert list(unet.state_dict()) == keys


def test_patched_blocks_equal_stock_on_cpu_channels_last():
    # on the CPU both stand-ins run the stock formulas and the layout step moves no value:
    # fusing the blocks changes nothing but memory formats (attention patched on both sides)
    unet = tiny_unet().to(memory_format=torch.channels_last)
    other = copy.deepcopy(unet)
    with torch.no_grad():
        dda.patch(other, fuse_blocks=False)
        ref = other(**unet_inputs(other, True))[0]
        report = dda.patch(unet)
        out = unet(**unet_inputs(unet, True))[0]
    assert report.blocks["GroupNorm"] > 0 and "fuse_blocks" in report.options
    assert rel_err(out, ref) <= 16 * EPS[torch.float32]


def test_keep_output_layout_keeps_channels_last():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for linear in (False, True):
        torch.manual_seed(0)
        t2d = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                                 cross_attention_dim=12, use_linear_projection=linear).eval()
        x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
        ctx = torch.randn(2, 7, 12)
        with torch.no_grad():
            ref = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
            assert keep_output_layout(t2d) and not keep_output_layout(t2d)  # applied once
            out = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
            out_nchw = t2d(x.contiguous(), encoder_hidden_states=ctx, return_dict=False)[0]
        assert out.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous(
            memory_format=torch.channels_last)
        # the same values (a 1x1 conv proj_out may round differently in the other layout)
        assert rel_err(out, ref) <= (0 if linear else 16 * EPS[torch.float32])
        assert out_nchw.is_contiguous() and rel_err(out_nchw, ref) <= 16 * EPS[torch.float32]


@pytest.mark.parametrize("kind", ["plain", "shortcut+scale", "up", "down", "no temb (VAE)", "skip_time_act",
                                  "group norm (VAE decoder)"])
def test_fused_resnet_forward_is_the_stock_computation_on_cpu(kind):
    # on the CPU _norm_silu runs the stock composition, so the fused forward must reproduce
    # stock's structure exactly: up / down sampling, shortcut, output scale, temb handling
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    cfg = dict(in_channels=16, out_channels=16, temb_channels=12, groups=4)
    cfg.update({"shortcut+scale": dict(out_channels=24, output_scale_factor=2.0), "up": dict(up=True),
                "down": dict(down=True), "no temb (VAE)": dict(temb_channels=None),
                "skip_time_act": dict(skip_time_act=True),
                "group norm (VAE decoder)": dict(temb_channels=None, time_embedding_norm="group")}.get(kind, {}))
    block = ResnetBlock2D(**cfg).eval()
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    temb = None if cfg["temb_channels"] is None else torch.randn(2, 12)
    with torch.no_grad():
        ref = block(x, temb)
        assert not fuse_resnet(block)  # the norms must be the stand-ins first
        block.norm1, block.norm2 = ChannelsLastGroupNorm(block.norm1), ChannelsLastGroupNorm(block.norm2)
        assert fuse_resnet(block) and not fuse_resnet(block)
        out = block(x, temb)
    assert torch.equal(out, ref)
    assert block.norm1.fallback_calls == 1 and block.norm1.last_fallback_reason == "CPU input"


def test_modules_with_hooks_or_adapters_are_not_fused():
    unet = tiny_unet()
    gn = unet.conv_norm_out
    gn.register_forward_hook(lambda m, i, o: None)
    geglu = next(m for m in unet.modules() if type(m) is GEGLU)
    geglu.proj = nn.Sequential(geglu.proj)  # stands for an adapter-wrapped projection
    report = dda.patch(unet)
    declined = {r.name: r.reasons for r in report.blocks_declined}
    assert unet.conv_norm_out is gn and "forward hooks" in declined["conv_norm_out"][0]
    assert any("Sequential" in reasons[0] for reasons in declined.values())
    assert "not fused: conv_norm_out" in str(report)


def test_group_norm_module_counts_fallbacks():
    gn = nn.GroupNorm(2, 8)
    mod = ChannelsLastGroupNorm(gn)
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(mod(x), gn(x))
    assert mod.fallback_calls == 1 and mod.last_fallback_reason == "CPU input"


# ---------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,approximate", [((2, 4096, 2 * 1280), False), ((77, 2 * 7), False),
                                               ((3, 5, 2 * 40), True), ((1, 2 * 640), False)])
def test_geglu_cuda_matches_float64(shape, approximate, dtype):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to("cuda", dtype)
    poisoned_cache(x.numel() * x.element_size() // 2)
    y = ops.geglu(x, approximate)
    ref = geglu_ref(x, approximate)
    # stock: gelu rounded to dtype, then the product rounded
    value, gate = x.chunk(2, dim=-1)
    stock = value * F.gelu(gate, approximate="tanh" if approximate else "none")
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    assert rel_err(y, ref) <= max(1.5 * rel_err(stock, ref), 2 * EPS[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,C,H,W,G,offset", [(2, 320, 64, 64, 32, 0.0), (1, 128, 128, 128, 32, 0.0),
                                              (3, 40, 7, 9, 4, 0.0), (1, 8, 1, 1, 2, 0.0),
                                              (2, 1280, 8, 8, 32, 0.0), (2, 64, 33, 17, 32, 30.0)])
@pytest.mark.parametrize("affine,silu,shifted", [(True, False, False), (False, True, False), (True, True, True)])
def test_group_norm_cuda_matches_float64(N, C, H, W, G, offset, affine, silu, shifted, dtype):
    gen = torch.Generator().manual_seed(C * 7 + H)
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) + offset
    x = x64.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=gen, dtype=torch.float64).to("cuda", dtype) if affine else None
    b = torch.randn(C, generator=gen, dtype=torch.float64).to("cuda", dtype) if affine else None
    shift = (torch.randn(N, C, 1, 1, generator=gen, dtype=torch.float64) * 2 - offset).to("cuda", dtype) \
        if shifted else None
    poisoned_cache(x.numel() * x.element_size())
    y = ops.group_norm(x, G, w, b, 1e-5, silu, shift)
    ref = gn_ref(x, G, w, b, 1e-5, silu, shift)
    stock = stock_gn(x, G, w, b, 1e-5, silu, shift)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    assert rel_err(y, ref) <= max(1.5 * rel_err(stock, ref), 4 * EPS[dtype])


def poisoned_small_pool(blocks=8, nbytes=1 << 20):
    """Leave `blocks` cached 1 MB blocks of 0xFF bytes in the caching allocator's small pool,
    where the next small allocations (group_norm's workspace among them) are carved from."""
    junk = [torch.full((nbytes // 4,), -1, dtype=torch.int32, device="cuda") for _ in range(blocks)]
    del junk


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("C", [320, 1280])
@pytest.mark.parametrize("H,W", [(1, 1), (7, 1), (16, 16), (64, 64)])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("silu,shifted", [(False, False), (True, True)])
def test_group_norm_cuda_repeated_calls_and_graph_replays(N, H, W, C, silu, shifted, dtype):
    # The statistics kernel's last block per sample (or per bundle of chunks, then per sample:
    # 64 x 64 and 16 x 16 at C=1280) combines the partials behind per-call block counters. Every
    # call and replay below sees new data in a workspace that the previous call used (eager: the
    # caching allocator's same block; graph: the same pool address), so counters or statistics
    # carried over from the previous launch give wrong outputs.
    G, eps = 32, 1e-5
    gen = torch.Generator().manual_seed(N * 1000 + H * W + C)

    def draw(i):
        x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) * (1 + i) + 3 * i
        x = x64.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
        shift = (torch.randn(N, C, 1, 1, generator=gen, dtype=torch.float64) * 2 - 3 * i).to("cuda", dtype) \
            if shifted else None
        return x, shift

    w = torch.randn(C, generator=gen, dtype=torch.float64).to("cuda", dtype)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to("cuda", dtype)

    def check(y, x, shift, act):
        ref = gn_ref(x, G, w, b, eps, act, shift)
        stock = stock_gn(x, G, w, b, eps, act, shift)
        assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
        assert rel_err(y, ref) <= max(1.5 * rel_err(stock, ref), 4 * EPS[dtype])

    poisoned_small_pool()
    inputs = [draw(i) for i in range(4)]
    outs = [ops.group_norm(x, G, w, b, eps, silu, shift) for x, shift in inputs]  # back to back, one stream
    for (x, shift), y in zip(inputs, outs):
        check(y, x, shift, silu)

    static_x = inputs[0][0].clone()
    static_shift = inputs[0][1].clone() if shifted else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.group_norm(static_x, G, w, b, eps, silu, static_shift)  # warm-up off the capturing stream
    torch.cuda.current_stream().wait_stream(side)
    poisoned_small_pool()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # two GroupNorms back to back in one graph
        y1 = ops.group_norm(static_x, G, w, b, eps, silu, static_shift)
        y2 = ops.group_norm(y1, G, None, None, eps, False)
    for i in range(4, 8):
        x, shift = draw(i)
        static_x.copy_(x)
        if shifted:
            static_shift.copy_(shift)
        graph.replay()
        torch.cuda.synchronize()
        check(y1, x, shift, silu)
        ref2 = gn_ref(y1, G, None, None, eps, False)
        assert rel_err(y2, ref2) <= max(1.5 * rel_err(stock_gn(y1, G, None, None, eps, False), ref2), 4 * EPS[dtype])


@requires_cuda
def test_group_norm_cuda_refuses_what_it_cannot_take():
    x = torch.randn(2, 12, 4, 4, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert "multiple of 8" in ops.group_norm_supported(x, 4)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.group_norm(x, 4)


@requires_cuda
def test_cuda_patched_unet_blocks_close_to_stock_and_no_fallbacks():
    # fp32 (the random tiny UNet overflows fp16); channels-last, so every GroupNorm runs ours
    unet = tiny_unet().to("cuda").to(memory_format=torch.channels_last)
    stock = copy.deepcopy(unet)
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in unet_inputs(unet, True).items()}
    with torch.no_grad():
        ref64 = copy.deepcopy(stock).double()(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                                 for k, v in inputs.items()})[0]
        ref = stock(**inputs)[0]
        dda.patch(unet)
        out = unet(**inputs)[0]
    gns = [m for m in unet.modules() if isinstance(m, ChannelsLastGroupNorm)]
    assert gns and all(m.fallback_calls == 0 for m in gns), [m.last_fallback_reason for m in gns if m.fallback_calls]
    assert torch.isfinite(ref64).all() and torch.isfinite(out).all()
    assert rel_err(out, ref64) <= 2 * rel_err(ref, ref64) + 64 * EPS[torch.float32]
