"""CUDA-graph wrappers for a UNet's ``forward`` and a VAE's ``decode`` / ``encode``, keyed by input signature.

    wrapper = graph_module_forward(unet)            # unet.forward is now a GraphedCallable
    noise = unet(latents, t, encoder_hidden_states=emb).sample   # captured on first call, replayed after
    ungraph_module(unet)                             # restores the original forward, frees the graphs

:func:`deepspeed_diffusers_attn.patch` with ``cuda_graph=True`` does this for a
pipeline's ``unet`` and ``vae``. Nothing here depends on attention patching: a stock
diffusers UNet is graphed the same way (the benchmarks compare both).

How a call is served (:class:`GraphedCallable`):

1. The arguments are bound to the callable's signature (so positional and keyword
   forms are the same call) and reduced to a *signature key*
   (:func:`signature_key`): for every tensor, nested in dicts, lists and tuples
   (SDXL's ``added_cond_kwargs``, ControlNet's residual lists, ``timestep_cond``,
   ``cross_attention_kwargs``), its shape, dtype, device and layout (contiguous,
   channels-last, or its strides); which arguments are present; and the value of every
   non-tensor argument (``return_dict``, python floats and ints, strings...), since those
   are frozen into a captured graph. A ``tensor_scalars`` argument (the UNet's
   ``timestep``) is the exception: a python int/float (or a one-element CPU tensor)
   there changes every denoising step, so it is a graph *input* (a 0-d int64/float64
   device tensor, exactly what diffusers builds from it), and only its dtype is in the key.
2. A known key replays its graph: the call's tensors are copied into the graph's static
   input buffers, the graph is replayed on the current stream, and the outputs are
   cloned (``clone_outputs=True``, the default), so they stay valid after later calls.
   The return structure is rebuilt as the callable returned it at capture
   (``UNet2DConditionOutput``, a tuple, ``DecoderOutput``, ``AutoencoderKLOutput`` with
   its ``DiagonalGaussianDistribution``...).
3. A new key captures a new graph: static buffers get the call's values, ``warmup``
   eager calls run on a side stream (cuBLAS/cuBLASLt plans and cuDNN are set up there:
   our GEMM plans are not made during capture), then one call is captured on that same
   stream.
4. A call that cannot be captured runs eagerly, and says why once per reason
   (:class:`GraphFallbackWarning`): CPU tensors, tensors on two devices, autograd
   (grad enabled and an input or parameter requiring grad), arguments that are neither
   tensors nor plain values, or a capture that failed (that signature then stays eager).

Memory. Each graph owns its activations and outputs in a CUDA-graph memory pool; all
graphs of one wrapper (and device) share one pool (``torch.cuda.graph_pool_handle()``),
so the pool is about the largest graph's activations plus every live graph's outputs,
not the sum of all graphs. Static inputs live outside the pool. At most ``max_graphs``
graphs (default 8) are kept per wrapper, least recently used evicted first. The
attention layers' scratch memory of a captured call comes from the pool too
(:mod:`.workspace`), so a graph never reads memory an eager call owns.
:meth:`GraphedCallable.reset` and :func:`ungraph_module` free everything.

Rules for callers:

* Replays must be serialised (one thread; graphs of one wrapper share memory). A call on
  a different stream than the previous one first waits for the previous stream.
* With ``clone_outputs=False`` the returned tensors are the graph's own buffers: they are
  overwritten by the next call of this wrapper (any signature), and may be clobbered by
  a replay of another graph of the same pool.
* The module's Python-side state is part of the key (:mod:`.module_state`): active
  LoRA adapters and their scales, disabled or merged adapters, attention processors and
  their values (an IP-Adapter's scale). ``set_adapters``, ``disable_lora``, ``fuse_lora``,
  ``set_ip_adapter_scale`` and ``set_attn_processor`` therefore take effect at the next
  call: a new state captures its own graph (LRU as above), a state seen before replays
  its graph. Loading or unloading adapters changes the module's structure and drops every
  graph. Other Python state a forward reads is not seen: call :meth:`GraphedCallable.reset`.
* Parameters are read in place: updating them in place (``load_state_dict``, ``copy_``)
  is seen by the graphs. Moving them (``.to()``, ``.half()``, diffusers' VAE upcast) is
  detected (their data pointers are checked each call) and recaptures; replacing
  Parameter objects or submodules is not detected: call :meth:`GraphedCallable.reset`.
* Global settings read at capture (TF32 flags, SDPA backend choice) are frozen into the
  graph. Do not combine with ``torch.compile`` of the same module (use one or the other).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import inspect
import numbers
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .module_state import ModelState

__all__ = [
    "GraphedCallable",
    "GraphFallbackWarning",
    "CaptureError",
    "graph_module_forward",
    "ungraph_module",
    "graphed_methods",
    "signature_key",
    "check_options",
    "DEFAULT_MAX_GRAPHS",
]

DEFAULT_MAX_GRAPHS = 8

_PLAIN_VALUES = (type(None), bool, numbers.Number, str, bytes, torch.dtype, torch.device,
                 torch.memory_format, enum.Enum)


class GraphFallbackWarning(UserWarning):
    """A graphed callable ran eagerly; the message says why (given once per reason)."""


class CaptureError(RuntimeError):
    """Raised by a capture function when capturing (not the eager warm-up) failed; that signature runs eagerly."""


class _HostScalar:
    """A per-call scalar of a ``tensor_scalars`` argument, fed to the graph as a 0-d/1-element tensor."""

    __slots__ = ("value", "dtype", "shape")

    def __init__(self, value, dtype: torch.dtype, shape: tuple):
        self.value, self.dtype, self.shape = value, dtype, shape


def _host_scalar(value) -> Optional[_HostScalar]:
    """``value`` as a graph input if it is a python int/float or a one-element CPU tensor, else None.

    dtypes follow diffusers' ``get_time_embed``: float -> float64, int -> int64.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return _HostScalar(int(value), torch.int64, ())
    if isinstance(value, float):
        return _HostScalar(float(value), torch.float64, ())
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel() == 1:
        return _HostScalar(value.item(), value.dtype, tuple(value.shape))
    return None


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill a contiguous block without overlap (in some dim order)."""
    expected = 1
    for size, stride in sorted((s, st) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor, channels_last: bool):
    """The layout part of a tensor's key; also what its static buffer will look like.

    'contiguous' / 'channels_last' buffers are made in that format; ('strided', s) keeps
    a dense tensor's strides; ('copied', s) is a non-dense tensor (expanded, sliced),
    copied into a contiguous buffer (the strides stay in the key).
    """
    if channels_last and t.dim() == 4 and t.is_floating_point():
        return "channels_last"
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return ("strided" if _dense(t) else "copied", tuple(t.stride()))


def _spec(value, path: str, channels_last: bool, leaves: list, problems: list):
    """The hashable key of one (possibly nested) argument; appends its tensors to ``leaves``."""
    if isinstance(value, _HostScalar):
        leaves.append(value)
        return ("scalar", value.dtype, value.shape)
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        if value.layout != torch.strided:
            problems.append(f"{path} is a {value.layout} tensor")
        return ("tensor", tuple(value.shape), value.dtype, str(value.device), _layout(value, channels_last))
    if isinstance(value, (list, tuple)) and (type(value) in (list, tuple) or hasattr(value, "_fields")):
        return (type(value).__name__,
                tuple(_spec(v, f"{path}[{i}]", channels_last, leaves, problems) for i, v in enumerate(value)))
    if type(value) is dict:
        items = []
        for k, v in value.items():
            if not isinstance(k, _PLAIN_VALUES):
                problems.append(f"{path} has a key of type {type(k).__name__}")
            items.append((k, _spec(v, f"{path}[{k!r}]", channels_last, leaves, problems)))
        return ("dict", tuple(items))
    if isinstance(value, _PLAIN_VALUES):
        return ("value", type(value).__qualname__, value)
    problems.append(f"{path} is a {type(value).__qualname__} (neither a tensor nor a plain value, "
                    "so a graph cannot be keyed on it)")
    return ("object", id(value))


def signature_key(arguments: dict, *, tensor_scalars=(), ignored=(), channels_last: bool = False,
                  extra=()) -> tuple[tuple, list, list[str]]:
    """(key, leaves, problems) for one call's bound arguments (name -> value, in call order).

    ``leaves``: the call's tensors (and :class:`_HostScalar` s for ``tensor_scalars``
    arguments given as python numbers or one-element CPU tensors), in the order the key
    lists them. ``problems``: why this call cannot be graphed (empty if it can).
    ``ignored`` arguments are left out of the key. ``extra`` is prepended to the key.
    A pure function: no CUDA, no side effects.
    """
    leaves: list = []
    problems: list[str] = []
    parts = []
    for name, value in arguments.items():
        if name in ignored:
            continue
        if name in tensor_scalars:
            value = _host_scalar(value) or value
        parts.append((name, _spec(value, name, channels_last, leaves, problems)))
    return (tuple(extra), tuple(parts)), leaves, problems


def _replace_leaves(arguments: dict, new_leaves: list, tensor_scalars=(), ignored=()) -> dict:
    """``arguments`` with its leaves (in :func:`signature_key` order) replaced by ``new_leaves``."""
    it = iter(new_leaves)

    def walk(value):
        if isinstance(value, torch.Tensor):
            return next(it)
        if isinstance(value, (list, tuple)) and (type(value) in (list, tuple) or hasattr(value, "_fields")):
            items = [walk(v) for v in value]
            if type(value) in (list, tuple):
                return type(value)(items)
            return type(value)(*items)
        if type(value) is dict:
            return {k: walk(v) for k, v in value.items()}
        return value

    out = {}
    for name, value in arguments.items():
        if name not in ignored and name in tensor_scalars and _host_scalar(value) is not None:
            out[name] = next(it)
        elif name in ignored:
            out[name] = value
        else:
            out[name] = walk(value)
    return out


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` rebuilt with ``fn`` applied to every tensor in it.

    Handles tensors, lists, tuples (named too), dicts, dataclasses (diffusers'
    ``BaseOutput`` subclasses) and plain objects holding tensors in their ``__dict__``
    (diffusers' ``DiagonalGaussianDistribution``, copied shallowly). Anything else is
    returned as is.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(v, fn) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: map_tensors(getattr(obj, f.name), fn)
                            for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, nn.Module) or not hasattr(obj, "__dict__") or isinstance(obj, type):
        return obj
    if not any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
        return obj
    new = copy.copy(obj)
    for k, v in vars(obj).items():
        new.__dict__[k] = map_tensors(v, fn)
    return new


def _static_for(leaf, layout, device: torch.device) -> torch.Tensor:
    if isinstance(leaf, _HostScalar):
        return torch.empty(leaf.shape, dtype=leaf.dtype, device=device)
    if layout == "channels_last":
        return torch.empty(leaf.shape, dtype=leaf.dtype, device=device, memory_format=torch.channels_last)
    if isinstance(layout, tuple) and layout[0] == "strided":
        return torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=device)
    return torch.empty(leaf.shape, dtype=leaf.dtype, device=device)


def _fill(static: torch.Tensor, leaf) -> None:
    if isinstance(leaf, _HostScalar):
        static.fill_(leaf.value)
    else:
        static.copy_(leaf)


def _layouts(leaves: list, channels_last: bool) -> list:
    return [None if isinstance(x, _HostScalar) else _layout(x, channels_last) for x in leaves]


class _CudaCapture:
    """Captures on a side stream of the device, into one memory pool (per wrapper and device)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pools: dict[torch.device, tuple] = {}

    def __call__(self, run: Callable[[], Any], device: torch.device):
        """(replay, static output) for ``run``, which reads only static buffers."""
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
            self.pools[device] = torch.cuda.graph_pool_handle()
        stream = self.streams[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                run()  # cuBLAS / cuBLASLt plans and cuDNN set up outside capture
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pools[device], stream=stream):
                out = run()
        except Exception as e:  # noqa: BLE001  (the eager warm-up worked, so this is capture-specific)
            raise CaptureError(f"{type(e).__name__}: {e}") from e
        torch.cuda.current_stream(device).wait_stream(stream)

        def replay():
            graph.replay()  # the graph (and its pool's memory) lives as long as this closure

        replay.keepalive = graph
        return replay, out


