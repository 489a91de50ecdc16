"""Fixed-address LoRA weights of one patched attention module, as low-rank groups.

A stand-in's projections read three inputs: the normalised input (Q, and K/V in
self-attention), the context (K/V in cross-attention) and the attention output (the
output projection). For each input, every loaded PEFT adapter's A matrix of those
projections is a block of rows of one ``[R, in]`` tensor, and PEFT's
``lora_A[name].weight`` becomes a view of its block. So:

* one GEMM computes ``x A^T`` for every adapter of Q, K and V at once, and one kernel adds
  every adapter's B (PEFT's own tensor) times its columns of that result to its projection's
  output in the fused result (:class:`~deepspeed_diffusers_attn.attention.LowRankGroup`,
  :func:`~deepspeed_diffusers_attn.ops.low_rank_accumulate`);
* any write to the adapter weights, including PEFT's hotswap (``.data.copy_``, which no
  version counter sees), is what the kernels read;
* each adapter's factor in the output (its ``scaling`` while active; 0 while inactive,
  disabled or merged) is the float32 entry at its first rank in a fixed vector, a slice of
  the model-wide :mod:`..factor_pool`. ``set_adapters``, ``disable_lora`` / ``enable_lora``,
  ``fuse_lora`` / ``unfuse_lora`` and ``set_adapters(weights=...)`` only rewrite those
  values (staged on the host, copied for every module at once before the next kernels read
  them), so a
  captured CUDA graph reads the new factors at replay: every switch replays the same graph.
  An inactive adapter adds nothing (not ``0 * inf``): the kernel that adds the B side skips a
  segment whose factor is 0.

The bank is rebuilt (new tensors, a new :attr:`LoraBank.generation`, which is in the graph
key) when the adapters' identity changes: one loaded or deleted, or a weight given new
storage (``.to()``, a hotswap to another rank). Inactive adapters cost their rank in the A
GEMM (the B side skips them); that is the price of not re-capturing on every switch.

Adapter weights in another dtype or on another device than the module (PEFT can keep
adapters in float32 under a float16 model) cannot be views of the module-dtype bank: they
are then cast and stacked on every call (:attr:`LoraBank.per_call` says why), and the
graph key holds their state, so a switch re-captures once per new state.
"""
from __future__ import annotations

import itertools

import torch

from .. import factor_pool
from ..attention import LowRankGroup
from ..module_state import tuner_key
from . import peft_lora

__all__ = ["LoraBank"]


_data_ptr = torch.Tensor.data_ptr


