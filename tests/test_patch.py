"""patch() / unpatch() on scaled-down real models, on the CPU in fp32.

Patched outputs must match stock diffusers within 1e-5 (relative L2 and relative max);
after unpatch, outputs, parameters and state_dict must be bit-identical to stock.
"""
from __future__ import annotations

import gc
import inspect

import pytest
import torch
from torch import nn
from diffusers import AutoencoderKL, Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.adapters.attention_processor import PatchedAttention

from deepspeed_diffusers_attn.configs import SD15_UNET, SD21_UNET, SDXL_UNET, SD_VAE, scaled_down, sdxl_added_cond_shapes

TOL = 1e-5
UNETS = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max abs error / max abs reference)."""
    diff = (out.double() - ref.double())
    return (diff.norm() / ref.double().norm()).item(), (diff.abs().max() / ref.double().abs().max()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    l2, mx = rel_errors(out, ref)
    assert l2 <= tol and mx <= tol, f"rel L2 {l2:.3g}, rel max {mx:.3g} > {tol}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert_bit_equal(a[k], b[k])


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def make_unet(kind: str) -> tuple[UNet2DConditionModel, dict]:
    torch.manual_seed(0)
    config = scaled_down(UNETS[kind])
    unet = UNet2DConditionModel.from_config(config).eval()
    batch, size = 2, config["sample_size"]
    inputs = {
        "sample": torch.randn(batch, 4, size, size),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"]),
    }
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = {k: torch.randn(s) for k, s in sdxl_added_cond_shapes(config, batch).items()}
    return unet, inputs


def run_unet(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def make_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL.from_config(scaled_down(SD_VAE)).eval()


def encoder_mask() -> torch.Tensor:
    """diffusers' encoder_attention_mask [B, 77] (1 = keep): batch 0 sees 20 tokens, batch 1 all."""
    mask = torch.ones(2, 77)
    mask[0, 20:] = 0
    return mask


@pytest.mark.parametrize("kind", list(UNETS))
def test_unet_parity_and_exact_restore(kind):
    unet, inputs = make_unet(kind)
    masked_inputs = {**inputs, "encoder_attention_mask": encoder_mask()}
    n_attn = sum(isinstance(m, Attention) for m in unet.modules())
    stock = run_unet(unet, inputs)
    stock_masked = run_unet(unet, masked_inputs)
    state = clone_state(unet)

    report = dda.patch(unet)
    assert report.summary() == {"patched": n_attn, "declined": 0, "already patched": 0}, str(report)
    assert not any(isinstance(m, Attention) for m in unet.modules())
    assert_close(run_unet(unet, inputs), stock)
    assert_close(run_unet(unet, masked_inputs), stock_masked)

    assert dda.unpatch(unet).summary() == {"restored": n_attn}
    assert_bit_equal(run_unet(unet, inputs), stock)
    assert_state_equal(clone_state(unet), state)


def test_sd21_uses_upcast_attention():
    unet, _ = make_unet("sd21")
    assert all(m.upcast_attention for m in unet.modules() if isinstance(m, Attention))


def test_masking_matters():
    """The encoder mask must change the output, so the masked parity test is not vacuous."""
    unet, inputs = make_unet("sd15")
    dda.patch(unet)
    plain = run_unet(unet, inputs)
    masked = run_unet(unet, {**inputs, "encoder_attention_mask": encoder_mask()})
    assert rel_errors(masked[0], plain[0])[0] > 1e-3
    assert_close(masked[1], plain[1])


def test_vae_parity_and_exact_restore():
    vae = make_vae()
    torch.manual_seed(1)
    z = torch.randn(1, 4, 16, 16)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stock_dec = vae.decode(z).sample
        stock_enc = vae.encode(image).latent_dist.mean
    state = clone_state(vae)

    report = dda.patch(vae)
    assert report.summary()["patched"] == 2, str(report)  # encoder and decoder mid-block
    assert report.names("patched") == ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
    with torch.no_grad():
        assert_close(vae.decode(z).sample, stock_dec)
        assert_close(vae.encode(image).latent_dist.mean, stock_enc)

    dda.unpatch(vae)
    with torch.no_grad():
        assert_bit_equal(vae.decode(z).sample, stock_dec)
    assert_state_equal(clone_state(vae), state)


