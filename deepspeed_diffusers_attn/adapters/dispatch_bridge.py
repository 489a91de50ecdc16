"""Adapter: diffusers' attention dispatcher bridge (``dispatch_attention_fn`` -> :func:`.ops.attention`).

About fifty diffusers models (Flux, Wan, QwenImage, HunyuanVideo, LTX-Video, Cosmos...)
compute attention in their processors (``FluxAttnProcessor``, ``WanAttnProcessor``...)
by calling ``diffusers.models.attention_dispatch.dispatch_attention_fn`` with q/k/v in
``[B, S, H, D]``, the layout :func:`.ops.attention` takes. This adapter keeps such a
module and its processor's code exactly as they are and runs only that attention call on
our kernel; the report lists the module as "bridged". It claims every attention module
(a ``processor`` and ``set_processor``) whose processor class calls
``dispatch_attention_fn`` by that global name, except those the fused ``Attention``
adapter converts; a processor that does not call it stays with :mod:`.unserved`.

Mechanism.

* The module stays in place (nothing is replaced in its parents, its parameters and
  ``state_dict`` are untouched); its processor is wrapped in a :class:`BridgedProcessor`
  that answers the stock processor's class through ``__class__`` (so ``isinstance``,
  ``attn_processors`` and diffusers' class checks see the stock processor), reads and
  writes attributes through to it (``set_attention_backend`` sets the stock processor's
  ``_attention_backend``), has the stock ``__call__``'s signature (diffusers filters the
  call's keyword arguments by it) and pickles / deep-copies as a wrapper of a copy.
* Its call turns a thread-local flag on for the duration of the stock processor's call.
* One shim replaces the name ``dispatch_attention_fn`` in the globals of the modules
  whose processors are bridged (found from the processor class's code, at patch time),
  while at least one module is bridged. With the flag off (an unpatched model, another
  thread) it calls diffusers' original with the very same arguments, so unpatched
  models compute bit-exactly what stock diffusers computes. With the flag on it calls
  :func:`.ops.attention` when our kernel can serve the call, else diffusers' original.
* :func:`restore` (``unpatch``) gives the module its stock processor back, and the shim
  is removed from every namespace once no bridged module is left (a bridged model dropped
  without ``unpatch`` leaves it in place, calling only diffusers' original, until the
  next ``unpatch``).

What falls back to diffusers' own attention, per call, and why (see :func:`call_refusal`):
dropout_p > 0, is_causal, K/V heads that differ from Q's (grouped-query attention), a V
head dim that differs from K's, ``attention_kwargs`` (``return_lse``...), a context-parallel
``parallel_config`` our attention does not run (ring and Ulysses together, uneven shards; see
:func:`.context_parallel.for_parallel_config`) or one with a mask, a backend other than diffusers' default ``"native"`` (chosen with
``set_attention_backend``, the ``attention_backend`` context manager or
``DIFFUSERS_ATTN_BACKEND``; an explicit ``"native"`` is served), a mask that is not bool
or an additive mask in float32 or q's dtype or that does not broadcast to ``[B, H, Sq, Sk]``
(SDPA's own rules: every mask SDPA takes, our op takes), dtypes / head dims / devices the
device's kernels do not run (the op's own rule, :func:`.ops.attention_kernel_name`),
inputs that need a gradient (our attention is inference-only), q/k/v that are not 4-D or
disagree in batch or head dim, empty inputs.
Static reasons known at patch time (the stock processor is an ``nn.Module`` holding
weights, an unsupported head dim or parameter dtype on their device, a backend already
set, a context-parallel config our attention does not run, diffusers' private API not as
expected) decline the module at patch time instead, with the reason in the report.

Context parallelism (diffusers' ``enable_parallelism``): a call with a context-parallel
``parallel_config`` gets this rank's token shard; it is served by
:mod:`.context_parallel` (Ulysses or ring over the config's mesh), diffusers' hooks having
split the inputs and gathering the output.

Under ``torch.autocast`` the inputs are cast as autocast casts them for SDPA (then judged
in that dtype: CPU bf16 autocast falls back). Masks arrive in SDPA form: bool (True =
attend) or additive, broadcast from the right to ``[B, H, Sq, Sk]``; our op takes exactly
that form. Where diffusers' native backend reads a 2-D ``[B, Sk]`` mask as
``[B, 1, 1, Sk]`` (diffusers >= 0.36; found by probing it once), the bridge reads it the
same way. A query row with every key masked gives 0, as
torch's SDPA does.

Visibility. :func:`bridge_stats` counts the calls served and the calls that fell back,
per reason; each reason also warns once (``UserWarning``). Under ``torch.compile`` the
decision is made when the graph is traced: a fallback is counted (and warned) once per
trace, and compiled calls are not counted; under CUDA-graph capture the capture counts,
replays do not. Likewise a captured graph keeps the choice made at capture: a processor's
backend set later changes the graph key (:mod:`..module_state` reads the processor's
values through the wrapper), the global ``attention_backend()`` context does not.

torch.compile and CUDA graphs. The shim's checks read only tensor metadata (no sync, no
allocation), :func:`.ops.attention` has a fake kernel, the kernel rule is evaluated as a
constant when traced (:func:`torch.compiler.assume_constant_result`), and the flag is a
``threading.local`` that Dynamo traces: ``torch.compile(model, fullgraph=True)`` of a
bridged model traces with no graph break, and CUDA-graph capture records our kernel. A
head dim that is symbolic under ``dynamic=True`` falls back.

Limits. Only the attention core runs on our kernel: the projections, norms, RoPE and
output projection are diffusers' code. ``set_attn_processor`` with new processor objects
ends bridging for those modules (``patch`` again bridges them again; handing back the
objects ``attn_processors`` returned keeps it, also after ``unpatch``). A processor that calls the dispatcher
through another name (``attention_dispatch.dispatch_attention_fn(...)``) or through a
helper defined in another module is not seen. Every private-API read of diffusers
(``attention_dispatch``, ``AttentionBackendName``, ``_AttentionBackendRegistry``) is in
this file and feature-detected once (:func:`api_problem`): when anything is not as
expected, every module this adapter claims is declined with the reason, and nothing is
installed.
"""
from __future__ import annotations

