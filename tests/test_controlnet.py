"""ControlNet pipelines: patched in full (the ControlNet's attention too), graphed with the
residual lists in the UNet's key, one or several ControlNets.

CPU (fp32): images of a scaled-down SD1.5 ControlNet pipeline, patched vs stock, and an
exact restore. GPU (skipped without CUDA): the same pipeline in fp16 with
``cuda_graph=True``, graphed vs eager, for one and for two ControlNets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.pipeline import build_sd15_pipeline

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def controlnet_pipeline(n_nets: int = 1):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = build_sd15_pipeline(scaled=True, seed=3)
    torch.manual_seed(4)
    nets = []
    for _ in range(n_nets):
        net = ControlNetModel.from_unet(base.unet).eval()
        with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weights
            for p in net.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        nets.append(net)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=nets[0] if n_nets == 1 else nets, scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, n_nets: int = 1, size: int = 64, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand(1, 3, size, size, generator=gen)
    images = cond if n_nets == 1 else [cond, cond.flip(-1)]
    scales = 1.0 if n_nets == 1 else [1.0, 0.5]
    return pipe("a photo of a cat", image=images, num_inference_steps=steps, height=size, width=size,
                controlnet_conditioning_scale=scales, output_type="np",
                generator=torch.Generator().manual_seed(1)).images


@pytest.mark.parametrize("n_nets", [1, 2])
def test_controlnet_pipeline_patched_in_full_equals_stock(n_nets):
    pipe = controlnet_pipeline(n_nets)
    stock = generate(pipe, n_nets)
    report = dda.patch(pipe)
    names = report.names("patched")
    assert report.summary()["declined"] == 0
    assert any(n.startswith("controlnet.") for n in names) and any(n.startswith("unet.") for n in names)
    ours = generate(pipe, n_nets)
    assert np.abs(ours - stock).max() <= 1e-4
    dda.unpatch(pipe)
    assert np.array_equal(generate(pipe, n_nets), stock)


def test_controlnet_forward_is_graph_wrapped_and_unwrapped():
    pipe = controlnet_pipeline(2)
    report = dda.patch(pipe, cuda_graph=True)
    assert "controlnet.nets.0.forward" in report.wrapped and "controlnet.nets.1.forward" in report.wrapped
    assert "forward" in vars(pipe.controlnet.nets[0])
    dda.unpatch(pipe)
    assert "forward" not in vars(pipe.controlnet.nets[0])


@requires_cuda
@pytest.mark.parametrize("n_nets", [1, 2])
def test_cuda_controlnet_pipeline_graphed_equals_eager(n_nets):
    pipe = controlnet_pipeline(n_nets).to("cuda", torch.float16)
    dda.patch(pipe)
    eager = generate(pipe, n_nets)
    dda.patch(pipe, cuda_graph=True)
    graphed = generate(pipe, n_nets)
    again = generate(pipe, n_nets)
    stats = pipe.unet.forward.stats
    assert stats["captures"] == 1 and stats["replays"] == 6, stats
    diff = np.abs(graphed - eager).max()
    print(f"controlnet x{n_nets}: graphed vs eager max pixel diff {diff:.3g}")
    assert diff <= 5e-3 and np.array_equal(graphed, again)
