"""LoRA (PEFT, as diffusers loads it) on patched attention: the fused projections stay, and
every adapter call keeps stock's meaning.

CPU, fp32, a scaled-down SD1.5 UNet with two random (not zero-initialised) adapters on
every attention projection: loaded before or after patch(), then each diffusers adapter
call, compared with a stock copy that gets the same adapters and the same calls.
"""
from __future__ import annotations

import copy

import pytest
import torch

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.adapters.attention_processor import PatchedAttention
from deepspeed_diffusers_attn.configs import SD15_UNET, SDXL_UNET, scaled_down, sdxl_added_cond_shapes

pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOL = 2e-5


def make_unet(kind="sd15"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = scaled_down({"sd15": SD15_UNET, "sdxl": SDXL_UNET}[kind])
    unet = UNet2DConditionModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, config["sample_size"], config["sample_size"], generator=gen),
              "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=gen)}
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = {k: torch.randn(s, generator=gen)
                                       for k, s in sdxl_added_cond_shapes(config, 2).items()}
    return unet, inputs


def add_adapters(unet, names=("a", "b"), targets=TARGETS, rank=4, seed=7):
    from peft import LoraConfig

    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                    init_lora_weights=False), adapter_name=name)


def run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def patched_modules(unet):
    return [m for m in unet.modules() if isinstance(m, PatchedAttention)]


def patched_with_stock_twin(kind="sd15"):
    """(patched UNet, stock copy, inputs): both with the same two adapters (add_adapters)."""
    unet, inputs = make_unet(kind)
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    add_adapters(unet)
    dda.patch(unet)
    return unet, stock, inputs


CALLS = {
    "set_adapters both": lambda u: u.set_adapters(["a", "b"], weights=[1.0, 0.5]),
    "set_adapters one": lambda u: u.set_adapters(["b"], weights=[0.75]),
    "disable_lora": lambda u: u.disable_lora(),
    "enable_lora": lambda u: (u.disable_lora(), u.enable_lora()),
    "delete_adapters": lambda u: u.delete_adapters("a"),
    "fuse_lora": lambda u: u.fuse_lora(adapter_names=["a"], lora_scale=0.8),
    "fuse_then_unfuse": lambda u: (u.fuse_lora(adapter_names=["a"]), u.unfuse_lora()),
    "unload_lora": lambda u: u.unload_lora(),
}


@pytest.mark.parametrize("when", ["before patch", "after patch"])
def test_lora_runs_on_our_kernels_and_equals_stock(when):
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    if when == "before patch":
        add_adapters(unet)
        report = dda.patch(unet)
    else:
        report = dda.patch(unet)
        add_adapters(unet)
    assert report.summary()["declined"] == 0 and report.summary()["patched"] == len(patched_modules(unet)) > 0
    assert all(not m.stock_reason for m in patched_modules(unet))
    ref = run(stock, inputs)
    assert rel(run(unet, inputs), ref) <= TOL
    base = copy.deepcopy(stock)
    base.disable_lora()
    assert rel(run(base, inputs), ref) > 1e-3, "the adapters should change the output"


@pytest.mark.parametrize("call", list(CALLS))
def test_every_adapter_call_keeps_stock_meaning(call):
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    dda.patch(unet)
    add_adapters(unet)
    CALLS[call](stock)
    CALLS[call](unet)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    assert all(not m.stock_reason for m in patched_modules(unet))


def test_state_dict_with_lora_has_stock_keys_and_unpatch_keeps_the_adapters():
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    dda.patch(unet)
    add_adapters(unet)
    sd, ref = unet.state_dict(), stock.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    out = run(unet, inputs)
    dda.unpatch(unet)
    assert not patched_modules(unet)
    assert rel(run(unet, inputs), out) <= TOL
    assert list(unet.state_dict()) == list(ref)


