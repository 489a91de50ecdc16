"""CUDA-graph wrappers (deepspeed_diffusers_attn.graphs, patch(cuda_graph=True, channels_last=True)).

CPU: the signature key (pure function), LRU eviction and output cloning through an
injected fake capture, the eager-fallback warnings, option validation, and exact
restore of the wrapped methods by unpatch. GPU (marked ``cuda``, skipped without CUDA; ``pytest -s -m cuda tests/test_graphs.py`` prints
the errors and whether each graphed result was bit-exact): graphed output
vs eager on scaled-down SD1.5 / SDXL UNets and the VAE in fp16, many signatures in one
process, a tiny StableDiffusionPipeline, and patch + torch.compile(reduce-overhead).

Graphed vs eager tolerance on the GPU: a graph replays the very kernels the eager call
ran, on the same data, so outputs are normally bit-identical. cuDNN and cuBLAS may pick
a different algorithm for differently aligned (graph-pool) addresses, which changes
fp16 rounding, so the tests allow fp16 noise (relative error <= 2e-3, about 2 ulp of
fp16) and print whether the result was bit-exact. Channels-last and torch.compile
run different kernels, so they get a wider bound (1e-2).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import deepspeed_diffusers_attn as dda
from conftest import fake_capture
from deepspeed_diffusers_attn import graphs
from deepspeed_diffusers_attn.configs import SD15_UNET, SDXL_UNET, SD_VAE, scaled_down, sdxl_added_cond_shapes
from deepspeed_diffusers_attn.graphs import (
    CaptureError,
    GraphedCallable,
    GraphFallbackWarning,
    graph_module_forward,
    map_tensors,
    signature_key,
    ungraph_module,
)

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requires_cuda(test):
    """Marks a GPU test: ``-m cuda`` selects it, and it is skipped without CUDA."""
    return pytest.mark.cuda(_skip_without_cuda(test))


UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
NO_FALLBACK = pytest.mark.filterwarnings("error::deepspeed_diffusers_attn.graphs.GraphFallbackWarning")


def key(tensor_scalars=("timestep",), **arguments):
    k, _, problems = signature_key(arguments, tensor_scalars=tensor_scalars)
    assert not problems, problems
    return k


def make_unet(kind: str, device="cpu", dtype=torch.float32, batch: int = 2, size=None, seq: int = 77):
    torch.manual_seed(0)
    config = scaled_down(UNETS[kind])
    unet = UNet2DConditionModel.from_config(config).eval().to(device, dtype)
    return unet, unet_inputs(config, kind, device, dtype, batch, size or config["sample_size"], seq)


def unet_inputs(config, kind, device, dtype, batch, size, seq, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, size, size, generator=gen).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, seq, config["cross_attention_dim"], generator=gen).to(device, dtype),
    }
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = {k: torch.randn(s, generator=gen).to(device, dtype)
                                       for k, s in sdxl_added_cond_shapes(config, batch).items()}
    return inputs


def make_vae(device="cpu", dtype=torch.float32) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL.from_config(scaled_down(SD_VAE)).eval().to(device, dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# --------------------------------------------------------------------------- signature key (pure)
def test_same_call_same_key_and_what_changes_it():
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    base = key(sample=x, timestep=10, encoder_hidden_states=e, return_dict=False)
    assert base == key(sample=torch.randn(2, 4, 8, 8), timestep=10, encoder_hidden_states=torch.randn(2, 77, 16),
                       return_dict=False)
    different = [
        dict(sample=torch.randn(1, 4, 8, 8), timestep=10, encoder_hidden_states=e, return_dict=False),  # batch
        dict(sample=torch.randn(2, 4, 16, 8), timestep=10, encoder_hidden_states=e, return_dict=False),  # size
        dict(sample=x.half(), timestep=10, encoder_hidden_states=e, return_dict=False),  # dtype
        dict(sample=x, timestep=10, encoder_hidden_states=torch.randn(2, 20, 16), return_dict=False),  # prompt
        dict(sample=x, timestep=10, encoder_hidden_states=e, return_dict=True),  # non-tensor value
        dict(sample=x, timestep=10, encoder_hidden_states=e),  # which kwargs are present
        dict(sample=x, timestep=10, encoder_hidden_states=e, return_dict=False, timestep_cond=None),
        dict(sample=x.contiguous(memory_format=torch.channels_last), timestep=10, encoder_hidden_states=e,
             return_dict=False),  # layout
        dict(sample=x[..., ::2].repeat(1, 1, 1, 2)[..., :8].transpose(2, 3), timestep=10,
             encoder_hidden_states=e, return_dict=False),  # strided
        dict(sample=x, timestep=10.0, encoder_hidden_states=e, return_dict=False),  # float timestep: float64
    ]
    keys = [key(**d) for d in different]
    assert base not in keys
    assert len(set(keys)) == len(keys)


def test_python_values_are_typed_and_in_the_key():
    f = lambda v: key(tensor_scalars=(), sample=torch.zeros(1), scale=v)  # noqa: E731
    assert len({f(1), f(1.0), f(True), f(2.0), f("1"), f(None)}) == 6
    assert f(0.5) == f(0.5)


def test_timestep_value_not_in_key():
    x = torch.randn(2, 4, 8, 8)
    k = lambda t: key(sample=x, timestep=t)  # noqa: E731
    assert k(1) == k(999) == k(torch.tensor(999))  # a 0-d CPU int64 tensor is the same graph input
    assert k(1.0) == k(981.5)
    assert k(1) != k(1.0)
    assert k(torch.tensor([1, 2])) != k(1)  # a [B] tensor is a tensor input of its own shape
    # without tensor_scalars the value is frozen, so it is in the key
    assert key(tensor_scalars=(), sample=x, timestep=1) != key(tensor_scalars=(), sample=x, timestep=2)


def test_nested_added_cond_kwargs_and_lists():
    def k(text=(2, 80), time=(2, 6), extra=False, residuals=((2, 8, 8, 8), (2, 8, 4, 4))):
        cond = {"text_embeds": torch.zeros(text), "time_ids": torch.zeros(time)}
        if extra:
            cond["image_embeds"] = torch.zeros(2, 4)
        return key(sample=torch.zeros(2, 4, 8, 8), timestep=1, added_cond_kwargs=cond,
                   down_block_additional_residuals=tuple(torch.zeros(s) for s in residuals),
                   cross_attention_kwargs={"scale": 1.0})

    base = k()
    assert base == k()
    assert len({base, k(text=(2, 96)), k(time=(1, 6)), k(extra=True), k(residuals=((2, 8, 8, 8),))}) == 5
    _, leaves, _ = signature_key({"added_cond_kwargs": {"a": torch.zeros(1), "b": [torch.zeros(2), 3]}})
    assert [t.shape for t in leaves] == [(1,), (2,)]


def test_unkeyable_argument_is_a_problem():
    _, _, problems = signature_key({"sample": torch.zeros(1), "cb": object()})
    assert problems and "cb" in problems[0]


# --------------------------------------------------------------------------- wrapper on the CPU (fake capture)
def scale_fn(x, scale=1.0, return_dict=False):
    return (x * scale,) if not return_dict else {"out": x * scale}


def test_lru_eviction_order_and_replay_values():
    log = []
    g = GraphedCallable(scale_fn, max_graphs=2, capture=fake_capture(log))
    a, b, c = torch.randn(2, 3), torch.randn(4, 3), torch.randn(5, 3)
    g(a)
    g(b)
    g(a)  # a becomes the most recent: b is evicted next
    g(c)
    assert g.num_graphs == 2 and g.stats["captures"] == 3 and g.stats["evictions"] == 1
    shapes = [dict(k[1])["x"][1] for k in g.keys()]
    assert shapes == [(2, 3), (5, 3)]
    new_a = torch.randn(2, 3)
    torch.testing.assert_close(g(new_a, 3.0)[0], new_a * 3.0)  # scale=3.0 is a new key: captured
    torch.testing.assert_close(g(new_a)[0], new_a)
    g(b)  # evicted earlier: captured again
    assert g.stats["captures"] == 6 and g.stats["evictions"] == 4
    assert g.stats["replays"] == 7  # every call; one was a cache hit


def test_positional_and_keyword_calls_share_a_graph():
    g = GraphedCallable(scale_fn, capture=fake_capture([]))
    x = torch.randn(3)
    g(x, 2.0)
    g(x, scale=2.0)
    g(x=x, scale=2.0)
    assert g.num_graphs == 1 and g.stats["captures"] == 1


def test_outputs_are_cloned_unless_told():
    g = GraphedCallable(scale_fn, capture=fake_capture([]))
    x1, x2 = torch.randn(3), torch.randn(3)
    out1 = g(x1, return_dict=True)
    out2 = g(x2, return_dict=True)
    assert isinstance(out1, dict)
    torch.testing.assert_close(out1["out"], x1)
    torch.testing.assert_close(out2["out"], x2)

    shared = GraphedCallable(scale_fn, capture=fake_capture([]), clone_outputs=False)
    first = shared(x1)[0]
    second = shared(x2)[0]
    assert first.data_ptr() == second.data_ptr()  # the graph's own buffer, overwritten
    torch.testing.assert_close(first, x2)


def test_output_structures_rebuilt():
    vae = make_vae()
    wrapper = graph_module_forward(vae, "encode", capture=fake_capture([]))
    graph_module_forward(vae, "decode", capture=fake_capture([]))
    image, z = torch.randn(1, 3, 32, 32), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        eager_enc = wrapper.fn(image).latent_dist
        eager_dec = vae.decode.fn(z).sample
        for _ in range(2):
            enc = vae.encode(image)
            dec = vae.decode(z, generator=torch.Generator())  # unused by AutoencoderKL.decode: not in the key
            dec_tuple = vae.decode(z, return_dict=False)
    assert isinstance(enc.latent_dist, DiagonalGaussianDistribution)
    torch.testing.assert_close(enc.latent_dist.mean, eager_enc.mean)
    torch.testing.assert_close(enc.latent_dist.std, eager_enc.std)
    assert isinstance(dec, DecoderOutput) and isinstance(dec_tuple, tuple)
    torch.testing.assert_close(dec.sample, eager_dec)
    torch.testing.assert_close(dec_tuple[0], eager_dec)
    assert vae.decode.num_graphs == 2  # return_dict True / False


def test_cpu_inputs_fall_back_with_one_warning():
    unet, inputs = make_unet("sd15")
    with torch.no_grad():
        ref = unet(**inputs).sample
    report = dda.patch(unet, cuda_graph=True)
    assert report.wrapped == ("UNet2DConditionModel.forward",)
    with torch.no_grad():
        with pytest.warns(GraphFallbackWarning, match="CUDA device"):
            out = unet(**inputs).sample
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphFallbackWarning)
            unet(**inputs)  # said once
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert unet.forward.stats["eager"] == 2 and unet.forward.num_graphs == 0


def test_autograd_and_unkeyable_inputs_fall_back():
    lin = nn.Linear(3, 3)
    graph_module_forward(lin, capture=fake_capture([]))
    x = torch.randn(2, 3)
    with pytest.warns(GraphFallbackWarning, match="require grad"):
        y = lin(x)
    assert y.requires_grad  # eager, with autograd
    with torch.no_grad():
        lin(x)
    assert lin.forward.num_graphs == 1

    g = GraphedCallable(lambda x, cb: cb(x), capture=fake_capture([]))
    with pytest.warns(GraphFallbackWarning, match="neither a tensor"):
        g(x, cb=lambda t: t)


def test_failed_capture_runs_eagerly_and_says_so():
    def failing(run, device):
        run()
        raise CaptureError("operation not permitted when stream is capturing")

    g = GraphedCallable(scale_fn, capture=failing)
    x = torch.randn(3)
    with pytest.warns(GraphFallbackWarning, match="capture failed"):
        torch.testing.assert_close(g(x, 2.0)[0], 2 * x)
    g(x, 2.0)  # same signature: eager, no second capture attempt
    assert g.stats["capture_failures"] == 1 and g.stats["eager"] == 2


def test_warmup_errors_propagate():
    def bad(x):
        raise ValueError("user error")

    g = GraphedCallable(bad, capture=fake_capture([]))
    with pytest.raises(ValueError, match="user error"):
        g(torch.zeros(1))


def test_moved_parameters_recapture():
    lin = nn.Linear(3, 3)
    wrapper = graph_module_forward(lin, capture=fake_capture([]))
    with torch.no_grad():
        lin(torch.randn(2, 3))
        lin.double()
        with pytest.warns(GraphFallbackWarning, match="moved"):
            x = torch.randn(2, 3)
            lin(x.double())
        lin.float()
        torch.testing.assert_close(lin(x), wrapper.fn(x))
    assert wrapper.stats["resets"] == 2


def test_training_flag_in_key():
    lin = nn.Linear(3, 3)
    wrapper = graph_module_forward(lin, capture=fake_capture([]))
    with torch.no_grad():
        lin(torch.randn(2, 3))
        lin.train(False)
        lin(torch.randn(2, 3))
    assert wrapper.num_graphs == 2


# --------------------------------------------------------------------------- module state in the key
def frozen_capture(log: list):
    """A capture function for the CPU that, like a real graph, replays what it captured: the
    static output keeps the capture's values (the tests call with the same inputs), so a
    replay of the wrong graph returns the wrong values."""

    def capture(run, device):
        out = run()
        log.append(out)
        return (lambda: None), out

    return capture


class _OpRecorder(TorchDispatchMode):
    """Records every aten / dda op a call runs, with the very tensors it read and wrote."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _returns_alias(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


