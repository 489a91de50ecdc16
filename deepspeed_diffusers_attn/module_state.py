"""The Python-side state of a model that a CUDA graph would freeze, as a hashable key.

A captured graph replays the kernels of one call. Every Python value the forward read
on the way is frozen into it: which LoRA adapters are active and their scales, whether
adapters are disabled or merged (``set_adapters``, ``disable_lora``, ``fuse_lora``...),
which attention processor runs, and a processor's own values (an IP-Adapter's
``scale``). :class:`ModelState` reads those values on every call;
:class:`.graphs.GraphedCallable` puts them into its signature key, so a call after such
a change replays the graph of the new state (capturing it if new), never the old one.

Structure (which submodules, parameters and buffers the model has) changes when
adapters are loaded or unloaded, or processors that are modules are set. Walking a
UNet's ~2,000 modules on every call would cost milliseconds, so torch's global
registration hooks count every module / parameter / buffer registration into a module
of a watched model (not into the temporary ``ModuleList`` a forward may build by
slicing); :meth:`ModelState.refresh` walks the model again only when that count moved, and says
whether the structure changed (then the caller drops its graphs: they may read
parameters that no longer exist). Deleting a submodule registers nothing, but a
deleted adapter is no longer active, which the key shows.

What is read, per kind of module (found by duck typing, so neither peft nor diffusers
need be imported):

* PEFT tuner layers (``_active_adapter``, ``_disable_adapters``, ``merged_adapters``):
  the active adapters, the disabled flag, the merged adapters and the active adapters'
  ``scaling`` (which ``set_adapters`` weights and ``scale_lora_layers`` set). Which
  adapters are loaded, their rank and kind are structure (registered modules).
* Modules with an attention ``processor`` (diffusers ``Attention`` and its relatives):
  the processor object and its plain attributes (numbers, strings, and lists / tuples of
  them, e.g. ``IPAdapterAttnProcessor2_0.scale``), and those of the processor it stands
  for when it has a ``stock`` attribute (our ``FusedAttnProcessor``).

* Modules with ``graph_state()`` and ``graph_state_covers()`` (our attention stand-ins):
  ``graph_state()`` returns a token and may write fixed-address buffers that a captured
  graph reads at replay (the LoRA factors of :mod:`.adapters.lora_bank`, staged in
  :mod:`.factor_pool` and copied once all are read); the tuner layers
  ``graph_state_covers()`` lists are then read by it alone, not as PEFT layers above.

Anything else a forward reads from Python objects (a custom module's flag) is not seen:
call :meth:`.graphs.GraphedCallable.reset` after changing it.
"""
from __future__ import annotations

import numbers
import weakref

import torch
from torch import nn

from . import factor_pool

__all__ = ["ModelState", "registrations", "tuner_key"]

_count = 0
_watched: set[int] = set()  # ids of the modules of every live ModelState, at their last walk
_states: "weakref.WeakSet[ModelState]" = weakref.WeakSet()


def _registered(parent, _name, _value) -> None:
    """A global registration hook: counts registrations into watched modules, and never
    changes the registration (returns None). Registrations into other modules (a
    ``ModuleList`` slice a forward builds, a new model) are not counted."""
    global _count
    if id(parent) in _watched:
        _count += 1


_hooks = (
    torch.nn.modules.module.register_module_module_registration_hook(_registered),
    torch.nn.modules.module.register_module_parameter_registration_hook(_registered),
    torch.nn.modules.module.register_module_buffer_registration_hook(_registered),
)


def registrations() -> int:
    """How many modules, parameters and buffers were registered into watched modules so far."""
    return _count


_PLAIN = (type(None), bool, numbers.Number, str)


