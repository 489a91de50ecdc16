"""What every adapter's stand-in shares: the original's layout kept, shared weight memory.

A stand-in replaces one diffusers attention module in its parents and keeps that
module's layout: the original's children (``to_q``, ``to_k``, ``to_v``, ``to_out``,
``group_norm``...) are registered in the stand-in under the same names, so
``parameters()``, ``state_dict()`` (stock keys: ``save_pretrained`` writes a stock
checkpoint, ``load_state_dict`` takes one), ``named_modules()`` and PEFT's adapter
injection see a stock diffusers model. The fused module (``dda``) is held unregistered:
its tensors are the storage that the original's parameters view (:func:`share_weights`),
so no weight memory is duplicated and nothing is counted twice, and writing a stock
parameter (``load_state_dict``, ``copy_``) writes what the fused kernels read.
``.to()`` / ``.half()`` move the fused tensors first and re-point the views, so no
parameter is copied on its own.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["StandIn", "share_weights", "unshare_weights"]


class StandIn(nn.Module):
    """Base of every adapter's stand-in module.

    Subclasses implement ``forward`` with the original's call signature, and
    ``_shared_pairs()``: the (stock parameter, fused view) pairs of :func:`share_weights`,
    read from the stand-in's current children (an adapter layer PEFT wrapped around a
    projection holds the stock parameter as its ``base_layer``).
    """

    def __init__(self, original: nn.Module, fused: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)  # unregistered: restored by unpatch
        object.__setattr__(self, "_dda", fused)  # unregistered: its tensors are what the children view
        for name, child in original.named_children():
            self.add_module(name, child)
        self.train(original.training)

    @property
    def original(self) -> nn.Module:
        """The diffusers module this stand-in replaced (given back by :meth:`restore`)."""
        return self._original

    @property
    def dda(self) -> nn.Module:
        """The fused module that runs (not registered: the stock parameters view its tensors)."""
        return self._dda

    def _shared_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        raise NotImplementedError

    def _pairs_key(self) -> tuple:
        """A cheap identity of the stock parameters :meth:`_shared_pairs` would pair (a subclass's)."""
        raise NotImplementedError

    def _pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """:meth:`_shared_pairs`, kept while the stock parameters are the same objects and the
        fused tensors have not moved (``_apply`` drops it): building the views costs more than
        the per-call check that uses them."""
        key = self._pairs_key()
        cached = self.__dict__.get("_pairs_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._shared_pairs())
            object.__setattr__(self, "_pairs_cache", cached)
        return cached[1]

    def train(self, mode: bool = True):
        """Set the training flag here, on the children and on the fused module."""
        super().train(mode)
        self._dda.train(mode)
        return self

    def _check_views(self) -> None:
        """Keep the fused tensors what the stock parameters hold; called before each eager forward.

        A stock parameter whose storage was replaced (``load_state_dict(..., assign=True)``,
        a safe LoRA merge, ``.data =``) has its values copied into the fused tensor and
        becomes a view again. A write through a stock parameter (``load_state_dict``) bumps
        only that parameter's version counter, not the fused tensor's, and a write through
        its ``.data`` (``fuse_lora``'s in-place merge) bumps none, which
        :meth:`_weights_token` covers; on either the fused module is told
        (``weights_changed``) to drop what it derived from its weights (a cached K/V, a
        scaled bias). Other ``.data`` writes need ``dda.weights_changed()``.
        """
        changed = False
        versions = []
        for param, fused in self._pairs():
            if param.data_ptr() != fused.data_ptr() or param.shape != fused.shape:
                with torch.no_grad():
                    fused.copy_(param)
                param.data = fused
                changed = True
            versions.append(None if param.is_inference() else param._version)
        versions = (tuple(versions), self._weights_token())
        if changed or versions != self.__dict__.get("_versions"):
            object.__setattr__(self, "_versions", versions)
            self._dda.weights_changed()

    def _weights_token(self) -> tuple:
        """What else changes the stock weights without bumping their version counters (a
        subclass's; e.g. which LoRA adapters are merged into them through ``.data``)."""
        return ()

    def restore(self) -> nn.Module:
        """Give the original the stand-in's current children (with any adapter layers added
        meanwhile), its own weight storage again (the fused tensors' current values, device
        and dtype, after any replaced storage was taken in) and the training flag; returns
        it. The stand-in is spent."""
        self._check_views()
        unshare_weights(self._shared_pairs())
        for name, child in self.named_children():
            setattr(self._original, name, child)
        self._original.train(self.training)
        return self._original

    def _sync_original(self) -> nn.Module:
        """The original with the stand-in's current children (for running it stock)."""
        for name, child in self.named_children():
            self._original._modules[name] = child
        return self._original

    def _apply(self, fn, recurse=True):
        # Move the fused tensors, re-point the stock parameters at them, then move the rest
        # (adapter weights, a processor module): fn leaves already-converted views alone.
        object.__setattr__(self, "_pairs_cache", None)
        self._dda._apply(fn, recurse)
        for param, fused in self._shared_pairs():
            param.data = fused
        return super()._apply(fn, recurse)


def parameter_identities(modules) -> tuple:
    """The identities of each module's own weight and bias (a PEFT layer's base layer's), for
    :meth:`StandIn._pairs_key`; None entries are skipped. Dict reads only: asked on every call."""
    key = []
    for m in modules:
        if m is not None:
            params = m._modules.get("base_layer", m)._parameters
            key += (id(params.get("weight")), id(params.get("bias")))
    return tuple(key)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of the same width, for bit-exact comparison."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()])


def share_weights(original: nn.Module, pairs, keep=()) -> list[str]:
    """Make each stock parameter of ``pairs`` a view of its fused tensor; returns why not (empty: done).

    ``pairs``: (stock parameter, fused view holding a bit-identical copy of its values).
    ``keep``: tensors of ``original`` that keep their own storage (adapter weights).
    Nothing changes unless every other parameter and buffer of ``original`` is covered and
    every copy is bit-identical; the stock storage is then freed.
    """
    covered = {id(p) for p, _ in pairs} | {id(t) for t in keep}
    reasons = [f"parameter {name} is not used by the fused module"
               for name, p in original.named_parameters() if id(p) not in covered]
    reasons += [f"buffer {name} is not used by the fused module"
                for name, b in original.named_buffers() if id(b) not in covered]
    for p, t in pairs:
        if (p.shape, p.dtype, p.device) != (t.shape, t.dtype, t.device) or not torch.equal(_bits(p), _bits(t)):
            reasons.append(f"internal: fused copy of a {tuple(p.shape)} {p.dtype} parameter differs from the original")
    if not reasons:
        for param, view in pairs:
            param.data = view
    return reasons


def unshare_weights(pairs) -> None:
    """Give each stock parameter its own storage, holding its fused tensor's current values."""
    for param, fused in pairs:
        param.data = fused.clone()