def replaying_capture(log: list):
    """A capture function for the CPU that behaves like a CUDA graph: it records the ops of
    the capture call with their tensors, and a replay re-runs those ops on those same
    tensors (what a graph's kernels do with their addresses). Python values read at capture
    (scalars, which adapters are active) stay frozen; values in tensors the ops read (fixed
    buffers written between replays) are read anew."""

    def capture(run, device):
        recorder = _OpRecorder()
        with recorder:
            out = run()
        log.append(out)

        def replay():
            for func, args, kwargs, recorded in recorder.ops:
                result = func(*args, **kwargs)
                if _returns_alias(func):  # views and in-place / out= ops wrote the recorded tensors
                    continue
                fresh = []
                map_tensors(result, fresh.append)
                it = iter(fresh)
                map_tensors(recorded, lambda t: t.copy_(next(it)))

        return replay, out

    return capture


def add_lora_adapters(unet, names=("a", "b"), rank=4, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """Random (not zero-initialised) PEFT LoRA adapters, as diffusers' load_lora_adapter would add them."""
    from peft import LoraConfig

    for name in names:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                    init_lora_weights=False), adapter_name=name)


ADAPTER_CHANGES = {
    "set_adapters one": lambda u: u.set_adapters(["a"], weights=[1.0]),
    "set_adapters weight": lambda u: u.set_adapters(["a", "b"], weights=[1.0, 0.5]),
    "disable_lora": lambda u: u.disable_lora(),
    "fuse_lora": lambda u: u.fuse_lora(adapter_names=["a"]),
}


