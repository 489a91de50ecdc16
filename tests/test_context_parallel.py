"""Context-parallel attention (:mod:`deepspeed_diffusers_attn.context_parallel`) on the CPU: two gloo ranks.

One spawn of two worker processes runs every scenario in order. Each rank builds the whole
q, k, v from the same seed, keeps its contiguous shard of the tokens, calls Ulysses / ring
attention, and saves its output rows with the same rows of the single-process result (our
attention on the whole sequence) and of a float64 reference; the tests assert in the parent.

Tolerance: the parallel output's error against float64 may be at most twice the
single-process fp32 error plus a floor of a few fp32 units (the ring merges fp32 partials in
another order; Ulysses runs the same attention on the same rows, so it is exact).
"""
from __future__ import annotations

import datetime
import importlib
import os

import pytest
import torch
import torch.distributed as dist

from deepspeed_diffusers_attn import context_parallel, ops
from deepspeed_diffusers_attn.context_parallel import ring_attention, ulysses_attention

from conftest import gloo_rank, raised, spawn_ranks

WORLD = 2
JOIN_S = 120
FLOOR = 4 * 2.0**-23

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


class Boom(RuntimeError):
    """The failure injected on rank 1."""


def shards(rank: int, B=2, Sq=37, Sk=37, H=4, D=16, seed=0, precision="exact"):
    """(q, k, v of this rank's tokens, the single-process output rows in ``precision``, the float64
    reference rows)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, WORLD * Sq, H, D, generator=gen)
    k = torch.randn(B, WORLD * Sk, H, D, generator=gen)
    v = torch.randn(B, WORLD * Sk, H, D, generator=gen)
    rows = slice(rank * Sq, (rank + 1) * Sq)
    single = ops.attention(q, k, v, precision=precision)[0][:, rows]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D ** 0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())[:, rows]
    keys = slice(rank * Sk, (rank + 1) * Sk)
    return (q[:, rows], k[:, keys], v[:, keys]), single, ref


def _scenarios(rank: int, results: dict) -> None:
    fns = {"ulysses": ulysses_attention, "ring": ring_attention}
    for label, fn in fns.items():
        (q, k, v), single, ref = shards(rank)
        results[f"{label}/equal"] = (fn(q, k, v), single, ref)
        (q, k, v), single, ref = shards(rank, Sq=37, Sk=20, seed=1)  # different query and key shards
        results[f"{label}/sq_ne_sk"] = (fn(q, k, v), single, ref)
        (q, k, v), single, ref = shards(rank, B=1, Sq=1, Sk=5, H=2, D=8, seed=2)
        results[f"{label}/tiny"] = (fn(q, k, v, check=False), single, ref)
        own = [dist.new_group([r], backend="gloo") for r in range(WORLD)][rank]
        (q, k, v), _, _ = shards(rank, seed=3)
        results[f"{label}/w1"] = (fn(q, k, v, group=own), ops.attention(q, k, v)[0])
        (q, k, v), single, ref = shards(rank, seed=8, precision="int8-qk")
        results[f"{label}/int8-qk"] = (fn(q, k, v, precision="int8-qk"), single, ref)

        (q, k, v), _, _ = shards(rank, Sq=37 - rank, seed=4)  # rank 1's shard is one token short
        results[f"{label}/uneven"] = raised(lambda: fn(q, k, v))

        (q, k, v), single, ref = shards(rank, seed=5)
        attention_ops = ("attention", "attention_out")  # every way the functions call the kernel
        if rank == 1:
            def boom(*args, **kwargs):
                raise Boom("injected on rank 1")
            real = {name: getattr(context_parallel.ops, name) for name in attention_ops}
            for name in attention_ops:
                setattr(context_parallel.ops, name, boom)
        try:
            results[f"{label}/fail"] = raised(lambda: fn(q, k, v, timeout=datetime.timedelta(seconds=20)))
        finally:
            if rank == 1:
                for name in attention_ops:
                    setattr(context_parallel.ops, name, real[name])
        results[f"{label}/after_fail"] = (fn(q, k, v), single, ref)  # the group is still usable

    (q, k, v), _, _ = shards(rank, seed=7)  # an allocation before the ring fails on rank 1
    real_stack = torch.stack
    if rank == 1:
        def failing_stack(*args, **kwargs):
            raise Boom("allocation on rank 1")
        torch.stack = failing_stack
    try:
        results["ring/alloc_fail"] = raised(lambda: ring_attention(q, k, v, timeout=datetime.timedelta(seconds=20)))
    finally:
        torch.stack = real_stack

    (q, k, v), single, ref = shards(rank, H=3, seed=6)
    results["ring/odd_heads"] = (ring_attention(q, k, v), single, ref)
    results["ulysses/odd_heads"] = raised(lambda: ulysses_attention(q, k, v))
    results["bad_shapes"] = raised(lambda: ring_attention(q, k[..., :8], v[..., :8]))


def _model_scenarios(rank: int, results: dict) -> None:
    """Scaled-down Wan and Flux transformers, patched (our stand-ins) or bridged (a forward hook
    keeps the stand-in away, so diffusers' processor calls our attention through the bridge),
    then context-parallel by diffusers' hooks: the output equals the stock model's on the
    whole input, which every rank computes itself."""
    import deepspeed_diffusers_attn as dda
    from deepspeed_diffusers_attn.adapters.dispatch_bridge import bridge_stats
    from deepspeed_diffusers_attn.configs import scaled_down
    from deepspeed_diffusers_attn.dit_example import MODELS, build_model, transformer_inputs

    try:  # the diffusers API context_parallel.enable needs
        importlib.import_module("diffusers.hooks.context_parallel")
        importlib.import_module("diffusers.models._modeling_parallel")
    except ImportError as e:
        results["models"] = f"diffusers has no context parallelism here: {e}"
        return
    for key in ("wan", "flux"):
        spec = MODELS[key]
        config = scaled_down(dict(spec.transformer))
        inputs = transformer_inputs(spec, config, batch=1, height=64, width=64, frames=5 if spec.frames else None,
                                    text_tokens=16)
        with torch.no_grad():
            ref = build_model(config)(**inputs)[0]
        for mode in ("ulysses", "ring"):
            for how in ("patched", "bridged", "parallel first"):
                model = build_model(config)
                if how == "bridged":
                    for m in model.modules():
                        if type(m).__name__ in ("WanAttention", "FluxAttention"):
                            m.register_forward_hook(lambda *a: None)
                if how == "parallel first":  # enable_parallelism, then patch
                    context_parallel.enable(model, mode)
                summary = dda.patch(model).summary()
                if how != "parallel first":
                    context_parallel.enable(model, mode)
                bridge_stats(reset=True)
                with torch.no_grad():
                    # diffusers gathers the output with an async functional collective: clone()
                    # waits for it; torch.save alone would write whatever the gather had
                    # written by then
                    out = model(**inputs)[0].clone()
                results[f"{key}/{mode}/{how}"] = (out, ref, summary, bridge_stats())


def _all_scenarios(rank: int, results: dict) -> None:
    _scenarios(rank, results)
    _model_scenarios(rank, results)


def _worker(rank: int, init: str, out_dir: str) -> None:
    gloo_rank(rank, init, out_dir, WORLD, _all_scenarios)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results (a dict per rank), from one spawn of two gloo workers."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("context_parallel"), WORLD, JOIN_S)


def _close(out, single, ref) -> None:
    assert out.shape == single.shape and out.dtype == single.dtype
    err_single = (single.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * err_single + FLOOR, f"error {err:.3g} vs single-process {err_single:.3g}"


@pytest.mark.parametrize("fn", ["ulysses", "ring"])
@pytest.mark.parametrize("case", ["equal", "sq_ne_sk", "tiny", "after_fail"])
def test_matches_single_process_and_float64(ranks, fn, case):
    for res in ranks:
        _close(*res[f"{fn}/{case}"])


def test_ulysses_is_the_single_process_attention_exactly(ranks):
    """Ulysses only moves data: each rank's heads run the same attention on the same rows."""
    for res in ranks:
        out, single, _ = res["ulysses/equal"]
        assert torch.equal(out, single)


def test_an_8_bit_precision_runs_on_every_rank(ranks):
    """Ulysses gives each rank whole heads: the single-process 8-bit result exactly. The ring
    smooths each K shard by its own mean and merges through the unsmoothed lse: as accurate as
    the single-process 8-bit attention."""
    for res in ranks:
        out, single, _ = res["ulysses/int8-qk"]
        assert torch.equal(out, single)
        _close(*res["ring/int8-qk"])


def test_ring_takes_head_counts_the_world_does_not_divide(ranks):
    for res in ranks:
        _close(*res["ring/odd_heads"])


@pytest.mark.parametrize("fn", ["ulysses", "ring"])
def test_a_world_of_one_calls_straight_through(ranks, fn):
    for res in ranks:
        out, direct = res[f"{fn}/w1"]
        assert torch.equal(out, direct)


def test_ulysses_refuses_heads_the_world_does_not_divide_on_every_rank(ranks):
    for r, res in enumerate(ranks):
        kind, message = res["ulysses/odd_heads"]
        if r == 0:  # every rank fails its own check: each re-raises its own
            assert kind == "ValueError"
        assert "3 heads do not split over 2 ranks" in message and "ring_attention" in message


@pytest.mark.parametrize("fn", ["ulysses", "ring"])
def test_uneven_shards_raise_on_every_rank_before_any_exchange(ranks, fn):
    for res in ranks:
        kind, message = res[f"{fn}/uneven"]
        assert kind == "ValueError" and "Sq 36..37" in message


def test_a_shard_that_does_not_fit_raises_on_every_rank(ranks):
    """Both ranks pass k with D = 8 against q's 16: each raises its own ValueError."""
    for res in ranks:
        kind, message = res["bad_shapes"]
        assert kind == "ValueError" and "differ in B, H or D" in message


def test_an_allocation_failing_before_the_exchange_raises_on_every_rank(ranks):
    assert ranks[1]["ring/alloc_fail"] == ("Boom", "allocation on rank 1")
    kind, message = ranks[0]["ring/alloc_fail"]
    assert kind == "RuntimeError" and "ring_attention: rank 1 failed: Boom: allocation on rank 1" in message


@pytest.mark.parametrize("fn", ["ulysses", "ring"])
def test_a_failing_rank_raises_on_every_rank(ranks, fn):
    kind0, message0 = ranks[0][f"{fn}/fail"]
    kind1, message1 = ranks[1][f"{fn}/fail"]
    assert (kind1, message1) == ("Boom", "injected on rank 1")
    assert kind0 == "RuntimeError" and f"{fn}_attention: rank 1 failed: Boom: injected on rank 1" in message0


@pytest.mark.parametrize("how", ["patched", "bridged", "parallel first"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("key", ["wan", "flux"])
def test_diffusers_context_parallel_runs_our_attention_and_equals_stock(ranks, key, mode, how):
    """diffusers' context-parallel hooks split the model's inputs and gather its output; our
    attention (stand-in or bridge) serves the sharded self-attention with Ulysses or ring."""
    if isinstance(ranks[0].get("models"), str):
        pytest.skip(ranks[0]["models"])
    for res in ranks:
        out, ref, summary, stats = res[f"{key}/{mode}/{how}"]
        assert summary.get("declined", 0) == 0 and summary.get(how.replace("parallel first", "patched"), 0) > 0, summary
        if how == "bridged":
            assert stats["served"] > 0 and not stats["fallbacks"], stats
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


class _Mesh:
    def get_group(self):
        return "the group"


def _cp(**fields):
    from types import SimpleNamespace

    base = dict(ring_degree=1, ulysses_degree=1, ulysses_anything=False, ring_anything=False,
                _ring_mesh=_Mesh(), _ulysses_mesh=_Mesh())
    return SimpleNamespace(context_parallel_config=SimpleNamespace(**{**base, **fields}))


def test_for_parallel_config_picks_ulysses_or_ring_and_refuses_the_rest():
    from types import SimpleNamespace

    from deepspeed_diffusers_attn.context_parallel import for_parallel_config

    assert for_parallel_config(None) is None
    assert for_parallel_config(SimpleNamespace(context_parallel_config=None)) is None  # tensor parallel only
    u = for_parallel_config(_cp(ulysses_degree=2))
    r = for_parallel_config(_cp(ring_degree=4))
    assert u.func is ulysses_attention and u.keywords == {"group": "the group"}
    assert r.func is ring_attention and r.keywords == {"group": "the group"}
    for fields, match in [(dict(ring_degree=2, ulysses_degree=2), "together"),
                          (dict(ulysses_degree=2, ulysses_anything=True), "uneven"),
                          (dict(ring_degree=2, _ring_mesh=None), "no device mesh")]:
        with pytest.raises(ValueError, match=match):
            for_parallel_config(_cp(**fields))


def test_a_context_parallel_config_we_do_not_run_declines_at_patch_time():
    """A processor carrying a config our attention does not run (ring and Ulysses together)
    is declined with that reason, not patched to compute on its shard alone."""
    import deepspeed_diffusers_attn as dda
    from deepspeed_diffusers_attn.configs import scaled_down
    from deepspeed_diffusers_attn.dit_example import MODELS, build_model

    model = build_model(scaled_down(dict(MODELS["wan"].transformer)))
    for m in model.modules():
        if type(m).__name__ == "WanAttention":
            m.processor._parallel_config = _cp(ring_degree=2, ulysses_degree=2)
    report = dda.patch(model)
    assert report.summary().get("declined", 0) == 4 and "together" in str(report)


def test_bench_parallel_dry_run(tmp_path):
    """benchmarks/bench_parallel.py under torchrun, two gloo ranks, tiny configs: every case runs
    and its parallel output matches the one-rank output."""
    import json
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--nproc-per-node", str(WORLD), "benchmarks/bench_parallel.py", "--dry-run",
                           "--cases", "flux,sdxl", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert [(r["case"], r["mode"]) for r in rows] == [("flux", "ulysses"), ("flux", "ring"), ("sdxl", "cfg")]
    for r in rows:
        assert "error" not in r and r["world"] == WORLD and r["rel_err"] < 1e-5, r


def _bench_rank(rank: int, init: str, out_dir: str) -> None:
    """A spawned rank running bench_parallel.main (dry run, flux) whose Ulysses copy fails on
    rank 1 only (context_parallel.enable raises there)."""
    import functools
    import sys

    results: dict = {}
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
        import bench_parallel

        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
        dist.init_process_group = functools.partial(dist.init_process_group, init_method=init, rank=rank,
                                                    world_size=WORLD)
        if rank == 1:
            real_enable = bench_parallel.context_parallel.enable

            def enable(model, mode):
                if mode == "ulysses":
                    raise Boom("injected on rank 1")
                return real_enable(model, mode)

            bench_parallel.context_parallel.enable = enable
        bench_parallel.main(["--dry-run", "--cases", "flux", "--timeout", "60",
                             "--out", os.path.join(out_dir, "bench")])
        results["done"] = True
    except Exception:  # noqa: BLE001  (reported to the parent)
        import traceback

        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_bench_parallel_failure_on_one_rank_is_every_ranks_row(tmp_path):
    """bench_parallel: a step that raises on one rank only becomes that row's error on every
    rank, and the next row runs on both (no rank left waiting in a collective)."""
    import json

    ranks = spawn_ranks(_bench_rank, tmp_path, WORLD, 240)
    assert all(r.get("done") for r in ranks)
    rows = json.load(open(tmp_path / "bench" / "results.json"))["rows"]
    assert [(r["case"], r["mode"]) for r in rows] == [("flux", "ulysses"), ("flux", "ring")]
    assert "rank 1 failed: Boom: injected on rank 1" in rows[0]["error"], rows[0]
    assert "error" not in rows[1] and rows[1]["rel_err"] < 1e-5, rows[1]
