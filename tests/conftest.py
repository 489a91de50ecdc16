"""Shared test helpers: seeding, a CUDA skip marker, seeded diffusers Attention blocks,
the upcast-reference error check, and spawned gloo ranks for the torch.distributed tests."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import deepspeed_diffusers_attn  # noqa: F401  (loads the extension: torch.ops.dda)
from deepspeed_diffusers_attn.attention import DeepSpeedDiffusersAttention
from deepspeed_diffusers_attn.workspace import release_workspaces

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from seed 0, layer id 0 and no workspace."""
    torch.manual_seed(0)
    DeepSpeedDiffusersAttention.reset_layer_ids()
    release_workspaces()
    yield
    release_workspaces()


def make_attention(
    query_dim: int,
    heads: int,
    dim_head: int,
    *,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
    processor=None,
    **kwargs,
):
    """A diffusers ``Attention`` in eval mode with seeded random weights.

    Every parameter is redrawn (biases and GroupNorm affine included, which default to
    constants), so a wrong bias or a missing norm affine shows up in the output.
    """
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim, heads=heads, dim_head=dim_head, processor=processor, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return attn.eval().to(device=device, dtype=dtype)


def as_dtype(t, dtype):
    """t cast to dtype if it is a floating tensor; other values unchanged."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.to(dtype)
    return t


def run_diffusers(attn, x, context=None, mask=None, dtype=None):
    """attn (a copy cast to ``dtype``, if given) on the inputs cast likewise."""
    if dtype is not None:
        attn = copy.deepcopy(attn).to(dtype)
        x, context, mask = (as_dtype(t, dtype) for t in (x, context, mask))
    with torch.no_grad():
        return attn(x, encoder_hidden_states=context, attention_mask=mask)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def assert_upcast_close(ours, attn, x, context=None, mask=None, same_dtype=None, factor=2.0, floor=1e-6):
    """Our error against a float64 run of ``attn`` is at most ``factor`` times diffusers'
    own error at ``same_dtype`` (default: ours' dtype), plus ``floor`` times the output's
    magnitude."""
    ref = run_diffusers(attn, x, context, mask, dtype=torch.float64)
    theirs = run_diffusers(attn, x, context, mask, dtype=same_dtype or ours.dtype)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all()
    ours_err, their_err = max_err(ours, ref), max_err(theirs, ref)
    bound = factor * their_err + floor * max(1.0, ref.abs().max().item())
    assert ours_err <= bound, f"error {ours_err:.3g} > {factor} x diffusers' {their_err:.3g} + floor"
    return ours_err, their_err


def record_result(file: str, name: str, values: dict) -> None:
    """Print ``values`` (shown with ``pytest -s``) and merge them under ``name`` into
    ``$DDA_RESULTS_DIR/<file>.json`` when that variable is set (the GPU runs keep their numbers)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in values.items()))
    folder = os.environ.get("DDA_RESULTS_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{file}.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results[name] = {**values, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


def fake_capture(log: list):
    """A capture function for the CPU: runs eagerly, and 'replays' by recomputing into the static output."""
    from deepspeed_diffusers_attn.graphs import map_tensors

    def capture(run, device):
        out = run()
        log.append(out)

        def replay():
            fresh = []
            map_tensors(run(), fresh.append)
            it = iter(fresh)
            map_tensors(out, lambda t: t.copy_(next(it)))

        return replay, out

    return capture


def raised(fn) -> tuple[str, str]:
    """(exception type name, message) of what ``fn()`` raised, ("", "") if nothing: a spawned
    rank's outcome, saved for the parent to assert."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "", ""


def gloo_rank(rank: int, init: str, out_dir: str, world: int, scenarios) -> None:
    """A spawned rank's body: join the gloo group (30 s timeout), run ``scenarios(rank,
    results)``, save ``results`` to ``out_dir/rank<rank>.pt`` (a crash as its traceback)."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict = {}
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        scenarios(rank, results)
    except Exception:  # noqa: BLE001  (reported to the parent)
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(target, out_dir, world: int, join_s: float, every_rank: bool = True) -> list:
    """Run ``target(rank, init, out_dir)`` on ``world`` spawned processes (a file rendezvous in
    ``out_dir``); fails if a rank is still running after ``join_s`` seconds, and with
    ``every_rank`` unless every rank saved results without a crash (:func:`gloo_rank`).
    Returns the results the ranks saved (``rank<r>.pt``), in rank order."""
    import torch.multiprocessing as mp

    init = f"file://{out_dir / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, init, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {join_s} s"
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False)
               for r in range(world) if (out_dir / f"rank{r}.pt").exists()]
    if every_rank:
        assert len(results) == world, f"{world - len(results)} ranks saved no results"
        for r, res in enumerate(results):
            assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results
