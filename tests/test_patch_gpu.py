"""patch() on full-size SD1.5 / SD2.1 / SDXL UNets and the SD VAE decoder, on a CUDA device.

Each model is built from its real config with seeded random weights and run three ways on
the same inputs: stock diffusers in fp16 (SDXL also bf16), patched in the same dtype, and
stock in float64 (the reference). The patched error against float64 must be at most twice
the stock error plus the output dtype's unit roundoff (see ``FLOOR``).

Weights and inputs are rounded once to values that fp16, bf16 and fp64 all represent
exactly (:func:`round_to_common`), so every run, reference included, computes with the
very same numbers and the errors measure arithmetic only, not weight rounding.

Run with ``pytest -s -m cuda tests/test_patch_gpu.py`` to see the numbers; with
``DDA_RESULTS_DIR`` set they are also written to ``$DDA_RESULTS_DIR/test_patch_gpu.json``.
About a minute or two on an H100; peak GPU memory is under ~40 GB (SDXL or SD2.1 in float64).
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.configs import SD15_UNET, SD21_UNET, SDXL_UNET, SD_VAE, sdxl_added_cond_shapes
from deepspeed_diffusers_attn.adapters.attention_processor import PatchedAttention
from deepspeed_diffusers_attn.workspace import Workspace, release_workspaces, workspace_nbytes

from conftest import requires_cuda, record_result

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"
BATCH = 2
# kind: (config, latent side, dtypes). Latent side = image side / 8: 512, 768 and 1024 pixels.
UNETS = {
    "sd15": (SD15_UNET, 64, (torch.float16,)),
    "sd21": (SD21_UNET, 96, (torch.float16,)),
    "sdxl": (SDXL_UNET, 128, (torch.float16, torch.bfloat16)),
}
# Rounding the output to the model dtype alone costs up to this much relative error (the
# unit roundoff 2^-11 / 2^-8), so no bound below it can be met by any implementation.
FLOOR = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FACTOR = 2.0
# Sharpen random attention: to_q and to_k scaled by this give score std ~2 (default init
# gives ~0.3, a near-uniform softmax that would average any softmax error away).
QK_GAIN = 2.5
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _strict_math():
    """No TF32 and no reduced-precision GEMM reductions while a test runs; free the GPU after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
             matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    yield
    (matmul.allow_tf32, cudnn.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
     matmul.allow_bf16_reduced_precision_reduction) = saved
    free_gpu()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def record(name: str, values: dict) -> None:
    """Print ``values`` and keep them in test_patch_gpu.json (see conftest.record_result)."""
    record_result("test_patch_gpu", name, values)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