def _plain(value):
    """``value`` if it is a plain value (or a list / tuple of them), as a hashable; else None."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    return None


def _is_tuner_layer(m: nn.Module) -> bool:
    d = m.__dict__
    return "_active_adapter" in d and "_disable_adapters" in d and "merged_adapters" in d


def _scale_key(scale):
    # PEFT keeps scalings as 0-d tensors for hotswapping and updates them in place (fill_)
    return (id(scale), scale._version) if isinstance(scale, torch.Tensor) else scale


def tuner_key(layer: nn.Module) -> tuple:
    """What of a PEFT tuner layer's state changes its output: the active adapters, the
    disabled flag, the merged adapters and the active adapters' ``scaling``."""
    # Read from __dict__: this runs for every adapter layer on every call (about 1 us each).
    d = layer.__dict__
    active = d["_active_adapter"]
    scaling = d.get("scaling")
    if isinstance(active, str):
        scales = None if scaling is None else _scale_key(scaling.get(active))
    else:
        active = tuple(active)
        scales = None if scaling is None else tuple([_scale_key(scaling.get(a)) for a in active])
    merged = d["merged_adapters"]
    return (active, d["_disable_adapters"], tuple(merged) if merged else (), scales)


def _has_processor(m: nn.Module) -> bool:
    return getattr(m, "processor", None) is not None and callable(getattr(m, "set_processor", None))


def _plain_attrs(obj) -> tuple:
    attrs = vars(obj) if hasattr(obj, "__dict__") else {}
    return tuple((k, v) for k, v in ((k, _plain(v)) for k, v in attrs.items()) if v is not None)


def _processor_key(m: nn.Module) -> tuple:
    p = m.processor
    wrapped = vars(p).get("stock") if hasattr(p, "__dict__") else None  # a processor standing for another
    inner = None if wrapped is None else (type(wrapped).__qualname__, _plain_attrs(wrapped))
    return (id(p), type(p).__qualname__, _plain_attrs(p), inner)


def _graph_state(m: nn.Module):
    return m.graph_state()


class ModelState:
    """Reads the Python-side state of ``module`` that changes what its forward computes.

    ``key()`` gives it as a hashable tuple (see the module doc for what is read);
    ``refresh()`` must come first on each call: it re-walks the model when anything was
    registered since the last walk, and returns True when the model's structure changed.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._seen = -1
        self._structure: list | None = None  # weak references to every module, parameter and buffer
        self._readers: list = []  # (key function, module)
        self._ids: frozenset = frozenset()
        _states.add(self)

    def refresh(self) -> bool:
        """Re-walk the model if anything was registered since; True if its structure changed."""
        if self._seen == _count:
            return False
        self._seen = _count
        modules = list(self.module.modules())
        objects = [*modules, *self.module.parameters(), *self.module.buffers()]
        old = self._structure
        # Identity through weak references: an id alone could be reused by a new object.
        changed = old is not None and (len(old) != len(objects) or any(r() is not o for r, o in zip(old, objects)))
        self._structure = [weakref.ref(o) for o in objects]
        self._ids = frozenset(map(id, modules))
        _watched.clear()
        for state in _states:
            _watched.update(state._ids)
        covered = set()  # tuner layers whose state a module's graph_state() accounts for
        for m in modules:
            if callable(getattr(type(m), "graph_state", None)):
                covered.update(map(id, m.graph_state_covers()))
        readers = []
        for m in modules:
            if callable(getattr(type(m), "graph_state", None)):
                readers.append((_graph_state, m))
            if _is_tuner_layer(m):
                if id(m) not in covered:
                    readers.append((tuner_key, m))
            elif _has_processor(m):
                readers.append((_processor_key, m))
        self._readers = readers
        return changed

    def key(self) -> tuple:
        """The state now, as a hashable tuple (empty for a model with nothing to read).

        The fixed-address buffers the readers wrote (:mod:`.factor_pool`) are copied to the
        device on the current stream before it returns, so a graph replayed next reads them."""
        key = tuple([read(m) for read, m in self._readers])
        factor_pool.flush()
        return key

    @property
    def num_readers(self) -> int:
        """How many modules' state is read per call."""
        return len(self._readers)