@pytest.mark.parametrize("change", list(ADAPTER_CHANGES))
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "ours"])
def test_adapter_changes_never_replay_a_stale_graph(change, patched):
    """Stock PEFT layers freeze the adapter state into a graph, so a change captures a new
    one; ours read the adapter factors from a fixed buffer, so the same graph replays with
    the change (an inactive adapter's factor is 0, and the kernel skips it). Either way the
    replay equals eager, bit for bit."""
    pytest.importorskip("peft")
    unet, inputs = make_unet("sd15")
    add_lora_adapters(unet)
    unet.set_adapters(["a", "b"], weights=[1.0, 1.0])
    if patched:
        dda.patch(unet)
    wrapper = graph_module_forward(unet, capture=replaying_capture([]))
    with torch.no_grad():
        before = unet(**inputs).sample.clone()
        assert torch.equal(unet(**inputs).sample, before)  # a replay
        ADAPTER_CHANGES[change](unet)
        eager = wrapper.fn(**inputs).sample
        after = unet(**inputs).sample
    assert (eager - before).abs().max() > 1e-3, "the change should alter the output"
    torch.testing.assert_close(after, eager, rtol=0, atol=0)
    assert wrapper.stats["captures"] == (1 if patched else 2)


def test_switching_adapters_back_replays_without_capture():
    pytest.importorskip("peft")
    unet, inputs = make_unet("sd15")
    add_lora_adapters(unet)
    wrapper = graph_module_forward(unet, capture=frozen_capture([]))
    outs = {}
    with torch.no_grad():
        for names in (["a"], ["b"], ["a"], ["b"]):
            unet.set_adapters(names, weights=[1.0])
            outs.setdefault(names[0], []).append(unet(**inputs).sample.clone())
    assert wrapper.stats["captures"] == 2 and wrapper.stats["replays"] == 4
    assert torch.equal(outs["a"][0], outs["a"][1]) and torch.equal(outs["b"][0], outs["b"][1])
    assert not torch.equal(outs["a"][0], outs["b"][0])