@torch.no_grad()
def round_to_common(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, with magnitudes below 2^-14 flushed to 0.

    A bf16 value (8 significant bits) that is at least fp16's smallest normal 2^-14 and
    below 65504 is exactly representable in fp16 too, so the result converts to fp16,
    bf16 and fp64 without change.
    """
    r = t.to(torch.bfloat16).to(t.dtype)
    return torch.where(r.abs() < 2.0**-14, torch.zeros_like(r), r)


@torch.no_grad()
def prepare_weights(model: nn.Module) -> None:
    """Sharpen every attention's scores (QK_GAIN) and round all parameters (round_to_common)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.to_q.weight.mul_(QK_GAIN)
            m.to_k.weight.mul_(QK_GAIN)
    for p in model.parameters():
        p.copy_(round_to_common(p))
    assert all(p.abs().max() < 65504 for p in model.parameters())


def build(cls, config: dict) -> nn.Module:
    """A model of ``cls`` from ``config``, built directly on the GPU (fp32) with seed 0."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls.from_config(config).eval()
    prepare_weights(model)
    return model


def unet_inputs(config: dict, side: int) -> dict:
    """fp32 inputs of a UNet call on the GPU: latents, two timesteps, a 77-token context
    (and SDXL's pooled text embeds and time ids for a square image of 8 * side pixels)."""
    gen = torch.Generator(DEVICE).manual_seed(1)

    def randn(*shape):
        return round_to_common(torch.randn(*shape, device=DEVICE, generator=gen))

    inputs = {
        "sample": randn(BATCH, 4, side, side),
        "timestep": torch.tensor([10, 500], device=DEVICE),
        "encoder_hidden_states": randn(BATCH, 77, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":
        shapes = sdxl_added_cond_shapes(config, BATCH)
        pixels = 8.0 * side  # (original size, crop top-left, target size)
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels], device=DEVICE)
        inputs["added_cond_kwargs"] = {"text_embeds": randn(*shapes["text_embeds"]),
                                       "time_ids": time_ids.expand(shapes["time_ids"]).clone()}
    return inputs


def cast(obj, dtype: torch.dtype):
    """Floating tensors in ``obj`` (a tensor or a dict of them, nested) cast to ``dtype``."""
    if isinstance(obj, dict):
        return {k: cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    return obj


@torch.no_grad()
def run_unet(unet, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    return unet(**cast(inputs, dtype)).sample


def count_attention(model: nn.Module) -> int:
    return sum(isinstance(m, Attention) for m in model.modules())


def check_parity(name: str, dtype: torch.dtype, stock: torch.Tensor, patched: torch.Tensor,
                 ref: torch.Tensor) -> None:
    """Record the errors; patched error <= FACTOR * stock error + FLOOR[dtype]."""
    assert torch.isfinite(stock).all(), f"{name}: stock {dtype} output is not finite; the case is unusable"
    assert torch.isfinite(patched).all(), f"{name}: patched {dtype} output is not finite"
    stock_err, ours_err = rel_l2(stock, ref), rel_l2(patched, ref)
    bound = FACTOR * stock_err + FLOOR[dtype]
    record(f"{name}_{str(dtype).removeprefix('torch.')}",
           {"rel_l2_patched_vs_fp64": ours_err, "rel_l2_stock_vs_fp64": stock_err,
            "rel_l2_patched_vs_stock": rel_l2(patched, stock), "bound": bound})
    assert ours_err <= bound, (
        f"{name} {dtype}: patched rel L2 error {ours_err:.3e} > {FACTOR} x stock {stock_err:.3e} "
        f"+ {FLOOR[dtype]:.3e}")


@pytest.mark.parametrize("kind", list(UNETS))
def test_full_size_unet_parity(kind):
    config, side, dtypes = UNETS[kind]
    unet = build(UNet2DConditionModel, config)
    inputs = unet_inputs(config, side)
    n_attn = count_attention(unet)
    ref = run_unet(unet.double(), inputs, torch.float64)
    for dtype in dtypes:
        unet.to(dtype)
        free_gpu()
        stock = run_unet(unet, inputs, dtype)
        report = dda.patch(unet)
        assert report.summary() == {"patched": n_attn, "declined": 0, "already patched": 0}, str(report)
        patched = run_unet(unet, inputs, dtype)
        assert dda.unpatch(unet).summary() == {"restored": n_attn}
        check_parity(f"{kind}_unet_{8 * side}px_b{BATCH}", dtype, stock, patched, ref)
    del unet, ref, stock, patched


def test_full_size_vae_decoder_parity():
    vae = build(AutoencoderKL, SD_VAE)
    gen = torch.Generator(DEVICE).manual_seed(1)
    z = round_to_common(torch.randn(1, 4, 64, 64, device=DEVICE, generator=gen))  # a 512x512 image
    with torch.no_grad():
        ref = vae.double().decode(z.double()).sample
        vae.half()
        free_gpu()
        stock = vae.decode(z.half()).sample
        report = dda.patch(vae)
        assert report.names("patched") == ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
        patched = vae.decode(z.half()).sample
    dda.unpatch(vae)
    check_parity("sd_vae_decoder_512px", torch.float16, stock, patched, ref)
    del vae, ref, stock, patched


def overflow_attention() -> tuple[Attention, torch.Tensor, torch.Tensor]:
    """An SD2.1-style cross-attention (upcast_attention=True, fp16, 2 heads of 64) and inputs
    x [2, 64, 128], ctx [2, 77, 128] whose scaled scores are ~73728 > 65504 (fp16's max).

    to_q and to_k are identities, so q = x and k = ctx exactly. Channel 0 of each head
    is 768 in every token, so every score is 768^2 / 8 = 73728 plus the dot product of the
    other 63 channels (integers in [-2, 2]): the softmax sees a per-row constant (which it
    ignores) plus differences of a few units, and all scores are exact in fp32 (integers
    below 2^24 times 1/8). to_v ignores the two large channels, so the output depends on
    the softmax, not on one dominant value.
    """
    C, heads, D = 128, 2, 64
    big = [h * D for h in range(heads)]
    gen = torch.Generator().manual_seed(3)
    attn = Attention(C, cross_attention_dim=C, heads=heads, dim_head=D, upcast_attention=True)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(C))
        attn.to_k.weight.copy_(torch.eye(C))
        attn.to_v.weight.copy_(torch.randn(C, C, generator=gen) / C**0.5)
        attn.to_v.weight[:, big] = 0
        attn.to_out[0].weight.copy_(torch.randn(C, C, generator=gen) / C**0.5)
        attn.to_out[0].bias.copy_(0.1 * torch.randn(C, generator=gen))
        for p in attn.parameters():
            p.copy_(round_to_common(p))

    def tokens(n):
        t = torch.randint(-2, 3, (2, n, C), generator=gen).float()
        t[:, :, big] = 768.0
        return t

    return attn.eval(), tokens(64).to(DEVICE, torch.float16), tokens(77).to(DEVICE, torch.float16)


def test_sd21_upcast_attention_survives_fp16_overflow():
    attn, x, ctx = overflow_attention()
    with torch.no_grad():
        ref = copy.deepcopy(attn).to(DEVICE, torch.float64)(x.double(), encoder_hidden_states=ctx.double())
        attn = attn.to(DEVICE, torch.float16)
        # The test is meaningful: fp16 QK^T overflows, and so does diffusers' non-upcast path.
        q = x.view(2, 64, 2, 64)[:, :, 0]
        k = ctx.view(2, 77, 2, 64)[:, :, 0]
        assert torch.isinf((q * 64**-0.5) @ k.transpose(1, 2)).all()
        plain = copy.deepcopy(attn)
        plain.upcast_attention = False
        plain.set_processor(AttnProcessor())
        assert not torch.isfinite(plain(x, encoder_hidden_states=ctx)).all()
        upcast = copy.deepcopy(attn)
        upcast.set_processor(AttnProcessor())
        theirs = upcast(x, encoder_hidden_states=ctx)  # diffusers' fp32-score path
        sdpa = attn(x, encoder_hidden_states=ctx)  # stock AttnProcessor2_0 (SDPA)

        holder = nn.ModuleDict({"attn": attn})
        assert dda.patch(holder).summary()["patched"] == 1
        ours = holder["attn"](x, encoder_hidden_states=ctx)
    assert torch.isfinite(ours).all()
    values = {"rel_l2_patched_vs_fp64": rel_l2(ours, ref), "rel_l2_diffusers_upcast_vs_fp64": rel_l2(theirs, ref),
              "sdpa_fp16_finite": bool(torch.isfinite(sdpa).all())}
    if values["sdpa_fp16_finite"]:
        values["rel_l2_sdpa_fp16_vs_fp64"] = rel_l2(sdpa, ref)
    record("sd21_upcast_overflow", values)
    # Scores are exact in fp32 here, so the error is fp16 rounding of v, o and the output;
    # 2e-2 also admits a kernel that rounds each score once near 7e4 (fp32 ulp 2^-7).
    assert values["rel_l2_patched_vs_fp64"] <= max(FACTOR * values["rel_l2_diffusers_upcast_vs_fp64"], 2e-2)


def workspace_need(wrapper: PatchedAttention, args: tuple, kwargs: dict) -> int:
    """The workspace bytes this call of ``wrapper`` needs (see deepspeed_diffusers_attn.workspace)."""
    cfg = wrapper.dda.config
    hidden = args[0] if args else kwargs["hidden_states"]
    ctx = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    B, Sq = hidden.shape[0], (hidden[0, 0].numel() if hidden.dim() == 4 else hidden.shape[1])
    H, D = cfg.heads, cfg.dim_head
    if ctx is None:
        shapes = [(B, Sq, 3, H, D), (B, Sq, H, D)]
    else:
        shapes = [(B, Sq, H, D), (B, ctx.shape[1], 2, H, D), (B, Sq, H, D)]
    return Workspace.bytes_for(shapes, hidden.dtype)


def memory_bytes() -> tuple[int, int]:
    """(allocated, requested): the caching allocator's bytes in live blocks, and the bytes the
    tensors in them asked for. Their difference is block slack: every request is rounded up to
    512 B, and a free block is handed out whole when splitting it would leave too little
    (at most 1 MiB in the large pool, under 512 B in the small one)."""
    stats = torch.cuda.memory_stats()
    return stats["allocated_bytes.all.current"], stats["requested_bytes.all.current"]


def test_sdxl_patch_memory():
    """Patching adds no weight memory (the originals become views of the fused tensors),
    never holds a second copy of the model while it works, and unpatch gives it all back."""
    config, side, _ = UNETS["sdxl"]
    unet = build(UNet2DConditionModel, config).half()
    inputs = unet_inputs(config, side)
    run_unet(unet, inputs, torch.float16)  # library workspaces (cuBLAS, cuDNN) exist from here on
    free_gpu()
    torch.cuda.synchronize()
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    before, before_requested = memory_bytes()
    torch.cuda.reset_peak_memory_stats()
    report = dda.patch(unet)
    torch.cuda.synchronize()
    after_patch, after_patch_requested = memory_bytes()
    peak_patch = torch.cuda.max_memory_allocated() - before

    needs = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: needs.append(workspace_need(m, a, k)), with_kwargs=True)
             for m in unet.modules() if isinstance(m, PatchedAttention)]
    out = run_unet(unet, inputs, torch.float16)
    for h in hooks:
        h.remove()
    del out
    torch.cuda.synchronize()
    ws = workspace_nbytes(DEVICE)
    scratch = 0  # dda.linear's cuBLASLt scratch is a per-call cached block (csrc/torch/cuda_impl.cpp)
    after_forward = torch.cuda.memory_allocated()

    dda.unpatch(unet)
    release_workspaces()
    del report
    free_gpu()
    after_unpatch, after_unpatch_requested = memory_bytes()
    record("sdxl_fp16_patch_memory", {
        "weights_MiB": weights / MiB, "before_MiB": before / MiB,
        "after_patch_minus_before_MiB": (after_patch - before) / MiB,
        "after_patch_minus_before_requested_B": after_patch_requested - before_requested,
        "block_slack_before_MiB": (before - before_requested) / MiB,
        "block_slack_after_patch_MiB": (after_patch - after_patch_requested) / MiB,
        "peak_during_patch_minus_before_MiB": peak_patch / MiB,
        "workspace_MiB": ws / MiB, "workspace_expected_MiB": max(needs) / MiB, "linear_scratch_MiB": scratch / MiB,
        "after_forward_minus_after_patch_minus_workspaces_MiB": (after_forward - after_patch - ws - scratch) / MiB,
        "after_unpatch_minus_before_minus_scratch_MiB": (after_unpatch - before - scratch) / MiB,
        "after_unpatch_minus_before_minus_scratch_requested_B": after_unpatch_requested - before_requested - scratch})
    # Duplicated weights would add 100% of `weights` (4.9 GB for SDXL fp16). patch() keeps no
    # tensor bytes at all: each layer's fused tensors (qkvw, ow, ob; or qw, kv, ow, ob) are
    # exactly as large as the five originals they replace, which are freed (their Parameters
    # become views); nothing else persists (no cache, no workspace before a forward).
    # tests/test_patch.py::test_patch_keeps_no_tensor_memory checks that on the CPU over every
    # live tensor (scaled down; at this full size too it finds 0 B). So the requested bytes
    # must not move at all:
    assert after_patch_requested == before_requested, (
        f"patch() left {after_patch_requested - before_requested} B of tensors behind")
    # The allocated bytes may still move (the H200 run of 2026-11-27 measured +7.6 MiB after
    # patch and +3.6 MiB after unpatch, 0.16% / 0.07%): that is block slack (memory_bytes),
    # not tensor memory. The new tensors land in the holes the layers before freed, so which
    # blocks are handed out whole changes; no tensor holds those bytes. Bound: 1% of the weights.
    assert after_patch - before <= weights // 100
    # One layer is converted at a time: its fused copy exists until the originals become views.
    assert peak_patch <= 64 * MiB
    assert ws == max(needs), "workspace is not sized by the largest call"
    assert after_unpatch_requested - before_requested == scratch, (
        f"unpatch left {after_unpatch_requested - before_requested - scratch} B of tensors behind")
    assert abs(after_unpatch - before - scratch) <= weights // 100
    del unet