def test_storage_not_duplicated_and_state_dict_while_patched():
    unet, _ = make_unet("sdxl")
    before = storage_bytes(unet.parameters())
    numel = sum(p.numel() for p in unet.parameters())
    report = dda.patch(unet)

    wrappers = [m for m in unet.modules() if isinstance(m, PatchedAttention)]
    assert len(wrappers) == report.summary()["patched"]
    originals = [p for w in wrappers for p in w.original.parameters()]
    assert storage_bytes(list(unet.parameters()) + originals) == before
    assert sum(p.numel() for p in unet.parameters()) == numel

    keys = list(unet.state_dict())
    assert not any(".dda." in k for k in keys)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight" in keys
    assert sum(v.numel() for v in unet.state_dict().values()) == numel


def test_state_dict_has_stock_keys_and_values_while_patched():
    unet, inputs = make_unet("sdxl")
    stock = clone_state(unet)
    dda.patch(unet)
    assert_state_equal(clone_state(unet), stock)
    kept = unet.state_dict(keep_vars=True)
    assert all(isinstance(v, nn.Parameter) for k, v in kept.items() if k.endswith("to_q.weight"))


def test_save_pretrained_while_patched_loads_in_stock_diffusers(tmp_path):
    unet, inputs = make_unet("sd15")
    stock = clone_state(unet)
    ref = run_unet(unet, inputs)
    dda.patch(unet)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert_state_equal(clone_state(loaded), stock)
    assert_bit_equal(run_unet(loaded, inputs), ref)


def test_load_stock_state_dict_into_patched_model_updates_fused_weights():
    unet, inputs = make_unet("sd15")
    new = {k: v * 1.25 + 0.01 for k, v in clone_state(unet).items()}
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(new)
    dda.patch(unet)
    assert not unet.load_state_dict(new).missing_keys
    assert_close(run_unet(unet, inputs), run_unet(stock, inputs))
    assert_state_equal(clone_state(unet), clone_state(stock))
    dda.unpatch(unet)
    assert_state_equal(clone_state(unet), clone_state(stock))


def test_load_state_dict_reports_stock_names_and_assign_refuses_views():
    unet, inputs = make_unet("sd15")
    dda.patch(unet)
    sd = unet.state_dict()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with pytest.raises(RuntimeError, match=f'Missing key.*"{name}"'):
        unet.load_state_dict({k: v for k, v in sd.items() if k != name})
    bad = dict(sd)
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=f"size mismatch for {name}"):
        unet.load_state_dict(bad)
    new = {k: v * 0.5 for k, v in sd.items()}
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(new)
    unet.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)  # new Parameter objects
    assert_close(run_unet(unet, inputs), run_unet(stock, inputs))
    wrapper = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert wrapper.to_q.weight.data_ptr() == wrapper.dda.attn_qkvw.data_ptr()  # a view again

