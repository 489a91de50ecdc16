"""CFG-parallel (:mod:`deepspeed_diffusers_attn.parallel`) on the CPU: two gloo ranks.

One spawn of two worker processes runs every scenario in order on a scaled-down SD1.5 UNet
(and an SDXL-shaped one), seeded identically on both ranks, with a [2 uncond; 2 cond] batch.
Each worker computes the single-process reference itself (the unwrapped model on all 4 rows),
then the cfg-parallel call, and saves both to a file; the tests assert in the parent.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn.configs import SD15_UNET, SDXL_UNET, scaled_down, sdxl_added_cond_shapes
from deepspeed_diffusers_attn.parallel import CFGParallel, cfg_parallel, uncfg_parallel

from conftest import gloo_rank, raised, spawn_ranks

WORLD = 2
TOL = 2e-5  # fp32: a GEMM over 2 rows may round differently from one over 4 (1.6e-6 seen)
JOIN_S = 120
STUCK_S = 8  # a hang fails the test instead of blocking the suite

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


class Boom(RuntimeError):
    """The failure injected on rank 1."""


def make_unet(kind: str, batch: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = scaled_down({"sd15": SD15_UNET, "sdxl": SDXL_UNET}[kind])
    unet = UNet2DConditionModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    inputs = {"sample": torch.randn(batch, 4, size, size, generator=gen),
              "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=gen)}
    if kind == "sdxl":
        inputs["timestep"] = torch.tensor(500)  # 0-d: passed to both ranks as is
        inputs["added_cond_kwargs"] = {k: torch.randn(s, generator=gen)
                                       for k, s in sdxl_added_cond_shapes(config, batch).items()}
    else:
        inputs["timestep"] = torch.arange(batch) * 100 + 10  # [N]: sliced
    return unet, inputs


def _scenarios(rank: int, results: dict) -> None:
    unet, inputs = make_unet("sd15")
    with torch.no_grad():
        # A group of one rank: the wrapper calls straight through.
        own = [dist.new_group([r], backend="gloo") for r in range(WORLD)][rank]
        ref = unet(**inputs).sample
        cfg_parallel(unet, group=own)
        results["w1"] = (unet(**inputs).sample, ref)
        uncfg_parallel(unet)

        wrapper = cfg_parallel(unet)
        results["wrapper"] = (type(wrapper).__name__, isinstance(unet.__dict__.get("forward"), CFGParallel))
        results["stock"] = (unet(**inputs).sample, ref)
        # Each half run alone, in one process: the gathered output must be these rows exactly.
        halves = [wrapper.fn(**{k: v[i:i + 2] for k, v in inputs.items()}).sample for i in (0, 2)]
        results["halves"] = (results["stock"][0], torch.cat(halves))
        tup = unet(**inputs, return_dict=False)
        results["tuple"] = (type(tup).__name__, len(tup), tup[0], ref)

        odd = {k: v[:3] for k, v in inputs.items()}
        results["odd"] = raised(lambda: unet(**odd))

        if rank == 1:
            def fail(*args, **kwargs):
                raise Boom("injected on rank 1")
            unet.conv_in.forward = fail  # inside the local call, so after the batch split
        results["fail"] = raised(lambda: unet(**inputs))
        unet.conv_in.__dict__.pop("forward", None)
        results["after_fail"] = (unet(**inputs).sample, ref)  # the group is still usable

        results["uncfg"] = (uncfg_parallel(unet), "forward" in unet.__dict__, uncfg_parallel(unet))
        results["double"] = raised(lambda: (cfg_parallel(unet), cfg_parallel(unet)))
        uncfg_parallel(unet)

        dda.patch(unet)
        ref = unet(**inputs).sample
        cfg_parallel(unet)
        results["patched"] = (unet(**inputs).sample, ref)
        uncfg_parallel(unet)

        # Around an (eager, channels-last) GraphedCallable: its output layout is kept.
        from deepspeed_diffusers_attn.graphs import GraphedCallable, graph_module_forward, ungraph_module
        graph_module_forward(unet, cuda_graph=False, channels_last=True)
        ref = unet(**inputs).sample
        cfg_parallel(unet)
        out = unet(**inputs).sample
        uncfg_parallel(unet)
        results["graphed"] = (out, ref, out.is_contiguous(memory_format=torch.channels_last),
                              ref.is_contiguous(memory_format=torch.channels_last),
                              isinstance(unet.__dict__.get("forward"), GraphedCallable))
        ungraph_module(unet)

        unet, inputs = make_unet("sdxl")
        ref = unet(**inputs).sample
        cfg_parallel(unet)
        results["sdxl"] = (unet(**inputs).sample, ref)


def _worker(rank: int, init: str, out_dir: str) -> None:
    gloo_rank(rank, init, out_dir, WORLD, _scenarios)


def _stuck_rank_worker(rank: int, init: str, out_dir: str) -> None:
    """Rank 1 hangs (sleeps, then exits) without calling; rank 0's call must raise at the
    wrapper's 3 s timeout, not when rank 1's exit resets the connection."""
    import time

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    layer = torch.nn.Linear(3, 3)
    cfg_parallel(layer, timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        time.sleep(STUCK_S)
        os._exit(0)
    start = time.perf_counter()
    kind, message = raised(lambda: layer(torch.ones(4, 3)))
    torch.save({"raised": kind, "message": message, "seconds": time.perf_counter() - start},
               os.path.join(out_dir, "rank0.pt"))
    os._exit(0)  # the group is broken: skip destroy_process_group


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results (a dict per rank), from one spawn of two gloo workers."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("cfg_parallel"), WORLD, JOIN_S)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape == (4, 4, 16, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["stock", "after_fail", "patched", "sdxl", "w1"])
def test_matches_single_process(ranks, case):
    for res in ranks:
        _close(*res[case])


def test_gather_is_exact(ranks):
    for res in ranks:
        out, halves = res["halves"]
        assert torch.equal(out, halves)


def test_return_dict_false_and_wrapper(ranks):
    for res in ranks:
        name, length, out, ref = res["tuple"]
        assert (name, length) == ("tuple", 1)
        _close(out, ref)
        assert res["wrapper"] == ("CFGParallel", True)


def test_around_graphed_callable_keeps_channels_last(ranks):
    for res in ranks:
        out, ref, out_cl, ref_cl, restored = res["graphed"]
        _close(out, ref)
        assert out_cl and ref_cl
        assert restored  # uncfg_parallel put the GraphedCallable back


def test_batch_not_divisible_raises_on_every_rank(ranks):
    for res in ranks:
        kind, message = res["odd"]
        assert kind == "ValueError"
        assert "N=3" in message and "W=2" in message


def test_failing_rank_fails_every_rank(ranks):
    assert ranks[1]["fail"] == ("Boom", "injected on rank 1")
    kind, message = ranks[0]["fail"]
    assert kind == "RuntimeError"
    assert "rank 1 failed" in message and "Boom: injected on rank 1" in message


def test_uncfg_parallel_restores(ranks):
    for res in ranks:
        assert res["uncfg"] == (True, False, False)
        kind, message = res["double"]
        assert kind == "ValueError" and "already cfg-parallel" in message


def test_needs_initialized_process_group():
    assert not dist.is_initialized()
    unet = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        cfg_parallel(unet)
    assert "forward" not in unet.__dict__


def test_stuck_rank_times_out(tmp_path):
    (res,) = spawn_ranks(_stuck_rank_worker, tmp_path, WORLD, JOIN_S, every_rank=False)
    assert res["raised"], "rank 0 returned although rank 1 never called"
    assert 2.5 < res["seconds"] < STUCK_S - 2, res


def test_graph_wrappers_never_sit_above_or_come_off_below_cfg_parallel(tmp_path):
    """A graph must not capture the collectives, and unpatch / ungraph_module must not pull the
    graph wrapper out from under a cfg-parallel one: both raise, naming uncfg_parallel, and
    unpatch changes nothing before it raises (one-rank group, in this process)."""
    from deepspeed_diffusers_attn.graphs import graph_module_forward, ungraph_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        unet, inputs = make_unet("sd15", batch=2)
        dda.patch(unet, channels_last=True)  # a graph-style wrapper (no CUDA graphs on the CPU)
        below = unet.__dict__["forward"]
        cfg_parallel(unet)
        with pytest.raises(ValueError, match="uncfg_parallel"):
            graph_module_forward(unet)
        with pytest.raises(ValueError, match="uncfg_parallel"):
            ungraph_module(unet)
        with pytest.raises(ValueError, match="uncfg_parallel"):
            dda.unpatch(unet)
        assert unet.__dict__["forward"].fn is below and any(
            type(m).__name__ == "PatchedAttention" for m in unet.modules()), "nothing was undone"
        with torch.no_grad():
            unet(**inputs)  # W == 1: straight through
        assert uncfg_parallel(unet)
        assert unet.__dict__["forward"] is below
        assert dda.unpatch(unet).wrapped
    finally:
        dist.destroy_process_group()
