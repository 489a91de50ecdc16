"""The diffusers dispatcher bridge (adapters/dispatch_bridge.py): models whose processors call
``dispatch_attention_fn`` keep diffusers' code, with that call on our attention kernel.

CPU fp32, tiny configs, seeded random weights: Flux, Wan (the dedicated adapters come first
in ADAPTERS, so these tests pin the bridge), LTX-Video and QwenImage (no dedicated adapter). Patched output within 1e-5 relative of stock, the report rows, bit-exact stock
after unpatch, an unpatched model untouched while another is patched, runtime fallbacks
counted and warned, private-API drift declined cleanly, torch.compile(fullgraph=True).
Also runs under the oldest supported diffusers (0.35.2). The CUDA tests (fp16/bf16, CUDA
graph capture) are skipped without a GPU.
"""
from __future__ import annotations

import copy
import gc
import inspect
import threading
import warnings

import pytest
import torch

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import adapters
from deepspeed_diffusers_attn.adapters import attention_processor, dispatch_bridge, unserved

from conftest import requires_cuda

diffusers = pytest.importorskip("diffusers")
attention_dispatch = pytest.importorskip("diffusers.models.attention_dispatch")
from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: E402  (CausalProcessor calls it)

ORIGINAL = attention_dispatch.dispatch_attention_fn


@pytest.fixture(autouse=True)
def _fresh_bridge():
    dda.bridge_stats(reset=True)
    yield
    gc.collect()  # bridged models of a failed test: their wrappers go, and the shim with them
    dispatch_bridge._uninstall_if_unused()
    dda.bridge_stats(reset=True)


@pytest.fixture
def bridge_first(monkeypatch):
    """Flux and Wan may get dedicated adapters ahead of the bridge: these tests pin the bridge."""
    monkeypatch.setattr(adapters, "ADAPTERS", (dispatch_bridge, attention_processor, unserved))


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def flux(seed=0):
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return randomize(model, seed)


def flux_inputs(B=2, S=16, T=7):
    return dict(hidden_states=torch.randn(B, S, 8), encoder_hidden_states=torch.randn(B, T, 32),
                pooled_projections=torch.randn(B, 16), timestep=torch.linspace(0.3, 0.7, B),
                img_ids=torch.randn(S, 3), txt_ids=torch.zeros(T, 3), return_dict=False)


def wan():
    return randomize(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32))


def wan_inputs():
    return dict(hidden_states=torch.randn(2, 4, 2, 8, 8), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 7, 32), return_dict=False)


def ltx():
    return randomize(diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, caption_channels=16))


def ltx_inputs():
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # padded text: an additive [B, H, 1, Sk] mask reaches the dispatcher
    return dict(hidden_states=torch.randn(2, 2 * 4 * 4, 8), encoder_hidden_states=torch.randn(2, 7, 16),
                timestep=torch.tensor([10, 500]), encoder_attention_mask=mask, num_frames=2, height=4, width=4,
                return_dict=False)


def qwen():
    return randomize(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6)))


def qwen_inputs():
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # a [B, 1, 1, S] bool mask reaches the dispatcher
    inputs = dict(hidden_states=torch.randn(2, 16, 16), encoder_hidden_states=torch.randn(2, 5, 16),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.1, 0.5]), img_shapes=[(1, 4, 4)] * 2,
                  return_dict=False)
    if "txt_seq_lens" in inspect.signature(diffusers.QwenImageTransformer2DModel.forward).parameters:
        inputs["txt_seq_lens"] = [5, 5]  # diffusers < 0.36
    return inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "processor") and callable(getattr(m, "set_processor", None))]


def processors(model) -> dict:
    """{module name: processor} (``attn_processors`` is missing on some models in older diffusers)."""
    return {n: m.processor for n, m in model.named_modules() if m in attention_modules(model)}


MODELS = {"flux": (flux, flux_inputs), "wan": (wan, wan_inputs), "ltx": (ltx, ltx_inputs),
          "qwen": (qwen, qwen_inputs)}


