"""Adapters: one module per diffusers attention family, and the one registry that orders them.

Each adapter module defines:

* ``NAME``: the family, as the patch report shows it;
* ``claims(module) -> bool``: whether the module belongs to this family (the first
  adapter in :data:`ADAPTERS` that claims a module answers for it, also to decline it);
* ``supports(module) -> list[str]``: every reason it cannot be converted (empty: it can);
* ``convert(module, **options) -> (stand_in, [])`` or ``(None, reasons)``: the
  stand-in module that replaces it (a :class:`~.stand_in.StandIn`: ``.original``,
  ``.dda``, ``restore()``, stock ``state_dict``), with the original's weights turned
  into views of the fused ones; the original is untouched when it declines. An adapter
  that converts in place (:mod:`.dispatch_bridge`: the module keeps running diffusers'
  code with its attention on our kernel) returns ``(module, notes)`` instead, and the
  report lists the module as "bridged" (:func:`is_bridged`, undone by :func:`unbridge`).

:func:`deepspeed_diffusers_attn.patch` walks a pipeline and asks :func:`adapter_for`;
it never looks inside a family. Adding a family is adding a module here and one entry
in :data:`ADAPTERS`, ahead of :mod:`.unserved`.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

from torch import nn

from . import attention_processor, dispatch_bridge, flux, joint_attention, unserved, wan
from .stand_in import StandIn

__all__ = ["ADAPTERS", "adapter_for", "candidates", "is_stand_in", "is_bridged", "unbridge", "supports", "from_diffusers",
           "StandIn"]

ADAPTERS: tuple[ModuleType, ...] = (joint_attention, flux, wan, dispatch_bridge, attention_processor, unserved)
"""Every adapter, in the order they are asked; :mod:`.unserved` comes last."""


def adapter_for(module: nn.Module) -> Optional[ModuleType]:
    """The adapter that answers for ``module``, or None if it is no attention module."""
    found = candidates(module)
    return found[0] if found else None


def candidates(module: nn.Module) -> list[ModuleType]:
    """Every adapter that claims ``module``, in :data:`ADAPTERS` order: ``patch`` asks them in
    turn, so a module a dedicated adapter declines (e.g. Flux with LoRA) may still be bridged.
    :mod:`.unserved` is left out when another adapter claims the module."""
    if isinstance(module, StandIn):
        return []
    found = [adapter for adapter in ADAPTERS if adapter.claims(module)]
    return found[:1] if found and found[0] is unserved else [a for a in found if a is not unserved]


def is_stand_in(module: nn.Module) -> bool:
    """Whether ``module`` is a stand-in put in place by ``patch``."""
    return isinstance(module, StandIn)


def is_bridged(module: nn.Module) -> bool:
    """Whether ``module`` was converted in place by :mod:`.dispatch_bridge` (its processor is bridged)."""
    return dispatch_bridge.is_bridged(module)


def unbridge(module: nn.Module) -> nn.Module:
    """Undo :func:`is_bridged`'s conversion: the stock processor comes back (``module`` is returned)."""
    return dispatch_bridge.restore(module)


def supports(module: nn.Module) -> list[str]:
    """Every reason ``module`` cannot be converted by its family's adapter; empty if it can."""
    adapter = adapter_for(module)
    if adapter is None:
        return [f"{type(module).__name__} is not a diffusers attention module"]
    return adapter.supports(module)


def from_diffusers(module: nn.Module, **options):
    """The fused module computing what the diffusers attention ``module`` computes (a new
    module, ``module`` untouched); ValueError naming the reasons if its family cannot."""
    adapter = adapter_for(module)
    if adapter is None or not hasattr(adapter, "from_diffusers"):
        raise ValueError(f"cannot convert this {type(module).__name__}: " + "; ".join(supports(module)))
    return adapter.from_diffusers(module, **options)