class LoraBank:
    """The fixed-address LoRA weights and factors of one module's projections (see the module doc).

    :meth:`sync` is called on every forward and before every graph replay. A spec is
    ``((input, ((target, layer), ...)), ...)``: the projections grouped by the input they
    read (targets ``"q"``, ``"k"``, ``"v"``, ``"out"``; layers plain or PEFT LoRA).
    """

    def __init__(self):
        self.generation = 0  # bumped on every rebuild: the graph key holds it
        self.per_call = ""  # why the adapters are stacked per call instead ("" when banked)
        self._layout = None  # identity of the adapters the bank holds
        self._groups = ()
        self._blocks = ()  # (layer, adapter name, rank) per block of the factor vector, in order
        self._starts = ()  # each block's first entry in the factor vector
        self._layers = ()  # the LoRA layers of the blocks, each once
        self._slice = None  # factor_pool.Slice of R_total entries: the groups' scales are its slices
        self._written = None  # the tuner state the factors were last written for
        # what the per-call check compares (_unchanged, set by _relayout): the projections,
        # variant, dtype and device; each LoRA layer's adapter dicts and their Linears; each
        # Linear's weight (identity) and its data pointer
        self._seen = None
        self._dicts, self._linears, self._params, self._weights, self._pointers = [], [], [], [], []
        self._weight_ids = []
        self._spec = ()

    # ------------------------------------------------------------------ public
    def sync(self, spec_fn, projections: tuple, variant, dtype: torch.dtype,
             device: torch.device) -> tuple[tuple, tuple]:
        """(the :class:`LowRankGroup` s for this call, a hashable graph-state token).

        ``projections``: the module's projection layers as they are now (their identities are
        compared); ``spec_fn()`` gives the spec (see the class doc) for the hashable ``variant``
        (which projections read which input). It is asked only when something changed: a
        projection replaced (an adapter layer added or removed), the variant, dtype or device,
        an adapter added, deleted or replaced, an adapter weight replaced or given new
        storage. Then the bank is rebuilt if the adapters' identity changed. The factors are
        rewritten when the adapters' state changed, in the host mirror of the
        :mod:`..factor_pool`: the caller runs :func:`..factor_pool.flush` before kernels read
        them. Neither may happen during a CUDA-graph capture (the graph wrappers sync before
        they capture), which raises.
        """
        if not self._unchanged(projections, variant, dtype, device):
            self._relayout(spec_fn(), projections, variant, dtype, device)
        if not self._layers:
            return (), ()
        state = tuple([tuner_key(m) for m in self._layers])
        if self.per_call:
            return self.stacked(self._spec, dtype), ("per call", state)
        if state != self._written:
            self._write_factors(state)
        return self._groups, ("bank", id(self), self.generation)

    def release(self) -> None:
        """Give every banked adapter weight its own storage again and forget the bank."""
        for layer, name, _ in self._blocks:
            a = layer.lora_A[name].weight if name in layer.lora_A else None
            if a is not None:
                a.data = a.data.clone()
        self._layout, self._groups = None, ()
        self._blocks, self._layers, self._starts = (), (), ()
        if self._slice is not None:
            self._slice.release()
            self._slice = None
        self._written, self._seen, self._spec = None, None, ()
        self._dicts, self._linears, self._params, self._weights, self._pointers = [], [], [], [], []
        self._weight_ids = []
        self.per_call = ""

    # ----------------------------------------------------------------- private
    def _unchanged(self, projections, variant, dtype, device) -> bool:
        return (self._seen == (projections, variant, dtype, device)
                and [list(d.values()) for d in self._dicts] == self._linears
                and [id(d["weight"]) for d in self._params] == self._weight_ids
                and list(map(_data_ptr, self._weights)) == self._pointers)

    def _relayout(self, spec, projections, variant, dtype, device) -> None:
        layers = [(inp, target, m) for inp, projections_ in spec for target, m in projections_
                  if peft_lora.is_lora_layer(m)]
        if not layers:
            if self._layout is not None:
                self.release()
        elif self._layout_key(layers, dtype, device) != self._layout:
            self._build(spec, layers, dtype, device)
        lora = list(dict.fromkeys(m for _, _, m in layers))
        self._layers = tuple(lora)
        self._spec = spec
        self._dicts = [d for m in lora for d in (m.lora_A._modules, m.lora_B._modules)]
        self._linears = [list(d.values()) for d in self._dicts]
        self._params = [lin._parameters for linears in self._linears for lin in linears]
        self._weights = [d["weight"] for d in self._params]
        self._weight_ids = list(map(id, self._weights))
        self._pointers = list(map(_data_ptr, self._weights))
        self._seen = (projections, variant, dtype, device)

    @staticmethod
    def _layout_key(layers, dtype, device) -> tuple:
        key = [dtype, device]
        for inp, target, m in layers:
            for name in m.lora_A.keys():
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                key.append((inp, target, id(m), name, id(a), a.data_ptr(), id(b), b.data_ptr()))
        return tuple(key)

    def _build(self, spec, layers, dtype, device) -> None:
        if factor_pool.capturing():
            raise RuntimeError("deepspeed_diffusers_attn: LoRA adapters were loaded, deleted or moved during a "
                               "CUDA-graph capture; run one eager call after changing adapters")
        if self._blocks:
            self.release()
        self.generation += 1
        self.per_call = self._why_per_call(layers, dtype, device)
        if self.per_call:
            self._layout = self._layout_key(layers, dtype, device)
            return
        blocks, rows = [], {}  # rows[input] = [(target, layer, name, A, B)]
        for inp, target, m in layers:
            for name in m.lora_A.keys():
                rows.setdefault(inp, []).append((target, m, name))
        total = sum(m.lora_A[name].weight.shape[0] for entries in rows.values() for _, m, name in entries)
        piece = factor_pool.reserve(total, device)
        factors = piece.factors
        groups, offset = [], 0
        with torch.no_grad():
            for inp, _ in spec:
                entries = rows.get(inp)
                if not entries:
                    continue
                width = entries[0][1].lora_A[entries[0][2]].weight.shape[1]
                ranks = [m.lora_A[name].weight.shape[0] for _, m, name in entries]
                a_all = torch.empty(sum(ranks), width, dtype=dtype, device=device)
                segments, r0 = [], 0
                for (target, m, name), r in zip(entries, ranks):
                    a = m.lora_A[name].weight
                    a_all[r0 : r0 + r].copy_(a)
                    a.data = a_all[r0 : r0 + r]
                    segments.append((target, r0, r0 + r, m.lora_B[name].weight))
                    blocks.append((m, name, r))
                    r0 += r
                groups.append(LowRankGroup(inp, a_all, factors[offset : offset + r0], tuple(segments)))
                offset += r0
        self._groups, self._blocks, self._slice, self._written = tuple(groups), tuple(blocks), piece, None
        self._starts = tuple(itertools.accumulate((r for _, _, r in blocks), initial=0))[:-1]
        self._layout = self._layout_key(layers, dtype, device)  # after re-pointing the A weights

    @staticmethod
    def _why_per_call(layers, dtype, device) -> str:
        for _, target, m in layers:
            for name in m.lora_A.keys():
                for kind, w in (("A", m.lora_A[name].weight), ("B", m.lora_B[name].weight)):
                    if w.dtype != dtype or w.device != device:
                        return (f"LoRA adapter {name!r} of {target}: its {kind} weight is {w.dtype} on {w.device}, "
                                f"the module {dtype} on {device}")
                    if kind == "B" and not w.is_contiguous():
                        return f"LoRA adapter {name!r} of {target}: its B weight is not contiguous"
        return ""

    def _write_factors(self, state: tuple) -> None:
        if factor_pool.capturing():  # before layer_factors, whose unmerge a capture would only record
            raise RuntimeError("deepspeed_diffusers_attn: the LoRA adapter state changed during a CUDA-graph "
                               "capture; run one eager call after changing adapters")
        factors = {m: peft_lora.layer_factors(m) for m in self._layers}  # unmerges a disabled merged layer
        # a segment's factor is read at its first rank (LowRankGroup.scale): one entry per block
        self._slice.write([(r0, float(factors[m][name])) for (m, name, _), r0 in zip(self._blocks, self._starts)])
        # a layer both disabled and merged (tuner_key: disabled flag, merged names) was unmerged above
        unmerged = any(key[1] and key[2] for key in state)
        self._written = tuple([tuner_key(m) for m in self._layers]) if unmerged else state

    @staticmethod
    def stacked(spec, dtype) -> tuple:
        """The groups built for one call alone, from ``spec`` as :meth:`sync` takes it: the
        active adapters' A scaled by their factors and cast to ``dtype``, B cast (what runs
        under torch.compile, and for adapters the bank cannot hold)."""
        groups = []
        for inp, projections in spec:
            a_parts, segments, r0 = [], [], 0
            for target, m in projections:
                for name, factor in peft_lora.adapter_factors(m).items():
                    if isinstance(factor, float) and factor == 0:  # inactive (a tensor scaling stays: traced)
                        continue
                    a, b = m.lora_A[name].weight, m.lora_B[name].weight
                    a_parts.append((a * factor).to(dtype))
                    segments.append((target, r0, r0 + a.shape[0], b.to(dtype).contiguous()))
                    r0 += a.shape[0]
            if a_parts:
                groups.append(LowRankGroup(inp, torch.cat(a_parts), None, tuple(segments)))
        return tuple(groups)

    def __repr__(self) -> str:
        kind = f"per call: {self.per_call}" if self.per_call else f"{len(self._blocks)} adapter blocks"
        return f"LoraBank(generation={self.generation}, {kind})"