class GraphedCallable:
    """A callable that runs ``fn`` through CUDA graphs keyed by its input signature (see the module doc).

    fn: the callable (usually a bound method such as ``unet.forward``).
    module: the nn.Module ``fn`` belongs to, if any: its training flag and Python-side
        state (:class:`.module_state.ModelState`) go into the key,
        its parameters' data pointers are checked before each replay, and parameters
        requiring grad under grad mode make the call eager.
    tensor_scalars: argument names whose python int/float values are graph inputs
        (``("timestep",)`` for a UNet), see :func:`signature_key`.
    ignored_args: argument names ``fn`` does not use (``AutoencoderKL.decode``'s
        ``generator``): left out of the key and passed through.
    max_graphs: graphs kept (LRU). clone_outputs: return clones of the graph's outputs
        (safe to keep) or the graph's own buffers (valid until the next call).
    channels_last: 4-D floating inputs are given to ``fn`` in channels-last format
        (the module's weights are converted by :func:`graph_module_forward`).
    cuda_graph: False gives only the input conversion, eagerly.
    warmup: eager calls on the capture stream before each capture.
    capture: for tests, a function ``(run, device) -> (replay, static_output)``
        replacing CUDA capture (then devices are not checked); it raises
        :class:`CaptureError` for a failed capture.
    """

    def __init__(self, fn: Callable, *, module: Optional[nn.Module] = None, tensor_scalars=(),
                 ignored_args=(), max_graphs: int = DEFAULT_MAX_GRAPHS, clone_outputs: bool = True,
                 channels_last: bool = False, cuda_graph: bool = True, warmup: int = 2,
                 capture: Optional[Callable] = None, name: Optional[str] = None):
        check_options(max_graphs=max_graphs, clone_outputs=clone_outputs, channels_last=channels_last,
                       cuda_graph=cuda_graph, warmup=warmup)
        self.fn = fn
        self.module = module
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.tensor_scalars = tuple(tensor_scalars)
        self.ignored_args = tuple(ignored_args)
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self._capture = capture if capture is not None else _CudaCapture(warmup)
        self._fake_capture = capture is not None
        try:
            self._signature = inspect.signature(fn)
        except (TypeError, ValueError):
            self._signature = None
        self._graphs: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self._eager: dict[tuple, str] = {}  # keys whose capture failed -> reason
        self._warned: set[str] = set()
        self._params: list[torch.Tensor] = []
        self._param_ptrs: list[int] = []
        self._last_stream = None
        self._state = ModelState(module) if module is not None else None
        self.stats = collections.Counter()  # captures, replays, eager, evictions, resets

    # ------------------------------------------------------------------ public
    @property
    def num_graphs(self) -> int:
        """How many captured graphs (signatures) the cache holds now."""
        return len(self._graphs)

    def keys(self) -> list[tuple]:
        """The signature keys of the live graphs, least recently used first."""
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph (their memory returns to the pool, and the pool is freed with the last)."""
        if self._graphs and not self._fake_capture and torch.cuda.is_available():
            torch.cuda.synchronize()  # no replay may still be running when its graph is destroyed
        self._graphs.clear()
        self._eager.clear()
        self._params, self._param_ptrs = [], []
        self.stats["resets"] += 1

    def __repr__(self) -> str:
        return (f"GraphedCallable({self.name}, graphs={len(self._graphs)}/{self.max_graphs}, "
                f"clone_outputs={self.clone_outputs}, channels_last={self.channels_last}, "
                f"cuda_graph={self.cuda_graph})")

    # ------------------------------------------------------------------ call
    def __call__(self, *args, **kwargs):
        arguments = self._bind(args, kwargs)
        if arguments is None:  # fn's signature is unknown or the call does not bind: let fn decide
            return self.fn(*args, **kwargs)
        if not self.cuda_graph:
            return self._call(self._converted(arguments))
        extra = self._module_state_key()
        key, leaves, problems = signature_key(arguments, tensor_scalars=self.tensor_scalars,
                                              ignored=self.ignored_args, channels_last=self.channels_last,
                                              extra=extra)
        device, why = self._device(leaves)
        problems = problems + why + self._autograd_problems(leaves)
        if problems:
            return self._eager_call(arguments, "; ".join(problems))
        if key in self._eager:
            return self._eager_call(arguments, self._eager[key])
        self._check_params()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new_graph(key, arguments, leaves, device)
            if entry is None:
                return self._eager_call(arguments, self._eager[key])
        else:
            self._graphs.move_to_end(key)
        return self._replay(entry, leaves, device)

    def _module_state_key(self) -> tuple:
        """The module's training flag and Python-side state (:mod:`.module_state`), for the key.

        A changed structure (adapters loaded or unloaded, modules swapped) drops every graph:
        they may read parameters that no longer exist.
        """
        if self.module is None:
            return ()
        if self._state.refresh() and (self._graphs or self._eager):
            if "structure" not in self._warned:
                self._warned.add("structure")
                warnings.warn(f"deepspeed_diffusers_attn: {self.name}: the module's submodules or parameters "
                              "changed (adapters loaded or unloaded?); its CUDA graphs are recaptured",
                              GraphFallbackWarning, stacklevel=3)
            self.reset()
        return (self.module.training, self._state.key())

    def _bind(self, args, kwargs) -> Optional[dict]:
        if self._signature is None:
            return None
        try:
            return dict(self._signature.bind(*args, **kwargs).arguments)
        except TypeError:
            return None

    def _call(self, arguments: dict):
        bound = inspect.BoundArguments(self._signature, collections.OrderedDict(arguments))
        return self.fn(*bound.args, **bound.kwargs)

    def _converted(self, arguments: dict) -> dict:
        if not self.channels_last:
            return arguments

        def fmt(t):
            if t.dim() == 4 and t.is_floating_point():
                return t.contiguous(memory_format=torch.channels_last)
            return t

        return {k: (v if k in self.ignored_args else map_tensors(v, fmt)) for k, v in arguments.items()}

    def _eager_call(self, arguments: dict, reason: str):
        self.stats["eager"] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"deepspeed_diffusers_attn: {self.name} ran without a CUDA graph: {reason}",
                          GraphFallbackWarning, stacklevel=3)
        return self._call(self._converted(arguments))

    def _device(self, leaves) -> tuple[Optional[torch.device], list[str]]:
        devices = {x.device for x in leaves if isinstance(x, torch.Tensor)}
        if self._fake_capture:
            return (next(iter(devices)) if devices else torch.device("cpu")), []
        cuda = {d for d in devices if d.type == "cuda"}
        if not cuda:
            return None, ["no input tensor is on a CUDA device (CPU inputs cannot be captured)"]
        if len(devices) > 1:
            return None, [f"inputs are on several devices ({', '.join(sorted(map(str, devices)))})"]
        device = next(iter(cuda))
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device, []

    def _autograd_problems(self, leaves) -> list[str]:
        if not torch.is_grad_enabled():
            return []
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
            return ["an input requires grad (graphs here are inference-only; use torch.no_grad())"]
        if self.module is not None and any(p.requires_grad for p in self.module.parameters()):
            return ["autograd is on and parameters require grad (graphs here are inference-only; "
                    "call under torch.no_grad() or torch.inference_mode())"]
        return []

    def _check_params(self) -> None:
        """Recapture everything if the module's parameters or buffers moved since the last capture."""
        if self.module is None or not self._params:
            return
        if list(map(torch.Tensor.data_ptr, self._params)) != self._param_ptrs:  # ~40 us for 700 tensors
            if "moved" not in self._warned:
                self._warned.add("moved")
                warnings.warn(f"deepspeed_diffusers_attn: {self.name}: the module's parameters moved "
                              "(.to(), .half(), ...); its CUDA graphs are recaptured", GraphFallbackWarning,
                              stacklevel=4)
            self.reset()

    def _snapshot_params(self) -> None:
        if self.module is not None and not self._params:
            self._params = list(self.module.parameters()) + list(self.module.buffers())
            self._param_ptrs = list(map(torch.Tensor.data_ptr, self._params))

    def _new_graph(self, key, arguments, leaves, device) -> Optional["_Entry"]:
        while len(self._graphs) >= self.max_graphs:
            if not self._fake_capture:
                torch.cuda.synchronize(device)  # the evicted graph may still be replaying
            self._graphs.popitem(last=False)
            self.stats["evictions"] += 1
        self._snapshot_params()
        layouts = _layouts(leaves, self.channels_last)
        with torch.no_grad(), torch.inference_mode(False):
            static = [_static_for(x, lay, device) for x, lay in zip(leaves, layouts)]
            for s, x in zip(static, leaves):
                _fill(s, x)
            static_args = _replace_leaves(arguments, static, self.tensor_scalars, self.ignored_args)

            def run():
                return self._call(static_args)

            try:
                if self._fake_capture:
                    replay, out = self._capture(run, device)
                else:
                    with torch.cuda.device(device):
                        replay, out = self._capture(run, device)
            except CaptureError as e:  # errors of the eager warm-up are the caller's and propagate
                self._eager[key] = f"CUDA-graph capture failed for this signature ({e})"
                self.stats["capture_failures"] += 1
                return None
        entry = _Entry(replay, static, out)
        self._graphs[key] = entry
        self.stats["captures"] += 1
        return entry

    def _replay(self, entry: "_Entry", leaves, device):
        self.stats["replays"] += 1
        if not self._fake_capture:
            stream = torch.cuda.current_stream(device)
            if self._last_stream is not None and self._last_stream != stream:
                stream.wait_stream(self._last_stream)
            self._last_stream = stream
        with torch.no_grad():
            for s, x in zip(entry.static, leaves):
                _fill(s, x)
            entry.replay()
            if self.clone_outputs:
                return map_tensors(entry.output, torch.Tensor.clone)
            return entry.output