import collections
import functools
import inspect
import threading
import types
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..attention import unsupported_device_dtype
from ..context_parallel import for_parallel_config, processor_refusal

__all__ = ["NAME", "claims", "supports", "convert", "restore", "is_bridged", "BridgedProcessor", "bridge_stats",
           "call_refusal", "api_problem", "installed_in"]

NAME = "diffusers dispatcher bridge"

_FN = "dispatch_attention_fn"
_NATIVE = "native"
_UNSET = object()  # parallel_config not passed (diffusers releases whose dispatcher has none)

# ----------------------------------------------------------------- diffusers' private API --

# dispatch_attention_fn's parameters as the shim reproduces them: (name, kind, default).
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KW = inspect.Parameter.KEYWORD_ONLY
_EXPECTED = (("query", _POS, inspect.Parameter.empty), ("key", _POS, inspect.Parameter.empty),
             ("value", _POS, inspect.Parameter.empty), ("attn_mask", _POS, None), ("dropout_p", _POS, 0.0),
             ("is_causal", _POS, False), ("scale", _POS, None), ("enable_gqa", _POS, False),
             ("attention_kwargs", _POS, None), ("backend", _KW, None))
_OPTIONAL = ("parallel_config", _KW, None)  # diffusers >= 0.36


class _Api(types.SimpleNamespace):
    """What feature detection found: ``problem`` ("" when usable), the original function,
    the backend registry, whether the dispatcher takes ``parallel_config`` and whether the
    native backend reads a 2-D mask as [B, Sk]."""


_API: Optional[_Api] = None  # filled once by _api() (not an lru_cache: the shim reads it in traced code)


def _api() -> _Api:
    """The feature detection's result, found on first use."""
    global _API
    if _API is None:
        _API = _detect()
    return _API


