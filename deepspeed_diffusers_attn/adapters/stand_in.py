"""What every adapter's stand-in shares: the original kept aside, stock checkpoints, shared weight memory.

A stand-in replaces one diffusers attention module in its parents. It keeps the
original unregistered (``.original``), so ``parameters()`` counts nothing twice, and its
fused module as its only child. The original's parameters become views of the fused
tensors (:func:`share_weights`), so no weight memory is duplicated and the original's
``state_dict()`` holds the values that run: :class:`StandIn` hands that state dict out
as its own (stock diffusers keys, so ``save_pretrained`` writes a stock checkpoint) and
accepts stock keys in ``load_state_dict`` (written through the views into the fused
tensors).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["StandIn", "share_weights", "unshare_weights"]


class StandIn(nn.Module):
    """Base of every adapter's stand-in module.

    Subclasses set ``self.dda`` (the fused module) and implement ``forward`` with the
    original's call signature, and ``_shared_pairs()``: the (original parameter, fused
    view) pairs of :func:`share_weights`.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)  # bypasses nn.Module registration
        self.train(original.training)
        self.register_load_state_dict_pre_hook(StandIn._load_stock_keys)

    @property
    def original(self) -> nn.Module:
        """The diffusers module this stand-in replaced (given back by :meth:`restore`)."""
        return self._original

    def _shared_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        raise NotImplementedError

    def restore(self) -> nn.Module:
        """Give the original its own storage again (the fused tensors' current values,
        device and dtype) and its training flag; returns it. The stand-in is spent."""
        unshare_weights(self._shared_pairs())
        self._original.train(self.training)
        return self._original

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The original's state dict: stock diffusers keys and values.

        Its parameters are views of the fused tensors, so the values are the ones that run.
        """
        return self._original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @staticmethod
    def _load_stock_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
        # load_state_dict pre-hook: stock keys (``to_q.weight``...) are copied into the original's
        # parameters, which are views of the fused tensors, and taken out of the dict; the fused
        # parameters are then "loaded" from themselves. A dict with fused keys loads as is.
        stock = module._original.state_dict(prefix=prefix, keep_vars=True)
        if not any(key in state_dict for key in stock):
            return
        with torch.no_grad():
            for key, param in stock.items():
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict.pop(key)
                if value.shape != param.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(param.shape)}.")
                    continue
                param.copy_(value)
        for name, param in module.dda.named_parameters():
            state_dict.setdefault(f"{prefix}dda.{name}", param)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): move the fused tensors, then re-point the original's views.
        super()._apply(fn, recurse)
        for param, fused in self._shared_pairs():
            param.data = fused
        return self


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of the same width, for bit-exact comparison."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()])


def share_weights(original: nn.Module, pairs) -> list[str]:
    """Make each original parameter of ``pairs`` a view of its fused tensor; returns why not (empty: done).

    ``pairs``: (original parameter, fused view holding a bit-identical copy of its values).
    Nothing changes unless every parameter and buffer of ``original`` is covered and every
    copy is bit-identical; the original storage is then freed.
    """
    covered = {id(p) for p, _ in pairs}
    reasons = [f"parameter {name} is not used by the fused module"
               for name, p in original.named_parameters() if id(p) not in covered]
    reasons += [f"buffer {name} is not used by the fused module" for name, _ in original.named_buffers()]
    for p, t in pairs:
        if (p.shape, p.dtype, p.device) != (t.shape, t.dtype, t.device) or not torch.equal(_bits(p), _bits(t)):
            reasons.append(f"internal: fused copy of a {tuple(p.shape)} {p.dtype} parameter differs from the original")
    if not reasons:
        for param, view in pairs:
            param.data = view
    return reasons


def unshare_weights(pairs) -> None:
    """Give each original parameter its own storage, holding its fused tensor's current values."""
    for param, fused in pairs:
        param.data = fused.clone()