@dataclasses.dataclass
class _Entry:
    replay: Callable[[], None]
    static: list  # static input buffers, in leaf order
    output: Any  # the static output structure


def check_options(**options) -> None:
    """Validate graph options by name (``clone_outputs``, ``channels_last``, ``cuda_graph``:
    bools; ``max_graphs``, ``warmup``: ints >= 1); raises TypeError / ValueError."""
    for name in ("clone_outputs", "channels_last", "cuda_graph"):
        if name in options and not isinstance(options[name], bool):
            raise TypeError(f"{name} must be a bool, got {options[name]!r}")
    for name, low in (("max_graphs", 1), ("warmup", 1)):
        v = options.get(name, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


# ---------------------------------------------------------------------- modules
def _to_channels_last(module: nn.Module) -> list[torch.Tensor]:
    """Convert the module's 4-D parameters and buffers to channels-last; returns those converted."""
    converted = []
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)
                converted.append(t)
    return converted


def _restore_contiguous(tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.contiguous()


def graph_module_forward(module: nn.Module, method: str = "forward", **options) -> GraphedCallable:
    """Wrap ``module.<method>`` in a :class:`GraphedCallable` (set as an instance attribute).

    Options are :class:`GraphedCallable`'s. A UNet's ``forward`` gets
    ``tensor_scalars=("timestep",)`` and ``AutoencoderKL.decode`` gets
    ``ignored_args=("generator",)`` unless given. With ``channels_last=True`` the
    module's 4-D weights are converted (restored by :func:`ungraph_module`).
    Wrapping a wrapped method raises ValueError.
    """
    current = module.__dict__.get(method)
    if isinstance(current, GraphedCallable):
        raise ValueError(f"{type(module).__name__}.{method} is already graphed; ungraph_module() it first")
    check_not_distributed(module, method)
    if not callable(getattr(module, method, None)):
        raise ValueError(f"{type(module).__name__} has no method {method!r}")
    sig_params = inspect.signature(getattr(module, method)).parameters
    if "tensor_scalars" not in options and "timestep" in sig_params:
        options["tensor_scalars"] = ("timestep",)
    if "ignored_args" not in options and method == "decode" and "generator" in sig_params \
            and type(module).__name__ == "AutoencoderKL":
        options["ignored_args"] = ("generator",)  # AutoencoderKL.decode documents it as unused
    options.setdefault("name", f"{type(module).__name__}.{method}")
    wrapper = GraphedCallable(getattr(module, method), module=module, **options)
    wrapper._restore = (method, method in module.__dict__, current)
    wrapper._converted_params = _to_channels_last(module) if wrapper.channels_last else []
    module.__dict__[method] = wrapper
    return wrapper


def check_not_distributed(module: nn.Module, method: Optional[str] = None) -> None:
    """ValueError if ``module.<method>`` (any method when None) is wrapped by a wrapper that runs
    collectives (:func:`.parallel.cfg_parallel`): a graph must not capture them, and the graph
    wrapper below it cannot be removed first."""
    for name, value in module.__dict__.items():
        if (method is None or name == method) and getattr(value, "runs_collectives", False):
            raise ValueError(f"{type(module).__name__}.{name} is cfg-parallel: call uncfg_parallel() first "
                             "(cfg_parallel goes on after patch / graph_module_forward, and comes off before)")


def graphed_methods(module: nn.Module) -> dict[str, GraphedCallable]:
    """The module's wrapped methods: name -> GraphedCallable."""
    return {k: v for k, v in module.__dict__.items() if isinstance(v, GraphedCallable)}


def ungraph_module(module: nn.Module, method: Optional[str] = None) -> list[str]:
    """Remove the wrapper(s) from ``module`` (all, or just ``method``), free their graphs,
    restore the weights' memory format and the exact previous attribute. Returns the names.
    ValueError if a cfg-parallel wrapper sits on the method (uncfg_parallel() first)."""
    check_not_distributed(module, method)
    removed = []
    for name, wrapper in list(graphed_methods(module).items()):
        if method is not None and name != method:
            continue
        wrapper.reset()
        _restore_contiguous(wrapper._converted_params)
        _, had_attr, previous = wrapper._restore
        if had_attr:
            module.__dict__[name] = previous
        else:
            del module.__dict__[name]
        removed.append(name)
    return removed