def test_loading_or_unloading_adapters_drops_the_graphs():
    pytest.importorskip("peft")
    unet, inputs = make_unet("sd15")
    wrapper = graph_module_forward(unet, capture=frozen_capture([]))
    with torch.no_grad():
        unet(**inputs)
        add_lora_adapters(unet, names=("a",))
        with pytest.warns(GraphFallbackWarning, match="submodules or parameters changed"):
            with_lora = unet(**inputs).sample
        torch.testing.assert_close(with_lora, wrapper.fn(**inputs).sample, rtol=0, atol=0)
        unet.unload_lora()
        without = unet(**inputs).sample
        torch.testing.assert_close(without, wrapper.fn(**inputs).sample, rtol=0, atol=0)
    assert wrapper.stats["resets"] == 2 and wrapper.stats["captures"] == 3


def test_processor_changes_are_in_the_key():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet, inputs = make_unet("sd15")
    wrapper = graph_module_forward(unet, capture=frozen_capture([]))
    with torch.no_grad():
        unet(**inputs)
        unet.set_attn_processor(AttnProcessor())
        unet(**inputs)
        unet.set_attn_processor(AttnProcessor2_0())
        unet(**inputs)
    assert wrapper.stats["captures"] == 3


def test_a_forward_that_slices_module_lists_does_not_rewalk():
    from deepspeed_diffusers_attn import module_state

    unet, inputs = make_unet("sd15")
    graph_module_forward(unet, capture=frozen_capture([]))
    with torch.no_grad():
        unet(**inputs)
        seen = module_state.registrations()
        unet(**inputs)
    assert module_state.registrations() == seen