@pytest.mark.parametrize("family", list(MODELS))
def test_bridged_model_matches_stock_and_unpatch_is_exact(family, bridge_first):
    make, make_inputs = MODELS[family]
    model, inputs = make(), make_inputs()
    stock_processors = processors(model)
    ref = run(model, inputs)

    report = dda.patch(model)
    n_attn = len(attention_modules(model))
    assert report.summary() == {"patched": 0, "bridged": n_attn, "declined": 0, "already patched": 0}, str(report)
    assert all(r.family == dispatch_bridge.NAME for r in report)
    assert "bridged" in str(report)
    for name, p in processors(model).items():  # diffusers' view: the stock class; what runs: the bridge
        stock = stock_processors[name]
        assert p.__class__ is type(stock) and isinstance(p, type(stock))
        assert isinstance(p, dispatch_bridge.BridgedProcessor) and p.stock is stock
    assert dispatch_bridge.installed_in()

    out = run(model, inputs)
    assert rel_err(out, ref) < 1e-5
    stats = dda.bridge_stats()
    assert stats["served"] >= n_attn and stats["fallbacks"] == {}, stats

    again = dda.patch(model)
    assert again.summary()["already patched"] == n_attn and all(r.reasons == ("bridged",) for r in again)

    restored = dda.unpatch(model)
    assert restored.summary() == {"restored": n_attn}
    assert all(processors(model)[n] is p for n, p in stock_processors.items())
    assert dispatch_bridge.installed_in() == []
    for g in {id(f.__globals__): f.__globals__ for p in stock_processors.values()
              for f in dispatch_bridge._dispatching_functions(type(p))}.values():
        assert g["dispatch_attention_fn"] is ORIGINAL
    assert torch.equal(run(model, inputs), ref)


def test_models_without_a_dedicated_adapter_are_bridged_by_default():
    model = ltx()
    report = dda.patch(model)
    assert len(report) == len(attention_modules(model)) > 0
    assert report.names("bridged") == [r.name for r in report], str(report)
    dda.unpatch(model)
    model = qwen()  # an Attention (the legacy class) whose processor calls the dispatcher
    report = dda.patch(model)
    assert len(report) == len(attention_modules(model)) > 0
    assert {r.status for r in report} <= {"bridged", "patched"}, str(report)  # a dedicated adapter may come
    dda.unpatch(model)


def test_every_attention_module_gets_a_row(bridge_first):
    model = flux()
    report = dda.patch(model)
    names = {n for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}
    assert {r.name for r in report} == names
    dda.unpatch(model)


def test_an_unpatched_model_is_untouched_while_another_is_patched(bridge_first):
    patched, other = flux(seed=0), flux(seed=1)
    inputs = flux_inputs()
    ref_other = run(other, inputs)
    other_processors = [type(p) for p in other.attn_processors.values()]
    dda.patch(patched)
    served = dda.bridge_stats()["served"]
    assert torch.equal(run(other, inputs), ref_other)
    assert dda.bridge_stats()["served"] == served  # the shim called diffusers' original
    assert [type(p) for p in other.attn_processors.values()] == other_processors
    run(patched, inputs)
    assert dda.bridge_stats()["served"] > served
    dda.unpatch(patched)


def test_training_falls_back_to_stock_and_is_reported(bridge_first):
    model = ltx()
    inputs = ltx_inputs()
    ref = model(**inputs)[0]  # grad enabled: the processors' q/k/v require grad
    dda.patch(model)
    with pytest.warns(UserWarning, match="inference-only"):
        out = model(**inputs)[0]
    assert torch.equal(out, ref)  # diffusers' own attention ran
    out.sum().backward()
    assert all(p.grad is not None for p in model.transformer_blocks[0].attn1.to_q.parameters())
    fallbacks = dda.bridge_stats()["fallbacks"]
    assert fallbacks == {"inputs require grad (our attention kernel is inference-only)": 2}, fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per reason
        model(**inputs)
    assert dda.bridge_stats()["served"] == 0
    dda.unpatch(model)