def _detect() -> _Api:
    try:
        import diffusers
        version = getattr(diffusers, "__version__", "?")
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return _Api(problem="diffusers is not installed")

    def bad(why: str) -> _Api:
        return _Api(problem=f"diffusers {version}: {why}; the bridge cannot route its attention calls")

    try:
        from diffusers.models import attention_dispatch as dispatch
    except Exception as e:  # ImportError, or anything its import raises
        return bad(f"diffusers.models.attention_dispatch does not import ({type(e).__name__}: {e})")
    fn = getattr(dispatch, _FN, None)
    names = getattr(dispatch, "AttentionBackendName", None)
    registry = getattr(dispatch, "_AttentionBackendRegistry", None)
    if not callable(fn) or isinstance(fn, _Shim):
        return bad(f"attention_dispatch.{_FN} is missing or not diffusers' own")
    if getattr(names, "NATIVE", None) != _NATIVE:
        return bad("AttentionBackendName.NATIVE is not 'native'")
    if registry is None or not hasattr(registry, "_active_backend"):
        return bad("_AttentionBackendRegistry._active_backend is missing")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return bad(f"{_FN} has no signature")
    have = [(p.name, p.kind, p.default) for p in params]
    with_parallel = have == [*_EXPECTED, _OPTIONAL]
    if have != list(_EXPECTED) and not with_parallel:
        return bad(f"{_FN}{inspect.signature(fn)} is not the signature the bridge reproduces")
    return _Api(problem="", fn=fn, registry=registry, with_parallel=with_parallel,
                mask_2d_is_batch=_probe_2d_mask(fn, names.NATIVE), version=version)


def _probe_2d_mask(fn, native) -> bool:
    """Whether diffusers' native backend reads a 2-D [B, Sk] mask as [B, 1, 1, Sk] (newer
    releases) rather than broadcasting it as [Sq, Sk] (SDPA's rule): asked once, with
    B=2, Sq=3, where only the former runs."""
    q = torch.zeros(2, 3, 1, 8)
    k = torch.zeros(2, 2, 1, 8)
    try:
        fn(q, k, k, attn_mask=torch.ones(2, 2, dtype=torch.bool), backend=native)
    except Exception:
        return False
    return True


def api_problem() -> str:
    """Why diffusers' dispatcher cannot be bridged in this environment ("" if it can)."""
    return _api().problem


# ---------------------------------------------------------------- which modules it claims --

def _code_names(code: types.CodeType):
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


@functools.lru_cache(maxsize=None)
def _dispatching_functions(cls: type) -> tuple:
    """The functions of ``cls`` (its MRO, nested functions included) that call ``dispatch_attention_fn``."""
    found = []
    for klass in cls.__mro__[:-1]:
        for attr in vars(klass).values():
            fn = getattr(attr, "__func__", attr)  # staticmethod / classmethod
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType) and _FN in set(_code_names(code)):
                found.append(fn)
    return tuple(found)


def _stock(processor):
    return processor.stock if isinstance_bridged(processor) else processor


def isinstance_bridged(processor) -> bool:
    """Whether ``processor`` is a :class:`BridgedProcessor` (its real type, not ``__class__``)."""
    return isinstance(type(processor), type) and issubclass(type(processor), BridgedProcessor)