# --------------------------------------------------------------------------- patch / unpatch / options
def test_unpatch_restores_original_methods():
    unet, _ = make_unet("sd15")
    vae = make_vae()
    assert "forward" not in unet.__dict__
    dda.patch(unet, cuda_graph=True)
    dda.patch(vae, cuda_graph=True)
    assert isinstance(unet.forward, GraphedCallable)
    assert isinstance(vae.decode, GraphedCallable) and isinstance(vae.encode, GraphedCallable)
    assert unet.forward.fn.__func__ is UNet2DConditionModel.forward
    report = dda.unpatch(unet)
    assert report.wrapped == ("UNet2DConditionModel.forward",)
    assert "forward" not in unet.__dict__
    assert unet.forward.__func__ is UNet2DConditionModel.forward
    assert set(dda.unpatch(vae).wrapped) == {"AutoencoderKL.decode", "AutoencoderKL.encode"}
    assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__
    assert vae.decode.__func__ is AutoencoderKL.decode


def test_unpatch_restores_a_previous_instance_attribute():
    unet, _ = make_unet("sd15")
    own = unet.forward  # e.g. a hook library's wrapper, set on the instance
    unet.forward = own
    dda.patch(unet, cuda_graph=True)
    assert unet.__dict__["forward"] is not own
    assert dda.patch(unet, cuda_graph=True).wrapped == ("UNet2DConditionModel.forward (already wrapped)",)
    dda.unpatch(unet)
    assert unet.__dict__["forward"] is own


