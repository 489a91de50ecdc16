"""The model-wide factor pool (deepspeed_diffusers_attn.factor_pool): slices that never move,
host-staged writes that reach the device only at flush, one copy per switch for a whole model."""
from __future__ import annotations

import pytest
import torch

import deepspeed_diffusers_attn as dda
from deepspeed_diffusers_attn import factor_pool
from deepspeed_diffusers_attn.graphs import GraphedCallable

from conftest import fake_capture
from test_lora import CALLS, patched_modules, patched_with_stock_twin, rel, run, TOL

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _flushed():
    factor_pool.flush()
    yield
    factor_pool.flush()


def test_writes_reach_the_device_only_at_flush_and_slices_never_move():
    a, b = factor_pool.reserve(3, CPU), factor_pool.reserve(2, CPU)
    ptr = a.factors.data_ptr()
    assert (a.factors == 0).all(), "unwritten entries are zero"
    a.write([(0, 1.5), (1, 1.5), (2, 0.0)])
    b.write([(0, 0.25), (1, 0.25)])
    assert factor_pool.pending() and (a.factors == 0).all(), "staged, not yet copied"
    factor_pool.flush()
    assert not factor_pool.pending()
    assert a.factors.tolist() == [1.5, 1.5, 0.0]
    assert b.factors.tolist() == [0.25, 0.25]
    assert a.factors.data_ptr() == ptr
    a.write([(i, float("nan")) for i in range(3)])
    factor_pool.flush()
    assert a.factors.isnan().all()
    with pytest.raises(IndexError, match="3 entries given index 3"):
        a.write([(3, 1.0)])
    a.write([(1, 7.0)])  # only the entries given change
    factor_pool.flush()
    assert a.factors.isnan().tolist() == [True, False, True] and a.factors[1].item() == 7.0
    a.release(), b.release()


def test_a_chunk_is_freed_with_its_last_slice_once_another_is_open():
    big = factor_pool.reserve(factor_pool._CHUNK, CPU)  # fills a chunk
    first = big._chunk
    small = factor_pool.reserve(4, CPU)  # opens the next one
    assert small._chunk is not first and first in factor_pool._pools[CPU]
    big.write([(0, 2.0)])
    big.release()
    assert first not in factor_pool._pools[CPU], "no live slice left in a closed chunk"
    assert first not in factor_pool._dirty, "the freed chunk's pending write is dropped, not copied"
    factor_pool.flush()
    small.release()
    assert small._chunk is None


def _count_copies(monkeypatch) -> list:
    copies = []
    real = factor_pool._Chunk.flush

    def counted(chunk):
        copies.append(chunk)
        real(chunk)

    monkeypatch.setattr(factor_pool._Chunk, "flush", counted)
    return copies


def test_a_switch_under_graphs_is_one_copy_for_the_whole_model(monkeypatch):
    unet, stock, inputs = patched_with_stock_twin()
    modules = patched_modules(unet)
    assert len(modules) > 2
    log = []
    graphed = GraphedCallable(unet, module=unet, capture=fake_capture(log))
    run(graphed, inputs)
    copies = _count_copies(monkeypatch)
    for call in ("set_adapters one", "set_adapters both", "disable_lora", "enable_lora"):
        CALLS[call](stock)
        CALLS[call](unet)
        before = len(copies)
        assert rel(run(graphed, inputs), run(stock, inputs)) <= TOL, call
        assert len(copies) - before == 1, f"{call}: every module's factors in one copy"
    assert len({id(m.lora_bank._slice._chunk) for m in modules}) == 1
    assert graphed.stats["replays"] >= 4 and graphed.stats["captures"] == 1, graphed.stats


def test_eager_switch_copies_before_each_module_reads(monkeypatch):
    """Without graphs each module stages and copies its own factors before its kernels run."""
    unet, stock, inputs = patched_with_stock_twin()
    run(unet, inputs)
    copies = _count_copies(monkeypatch)
    CALLS["set_adapters one"](stock)
    CALLS["set_adapters one"](unet)
    assert rel(run(unet, inputs), run(stock, inputs)) <= TOL
    assert len(copies) == len(patched_modules(unet))
    copies.clear()
    run(unet, inputs)
    assert copies == [], "nothing changed: nothing copied"


def test_unpatch_releases_the_slices():
    unet, _, inputs = patched_with_stock_twin()
    run(unet, inputs)
    chunk = patched_modules(unet)[0].lora_bank._slice._chunk
    live = chunk.live
    n = len(patched_modules(unet))
    dda.unpatch(unet)
    assert chunk.live == live - n


def test_changes_during_a_capture_raise_before_touching_peft(monkeypatch):
    """A state change seen while a CUDA graph is being captured raises, and before PEFT's
    unmerge of a disabled merged layer (which a capture would only record, leaving the
    weights merged while PEFT believes them unmerged)."""
    unet, _, inputs = patched_with_stock_twin()
    run(unet, inputs)
    unet.fuse_lora(adapter_names=["a"])
    run(unet, inputs)
    unet.disable_lora()  # disabled and merged: the next state read unmerges
    layers = [m for m in unet.modules() if hasattr(m, "merged_adapters") and hasattr(m, "lora_A")]
    merged = [list(m.merged_adapters) for m in layers]
    assert any(merged)
    monkeypatch.setattr(factor_pool, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
        run(unet, inputs)
    assert [list(m.merged_adapters) for m in layers] == merged, "PEFT's state was left as it was"
    monkeypatch.undo()
    factor_pool.flush()
    run(unet, inputs)
    assert not any(m.merged_adapters for m in layers)


def test_a_pending_write_during_a_capture_raises(monkeypatch):
    piece = factor_pool.reserve(2, CPU)
    piece.write([(0, 1.0), (1, 1.0)])
    monkeypatch.setattr(factor_pool, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
        factor_pool.flush()
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
        piece.write([(0, 2.0)])
    monkeypatch.undo()
    factor_pool.flush()
    assert piece.factors.tolist() == [1.0, 1.0]
    piece.release()
