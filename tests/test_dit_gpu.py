"""patch() on SD3-medium, Flux.1-dev and Wan2.1-T2V-1.3B transformers at their real widths, on a CUDA device.

Each transformer is built from its real config (deepspeed_diffusers_attn.configs) with only a
few blocks, but every width, head count, head dim and token count is the real one:

  sd3   2 joint blocks (a full one and the last, context_pre_only, one), 24 heads x 64,
        1024x1024: 4096 image + 333 text tokens, B=2 (the pipeline's CFG batch)
  flux  1 double-stream + 2 single-stream blocks, 24 heads x 128, 1024x1024: 4096 image + 512
        text tokens, B=1 (guidance-distilled: no CFG batch)
  wan   2 blocks, 12 heads x 128, 480x832 with 17 frames instead of 81: latent 5x60x104 = 7800
        tokens (81 frames would be 32760, whose float64 scores would need 100+ GB), 512 text
        tokens, B=2 (the pipeline calls B=1 twice per step; B=2 also checks batch strides)

and run three ways on the same seeded inputs: stock diffusers in bfloat16, patched in bfloat16,
and stock in float64 (the reference). The patched error against float64 must be at most twice
the stock error plus bfloat16's unit roundoff (relative L2 error). Then the same model patched
with ``cuda_graph=True`` must give the eager patched output: a graph replays the kernels the
eager call ran, so the result is normally bit-identical; cuBLAS may pick another algorithm for
the graph pool's addresses, so bfloat16 rounding noise is allowed (GRAPH_TOLERANCE).

Weights and inputs are rounded once to bfloat16 values, so the float64 reference computes with
the very numbers the bfloat16 runs read and the errors measure arithmetic, not weight rounding.
Random attention is sharpened (QK_GAIN) so that softmax errors are not averaged away.

Run with ``pytest -s -m cuda tests/test_dit_gpu.py`` to see the numbers; with
``DDA_RESULTS_DIR`` set they are also written to ``$DDA_RESULTS_DIR/test_dit_gpu.json``.
About a minute on an H200; peak GPU memory about 40 GB (Wan's float64 attention scores).
If patch() serves none of a model's attention modules, the parity test records the numbers
and skips, saying so (nothing of ours ran, so there is nothing to bound).
"""
from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import adapters
from deepspeed_diffusers_attn.configs import with_layers
from deepspeed_diffusers_attn.dit_example import MODELS, build_model, cast_model, transformer_inputs
from deepspeed_diffusers_attn.graphs import GraphFallbackWarning

from conftest import requires_cuda, record_result

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"
DTYPE = torch.bfloat16
# key: (blocks of each kind, batch, frames)
CASES = {"sd3": (2, 2, None), "flux": (1, 1, None), "wan": (2, 2, 17)}
FACTOR = 2.0
FLOOR = 2.0**-8  # bfloat16's unit roundoff: rounding the output alone costs this much
# Score sharpening. SD3 has no q/k norm: to_q and to_k (and the text stream's) weights times 2.5
# take the score std from ~0.3 to ~2. Flux and Wan RMS-normalise q and k (score std ~1 for random
# directions): their norm weights times 1.5 give ~2.
QK_GAIN = {"projection": 2.5, "norm": 1.5}
GRAPH_TOLERANCE = 1e-2  # max |graph - eager| / max |eager|: a few bfloat16 ulps