def test_pipeline_components_wrapped():
    from deepspeed_diffusers_attn.pipeline import build_sd15_pipeline

    pipe = build_sd15_pipeline(scaled=True)
    report = dda.patch(pipe, cuda_graph=True, max_graphs=3)
    assert report.wrapped == ("unet.forward", "vae.decode", "vae.encode")
    assert "wrapped (CUDA graph / channels-last): unet.forward" in str(report)
    assert pipe.unet.forward.max_graphs == 3 and pipe.vae.decode.ignored_args == ("generator",)
    assert pipe.unet.forward.tensor_scalars == ("timestep",)
    assert dda.unpatch(pipe).wrapped == ("unet.forward", "vae.decode", "vae.encode")
    assert not graphs.graphed_methods(pipe.unet) and not graphs.graphed_methods(pipe.vae)


def test_channels_last_converts_and_restores():
    unet, inputs = make_unet("sd15")
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = unet(**inputs).sample
    dda.patch(unet, channels_last=True)  # no graphs: eager input conversion only, no warnings
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphFallbackWarning)
        with torch.no_grad():
            out = unet(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    dda.unpatch(unet)
    assert all(p.is_contiguous() for p in unet.parameters())
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_options_validated():
    unet, _ = make_unet("sd15")
    with pytest.raises(TypeError, match="cuda_graph"):
        dda.patch(unet, cuda_graph=1)
    with pytest.raises(ValueError, match="max_graphs"):
        dda.patch(unet, cuda_graph=True, max_graphs=0)
    with pytest.raises(TypeError, match="clone_outputs"):
        dda.patch(unet, cuda_graph=True, clone_outputs="yes")
    with pytest.raises(TypeError):
        dda.patch(object(), cuda_graph=True)
    assert "forward" not in unet.__dict__  # nothing changed by a refused call
    with pytest.raises(ValueError, match="warmup"):
        GraphedCallable(scale_fn, warmup=0)
    graph_module_forward(unet)
    with pytest.raises(ValueError, match="already graphed"):
        graph_module_forward(unet)
    with pytest.raises(ValueError, match="no method"):
        graph_module_forward(unet, "nope")
    assert ungraph_module(unet) == ["forward"]


# --------------------------------------------------------------------------- GPU
def _report(name, out, ref):
    err = rel_err(out, ref)
    print(f"{name}: rel err {err:.3g}, bit-exact {torch.equal(out, ref)}")
    return err


@requires_cuda
@NO_FALLBACK
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "ours"])
@pytest.mark.parametrize("kind", list(UNETS))
def test_cuda_graphed_unet_matches_eager(kind, patched):
    unet, inputs = make_unet(kind, "cuda", torch.float16)
    if patched:
        dda.patch(unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
        wrapper = graph_module_forward(unet)
        outs = [unet(**inputs).sample for _ in range(3)]  # capture, then replays
    assert wrapper.stats["captures"] == 1 and wrapper.stats["replays"] == 3
    for out in outs:
        assert _report(f"{kind} patched={patched}", out, ref) <= 2e-3


@requires_cuda
@NO_FALLBACK
def test_cuda_many_signatures_in_one_process():
    """Small, then larger (the attention workspace grows), then small again; CFG on/off,
    prompt lengths, timestep as python int / float / 0-d tensor; max_graphs=4 evicts."""
    unet, _ = make_unet("sd15", "cuda", torch.float16)
    config = scaled_down(SD15_UNET)
    dda.patch(unet, cuda_graph=True, max_graphs=4)
    wrapper = unet.forward
    cases = [  # (batch, latent size, prompt length, timestep); signatures A B C D A E C B
        (2, 16, 77, 10), (1, 16, 77, 500), (2, 32, 77, torch.tensor(700, device="cuda")), (2, 24, 20, 3.5),
        (2, 16, 77, 900),  # A replayed after C grew the capture stream's attention workspace
        (4, 16, 154, 999),  # E evicts B (least recently used)
        (2, 32, 77, torch.tensor(1, device="cuda")), (1, 16, 77, 20),  # C replayed; B recaptured, evicts D
    ]
    with torch.no_grad():
        for i, (batch, size, seq, t) in enumerate(cases):
            inputs = unet_inputs(config, "sd15", "cuda", torch.float16, batch, size, seq, seed=10 + i)
            inputs["timestep"] = t
            ref = wrapper.fn(**inputs).sample
            out = unet(**inputs).sample
            assert out.shape == (batch, 4, size, size)
            assert _report(f"case {i} {(batch, size, seq, t)}", out, ref) <= 2e-3
    assert wrapper.num_graphs == 4
    assert wrapper.stats["captures"] == 6 and wrapper.stats["evictions"] == 2
    assert wrapper.stats["replays"] == len(cases)


@requires_cuda
@NO_FALLBACK
def test_cuda_outputs_kept_across_replays_and_return_dict():
    unet, inputs = make_unet("sdxl", "cuda", torch.float16)
    dda.patch(unet, cuda_graph=True)
    other = unet_inputs(scaled_down(SDXL_UNET), "sdxl", "cuda", torch.float16, 2, 16, 77, seed=5)
    with torch.no_grad():
        ref1, ref2 = unet.forward.fn(**inputs).sample, unet.forward.fn(**other).sample
        out1 = unet(**inputs)
        kept = out1.sample.clone()
        out2 = unet(**other, return_dict=False)
        out3 = unet(**inputs, return_dict=False)
        unet(**other)
    assert isinstance(out1, UNet2DConditionOutput) and isinstance(out2, tuple) and len(out2) == 1
    assert torch.equal(out1.sample, kept)  # not overwritten by later replays
    assert out1.sample.data_ptr() != out3[0].data_ptr()
    assert _report("return_dict=True", out1.sample, ref1) <= 2e-3
    assert _report("return_dict=False", out2[0], ref2) <= 2e-3
    assert unet.forward.num_graphs == 2  # inputs and other have the same shapes: one graph per return_dict
    assert unet.forward.stats["captures"] == 2


@requires_cuda
@NO_FALLBACK
def test_cuda_vae_decode_encode():
    vae = make_vae("cuda", torch.float16)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 16, 16, generator=gen).cuda().half()
    image = torch.randn(1, 3, 64, 64, generator=gen).cuda().half()
    dda.patch(vae)
    with torch.no_grad():
        ref_dec = vae.decode(z).sample
        ref_mean = vae.encode(image).latent_dist.mean
    dda.patch(vae, cuda_graph=True)
    with torch.no_grad():
        for _ in range(2):
            dec = vae.decode(z, return_dict=False, generator=torch.Generator())[0]
            mean = vae.encode(image).latent_dist.mean
    assert _report("vae.decode", dec, ref_dec) <= 2e-3
    assert _report("vae.encode", mean, ref_mean) <= 2e-3
    assert vae.decode.stats["replays"] == 2 and vae.encode.stats["replays"] == 2