def test_lora_on_layers_we_do_not_own_keeps_working():
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    targets = TARGETS + ["proj_in", "proj_out", "ff.net.2", "conv1"]
    add_adapters(stock, targets=targets)
    add_adapters(unet, targets=targets)
    dda.patch(unet)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_sdxl_lora_cross_attention_with_kv_cache():
    unet, inputs = make_unet("sdxl")
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    add_adapters(unet)
    dda.patch(unet, kv_cache=True)
    ref = run(stock, inputs)
    for _ in range(2):  # the cache must not serve K/V without the adapters' updates
        assert rel(run(unet, inputs), ref) <= TOL
    stock.set_adapters(["a"], weights=[0.3])
    unet.set_adapters(["a"], weights=[0.3])
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_unsupported_adapter_runs_stock_and_says_why():
    from peft import LoraConfig

    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    dda.patch(unet)
    for model in (stock, unet):
        torch.manual_seed(3)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], use_dora=True,
                                     init_lora_weights=False), adapter_name="dora")
    wrappers = patched_modules(unet)
    assert all("DoRA" in m.stock_reason for m in wrappers)
    assert all(type(m.processor).__name__ != "FusedAttnProcessor" for m in wrappers)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    report = dda.patch(unet)
    assert all("runs stock" in r.reasons[0] and "DoRA" in r.reasons[0] for r in report)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("when", ["before patch", "after patch", "with IP-Adapter"])
def test_cuda_sdxl_two_loras_against_float64(when):
    """fp16 on our kernels with two adapters (and an IP-Adapter): error against a float64
    stock run at most 2x stock fp16's own error."""
    from deepspeed_diffusers_attn.random_adapters import add_random_ip_adapter

    unet, inputs = make_unet("sdxl")
    add_adapters(unet, rank=8)
    unet.set_adapters(["a", "b"], weights=[1.0, 0.7])
    if when == "with IP-Adapter":
        dim = add_random_ip_adapter(unet, image_embed_dim=64)
        inputs["added_cond_kwargs"]["image_embeds"] = [torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(5))]
    ref64 = copy.deepcopy(unet).to("cuda", torch.float64)
    stock16 = copy.deepcopy(unet).to("cuda", torch.float16)
    ours = make_unet("sdxl")[0] if when == "after patch" else copy.deepcopy(unet)
    ours = ours.to("cuda", torch.float16)
    dda.patch(ours)
    if when == "after patch":
        add_adapters(ours, rank=8)
        ours.set_adapters(["a", "b"], weights=[1.0, 0.7])
        lora = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
        assert not ours.load_state_dict(lora, strict=False).unexpected_keys
    assert all(not m.stock_reason for m in patched_modules(ours))
    if when == "with IP-Adapter":
        assert sum(type(m.processor).__name__ == "IPAdapterAttnProcessor2_0" for m in patched_modules(ours)) > 0

    def to(v, dtype):
        if isinstance(v, dict):
            return {k: to(x, dtype) for k, x in v.items()}
        if isinstance(v, list):
            return [to(x, dtype) for x in v]
        return v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")

    def on(dtype):
        return to(inputs, dtype)

    ref = run(ref64, on(torch.float64))
    stock_err = rel(run(stock16, on(torch.float16)), ref)
    ours_err = rel(run(ours, on(torch.float16)), ref)
    print(f"SDXL + 2 LoRAs ({when}): ours {ours_err:.3g}, stock fp16 {stock_err:.3g} (rel. L2 vs float64)")
    assert ours_err <= 2 * stock_err + 1e-4


# --------------------------------------------------------------------------- the fixed-address bank
def test_adapter_weights_live_in_one_bank_per_input():
    """PEFT's A weights become views of the bank: one [R, in] tensor per input (Q/K/V's
    adapters together in self-attention), so one GEMM computes all of them."""
    unet, inputs = make_unet()
    add_adapters(unet)
    dda.patch(unet)
    run(unet, inputs)
    for m in patched_modules(unet):
        groups = m.lora_bank._groups
        cross = m.dda.config.is_cross_attention
        assert [g.input for g in groups] == (["hidden", "context", "output"] if cross else ["hidden", "output"])
        hidden = groups[0]
        assert hidden.a.shape[0] == (1 if cross else 3) * 2 * 4  # projections x adapters x rank
        for target in ("q",) if cross else ("q", "k", "v"):
            layer = getattr(m, f"to_{target}")
            for name in ("a", "b"):
                a = layer.lora_A[name].weight
                assert a.untyped_storage().data_ptr() == hidden.a.untyped_storage().data_ptr()


