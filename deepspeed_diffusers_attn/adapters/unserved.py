"""Adapter of last resort: attention modules of a family no other adapter serves.

Any module that carries an attention ``processor`` and that no adapter before this one
claims (a custom attention class, or one whose processor neither a dedicated adapter nor
the dispatcher bridge can run) is claimed here and always declined, with the family
named, so the report lists it instead of skipping it silently.
"""
from __future__ import annotations

from torch import nn

__all__ = ["NAME", "claims", "supports", "convert"]

NAME = "unserved attention family"


def claims(module: nn.Module) -> bool:
    """Whether ``module`` looks like a diffusers attention module (it has a processor and set_processor)."""
    return hasattr(module, "processor") and callable(getattr(module, "set_processor", None))


def supports(module: nn.Module) -> list[str]:
    """Always one reason: no adapter serves this family yet."""
    processor = type(getattr(module, "processor", None)).__name__
    return [f"no adapter serves {type(module).__name__} with {processor} yet; it runs stock diffusers"]


def convert(module: nn.Module, **options):
    """Never converts: (None, the reasons of :func:`supports`)."""
    return None, supports(module)