@requires_cuda
@NO_FALLBACK
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "ours"])
def test_cuda_channels_last_graph(patched):
    unet, inputs = make_unet("sd15", "cuda", torch.float16)
    with torch.no_grad():
        ref = unet(**inputs).sample
        if patched:
            dda.patch(unet, cuda_graph=True, channels_last=True)
        else:
            graph_module_forward(unet, channels_last=True)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        unet(**inputs)  # capture
        out = unet(**inputs).sample  # replay
    assert _report(f"channels_last patched={patched}", out, ref) <= 1e-2
    if patched:
        dda.unpatch(unet)
    else:
        ungraph_module(unet)
    assert unet.conv_in.weight.is_contiguous()


@requires_cuda
@NO_FALLBACK
def test_cuda_pipeline_images_match_eager():
    from deepspeed_diffusers_attn.pipeline import build_sd15_pipeline

    pipe = build_sd15_pipeline(scaled=True, seed=2).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a photo of a cat", num_inference_steps=4, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    dda.patch(pipe)
    eager = generate()
    report = dda.patch(pipe, cuda_graph=True)
    assert report.wrapped == ("unet.forward", "vae.decode", "vae.encode")
    graphed = generate()
    again = generate()
    assert pipe.unet.forward.stats["captures"] == 1 and pipe.unet.forward.stats["replays"] == 8
    assert pipe.vae.decode.stats["captures"] == 1 and pipe.vae.decode.stats["replays"] == 2
    diff = abs(graphed - eager).max()
    print(f"pipeline: max pixel diff {diff:.3g}, bit-exact {(graphed == eager).all()}")
    assert diff <= 5e-3
    assert (graphed == again).all()
    dda.unpatch(pipe)
    assert "forward" not in pipe.unet.__dict__