class CausalProcessor:
    """A custom processor calling the dispatcher with what our kernel does not take."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, is_causal=False, kv_heads=None):
        self.is_causal, self.kv_heads = is_causal, kv_heads

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        k = attn.to_k(context).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if self.kv_heads:  # grouped-query attention: fewer K/V heads
            k, v = k[:, :, : self.kv_heads], v[:, :, : self.kv_heads]
        out = dispatch_attention_fn(q, k, v, is_causal=self.is_causal, enable_gqa=bool(self.kv_heads),
                                    backend=self._attention_backend)
        return attn.to_out[0](out.flatten(2, 3))


@pytest.mark.parametrize("processor, reason", [
    (CausalProcessor(is_causal=True), "is_causal (causal attention)"),
    (CausalProcessor(kv_heads=1), "K/V heads differ from Q's (grouped-query attention)"),
    (CausalProcessor(), None),
])
def test_custom_processor_calls_are_served_or_fall_back(processor, reason):
    model = ltx()
    model.set_attn_processor(processor)
    inputs = ltx_inputs()
    ref = run(model, inputs)
    report = dda.patch(model)
    assert report.names("bridged") == [r.name for r in report], str(report)
    assert __name__ in dispatch_bridge.installed_in()  # the shim stands where the processor's code looks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(model, inputs)
    stats = dda.bridge_stats()
    if reason is None:
        assert rel_err(out, ref) < 1e-5 and stats == {"served": 2, "fallbacks": {}}
    else:
        assert torch.equal(out, ref) and stats == {"served": 0, "fallbacks": {reason: 2}}
    dda.unpatch(model)
    assert globals()["dispatch_attention_fn"] is ORIGINAL


def test_call_refusal_reasons():
    q = torch.randn(2, 5, 2, 16)
    k = torch.randn(2, 3, 2, 16)
    dispatch_bridge.api_problem()
    ok = dispatch_bridge.call_refusal
    assert ok(q, k, k) == ""
    if dispatch_bridge._api().mask_2d_is_batch:  # diffusers' native backend reads [B, Sk] as [B, 1, 1, Sk]
        assert ok(q, k, k, torch.ones(2, 3, dtype=torch.bool)) == ""
    else:  # SDPA's broadcast, as diffusers < 0.36: [Sq, Sk]
        assert "broadcast" in ok(q, k, k, torch.ones(2, 3, dtype=torch.bool))
        assert ok(q, k, k, torch.ones(5, 3, dtype=torch.bool)) == ""
    assert ok(q, k, k, torch.zeros(2, 1, 5, 3)) == ""
    assert ok(q, k, k, dropout_p=0.1) == "dropout_p > 0 (attention dropout)"
    assert "broadcast" in ok(q, k, k, torch.zeros(2, 3, 5, 3))  # 3 heads where there are 2
    assert "float32" in ok(q, k, k, torch.zeros(1, 3, dtype=torch.float64))
    assert "return_lse" in ok(q, k, k, attention_kwargs={"return_lse": True})
    assert "context-parallel" in ok(q, k, k, parallel_config=object())
    assert "'flash'" in ok(q, k, k, backend="flash")
    assert ok(q, k, k, backend="native") == ""  # an explicit native backend is served
    assert "head dim" in ok(q, torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))
    assert "multiple of 8" in ok(torch.randn(2, 5, 2, 12), torch.randn(2, 3, 2, 12), torch.randn(2, 3, 2, 12))
    assert "float32 only" in ok(q.half(), k.half(), k.half())
    assert "require grad" in ok(q.requires_grad_(), k, k)


def test_backend_chosen_with_set_attention_backend(bridge_first, monkeypatch):
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)  # set_attention_backend sets it
    inputs = flux_inputs()

    before = flux()
    before.set_attention_backend("_native_math")
    report = dda.patch(before)
    assert report.summary()["declined"] == len(report) > 0
    assert all("'_native_math' backend" in r.reasons[0] for r in report), str(report)
    assert dispatch_bridge.installed_in() == []

    after = flux()
    ref = run(after, inputs)
    dda.patch(after)
    after.set_attention_backend("_native_math")  # reaches the stock processors through the wrappers
    with pytest.warns(UserWarning, match="_native_math"):
        math = run(after, inputs)
    assert dda.bridge_stats()["served"] == 0 and len(dda.bridge_stats()["fallbacks"]) == 1
    assert rel_err(math, ref) < 1e-5
    after.set_attention_backend("native")
    assert rel_err(run(after, inputs), ref) < 1e-5 and dda.bridge_stats()["served"] == 2
    dda.unpatch(after)


def test_private_api_drift_declines_cleanly(bridge_first, monkeypatch):
    model = flux()
    inputs = flux_inputs()
    ref = run(model, inputs)

    def dispatch_attention_fn(query, key, value, mask=None):  # not the signature the bridge reproduces
        raise AssertionError("never called")

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", dispatch_attention_fn)
    monkeypatch.setattr(dispatch_bridge, "_API", None)  # detect again
    report = dda.patch(model)
    assert report.summary()["declined"] == len(report) == len(attention_modules(model))
    assert all(r.family == dispatch_bridge.NAME and "signature" in r.reasons[0] for r in report), str(report)
    assert dispatch_bridge.installed_in() == []
    assert torch.equal(run(model, inputs), ref)
    assert dda.unpatch(model).summary() == {"restored": 0}


def test_half_precision_on_the_cpu_is_declined_at_patch_time(bridge_first):
    model = flux().half()
    report = dda.patch(model)
    assert report.summary()["declined"] == len(report) > 0
    assert all("float32 only" in r.reasons[0] for r in report), str(report)
    assert dispatch_bridge.installed_in() == []


def test_deepcopy_of_a_bridged_model_is_bridged(bridge_first):
    model = flux()
    inputs = flux_inputs()
    ref = run(model, inputs)
    dda.patch(model)
    twin = copy.deepcopy(model)
    assert all(adapters.is_bridged(m) for m in attention_modules(twin))
    dda.unpatch(model)
    assert dispatch_bridge.installed_in()  # the copy still needs the shim
    assert rel_err(run(twin, inputs), ref) < 1e-5 and dda.bridge_stats()["served"] == 2
    assert dda.unpatch(twin).summary() == {"restored": 2}
    assert dispatch_bridge.installed_in() == []


def test_the_routing_flag_is_per_thread(bridge_first):
    model = flux()
    seen = []

    class Probe:
        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            thread = threading.Thread(target=lambda: seen.append(getattr(dispatch_bridge._local, "on", False)))
            thread.start()
            thread.join()
            seen.append(dispatch_bridge._local.on)
            return dispatch_attention_fn  # never reached: Probe is only called directly

    wrapper = dispatch_bridge._wrap(Probe())
    wrapper(None, None)
    assert seen == [False, True] and not getattr(dispatch_bridge._local, "on", False)
    del wrapper, model


def counting_backend():
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


def test_compile_fullgraph_equals_eager(bridge_first):
    model = flux()
    inputs = flux_inputs()
    dda.patch(model)
    eager = run(model, inputs)
    torch._dynamo.reset()
    backend = counting_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = run(compiled, inputs)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    assert backend.frame_count == 1
    assert any("dda.attention" in str(g.graph) for g in backend.graphs)  # our op is in the graph
    assert dda.bridge_stats()["fallbacks"] == {}
    dda.unpatch(model)
    torch._dynamo.reset()


def test_compile_counts_a_fallback_once_when_traced(bridge_first):
    model = ltx()
    inputs = ltx_inputs()
    dda.patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = compiled(**inputs)[0]  # grad enabled: falls back
        second = compiled(**inputs)[0]
    assert dda.bridge_stats()["fallbacks"] == {"inputs require grad (our attention kernel is inference-only)": 2}
    torch.testing.assert_close(first, second)
    dda.unpatch(model)
    torch._dynamo.reset()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_bridged_model_and_cuda_graph(dtype, bridge_first):
    model = flux().to("cuda", dtype)
    inputs = {k: v.to("cuda", dtype) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(S=256).items()}
    ref = run(model, inputs)
    report = dda.patch(model)
    assert report.summary()["bridged"] == len(report), str(report)
    out = run(model, inputs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.float(), ref.float()) < tol
    assert dda.bridge_stats()["served"] == 2 and dda.bridge_stats()["fallbacks"] == {}

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        model(**inputs)  # warm-up off the default stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = model(**inputs)[0]
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, out, rtol=0, atol=0)
    dda.unpatch(model)
    assert torch.equal(run(model, inputs), ref)


def test_autocast_is_seen_as_sdpa_sees_it():
    model = ltx()
    inputs = ltx_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(model, inputs)
        dda.patch(model)
        with pytest.warns(UserWarning, match="float32 only"):
            out = run(model, inputs)  # SDPA would run bf16: our CPU kernel cannot, so diffusers' runs
    assert torch.equal(out, ref)
    assert dda.bridge_stats()["served"] == 0
    assert all("float32 only" in reason for reason in dda.bridge_stats()["fallbacks"])
    dda.unpatch(model)


def test_a_wrapper_handed_back_after_unpatch_is_bridged_again(bridge_first):
    model = flux()
    inputs = flux_inputs()
    dda.patch(model)
    wrappers = dict(model.attn_processors)
    dda.unpatch(model)
    assert dispatch_bridge.installed_in() == []
    model.set_attn_processor(wrappers)
    assert all(adapters.is_bridged(m) for m in attention_modules(model))
    run(model, inputs)
    assert dda.bridge_stats()["served"] == 2 and dispatch_bridge.installed_in()
    assert dda.unpatch(model).summary() == {"restored": 2}
    del wrappers
    assert dispatch_bridge.installed_in() == []