@pytest.fixture(autouse=True)
def _strict_math():
    """No TF32 and no reduced-precision reductions while a test runs; free the GPU after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    matmul.allow_bf16_reduced_precision_reduction = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = saved
    gc.collect()
    torch.cuda.empty_cache()


def record(name: str, values: dict) -> None:
    """Print ``values`` and keep them in test_dit_gpu.json (see conftest.record_result)."""
    record_result("test_dit_gpu", name, values)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


@torch.no_grad()
def sharpen_and_round(model: nn.Module) -> None:
    """Scale every attention's q/k (QK_GAIN), then round all floating parameters and buffers to
    bfloat16 values (kept in their float32 storage)."""
    for m in model.modules():
        if not (isinstance(getattr(m, "to_q", None), nn.Linear) and isinstance(getattr(m, "to_k", None), nn.Linear)):
            continue
        norms = [getattr(m, n, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
        norms = [n for n in norms if getattr(n, "weight", None) is not None]
        if norms:
            for n in norms:
                n.weight.mul_(QK_GAIN["norm"])
        else:
            for n in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                if isinstance(getattr(m, n, None), nn.Linear):
                    getattr(m, n).weight.mul_(QK_GAIN["projection"])
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(DTYPE).to(t.dtype))


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def build_case(key: str, config: dict | None = None, height: int | None = None, width: int | None = None,
               reference: bool = True):
    """(name, bfloat16 model, float64 reference model or None, bfloat16 inputs) for one CASES entry
    (``config`` / ``height`` / ``width`` replace the real ones, for a scaled-down check)."""
    spec = MODELS[key]
    blocks, batch, frames = CASES[key]
    config = config or with_layers(spec.transformer, blocks)
    height, width = height or spec.height, width or spec.width
    model64 = build_model(config, device=DEVICE, dtype=torch.float32, seed=0)
    sharpen_and_round(model64)
    ours = cast_model(copy.deepcopy(model64) if reference else model64, DTYPE)
    model64 = model64.double() if reference else None
    inputs = transformer_inputs(spec, config, batch=batch, height=height, width=width, frames=frames,
                                device=DEVICE, dtype=DTYPE)
    name = f"{key}_{blocks}blocks_b{batch}_{spec.image_tokens(config, height, width, frames)}tokens"
    return name, ours, model64, inputs


def served(report) -> int:
    """How many attention modules run on our kernels (patched stand-ins or bridged modules)."""
    counts = report.summary()
    return counts.get("patched", 0) + counts.get("bridged", 0)


@pytest.mark.parametrize("key", list(CASES))
def test_dit_parity_against_float64(key):
    name, model, reference, inputs = build_case(key)
    with torch.no_grad():
        ref = reference(**cast_inputs(inputs, torch.float64))[0]
        del reference
        gc.collect()
        torch.cuda.empty_cache()
        stock = model(**inputs)[0]
        report = dda.patch(model)
        patched = model(**inputs)[0]
    attention = [m for m in model.modules() if adapters.adapter_for(m) is not None or adapters.is_stand_in(m)]
    assert len(report) == len(attention) > 0, str(report)  # every attention module has a row
    assert torch.isfinite(stock).all(), f"{key}: stock bfloat16 output is not finite; the case is unusable"
    assert torch.isfinite(patched).all(), f"{key}: patched bfloat16 output is not finite"
    stock_err, ours_err = rel_l2(stock, ref), rel_l2(patched, ref)
    bound = FACTOR * stock_err + FLOOR
    record(name, {"rel_l2_patched_vs_fp64": ours_err, "rel_l2_stock_vs_fp64": stock_err,
                  "rel_l2_patched_vs_stock": rel_l2(patched, stock), "bound": bound,
                  "served": served(report), "report": report.summary()})
    assert dda.unpatch(model).summary()["restored"] == served(report)
    if served(report) == 0:
        pytest.skip(f"{key}: patch() served none of its {len(report)} attention modules, nothing to bound:\n{report}")
    assert ours_err <= bound, (f"{key}: patched rel L2 error {ours_err:.3e} > {FACTOR} x stock {stock_err:.3e} "
                               f"+ {FLOOR:.3e}\n{report}")


@pytest.mark.parametrize("key", list(CASES))
def test_dit_cuda_graph_equals_eager_patched(key):
    _, model, _, inputs = build_case(key, reference=False)
    with torch.no_grad():
        dda.patch(model)
        eager = model(**inputs)[0]
        dda.unpatch(model)
        report = dda.patch(model, cuda_graph=True)
        assert report.wrapped == (f"{type(model).__name__}.forward",), str(report)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphFallbackWarning)  # a silent eager fallback would prove nothing
            first = model(**inputs)[0]  # captured, then replayed
            again = model(**inputs)[0]  # replayed
        stats = dict(model.forward.stats)
    dda.unpatch(model)
    assert stats.get("captures") == 1 and stats.get("replays") == 2 and not stats.get("eager"), stats
    scale = eager.double().abs().max().item()
    diffs = [(out.double() - eager.double()).abs().max().item() / scale for out in (first, again)]
    record(f"{key}_cuda_graph", {"max_rel_diff_graph_vs_eager": max(diffs),
                                 "bit_exact": all(torch.equal(out, eager) for out in (first, again)),
                                 "served": served(report)})
    assert torch.equal(first, again)  # one graph, the same inputs: the same bits
    assert max(diffs) <= GRAPH_TOLERANCE, f"{key}: graphed vs eager patched {max(diffs):.3e}"
