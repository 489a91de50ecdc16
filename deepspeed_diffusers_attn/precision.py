"""Which attention precision a fused attention module runs (issue 16).

A module's config names the precision asked for (``attention_precision``: ``"exact"``, the
default, or an 8-bit scheme of :func:`.ops.attention_precisions`); ``patch(pipe,
attention_precision=...)`` asks it of every module it converts. What runs is what was asked
where the attention op runs that precision for the module's device, dtype and head dim
(:func:`refusal`, the op's own capability rule), else the exact kernel, with one warning
naming why, and the patch report's row says the same (:meth:`AttentionPrecision.precision_note`).
It is settled when the module is built, whenever it moves (``.to()``, ``.half()``), when it is
unpickled, and by an eager forward on another device or dtype than it was settled for
(parameters moved or cast through ``.data``), so a forward reads a plain string (nothing for
``torch.compile`` to trace, nothing a CUDA graph could freeze stale). A traced forward reads what
was settled; if that precision cannot run there, the attention op raises with the reason.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from . import ops

__all__ = ["precision_problem", "check_precision", "refusal", "AttentionPrecision"]


def precision_problem(precision) -> str:
    """What is wrong with ``precision`` as an attention precision ("" if it names one of
    :func:`.ops.attention_precisions`)."""
    names = ops.attention_precisions()
    if precision in names:
        return ""
    return f"attention_precision must be one of {', '.join(map(repr, names))}; got {precision!r}"


def check_precision(precision) -> str:
    """``precision`` if it names one of :func:`.ops.attention_precisions`, else ValueError."""
    why = precision_problem(precision)
    if why:
        raise ValueError(why)
    return precision


@functools.lru_cache(maxsize=None)
def refusal(precision: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Why the attention op cannot run ``precision`` on ``device`` for ``dtype`` and
    ``head_dim`` ("" if it can): its capability rule, asked on one-element stand-ins."""
    if precision == "exact":
        return ""
    q = torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device)
    return ops.attention_supported(q, q, q, precision=precision)


class AttentionPrecision:
    """Mixin of the fused attention modules (before ``nn.Module`` in the bases). A subclass has
    a ``config`` with ``attention_precision`` and ``dim_head``, names in ``_precision_reference``
    the parameter whose device and dtype its forward runs in, calls :meth:`_settle_precision` at
    the end of ``__init__``, and in its forward calls :meth:`_precision_on` with that parameter's
    device and dtype, then passes ``precision=self._precision`` to the attention op."""

    _precision_reference = ""  # the parameter whose device and dtype decide

    _precision = "exact"  # what runs
    _precision_refusal = ""  # why the asked precision does not run ("" if it does)
    _precision_for = None  # the (device, dtype) it was settled for

    @property
    def attention_precision(self) -> str:
        """The precision the attention op runs in: the config's, or ``"exact"`` where that one
        cannot run here (:meth:`precision_note` says why)."""
        return self._precision

    def precision_note(self) -> str:
        """One line for the patch report: "" for exact attention as asked; else the precision
        that runs and, if it is not the one asked, why."""
        asked = self.config.attention_precision
        if asked == "exact":
            return ""
        if self._precision_refusal:
            return f"attention precision exact: {asked!r} cannot run here: {self._precision_refusal}"
        return f"attention precision {asked}"

    def _precision_repr(self) -> str:
        """``extra_repr``'s part: ", attention_precision=<what runs>" unless that is exact."""
        return f", attention_precision={self._precision}" if self._precision != "exact" else ""

    def _ask_precision(self, precision: str) -> None:
        """Ask for ``precision`` (patch, before the module's first call): a copy of the config
        with it (a config another module shares is left alone)."""
        self.config = dataclasses.replace(self.config, attention_precision=check_precision(precision))
        self._settle_precision()

    def _precision_on(self, device: torch.device, dtype: torch.dtype) -> str:
        """The precision that runs for a call with parameters on ``device`` in ``dtype`` (settled
        again if they moved or were cast without ``_apply``)."""
        if (device, dtype) != self._precision_for and not torch.compiler.is_compiling():
            self._settle_precision(device, dtype)
        return self._precision

    def _settle_precision(self, device=None, dtype=None) -> None:
        """Decide what runs for parameters on ``device`` in ``dtype`` (default: those of the
        ``_precision_reference`` parameter)."""
        asked = self.config.attention_precision
        if device is None:
            p = getattr(self, self._precision_reference)
            device, dtype = p.device, p.dtype
        self._precision_for = (device, dtype)
        if device.type == "meta":  # no kernel to ask; settled again when materialised (to_empty)
            self._precision, self._precision_refusal = asked, ""
            return
        why = refusal(asked, device, dtype, self.config.dim_head)
        if why and why != self._precision_refusal:
            warnings.warn(f"{type(self).__name__}: attention_precision {asked!r} cannot run on {device} in {dtype} "
                          f"(head dim {self.config.dim_head}): {why}; the exact kernel runs", stacklevel=3)
        self._precision, self._precision_refusal = ("exact", why) if why else (asked, "")

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._settle_precision()
        return result

    def __setstate__(self, state):
        super().__setstate__(state)
        self._settle_precision()  # the tensors may have been loaded elsewhere (map_location)