def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live CPU tensor the garbage collector knows
    (plain tensors and Parameters: fake tensors that other tests' tracing left have no data)."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, nn.Parameter) and o.device.type == "cpu":
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def test_patch_keeps_no_tensor_memory():
    """Over every live tensor, not only the parameters: patch() leaves nothing behind (no
    copy of an original weight, no cache, no workspace), and unpatch() no more than it took.
    (The GPU test of SDXL at full size checks the same through the allocator's requested bytes.)"""
    unet, _ = make_unet("sdxl")
    before = live_tensor_bytes()
    report = dda.patch(unet)
    assert report.summary()["patched"] > 0
    assert live_tensor_bytes() == before
    dda.unpatch(unet)
    assert live_tensor_bytes() == before


def test_to_dtype_keeps_views_and_unpatch_follows():
    unet, _ = make_unet("sd15")
    stock64 = clone_state(unet.double())
    unet.float()
    dda.patch(unet)
    unet.double()
    wrappers = [m for m in unet.modules() if isinstance(m, PatchedAttention)]
    originals = [p for w in wrappers for p in w.original.parameters()]
    assert all(p.dtype == torch.float64 for p in originals)
    assert storage_bytes(list(unet.parameters()) + originals) == storage_bytes(unet.parameters())
    dda.unpatch(unet)
    assert_state_equal(clone_state(unet), stock64)


def tiny_pipeline():
    """A StableDiffusionPipeline of scaled-down SD1.5 parts and a tiny CLIP, built offline."""
    from deepspeed_diffusers_attn.pipeline import build_sd15_pipeline

    return build_sd15_pipeline(scaled=True, seed=2)


def test_pipeline_images_and_progress_bar(capsys):
    pipe = tiny_pipeline()

    def generate():
        return pipe("a photo of a cat", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    stock = generate()
    capsys.readouterr()
    n_attn = sum(isinstance(m, Attention) for c in (pipe.unet, pipe.vae) for m in c.modules())
    report = dda.patch(pipe)
    assert report.summary() == {"patched": n_attn, "declined": 0, "already patched": 0}, str(report)
    assert not any(row.name.startswith("text_encoder") for row in report)
    assert {row.name.split(".")[0] for row in report} == {"unet", "vae"}
    patched = generate()
    assert "3/3" in capsys.readouterr().err
    assert abs(patched - stock).max() <= 1e-4

    dda.unpatch(pipe)
    assert (generate() == stock).all()


def test_report_rows_and_format():
    unet, _ = make_unet("sdxl")
    report = dda.patch(unet)
    counts = report.summary()
    assert counts == {"patched": len(report), "declined": 0, "already patched": 0}
    assert str(counts) == f"{len(report)} patched, 0 declined, 0 already patched"
    assert report.rows[0].name == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    text = str(report)
    assert text.splitlines()[0].startswith(f"deepspeed_diffusers_attn.patch: {len(report)} patched")
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in text
    assert report.options == {"cuda_graph": False, "channels_last": False, "kv_cache": False, "fuse_blocks": True}


class OwnProcessor:
    """A user's processor: stock math, but the patcher cannot know that."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_declined_modules_keep_working():
    torch.manual_seed(0)
    declined = {
        "norm_cross": dict(cross_attention_dim=64, cross_attention_norm="layer_norm"),
        "added_kv": dict(added_kv_proj_dim=16),
        "own_processor": dict(processor=OwnProcessor()),
        "hooked": {},
    }
    if "qk_norm" in inspect.signature(Attention.__init__).parameters:  # diffusers >= 0.26
        declined["qk_norm"] = dict(qk_norm="layer_norm")
    model = nn.ModuleDict({"plain": Attention(64, heads=2, dim_head=32)})
    for name, kwargs in declined.items():
        model[name] = Attention(64, heads=2, dim_head=32, **kwargs)
    model.eval()
    model["hooked"].register_forward_hook(lambda *args: None)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        stock = {k: m(x) for k, m in model.items()}
    originals = dict(model.items())

    report = dda.patch(model)
    status = {row.name: row for row in report}
    assert status["plain"].status == "patched"
    for name in declined:
        assert status[name].status == "declined" and status[name].reasons, str(report)
        assert model[name] is originals[name]
    assert "forward hooks" in " ".join(status["hooked"].reasons)
    assert report.summary() == {"patched": 1, "declined": len(declined), "already patched": 0}
    with torch.no_grad():
        for k, m in model.items():
            assert_close(m(x), stock[k])
    assert "declined  added_kv" in str(report)


def test_patch_twice_is_a_no_op():
    unet, inputs = make_unet("sd15")
    first = dda.patch(unet)
    modules = list(unet.modules())
    out = run_unet(unet, inputs)
    second = dda.patch(unet)
    assert second.summary() == {"patched": 0, "declined": 0, "already patched": len(first)}
    assert second.names("already patched") == first.names("patched")
    assert list(unet.modules()) == modules
    assert_bit_equal(run_unet(unet, inputs), out)


def test_unpatch_unpatched_is_a_no_op():
    unet, inputs = make_unet("sd15")
    state = clone_state(unet)
    report = dda.unpatch(unet)
    assert len(report) == 0 and report.summary() == {"restored": 0}
    assert "no diffusers attention modules to restore" in str(report)
    assert_state_equal(clone_state(unet), state)


def test_unpatch_restores_the_same_objects():
    unet, _ = make_unet("sd15")
    attns = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    params = {n: p for n, p in unet.named_parameters()}
    dda.patch(unet)
    dda.unpatch(unet)
    assert {n: m for n, m in unet.named_modules() if isinstance(m, Attention)} == attns
    now = dict(unet.named_parameters())
    assert list(now) == list(params) and all(now[n] is params[n] for n in params)
    # independent storage again: one storage per parameter
    assert len({p.untyped_storage().data_ptr() for p in now.values()}) == len(now)


def test_shared_attention_is_patched_everywhere():
    torch.manual_seed(0)
    attn = Attention(64, heads=2, dim_head=32)
    model = nn.ModuleDict({"a": nn.ModuleList([attn]), "b": nn.ModuleList([attn])})
    report = dda.patch(model)
    assert report.names("patched") == ["a.0"]
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], PatchedAttention)
    dda.unpatch(model)
    assert model["a"][0] is attn and model["b"][0] is attn


def test_cross_attention_kwargs_that_change_the_math_raise():
    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                               cross_attention_dim=24, norm_num_groups=8).eval()
    x, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 7, 24)
    with torch.no_grad():
        stock = block(x, encoder_hidden_states=ctx).sample
    dda.patch(block)
    with torch.no_grad():
        assert_close(block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"scale": 1.0}).sample, stock)
        with pytest.raises(ValueError, match="'scale'"):
            block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"scale": 0.5})
        with pytest.raises(ValueError, match="'ip_adapter_masks'"):
            block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"ip_adapter_masks": torch.ones(1)})
        with pytest.raises(ValueError, match="'foo'"):
            block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"foo": 1})
        wrapper = block.transformer_blocks[0].attn1
        h = torch.randn(1, 16, 32)
        assert_bit_equal(wrapper(h, temb=torch.randn(1, 8)), wrapper(h))
        with pytest.raises(ValueError, match="IP-Adapter"):
            block.transformer_blocks[0].attn2(h, encoder_hidden_states=(ctx, ctx))


def test_torch_save_and_load_of_a_patched_model(tmp_path):
    unet, inputs = make_unet("sdxl")
    dda.patch(unet)
    out = run_unet(unet, inputs)
    torch.save(unet, tmp_path / "unet.pt")
    loaded = torch.load(tmp_path / "unet.pt", weights_only=False)
    assert_bit_equal(run_unet(loaded, inputs), out)
    assert sum(isinstance(m, PatchedAttention) for m in loaded.modules()) > 0
    dda.unpatch(loaded)
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(loaded.state_dict())
    assert_close(run_unet(stock, inputs), out)


def test_attn_processors_report_what_runs_and_hand_back_keeps_our_kernels():
    from deepspeed_diffusers_attn.adapters.attention_processor import FusedAttnProcessor

    unet, inputs = make_unet("sd15")
    n = len(unet.attn_processors)
    dda.patch(unet)
    out = run_unet(unet, inputs)
    procs = unet.attn_processors
    assert len(procs) == n and all(type(p) is FusedAttnProcessor for p in procs.values())
    assert "FusedAttnProcessor(stock=AttnProcessor2_0)" in repr(next(iter(procs.values())))
    unet.set_attn_processor(procs)
    unet.set_attn_processor(AttnProcessor2_0())
    assert all(not m.stock_reason for m in unet.modules() if isinstance(m, PatchedAttention))
    assert_bit_equal(run_unet(unet, inputs), out)


def test_set_default_attn_processor_keeps_our_kernels_with_its_scale_rule():
    from diffusers.models.attention_processor import AttnProcessor

    unet, inputs = make_unet("sd15")
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(unet.state_dict())
    stock.set_default_attn_processor()
    dda.patch(unet)
    unet.set_default_attn_processor()
    assert all(type(p.stock) is AttnProcessor for p in unet.attn_processors.values())
    assert all(not m.stock_reason for m in unet.modules() if isinstance(m, PatchedAttention))
    assert_close(run_unet(unet, inputs), run_unet(stock, inputs))


def test_fuse_qkv_projections_leaves_results_unchanged():
    unet, inputs = make_unet("sd15")
    dda.patch(unet)
    out = run_unet(unet, inputs)
    unet.fuse_qkv_projections()
    assert_close(run_unet(unet, inputs), out)
    assert all(not m.stock_reason for m in unet.modules() if isinstance(m, PatchedAttention))
    unet.unfuse_qkv_projections()
    assert_bit_equal(run_unet(unet, inputs), out)


def test_an_unsupported_processor_runs_stock_until_a_supported_one_returns():
    unet, inputs = make_unet("sd15")
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(unet.state_dict())
    stock.set_attn_processor(OwnProcessor())
    dda.patch(unet)
    ours = run_unet(unet, inputs)
    unet.set_attn_processor(OwnProcessor())
    wrappers = [m for m in unet.modules() if isinstance(m, PatchedAttention)]
    assert all("OwnProcessor is custom" in m.stock_reason for m in wrappers)
    assert all(type(p) is OwnProcessor for p in unet.attn_processors.values())
    assert_bit_equal(run_unet(unet, inputs), run_unet(stock, inputs))
    report = dda.patch(unet)
    assert all(r.status == "already patched" and "runs stock" in r.reasons[0] for r in report)
    unet.set_attn_processor(AttnProcessor2_0())
    assert_bit_equal(run_unet(unet, inputs), ours)
    dda.unpatch(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def _ip_pair(n_adapters=1, tokens=4):
    """A patched cross-attention and a stock copy, each with an IP-Adapter processor (same weights)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    ref = Attention(64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    ref.load_state_dict(attn.state_dict())
    model = nn.ModuleDict({"attn": attn})
    dda.patch(model)
    scales = [0.7, 0.4][:n_adapters]
    ip = IPAdapterAttnProcessor2_0(64, cross_attention_dim=32, num_tokens=(tokens,) * n_adapters,
                                   scale=scales).eval()
    ip_ref = IPAdapterAttnProcessor2_0(64, cross_attention_dim=32, num_tokens=(tokens,) * n_adapters,
                                       scale=list(scales)).eval()
    ip_ref.load_state_dict(ip.state_dict())
    model["attn"].set_processor(ip)
    ref.set_processor(ip_ref)
    return model, ref


@pytest.mark.parametrize("n_adapters", [1, 2])
def test_ip_adapter_runs_on_our_kernels(n_adapters):
    model, ref = _ip_pair(n_adapters)
    patched = model["attn"]
    assert not patched.stock_reason and patched.processor is patched.original.processor  # reported as itself
    assert list(model.state_dict()) == ["attn." + k for k in ref.state_dict()]
    x, text = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    images = [torch.randn(2, 4, 32) for _ in range(n_adapters)]
    with torch.no_grad():
        assert_close(patched(x, (text, images)), ref(x, (text, images)))
        patched.processor.scale = [0.3] * n_adapters  # as set_ip_adapter_scale writes it: through to the processor
        ref.processor.scale = [0.3] * n_adapters
        assert_close(patched(x, (text, images)), ref(x, (text, images)))
        patched.processor.scale = [0.0] * n_adapters  # skipped branches
        ref.processor.scale = [0.0] * n_adapters
        assert_close(patched(x, (text, images)), ref(x, (text, images)))


def test_ip_adapter_concatenated_tokens_and_masks():
    model, ref = _ip_pair(1)
    patched = model["attn"]
    x, text, image = torch.randn(2, 10, 64), torch.randn(2, 7, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        joined = torch.cat([text, image], dim=1)  # diffusers' deprecated form
        assert_close(patched(x, joined), ref(x, joined))
        masks = [torch.ones(1, 1, 2, 5)]  # per-image masks: stock diffusers applies them
        assert_bit_equal(patched(x, (text, [image.unsqueeze(1)]), ip_adapter_masks=masks),
                         ref(x, (text, [image.unsqueeze(1)]), ip_adapter_masks=masks))

def test_bad_arguments_change_nothing():
    """Option behaviour is tested with each option (test_graphs.py, test_kv_cache.py); here,
    bad arguments raise before anything is patched."""
    unet, _ = make_unet("sd15")
    with pytest.raises(TypeError):
        dda.patch(unet, fast=True)
    with pytest.raises(TypeError, match="bool"):
        dda.patch(unet, cuda_graph="yes")
    with pytest.raises(TypeError):
        dda.patch(object())
    assert not any(isinstance(m, PatchedAttention) for m in unet.modules())


def test_ip_adapter_scale_change_is_in_the_graph_key():
    from deepspeed_diffusers_attn.graphs import graph_module_forward

    model, ref = _ip_pair(1)
    patched = model["attn"]

    def frozen(run, device):  # replays what it captured, like a real graph
        out = run()
        return (lambda: None), out

    wrapper = graph_module_forward(patched, capture=frozen)
    x, text, image = torch.randn(2, 10, 64), torch.randn(2, 7, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        first = patched(x, (text, [image])).clone()
        patched.processor.scale = [0.2]
        ref.processor.scale = [0.2]
        assert_close(patched(x, (text, [image])), ref(x, (text, [image])))
        assert not torch.equal(patched(x, (text, [image])), first)
    assert wrapper.stats["captures"] == 2


def test_ip_adapter_set_back_to_plain_and_unpatch_leave_stock_layout():
    model, ref = _ip_pair(1)
    patched = model["attn"]
    patched.set_processor(AttnProcessor2_0())
    assert not patched.stock_reason and "attn.processor.to_k_ip.0.weight" not in model.state_dict()
    dda.unpatch(model)
    restored = model["attn"]
    assert isinstance(restored, Attention)
    assert sorted(n for n, _ in restored.named_children()) == ["to_k", "to_out", "to_q", "to_v"]


def test_unpatch_right_after_an_assign_load_keeps_the_new_weights():
    unet, inputs = make_unet("sd15")
    dda.patch(unet)
    new = {k: v * 0.5 for k, v in unet.state_dict().items()}
    unet.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
    dda.unpatch(unet)  # no forward in between
    assert_state_equal(clone_state(unet), new)


def test_kv_cache_follows_writes_through_stock_parameters():
    unet, inputs = make_unet("sd15")
    dda.patch(unet, kv_cache=True)
    run_unet(unet, inputs)
    new = {k: v * 0.9 for k, v in unet.state_dict().items()}
    unet.load_state_dict(new)  # in place, through the stock parameters (views of the fused tensors)
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(new)
    assert_close(run_unet(unet, inputs), run_unet(stock, inputs))  # the same context tensor: no stale K/V