def claims(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module (``processor`` + ``set_processor``) whose
    processor calls ``dispatch_attention_fn``, and which the fused ``Attention`` adapter
    does not convert."""
    processor = getattr(module, "processor", None)
    if processor is None or not callable(getattr(module, "set_processor", None)):
        return False
    if not _dispatching_functions(type(_stock(processor))):
        return False
    from . import attention_processor  # the fused adapter runs more of the module on our kernels

    return not (attention_processor.claims(module) and not attention_processor.supports(module))


def is_bridged(module: nn.Module) -> bool:
    """Whether ``module`` runs a bridged processor."""
    return isinstance_bridged(module.__dict__.get("processor"))


def _head_dim(module: nn.Module) -> Optional[int]:
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    heads, inner = getattr(module, "heads", None), getattr(module, "inner_dim", None)
    if inner is None:
        inner = getattr(getattr(module, "to_q", None), "out_features", None)
    if isinstance(heads, int) and isinstance(inner, int) and heads > 0 and inner % heads == 0:
        return inner // heads
    return None


def supports(module: nn.Module) -> list[str]:
    """Every reason the attention calls of ``module`` cannot be bridged (empty: they can)."""
    if not claims(module):
        return [f"{type(module).__name__}'s processor does not call diffusers' {_FN}"]
    api = _api()
    if api.problem:
        return [api.problem]
    processor = _stock(module.processor)
    pname = type(processor).__name__
    reasons = []
    if isinstance(processor, nn.Module):
        reasons.append(f"processor {pname} is an nn.Module (it holds weights, e.g. IP-Adapter's); the bridge "
                       "wraps plain processors only")
    for fn in _dispatching_functions(type(processor)):
        current = fn.__globals__.get(_FN)
        if current is not api.fn and not isinstance(current, _Shim):
            reasons.append(f"{fn.__module__}.{_FN} is not diffusers' (replaced by {current!r})")
            break
    backend = getattr(processor, "_attention_backend", None)
    if backend is not None and _backend_name(backend) != _NATIVE:
        reasons.append(f"set_attention_backend chose diffusers' {_backend_name(backend)!r} backend")
    reasons += processor_refusal(processor)
    head_dim = _head_dim(module)
    params = [p for p in module.parameters()]
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) == 1 and len(devices) == 1:
        why = _kernel_refusal(next(iter(devices)), next(iter(dtypes)), head_dim or 64)
        if why:
            reasons.append(why)
    elif head_dim is not None:
        why = _kernel_refusal(torch.device("cpu"), torch.float32, head_dim)  # the head-dim part alone
        if why:
            reasons.append(why)
    return reasons


def convert(module: nn.Module, **options):
    """Bridge ``module`` in place: ``(module, notes)``, or ``(None, reasons)`` when it cannot be."""
    reasons = supports(module)
    if reasons:
        return None, reasons
    if is_bridged(module):
        return module, ["already bridged"]
    stock = _stock(module.processor)
    module.processor = _wrap(stock)
    return module, [f"{type(stock).__name__}: diffusers' code, our attention kernel"]


def restore(module: nn.Module) -> nn.Module:
    """Give a bridged ``module`` its stock processor back; the shim goes once nothing is bridged."""
    wrapper = module.__dict__.get("processor")
    with _install_lock:
        if isinstance_bridged(wrapper):
            module.processor = wrapper.stock
            _LIVE.discard(wrapper)
        _uninstall_if_unused()
    return module


# ------------------------------------------------------------------------ the processor --

class BridgedProcessor:
    """The processor of a bridged module: runs ``stock`` (the diffusers processor) with its
    ``dispatch_attention_fn`` calls routed to our kernel.

    ``__class__`` answers the stock processor's class and attributes read and write
    through to it, so diffusers' processor API keeps its meaning; ``type(p)`` and
    ``repr(p)`` show what runs. One subclass per stock class carries that class's
    ``__call__`` signature (diffusers filters a call's keyword arguments by it).
    """

    @property
    def __class__(self):
        return type(self.stock)

    def __init__(self, stock):
        object.__setattr__(self, "stock", stock)

    def __getattr__(self, name):
        if name == "stock" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)  # copy / pickle protocols are the wrapper's own
        return getattr(self.stock, name)

    def __setattr__(self, name, value):
        setattr(self.stock, name, value)

    def __reduce__(self):
        # pickle's default reduction reads __class__, which answers the stock class
        return _wrap, (self.stock,)

    def __repr__(self) -> str:
        return f"BridgedProcessor(stock={type(self.stock).__name__})"


_local = threading.local()


def _routed_call(self, attn, *args, **kwargs):
    if not torch.compiler.is_compiling() and self not in _LIVE:
        _register(self)  # a wrapper handed back after unpatch (set_attn_processor): bridged again
    previous = getattr(_local, "on", False)
    _local.on = True
    try:
        return self.stock(attn, *args, **kwargs)
    finally:
        _local.on = previous


@functools.lru_cache(maxsize=None)
def _wrapper_class(stock_cls: type) -> type:
    call = functools.wraps(stock_cls.__call__)(lambda self, attn, *args, **kwargs:
                                               _routed_call(self, attn, *args, **kwargs))
    call.__doc__ = f"{stock_cls.__name__}.__call__ with its attention calls on our kernel"
    return type(f"Bridged{stock_cls.__name__}", (BridgedProcessor,), {"__call__": call,
                                                                        "__module__": __name__})


_LIVE: "weakref.WeakSet[BridgedProcessor]" = weakref.WeakSet()  # wrappers in use: they need the shim


def _wrap(stock) -> BridgedProcessor:
    """A registered wrapper of ``stock`` (also what unpickling / deep-copying a wrapper calls)."""
    return _register(_wrapper_class(type(stock))(stock))


def _register(wrapper: BridgedProcessor) -> BridgedProcessor:
    with _install_lock:  # registered and installed at once: an unpatch elsewhere cannot remove the shim between
        _LIVE.add(wrapper)
        if not _api().problem:
            _install(type(wrapper.stock))
    return wrapper


# ----------------------------------------------------------------------------- the shim --

class _Shim:
    """The callable installed over ``dispatch_attention_fn`` (a class, so it is told apart
    from diffusers' function and from other wrappers)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=_UNSET):
        if getattr(_local, "on", False):
            q, k, v, mask = _autocast_inputs(query, key, value, attn_mask)
            why = call_refusal(q, k, v, mask, dropout_p, is_causal, enable_gqa, attention_kwargs, backend,
                               parallel_config)
            if not why:
                _count_served()
                q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
                attend = None if parallel_config is _UNSET else for_parallel_config(parallel_config)
                if attend is not None:  # this rank's token shard of a context-parallel sequence
                    return attend(q, k, v, scale)
                return ops.attention(q, k, v, _sdpa_mask(mask, q, k), scale)[0]
            _note_fallback(why)
        if parallel_config is _UNSET:
            return self.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                           backend=backend)
        return self.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                       backend=backend, parallel_config=parallel_config)


_INSTALLED: dict[int, dict] = {}  # id(globals) -> the globals dict where the shim stands
_SHIM: Optional[_Shim] = None
_install_lock = threading.RLock()


def _install(stock_cls: type) -> None:
    global _SHIM
    api = _api()
    with _install_lock:
        if _SHIM is None:
            _SHIM = _Shim(api.fn)
        for fn in _dispatching_functions(stock_cls):
            g = fn.__globals__
            if g.get(_FN) is api.fn:
                g[_FN] = _SHIM
                _INSTALLED[id(g)] = g


def _uninstall_if_unused() -> None:
    with _install_lock:
        if len(_LIVE) or _SHIM is None:
            return
        for g in _INSTALLED.values():
            if g.get(_FN) is _SHIM:
                g[_FN] = _SHIM.fn
        _INSTALLED.clear()


def installed_in() -> list[str]:
    """The modules whose ``dispatch_attention_fn`` is the shim now (empty when nothing is bridged)."""
    return sorted(g.get("__name__", "?") for g in _INSTALLED.values() if g.get(_FN) is _SHIM)


# -------------------------------------------------------------------- the per-call rules --

def _backend_name(backend) -> str:
    return str(getattr(backend, "value", backend))


@torch.compiler.assume_constant_result
def _kernel_refusal(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Why our attention kernels cannot run this dtype and head dim on this device ("" if
    they can): the op's own rule, cached (a constant when traced by torch.compile)."""
    return _kernel_rule(device.type, device.index, dtype, head_dim)


@functools.lru_cache(maxsize=None)
def _kernel_rule(device_type: str, index, dtype: torch.dtype, head_dim: int) -> str:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    why = unsupported_device_dtype(device, dtype)
    if why:
        return why
    if device.type == "cuda" and index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = ops.attention_kernel_name(device, dtype, head_dim, 256)
    if name.startswith("unsupported: "):
        why = name.removeprefix("unsupported: ").removeprefix("dda.attention: ").split("; got ")[0]
        return f"head_dim {head_dim} in {str(dtype).removeprefix('torch.')} on {device.type}: {why}"
    return ""


def _autocast_inputs(query, key, value, mask):
    """q, k, v and a float mask as SDPA sees them under autocast (cast to the autocast dtype,
    SDPA being one of autocast's lower-precision ops); unchanged outside autocast."""
    device_type = getattr(getattr(query, "device", None), "type", None)
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return query, key, value, mask
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t

    return cast(query), cast(key), cast(value), cast(mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _sdpa_mask(mask, query, key):
    """diffusers' mask as our op reads it (SDPA's broadcast from the right), with a 2-D
    [B, Sk] mask read as [B, 1, 1, Sk] where diffusers' native backend does."""
    if (mask is not None and mask.dim() == 2 and _api().mask_2d_is_batch
            and mask.shape[0] == query.shape[0] and mask.shape[1] == key.shape[1]):
        return mask[:, None, None, :]
    return mask


def call_refusal(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False,
                 attention_kwargs=None, backend=None, parallel_config=None) -> str:
    """Why one ``dispatch_attention_fn`` call runs diffusers' own attention ("" if our
    kernel serves it). Reads metadata only: no sync, no allocation."""
    if parallel_config is not None and parallel_config is not _UNSET:
        try:
            parallel = for_parallel_config(parallel_config) is not None
        except ValueError as e:
            return str(e)
        if parallel and attn_mask is not None:
            return "a mask under context parallelism (the sharded attention takes none)"
    chosen = backend if backend is not None else _api().registry._active_backend
    if _backend_name(chosen) != _NATIVE:
        return f"attention backend {_backend_name(chosen)!r} chosen (set_attention_backend, attention_backend() " \
               "or DIFFUSERS_ATTN_BACKEND)"
    if attention_kwargs:
        return f"attention_kwargs {sorted(attention_kwargs)} (e.g. return_lse) are not taken by our kernel"
    if dropout_p:
        return "dropout_p > 0 (attention dropout)"
    if is_causal:
        return "is_causal (causal attention)"
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or any(t.dim() != 4 for t in tensors):
        return "q, k, v are not 4-D [B, S, H, D] tensors"
    if query.dtype != key.dtype or query.dtype != value.dtype or query.device != key.device \
            or query.device != value.device:
        return "q, k, v differ in dtype or device"
    B, Sq, H, D = query.shape
    if key.shape[0] != B or value.shape[0] != B or key.shape[1] != value.shape[1]:
        return "q, k, v differ in batch or K/V length"
    if key.shape[2] != H or value.shape[2] != H:
        return "K/V heads differ from Q's (grouped-query attention)"
    if key.shape[3] != D or value.shape[3] != D:
        return "K or V head dim differs from Q's"
    if query.numel() == 0 or key.numel() == 0:
        return "empty q or k"
    if not isinstance(D, int):
        return "symbolic head dim (torch.compile dynamic=True)"
    why = _kernel_refusal(query.device, query.dtype, D)
    if why:
        return why
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or (
            isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad)):
        return "inputs require grad (our attention kernel is inference-only)"
    if (Sq + 191) // 192 * B * H > 2**31 - 1:
        return "too many query tiles x B x H for one CUDA grid"
    if attn_mask is not None:
        return _mask_refusal(_sdpa_mask(attn_mask, query, key), query, key)
    return ""


def _mask_refusal(mask, query, key) -> str:
    if not isinstance(mask, torch.Tensor):
        return "attn_mask is not a tensor"
    if mask.device != query.device:
        return "attn_mask is on another device than q"
    if mask.dtype != torch.bool and mask.dtype != query.dtype and mask.dtype != torch.float32:
        return "attn_mask is neither bool nor an additive mask in float32 or q's dtype"
    if mask.dim() > 4:
        return "attn_mask has more than 4 dims"
    B, Sq, H, _ = query.shape
    target = (B, H, Sq, key.shape[1])
    for i in range(mask.dim()):
        size = mask.shape[i]
        if size != 1 and size != target[4 - mask.dim() + i]:
            return "attn_mask does not broadcast to [B, H, Sq, Sk]"
    return ""


# --------------------------------------------------------------------------- visibility --

_stats_lock = threading.Lock()
_served = [0]
_fallbacks: collections.Counter = collections.Counter()
_warned: set = set()


def _count_served() -> None:
    if not torch.compiler.is_compiling():
        _served[0] += 1


def _note_fallback(why: str) -> None:
    if torch.compiler.is_compiling():
        _note_traced_fallback(why)
    else:
        _record(why)


@torch.compiler.assume_constant_result
def _note_traced_fallback(why: str) -> str:
    # evaluated once, when torch.compile traces the call (the compiled graph then runs
    # diffusers' attention on every call without coming back here)
    _record(why)
    return why


def _record(why: str) -> None:
    with _stats_lock:
        _fallbacks[why] += 1
        first = why not in _warned
        _warned.add(why)
    if first:
        warnings.warn(f"deepspeed_diffusers_attn: a bridged attention call runs diffusers' own attention: {why} "
                      "(counted in deepspeed_diffusers_attn.bridge_stats(); warned once per reason)", stacklevel=4)


def bridge_stats(reset: bool = False) -> dict:
    """The bridged modules' ``dispatch_attention_fn`` calls since the last reset:
    ``{"served": calls run by our kernel, "fallbacks": {reason: calls run by diffusers}}``.

    Eager calls are counted each; under ``torch.compile`` a fallback is counted once, when
    traced, and served calls are not counted; a CUDA graph's replays are not counted.
    ``reset=True`` returns the counts and zeroes them (the once-per-reason warnings too).
    """
    with _stats_lock:
        stats = {"served": _served[0], "fallbacks": dict(_fallbacks)}
        if reset:
            _served[0] = 0
            _fallbacks.clear()
            _warned.clear()
    return stats