def test_switching_adapters_rewrites_factors_not_the_bank():
    unet, stock, inputs = patched_with_stock_twin()
    run(unet, inputs)
    generations = [m.lora_bank.generation for m in patched_modules(unet)]
    for call in ("set_adapters one", "set_adapters both", "disable_lora", "enable_lora", "fuse_then_unfuse",
                 "fuse_lora"):
        CALLS[call](stock)
        CALLS[call](unet)
        assert rel(run(unet, inputs), run(stock, inputs)) <= TOL, call
    assert [m.lora_bank.generation for m in patched_modules(unet)] == generations


def test_hotswap_writes_through_data_are_seen():
    """PEFT's hotswap copies new weights into the loaded ones through ``.data`` (no version
    counter moves): the kernels read the bank those weights view, so the next call sees them."""
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    add_adapters(stock, names=("a",))
    add_adapters(unet, names=("a",))
    dda.patch(unet)
    run(unet, inputs)
    torch.manual_seed(11)
    new = {k: torch.randn_like(v) * 0.1 for k, v in stock.state_dict().items() if "lora_" in k}
    for model in (stock, unet):
        params = dict(model.named_parameters())
        for k, v in new.items():
            params[k].data.copy_(v)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_deleting_an_adapter_rebuilds_the_bank_and_unpatch_unshares():
    unet, stock, inputs = patched_with_stock_twin()
    run(unet, inputs)
    before = [m.lora_bank.generation for m in patched_modules(unet)]
    stock.delete_adapters("b")
    unet.delete_adapters("b")
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    assert all(m.lora_bank.generation == g + 1 for m, g in zip(patched_modules(unet), before))
    banks = [m.lora_bank._groups[0].a for m in patched_modules(unet)]
    dda.unpatch(unet)
    a_weights = [p for n, p in unet.named_parameters() if "lora_A" in n]
    assert a_weights and all(p.untyped_storage().data_ptr() not in {b.untyped_storage().data_ptr() for b in banks}
                             for p in a_weights)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_adapters_in_another_dtype_are_stacked_per_call():
    unet, stock, inputs = patched_with_stock_twin()
    for model in (stock, unet):  # adapters in float64 under a float32 model
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.double()
    with torch.no_grad():
        ours = unet(**inputs).sample
    assert all("float64" in m.lora_bank.per_call for m in patched_modules(unet))
    ref = run(stock, {k: v for k, v in inputs.items()})
    assert rel(ours, ref) <= TOL


def test_lora_under_torch_compile_equals_eager():
    """torch.compile traces the adapters stacked per call (their state becomes guards)."""
    unet, inputs = make_unet()
    add_adapters(unet)
    unet.set_adapters(["a", "b"], weights=[1.0, 0.5])
    dda.patch(unet)
    attn = patched_modules(unet)[1]  # a cross-attention module
    x = torch.randn(2, 16, attn.dda.config.hidden_size)
    ctx = torch.randn(2, 7, attn.dda.config.cross_attention_dim)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ctx), attn(x, ctx), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_and_ip_adapter_loaded_from_the_checkpoint_format(kind):
    """Two LoRAs plus an IP-Adapter loaded by diffusers' own loader from a state dict in the
    checkpoint's format: every attention module stays on our kernels, output as stock's,
    also after set_ip_adapter_scale."""
    from deepspeed_diffusers_attn.random_adapters import add_random_ip_adapter, add_random_lora

    unet, inputs = make_unet(kind)
    add_random_lora(unet, rank=4)
    dim = add_random_ip_adapter(unet, image_embed_dim=32)
    inputs["added_cond_kwargs"] = {**inputs.get("added_cond_kwargs", {}),
                                   "image_embeds": [torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(3))]}
    stock = copy.deepcopy(unet)
    report = dda.patch(unet)
    assert report.summary().get("declined", 0) == 0 and report.summary()["patched"] > 0
    ip = [m for m in patched_modules(unet) if type(m.processor).__name__ == "IPAdapterAttnProcessor2_0"]
    assert ip and all(not m.stock_reason for m in patched_modules(unet))
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    for model in (stock, unet):
        for p in model.attn_processors.values():
            if hasattr(p, "scale") and isinstance(p.scale, list):
                p.scale = [0.25]
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_self_attention_given_a_context_moves_k_v_updates_to_it():
    """A self-attention module called with encoder_hidden_states reads K/V from it: the
    bank regroups its adapters (K/V's A matrices then read the context), and back."""
    from peft import LoraConfig, inject_adapter_in_model

    from conftest import make_attention

    stock = make_attention(32, heads=2, dim_head=16)
    torch.manual_seed(4)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), stock)
    wrapper = torch.nn.Sequential(copy.deepcopy(stock))
    dda.patch(wrapper)
    ours = wrapper[0]
    assert isinstance(ours, PatchedAttention)
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        for context in (None, ctx, None):
            assert rel(ours(x, context), stock(x, context)) <= TOL


