"""The DiT adapters (SD3 joint attention, Flux, Wan) on tiny configs of the real model classes.

CPU, fp32: the whole transformer patched vs stock on the same seeded weights (relative
error <= 1e-5), one report row per attention module, unpatch bit-exact, state_dict keys and
values stock's while patched, the stand-in under torch.compile(fullgraph=True) equal to eager,
RoPE / mask semantics on single modules, and what is declined or runs stock, with its reason.
GPU (skipped without CUDA): bf16 error against an fp32 reference, at most twice stock bf16's,
on tiny models and on single attention modules of the real sizes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import adapters
from deepspeed_diffusers_attn.adapters import flux, joint_attention, wan
from deepspeed_diffusers_attn.dit_attention import JointAttention, QKNormCrossAttention

from conftest import make_attention, requires_cuda

TOL = 1e-5  # for two float32 computations of the same small module (attention-level checks)


# ---------------------------------------------------------------------- helpers
def seeded(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` in eval mode with every parameter redrawn (weights ~ N(0, 1/fan_in), norm weights
    around 1, biases nonzero), so a dropped bias or norm weight shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5 if p.dim() > 1 else 0.1 * noise)
    return model.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max(relative L2 error, max abs error / max abs reference), in float64."""
    d = out.double() - ref.double()
    return max((d.norm() / ref.double().norm()).item(), (d.abs().max() / ref.double().abs().max()).item())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k])), k


def sd3(qk_norm: bool, layers: int = 3):
    """A tiny SD3 (qk_norm=False: SD3-medium's layout) or SD3.5 (RMSNorm q/k, dual attention in
    the first two blocks) transformer and its inputs (batch 2, 16 image + 7 text tokens)."""
    from diffusers import SD3Transformer2DModel

    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)) if qk_norm else {}
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  caption_projection_dim=32, pooled_projection_dim=12, pos_embed_max_size=16, **extra)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 7, 24),
                  pooled_projections=torch.randn(2, 12), timestep=torch.tensor([10.0, 500.0]))
    return seeded(model), inputs