@requires_cuda
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "ours"])
def test_cuda_graph_after_set_adapters_equals_eager(patched):
    """SDXL with two PEFT adapters under cuda_graph=True: after each set_adapters, the graph
    replay equals eager. Stock PEFT layers capture a graph per adapter state; ours replay one
    graph that reads the adapter factors from a fixed buffer."""
    pytest.importorskip("peft")
    unet, inputs = make_unet("sdxl", "cuda", torch.float16)
    add_lora_adapters(unet, rank=8)
    unet.set_adapters(["a", "b"], weights=[1.0, 1.0])
    if patched:
        dda.patch(unet)
    with torch.no_grad():
        wrapper = graph_module_forward(unet)
        for _ in range(2):
            unet(**inputs)
        for names, weights in ((["a"], [1.0]), (["a", "b"], [0.5, 1.0]), (["a", "b"], [1.0, 1.0])):
            unet.set_adapters(names, weights=weights)
            eager = wrapper.fn(**inputs).sample
            graphed = unet(**inputs).sample
            assert _report(f"set_adapters({names}, {weights})", graphed, eager) <= 2e-3
    # stock: the last state was captured first, and replays; ours: the first graph only
    assert wrapper.stats["captures"] == (1 if patched else 3)


class _UNetSample(nn.Module):
    """unet(sample, timestep, context) -> the sample tensor: the tensor-only callable
    torch.cuda.make_graphed_callables takes."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context, return_dict=False)[0]


@requires_cuda
def test_cuda_pytorch_graph_recipe_on_a_patched_unet():
    """torch.cuda.graph as PyTorch's docs show it: warm-up on a side stream, then capture on
    the graph's own stream (where no attention workspace exists)."""
    unet, inputs = make_unet("sd15", "cuda", torch.float16)
    dda.patch(unet)
    static = {k: v.clone() for k, v in inputs.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            unet(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = unet(**static).sample
    for seed in (3, 4):
        fresh = unet_inputs(unet.config, "sd15", "cuda", torch.float16, 2, unet.config.sample_size, 77, seed=seed)
        for k in ("sample", "encoder_hidden_states"):
            static[k].copy_(fresh[k])
        graph.replay()
        with torch.no_grad():
            eager = unet(**fresh).sample
        assert _report(f"torch.cuda.graph recipe, seed {seed}", static_out, eager) <= 2e-3


@requires_cuda
def test_cuda_make_graphed_callables_on_a_patched_unet():
    unet, inputs = make_unet("sd15", "cuda", torch.float16)
    dda.patch(unet)
    unet.requires_grad_(False)  # inference: the fused attention has no backward
    module = _UNetSample(unet)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    graphed = torch.cuda.make_graphed_callables(module, args)
    fresh = unet_inputs(unet.config, "sd15", "cuda", torch.float16, 2, unet.config.sample_size, 77, seed=5)
    fresh_args = (fresh["sample"], fresh["timestep"], fresh["encoder_hidden_states"])
    with torch.no_grad():
        out = graphed(*fresh_args)
        eager = module(*fresh_args)
    assert _report("make_graphed_callables", out, eager) <= 2e-3


@requires_cuda
def test_cuda_patch_then_torch_compile_reduce_overhead():
    unet, inputs = make_unet("sd15", "cuda", torch.float16)
    dda.patch(unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
        compiled = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
        outs = [compiled(**inputs).sample.clone() for _ in range(3)]  # cudagraph trees record on run 2-3
    for out in outs:
        assert _report("patch + torch.compile(reduce-overhead)", out, ref) <= 1e-2