# ------------------------------------------------------- adapter changes between eager calls
def _load_as_assigned(model, state):
    model.load_state_dict(state, strict=False, assign=True)


AFTER_A_CALL = {  # each applied to stock and patched after one forward, without graphs
    "add_adapter": lambda u: add_adapters(u, names=("c",), seed=21),
    "unload_lora": lambda u: u.unload_lora(),
    "load_state_dict assign": lambda u: _load_as_assigned(
        u, {k: torch.randn_like(v, generator=torch.Generator().manual_seed(5)) * 0.1
            for k, v in u.state_dict().items() if "lora_" in k}),
    "delete and re-add": lambda u: (u.delete_adapters("a"), add_adapters(u, names=("a",), seed=30)),
    "tensor scalings filled": lambda u: [s.fill_(0.3) for m in u.modules() if hasattr(m, "scaling")
                                         for s in m.scaling.values()],
}


@pytest.mark.parametrize("change", list(AFTER_A_CALL))
def test_adapter_changes_after_a_call_without_graphs(change):
    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    add_adapters(stock)
    add_adapters(unet)
    for model in (stock, unet):
        if change == "tensor scalings filled":  # what enable_lora_hotswap turns the scalings into
            for m in model.modules():
                if hasattr(m, "scaling"):
                    for name in list(m.scaling):
                        m.scaling[name] = torch.tensor(float(m.scaling[name]))
    dda.patch(unet)
    before = run(unet, inputs)
    assert rel(before, run(stock, inputs)) <= TOL
    AFTER_A_CALL[change](stock)
    AFTER_A_CALL[change](unet)
    after = run(unet, inputs)
    assert (after - before).abs().max() > 1e-4, "the change should alter the output"
    assert rel(after, run(stock, inputs)) <= TOL


def test_dora_added_after_a_call_runs_stock():
    from peft import LoraConfig

    unet, inputs = make_unet()
    stock = copy.deepcopy(unet)
    dda.patch(unet)
    run(unet, inputs)
    for model in (stock, unet):
        torch.manual_seed(3)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], use_dora=True,
                                     init_lora_weights=False), adapter_name="dora")
    assert all("DoRA" in m.stock_reason for m in patched_modules(unet))
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL


def test_an_inactive_adapter_adds_nothing_even_when_it_overflows():
    """PEFT skips inactive adapters; ours compute their A side with factor 0 and the B side
    skips them, so an inf in an inactive adapter does not become 0 * inf = NaN."""
    unet, stock, inputs = patched_with_stock_twin()
    for model in (stock, unet):
        for n, p in model.named_parameters():
            if "lora_A.b." in n:
                p.data.fill_(float("inf"))
        model.set_adapters(["a"])
    out = run(unet, inputs)
    assert torch.isfinite(out).all()
    assert rel(out, run(stock, inputs)) <= TOL


@pytest.mark.parametrize("most", [0, 2], ids=["one GEMM per segment", "one launch per target"])
def test_more_segments_than_one_launch_takes(monkeypatch, most):
    """With more adapter segments than one low_rank_accumulate launch takes, a group runs one
    launch per target, or one GEMM per segment when a target alone has too many: the same
    result, inactive adapters included (the factor of a segment is its scale at r0)."""
    from deepspeed_diffusers_attn import ops

    monkeypatch.setattr(ops, "LOW_RANK_MAX_SEGMENTS", most)
    unet, stock, inputs = patched_with_stock_twin()
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    for model in (stock, unet):
        for n, p in model.named_parameters():
            if "lora_A.b." in n:
                p.data.fill_(float("inf"))
        model.set_adapters(["a"], weights=[0.7])
    out = run(unet, inputs)
    assert torch.isfinite(out).all()
    assert rel(out, run(stock, inputs)) <= TOL
