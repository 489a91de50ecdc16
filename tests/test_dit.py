"""DiT and video models on the CPU: the real configs, the shared model / input builders, CUDA-graph
wrapping of a pipeline's ``transformer`` by patch(cuda_graph=True), and bench_dit.py's dry run.

The configs are checked against the public models' published sizes by building them on the meta
device (no memory): SD3-medium 2.03B transformer parameters, Flux.1-dev 11.9B, Wan2.1-T2V-1.3B
1.42B (the "1.3B" of its name), and the token counts the benchmark states.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os

import pytest
import torch

import deepspeed_diffusers_attn as dda
from conftest import fake_capture
from deepspeed_diffusers_attn import configs
from deepspeed_diffusers_attn.configs import scaled_down, with_layers
from deepspeed_diffusers_attn.dit_example import MODELS, build_model, build_pipeline, transformer_inputs
from deepspeed_diffusers_attn.graphs import GraphedCallable, graph_module_forward, graphed_methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE, FRAMES, TEXT = 64, 5, 16


def _meta_params(config: dict) -> int:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config, billions", [
    (configs.SD3_MEDIUM_TRANSFORMER, 2.03), (configs.FLUX1_DEV_TRANSFORMER, 11.90),
    (configs.WAN21_T2V_1_3B_TRANSFORMER, 1.42), (configs.SD3_VAE, 0.08), (configs.WAN21_VAE, 0.13),
], ids=["sd3-medium", "flux1-dev", "wan2.1-1.3b", "sd3-vae", "wan-vae"])
def test_real_configs_have_the_published_sizes(config, billions):
    assert round(_meta_params(config) / 1e9, 2) == billions


def test_real_token_counts_and_heads():
    tokens = {k: m.image_tokens(m.transformer, m.height, m.width, m.frames) for k, m in MODELS.items()}
    assert tokens == {"sd3": 4096, "flux": 4096, "wan": 32760}  # Wan: 21 x 30 x 52 after 1x2x2 patching
    assert {k: m.text_tokens for k, m in MODELS.items()} == {"sd3": 333, "flux": 512, "wan": 512}
    heads = {k: (m.transformer["num_attention_heads"], m.transformer["attention_head_dim"]) for k, m in MODELS.items()}
    assert heads == {"sd3": (24, 64), "flux": (24, 128), "wan": (12, 128)}
    assert MODELS["wan"].latent_shape(MODELS["wan"].transformer, 1, 480, 832, 81) == (1, 16, 21, 60, 104)


def test_with_layers_and_scaled_down():
    flux = with_layers(configs.FLUX1_DEV_TRANSFORMER, 2)
    assert (flux["num_layers"], flux["num_single_layers"]) == (2, 4)
    assert with_layers(configs.SD3_MEDIUM_TRANSFORMER, 100)["num_layers"] == 24  # never more than the model has
    assert configs.FLUX1_DEV_TRANSFORMER["num_layers"] == 19  # the original is not modified
    with pytest.raises(ValueError):
        with_layers(configs.WAN21_T2V_1_3B_TRANSFORMER, 0)
    for m in MODELS.values():
        tiny = scaled_down(m.transformer)
        assert tiny["_class_name"] == m.transformer["_class_name"] and tiny["num_attention_heads"] == 2
        assert _meta_params(tiny) < 200_000
    assert sum(scaled_down(configs.FLUX1_DEV_TRANSFORMER)["axes_dims_rope"]) == 16  # RoPE covers the head dim


def _tiny(key: str, batch: int = 1):
    spec = MODELS[key]
    config = scaled_down(spec.transformer)
    model = build_model(config, seed=0)
    inputs = transformer_inputs(spec, config, batch=batch, height=SIDE, width=SIDE, frames=FRAMES, text_tokens=TEXT)
    return model, inputs


@pytest.mark.parametrize("key", list(MODELS))
def test_transformer_inputs_run_the_model(key):
    model, inputs = _tiny(key, batch=2)
    with torch.no_grad():
        (out,) = model(**inputs)
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    assert inputs["encoder_hidden_states"].shape[:2] == (2, TEXT)


def test_build_model_keeps_the_fp32_modules_of_wan():
    model = build_model(scaled_down(configs.WAN21_T2V_1_3B_TRANSFORMER), dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32 and dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert model.rope.freqs_cos.dtype == torch.float32


@pytest.mark.parametrize("key", list(MODELS))
def test_patch_cuda_graph_wraps_a_transformer_passed_directly(key):
    model, inputs = _tiny(key)
    name = f"{type(model).__name__}.forward"
    report = dda.patch(model, cuda_graph=True)
    assert report.wrapped == (name,)
    assert isinstance(model.forward, GraphedCallable) and model.forward.tensor_scalars == ("timestep",)
    assert dda.unpatch(model).wrapped == (name,) and not graphed_methods(model)


def test_patch_cuda_graph_wraps_pipeline_transformers():
    pipe = build_pipeline(MODELS["sd3"], scaled=True)
    report = dda.patch(pipe, cuda_graph=True)
    assert report.wrapped == ("transformer.forward", "vae.decode", "vae.encode")
    assert dda.unpatch(pipe).wrapped == report.wrapped

    from diffusers import WanPipeline

    wan = build_pipeline(MODELS["wan"], scaled=True)
    second = build_model(scaled_down(configs.WAN21_T2V_1_3B_TRANSFORMER), seed=1)
    two = WanPipeline(tokenizer=None, text_encoder=None, vae=wan.vae, scheduler=wan.scheduler,
                      transformer=wan.transformer, transformer_2=second, boundary_ratio=0.875)
    wrapped = dda.patch(two, cuda_graph=True).wrapped
    assert "transformer.forward" in wrapped and "transformer_2.forward" in wrapped
    dda.unpatch(two)
    assert not graphed_methods(two.transformer) and not graphed_methods(two.transformer_2)


@pytest.mark.parametrize("key", list(MODELS))
def test_graphed_transformer_replays_new_values(key):
    """The graph wrapper on each transformer: one capture for one signature, and every later call
    (new latents, new timestep values) gives the eager result."""
    model, inputs = _tiny(key)
    dda.patch(model)
    with torch.no_grad():
        wrapper = graph_module_forward(model, capture=fake_capture([]))
        first = model(**inputs)[0]
        other = dict(inputs, hidden_states=inputs["hidden_states"] + 0.5, timestep=inputs["timestep"] + 100)
        graphed = model(**other)[0]
        del model.__dict__["forward"]
        eager = model(**other)[0]
        model.__dict__["forward"] = wrapper
    assert wrapper.stats["captures"] == 1 and wrapper.stats["replays"] == 2
    assert not torch.equal(first, graphed)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    model.__dict__.pop("forward")
    dda.unpatch(model)


def _load_bench():
    path = os.path.join(ROOT, "benchmarks", "bench_dit.py")
    spec = importlib.util.spec_from_file_location("bench_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_removed_is_a_shape_preserving_no_op_and_restores():
    bench = _load_bench()
    sdpa, packet = torch.nn.functional.scaled_dot_product_attention, torch.ops.dda.attention
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    counts = collections.Counter()
    with bench.attention_removed(counts):
        out = torch.nn.functional.scaled_dot_product_attention(query=q.transpose(1, 2), key=k.transpose(1, 2),
                                                               value=v.transpose(1, 2))
        o, lse = dda.ops.attention(q, k, v, return_lse=True)
        assert dda.ops.attention_out(q, k, v, None, None, torch.zeros_like(q)).abs().sum() == 0  # nothing written
    assert out.shape == (1, 2, 5, 8) and o.shape == q.shape and lse.shape == (1, 2, 5)
    assert counts == {"sdpa": 1, "dda.attention": 2}
    assert torch.nn.functional.scaled_dot_product_attention is sdpa and torch.ops.dda.attention is packet
    torch.testing.assert_close(dda.ops.attention(q, k, v)[0],
                               sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    assert bench.unremoved_attention_ops() == []


def _dry_run(bench, out, *args) -> tuple[int, dict]:
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--dry-run", "--batch", "1", "--out", str(out), *args])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    with open(out / "results.json") as f:
        return rc, json.load(f)


def test_bench_dit_dry_run(tmp_path, capsys):
    bench = _load_bench()
    rc, result = _dry_run(bench, tmp_path, "--variants", "stock,ours,ours+graph")
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "not a benchmark" in text
    rows = result["rows"]
    assert result["conditions"]["card"] == "cpu (dry-run)"
    variants = ("stock", "ours", "ours+graph")
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in MODELS for v in variants]
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["rel_err"] < 1e-5 and r["finite"]
        assert "attention_share" in r and "ms_no_attention" in r
        if r["variant"] in ("stock", "ours"):  # one step's attention calls, all removed
            calls = r["attention_calls"]
            assert sum(calls.values()) > 0 and set(calls) <= {"sdpa", "dda.attention"}
        if r["variant"].startswith("ours"):
            assert sum(r["patch"].values()) > 0
    assert os.path.getsize(tmp_path / "results.png") > 0

    compiled = tmp_path / "compile"
    rc, result = _dry_run(bench, compiled, "--models", "flux", "--variants", "stock+compile,ours+compile")
    assert rc == 0, capsys.readouterr().out
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"stock", "stock+compile", "ours+compile"}
    assert rows["ours+compile"]["rel_err"] < 1e-5 and "attention_share" not in rows["ours+compile"]
    assert rows["ours+compile"]["speedup_vs_stock"] > 0  # against stock+compile