def flux_model(batch: int = 2):
    """A tiny Flux transformer (two double-, two single-stream blocks, RoPE axes 4+6+6) and its
    inputs (a 4x4 image grid, 5 text tokens)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    h, w, t = 4, 4, 5
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten()], dim=-1)
    txt_ids = torch.stack([torch.arange(t).float(), torch.zeros(t), torch.zeros(t)], dim=-1)
    inputs = dict(hidden_states=torch.randn(batch, h * w, 8), encoder_hidden_states=torch.randn(batch, t, 24),
                  pooled_projections=torch.randn(batch, 12), timestep=torch.rand(batch), img_ids=img_ids,
                  txt_ids=txt_ids)
    return seeded(model), inputs


def wan_model(i2v: bool):
    """A tiny Wan transformer (T2V, or I2V with image K/V) and its inputs (3x2x3 patches, 512
    text tokens, 5 image tokens for I2V)."""
    from diffusers import WanTransformer3DModel

    extra = dict(image_dim=20, added_kv_proj_dim=32) if i2v else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 4, 6), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=torch.randn(2, wan.TEXT_TOKENS, 24))
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(2, 5, 20)
    return seeded(model), inputs


MODELS = {
    "sd3-medium": lambda: sd3(qk_norm=False),
    "sd3.5": lambda: sd3(qk_norm=True),
    "flux": lambda: flux_model(batch=2),
    "flux-batch1": lambda: flux_model(batch=1),
    "wan-t2v": lambda: wan_model(i2v=False),
    "wan-i2v": lambda: wan_model(i2v=True),
}
FAMILY = {"sd3": joint_attention, "flux": flux, "wan": wan}
STAND_INS = {"sd3": joint_attention.PatchedJointAttention, "flux": flux.PatchedFluxAttention,
             "wan": wan.PatchedWanAttention}


def family(kind: str):
    return FAMILY[kind.split("-")[0].split(".")[0]]


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def attention_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if adapters.adapter_for(m) is not None or adapters.is_stand_in(m)]


# ---------------------------------------------------------------------- whole transformers
@pytest.mark.parametrize("kind", list(MODELS))
def test_transformer_parity_report_and_exact_restore(kind):
    model, inputs = MODELS[kind]()
    adapter = family(kind)
    names = attention_names(model)
    ref = run(model, inputs)
    before = state(model)
    # the tolerance comes from stock's own float32 error against float64 on these inputs
    ref64 = run(copy.deepcopy(model).double(),
                {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()})

    report = dda.patch(model)
    assert report.names("patched") == names and len(report) == len(names) > 0
    assert {r.family for r in report} == {adapter.NAME} and all(r.reasons == () for r in report)
    assert all(isinstance(model.get_submodule(n), STAND_INS[kind.split("-")[0].split(".")[0]]) for n in names)
    assert_state_equal(state(model), before)  # stock keys and values while patched
    out = run(model, inputs)
    err, stock_err = rel_err(out, ref64), rel_err(ref, ref64)
    assert err <= 2 * stock_err + 1e-6, (err, stock_err)

    again = dda.patch(model)
    assert again.summary()["already patched"] == len(names)

    restored = dda.unpatch(model)
    assert restored.names("restored") == names
    assert not any(adapters.is_stand_in(m) for m in model.modules())
    assert torch.equal(bits(run(model, inputs)), bits(ref))
    assert_state_equal(state(model), before)


def test_sd35_has_every_feature_the_adapter_maps():
    """The SD3.5 model exercises qk norms on both streams, context_pre_only and the dual attn2."""
    model, _ = sd3(qk_norm=True)
    last = model.transformer_blocks[-1].attn
    assert last.context_pre_only and last.to_add_out is None
    assert model.transformer_blocks[0].attn2 is not None and model.transformer_blocks[0].attn2.norm_q is not None
    assert model.transformer_blocks[0].attn.norm_added_q is not None
    fused = dda.from_diffusers(last)
    assert fused.config.context.out_features is None and fused.config.context.qk_norm is not None


def test_weights_are_shared_not_duplicated():
    model, _ = flux_model()
    params = {n: p for n, p in model.named_parameters()}
    dda.patch(model)
    stand_in = model.transformer_blocks[0].attn
    fused = stand_in.dda
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    storage = fused.attn_qkvw.untyped_storage().data_ptr()
    for name in ("to_q", "to_k", "to_v"):
        assert getattr(stand_in, name).weight.untyped_storage().data_ptr() == storage
    assert stand_in.norm_k.weight.untyped_storage().data_ptr() == fused.attn_normw.untyped_storage().data_ptr()
    assert stand_in.add_v_proj.bias.untyped_storage().data_ptr() == fused.ctx_qkvb.untyped_storage().data_ptr()
    assert list(fused.parameters()) and not any(p.requires_grad for p in fused.parameters())


def test_load_stock_state_dict_into_patched_model():
    model, inputs = sd3(qk_norm=True)
    other, _ = sd3(qk_norm=True)
    seeded(other, seed=7)
    ref = run(other, inputs)
    dda.patch(model)
    model.load_state_dict(other.state_dict())
    assert rel_err(run(model, inputs), ref) <= TOL


# ---------------------------------------------------------------------- single modules
def flux_attention(context: bool):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    kw = dict(added_kv_proj_dim=24, context_pre_only=False) if context else dict(pre_only=True)
    return seeded(FluxAttention(query_dim=32, heads=2, dim_head=16, out_dim=32, bias=True, eps=1e-6, **kw))


def patched(attn: nn.Module) -> nn.Module:
    """``attn`` patched inside a holder; returns (holder, the stand-in)."""
    holder = nn.Module()
    holder.attn = attn
    report = dda.patch(holder)
    assert report.summary()["patched"] == 1, str(report)
    return holder.attn


def test_flux_rope_reads_the_tables_like_apply_rotary_emb():
    """Tables whose even and odd entries differ: the four-table Rope must read them as diffusers does."""
    attn = flux_attention(context=True)
    x, c = torch.randn(2, 9, 32), torch.randn(2, 4, 24)
    cos, sin = torch.randn(13, 16), torch.randn(13, 16)
    with torch.no_grad():
        ref = attn(x, c, image_rotary_emb=(cos, sin))
        ours = patched(attn)(x, c, image_rotary_emb=(cos, sin))
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= TOL


def test_flux_without_context_returns_the_unprojected_attention():
    attn = flux_attention(context=False)
    attn.to_out = nn.ModuleList([nn.Linear(32, 32), nn.Dropout(0.0)])  # present, yet unused without a context
    x = torch.randn(2, 9, 32)
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    with torch.no_grad():
        ref = attn(x, image_rotary_emb=(cos, sin))
        ours = patched(attn)(x, image_rotary_emb=(cos, sin))
    assert ours.shape == ref.shape == (2, 9, 32) and rel_err(ours, ref) <= TOL
    double = patched(flux_attention(context=True))
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        double(x)


@pytest.mark.parametrize("form", ["bool [B, S]", "additive [B, 1, S, S]"])
def test_flux_attention_mask_is_applied_as_the_dispatcher_does(form):
    attn = flux_attention(context=True)
    x, c = torch.randn(2, 9, 32), torch.randn(2, 4, 24)
    keep = torch.rand(2, 13) > 0.3
    keep[:, 0] = True
    mask = keep if form.startswith("bool") else torch.randn(2, 1, 13, 13)
    with torch.no_grad():
        ref = attn(x, c, attention_mask=mask)
        ours = patched(attn)(x, c, attention_mask=mask)
        unmasked = attn(x, c)
    for a, b, u in zip(ours, ref, unmasked):
        assert rel_err(a, b) <= TOL and rel_err(u, b) > 1e-3


def test_wan_rope_reads_the_tables_like_its_processor():
    model, _ = wan_model(i2v=False)
    attn = model.blocks[0].attn1
    x = torch.randn(2, 6, 32)
    cos, sin = torch.randn(1, 6, 1, 16), torch.randn(1, 6, 1, 16)
    with torch.no_grad():
        ref = attn(x, rotary_emb=(cos, sin))
        ours = patched(attn)(x, rotary_emb=(cos, sin))
    assert rel_err(ours, ref) <= TOL


def test_wan_cross_attention_without_context_reads_hidden_states():
    model, _ = wan_model(i2v=False)
    attn = model.blocks[0].attn2
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        ref = attn(x)
        ours = patched(attn)(x)
    assert rel_err(ours, ref) <= TOL


def test_fused_modules_by_family():
    model, _ = wan_model(i2v=True)
    assert isinstance(dda.from_diffusers(model.blocks[0].attn1), JointAttention)
    cross = dda.from_diffusers(model.blocks[0].attn2)
    assert isinstance(cross, QKNormCrossAttention) and cross.config.image_size == 32
    assert set(cross.views()) >= {"image.k.weight", "image.v.bias", "image.k_norm.weight", "context.k_norm.weight"}
    assert dda.supports(model.blocks[0].attn2) == []


def compile_cases():
    sd3_model, _ = sd3(qk_norm=True)
    flux_m, _ = flux_model()
    wan_m, _ = wan_model(i2v=True)
    x16, c7 = torch.randn(2, 16, 32), torch.randn(2, 7, 32)
    rope = (torch.randn(21, 16), torch.randn(21, 16))
    wan_rope = (torch.randn(1, 16, 1, 16), torch.randn(1, 16, 1, 16))
    return {
        "sd3 joint": (sd3_model.transformer_blocks[0].attn, (x16, c7), {}),
        "sd3 attn2": (sd3_model.transformer_blocks[0].attn2, (x16,), {}),
        "flux double": (flux_m.transformer_blocks[0].attn, (x16, torch.randn(2, 5, 32)), {"image_rotary_emb": rope}),
        "wan attn1": (wan_m.blocks[0].attn1, (x16,), {"rotary_emb": wan_rope}),
        "wan attn2 i2v": (wan_m.blocks[0].attn2, (x16, torch.randn(2, 3 + wan.TEXT_TOKENS, 32)), {}),
    }


@pytest.mark.parametrize("case", ["sd3 joint", "sd3 attn2", "flux double", "wan attn1", "wan attn2 i2v"])
def test_compile_fullgraph_matches_eager(case):
    torch._dynamo.reset()
    attn, args, kwargs = compile_cases()[case]
    stand_in = patched(attn)
    with torch.no_grad():
        eager = stand_in(*args, **kwargs)
        compiled = torch.compile(stand_in, fullgraph=True, backend="aot_eager")(*args, **kwargs)
        stock = attn(*args, **kwargs)
    eager, compiled, stock = (o if isinstance(o, tuple) else (o,) for o in (eager, compiled, stock))
    for e, c, s in zip(eager, compiled, stock):
        # the traced RoPE is the same fp32 math as eager's fused multiply-adds, in another order
        assert rel_err(c, e) <= 1e-6
        assert rel_err(e, s) <= TOL


def test_backward_raises_and_no_grad_is_not_needed_for_inference():
    attn = flux_attention(context=True)
    stand_in = patched(attn)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, yc = stand_in(x, torch.randn(2, 4, 24))
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        (y.sum() + yc.sum()).backward()


# ---------------------------------------------------------------------- declined / stock
def test_lora_before_patch_is_bridged_with_the_reason():
    """The Flux adapter declines LoRA projections; the dispatcher bridge then serves those
    modules (PEFT's layers stay, only the attention call runs on our kernel), and each row
    says why the dedicated adapter did not."""
    from peft import LoraConfig

    model, inputs = flux_model()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    ref = run(model, inputs)
    report = dda.patch(model)
    assert report.summary()["bridged"] == len(report) == 4, str(report)
    assert all(any("LoRA" in r and r.startswith(flux.NAME) for r in row.reasons) for row in report)
    assert rel_err(run(model, inputs), ref) <= 1e-5
    dda.unpatch(model)
    assert torch.equal(run(model, inputs), ref)


def test_lora_after_patch_runs_stock_and_says_why():
    from peft import LoraConfig

    model, inputs = sd3(qk_norm=True)
    stock = copy.deepcopy(model)
    dda.patch(model)
    for m in (model, stock):
        torch.manual_seed(3)
        m.add_adapter(LoraConfig(r=2, target_modules=["to_q", "add_k_proj"], init_lora_weights=False))
    assert rel_err(run(model, inputs), run(stock, inputs)) <= TOL
    stand_in = model.transformer_blocks[0].attn
    assert "LoRA" in stand_in.stock_reason
    report = dda.patch(model)
    assert all(row.status == "already patched" and "runs stock" in row.reasons[0] for row in report)
    dda.unpatch(model)
    assert_state_equal(state(model), state(stock))


def test_processor_api_keeps_our_kernels_or_runs_stock():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, inputs = sd3(qk_norm=True)
    ref = run(model, inputs)
    dda.patch(model)
    model.set_attn_processor(model.attn_processors)  # handing back what it reports keeps our kernels
    model.fuse_qkv_projections()  # FusedJointAttnProcessor2_0: the same math, ours
    stand_in = model.transformer_blocks[0].attn
    assert stand_in.stock_reason == "" and type(stand_in.processor).__name__ == "FusedAttnProcessor"
    assert rel_err(run(model, inputs), ref) <= TOL
    stand_in.set_processor(AttnProcessor2_0())
    assert "AttnProcessor2_0 is not reproduced" in stand_in.stock_reason
    assert isinstance(stand_in.processor, AttnProcessor2_0)


@pytest.mark.parametrize("what", ["custom processor", "context parallel", "fused projections", "hook", "dropout"])
def test_declines_name_the_reason(what):
    model, _ = wan_model(i2v=False)
    attn = model.blocks[0].attn1
    expected = {"custom processor": "processor", "context parallel": "context-parallel",
                "fused projections": "unfuse_qkv_projections", "hook": "hooks", "dropout": "dropout"}[what]
    if what == "custom processor":
        sd3_model, _ = sd3(qk_norm=False)
        attn = sd3_model.transformer_blocks[0].attn
        attn.set_processor(type("MyJointAttnProcessor", (), {"__call__": lambda *a, **k: None})())
        assert adapters.adapter_for(attn) is joint_attention
    elif what == "context parallel":
        attn.processor._parallel_config = object()
    elif what == "fused projections":
        attn.fuse_projections()
    elif what == "hook":
        attn.to_q.register_forward_hook(lambda *a: None)
    else:
        attn.to_out[1].p = 0.1
        attn.train()
    reasons = dda.supports(attn)
    assert reasons and any(expected in r for r in reasons), reasons
    stand_in, why = adapters.adapter_for(attn).convert(attn)
    assert stand_in is None and why == reasons


def test_adapters_come_first_and_claim_their_families():
    sd3_model, _ = sd3(qk_norm=True)
    flux_m, _ = flux_model()
    wan_m, _ = wan_model(i2v=True)
    assert adapters.ADAPTERS[:3] == (joint_attention, flux, wan)
    assert adapters.adapter_for(sd3_model.transformer_blocks[0].attn2) is joint_attention
    assert adapters.adapter_for(flux_m.single_transformer_blocks[0].attn) is flux
    assert adapters.adapter_for(wan_m.blocks[0].attn2) is wan
    assert adapters.adapter_for(make_attention(32, 2, 16)).NAME == "Attention"


# ---------------------------------------------------------------------- GPU
def bf16_errors(stock: nn.Module, inputs: dict, call) -> tuple[float, float]:
    """(our bf16 error, stock bf16 error), each the relative error against stock fp32 on CUDA."""
    stock = stock.cuda()

    def cuda(v):
        if isinstance(v, (tuple, list)):
            return type(v)(cuda(x) for x in v)
        return v.cuda() if isinstance(v, torch.Tensor) else v

    inputs = {k: cuda(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = call(stock, inputs)
        half = copy.deepcopy(stock).to(torch.bfloat16)
        cast = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in
                    ("timestep", "img_ids", "txt_ids", "image_rotary_emb") else v) for k, v in inputs.items()}
        theirs = call(half, cast)
        report = dda.patch(half)
        assert report.summary()["patched"] == len(report) > 0, str(report)
        ours = call(half, cast)
    assert torch.isfinite(ours).all()
    return rel_err(ours, ref), rel_err(theirs, ref)


@requires_cuda
@pytest.mark.parametrize("kind", list(MODELS))
def test_gpu_bf16_tiny_models(kind):
    model, inputs = MODELS[kind]()
    ours, theirs = bf16_errors(model, inputs, lambda m, i: m(**i).sample)
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


def real_size_attention(kind: str):
    """One attention module of the real model's width and its real-size inputs (bf16-ready):
    SD3-medium (24 x 64, 4096 + 333 tokens, batch 2), SD3.5 (the same with RMSNorm q/k), Flux.1-dev
    (24 x 128, 512 + 4096 tokens, RoPE from FluxPosEmbed), Wan 1.3B (12 x 128, 32760 tokens,
    3-D RoPE; cross-attention to 512 text tokens)."""
    if kind.startswith("sd3"):
        from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

        attn = Attention(1536, added_kv_proj_dim=1536, dim_head=64, heads=24, out_dim=1536, context_pre_only=False,
                         bias=True, processor=JointAttnProcessor2_0(), eps=1e-6,
                         qk_norm="rms_norm" if kind == "sd3.5" else None)
        return attn, dict(hidden_states=torch.randn(2, 4096, 1536), encoder_hidden_states=torch.randn(2, 333, 1536))
    if kind == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed

        attn = FluxAttention(3072, heads=24, dim_head=128, out_dim=3072, added_kv_proj_dim=3072,
                             context_pre_only=False, bias=True, eps=1e-6)
        ids = torch.cat([torch.zeros(512, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(64.0),
                                                                          torch.arange(64.0), indexing="ij"),
                                                           -1).reshape(-1, 3)])
        rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
        return attn, dict(hidden_states=torch.randn(1, 4096, 3072), encoder_hidden_states=torch.randn(1, 512, 3072),
                          image_rotary_emb=rope)
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

    if kind == "wan attn1":
        attn = WanAttention(1536, heads=12, dim_head=128, eps=1e-6, processor=WanAttnProcessor())
        rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)(torch.empty(1, 16, 21, 60, 104))  # 21 x 30 x 52 = 32760
        return attn, dict(hidden_states=torch.randn(1, 32760, 1536), rotary_emb=tuple(t.float() for t in rope))
    attn = WanAttention(1536, heads=12, dim_head=128, eps=1e-6, cross_attention_dim_head=128,
                        processor=WanAttnProcessor())
    return attn, dict(hidden_states=torch.randn(1, 32760, 1536), encoder_hidden_states=torch.randn(1, 512, 1536))


@requires_cuda
@pytest.mark.parametrize("kind", ["sd3", "sd3.5", "flux", "wan attn1", "wan attn2"])
def test_gpu_bf16_real_size_attention(kind):
    attn, inputs = real_size_attention(kind)
    seeded(attn)
    holder = nn.Module()
    holder.attn = attn

    def call(m, i):
        out = m.attn(**i)
        return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out

    ours, theirs = bf16_errors(holder, inputs, call)
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)
