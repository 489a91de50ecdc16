"""CFG-parallel: the two halves of a classifier-free-guidance batch on two ranks.

A pipeline with guidance runs its denoiser on ``[uncond; cond]`` (2·B rows). With
:func:`cfg_parallel` each of W ranks runs ``module.<method>`` on its contiguous N/W rows of
the batch, and one all-gather per call rebuilds the N-row output on every rank, so the
pipeline code around the call is unchanged::

    dist.init_process_group("nccl")                  # torchrun --nproc-per-node 2 script.py
    torch.cuda.set_device(dist.get_rank())
    dda.patch(pipe.unet, cuda_graph=True)            # the graph captures the local half
    cfg_parallel(pipe.unet)                          # unet.forward is now a CFGParallel
    image = pipe(prompt, guidance_scale=7.5).images[0]   # same image on every rank

Communication is ``torch.distributed`` only (gloo on the CPU, NCCL on GPUs).

Which arguments are split (the batch rule):

- N, the call's batch size, is dim 0 of the first tensor with at least one dim, in the
  method's parameter order (``sample`` for a UNet, ``hidden_states`` for a transformer;
  call order if the call does not bind to the signature). N must be divisible by the group's
  world size W (else ValueError on every rank, before any communication).
- Every tensor argument whose dim 0 equals N is sliced to this rank's rows
  ``[rank·N/W, (rank+1)·N/W)``: positional or keyword, and nested in lists, tuples, dicts
  and dataclasses (``added_cond_kwargs``, ControlNet residual lists). So a timestep of shape
  [N] is sliced, and a 0-d or [1] timestep is passed as is, like every other tensor whose
  dim 0 is not N and every non-tensor argument. A tensor that has N rows by coincidence but
  is not per-sample would be sliced too. A call with no such tensor runs whole on every rank.
- Every output tensor whose dim 0 equals N/W is all-gathered along dim 0, in rank order, and
  the output keeps its structure (diffusers' output dataclasses, tuples with
  ``return_dict=False``, lists, dicts). Other output tensors are this rank's own. All
  gathered tensors travel in one all-gather per call (packed into one buffer per dtype).

Errors: after the local call every rank all-reduces a per-rank failure flag before any
all-gather, so a failing rank cannot leave the others waiting. The failing rank re-raises its
own exception; every other rank raises ``RuntimeError("cfg_parallel: rank R failed: ...")``
with that rank's message. The group stays usable afterwards. A rank that dies outright
(killed, segfault) never joins the all-reduce: the others wait for the process group's
timeout, so bound it with ``init_process_group(timeout=...)`` (or this wrapper's ``timeout``).

Costs and limits: one small all-reduce and one host read of it per call (the host waits for
the local step to finish before the all-gather is issued), plus the all-gather. Inference
only: no gradient flows through the all-gather. Wrap after :func:`.patch` /
:func:`.graphs.graph_module_forward` (the CUDA graph then holds the local half only, and no
collective is captured) and call :func:`uncfg_parallel` before ``unpatch`` / ``ungraph_module``.
"""
from __future__ import annotations

import datetime
import inspect
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .graphs import map_tensors

__all__ = ["CFGParallel", "cfg_parallel", "uncfg_parallel"]


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in ``obj``, depth-first, in the order :func:`map_tensors` visits them."""
    found = []

    def visit(t):
        found.append(t)
        return t

    map_tensors(obj, visit)
    return found


class CFGParallel:
    """``module.<method>`` split over the ranks of a process group along the batch (see the module doc).

    fn: the callable it wraps (the bound method, or a :class:`.graphs.GraphedCallable`).
    group: the process group (None: the default group).
    timeout: bound on the wait of the failure-flag all-reduce and the all-gather (None, and for
        the failure path's message exchange: the process group's timeout).
    name: for messages.
    """

    runs_collectives = True  # graphs.check_not_distributed: no graph may capture or unwrap below it

    def __init__(self, fn: Callable, group: Optional[dist.ProcessGroup] = None,
                 timeout: Optional[datetime.timedelta] = None, name: str = "forward"):
        self.fn = fn
        self.group = group
        self.timeout = timeout
        self.name = name
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        target = getattr(fn, "fn", fn)  # a GraphedCallable's own signature is (*args, **kwargs)
        try:
            self._signature = inspect.signature(target)
        except (TypeError, ValueError):
            self._signature = None

    def __repr__(self) -> str:
        return f"CFGParallel({self.name}, rank={self.rank}/{self.world_size})"

    def batch_size(self, args: tuple, kwargs: dict) -> Optional[int]:
        """N: dim 0 of the first tensor with at least one dim, in parameter order (None if none)."""
        ordered: Any = (args, kwargs)
        if self._signature is not None:
            try:
                ordered = list(self._signature.bind(*args, **kwargs).arguments.values())
            except TypeError:
                pass
        for t in _tensors(ordered):
            if t.dim() >= 1:
                return t.shape[0]
        return None

    def __call__(self, *args, **kwargs):
        n_total = self.batch_size(args, kwargs)
        if self.world_size == 1 or n_total is None:
            return self.fn(*args, **kwargs)
        if n_total % self.world_size:
            raise ValueError(f"cfg_parallel({self.name}): batch size N={n_total} is not divisible by "
                             f"the world size W={self.world_size}")
        n = n_total // self.world_size
        lo = self.rank * n
        device = next(t.device for t in _tensors((args, kwargs)) if t.dim() >= 1)
        error: Optional[BaseException] = None
        out, plan = None, None
        try:
            local = map_tensors((args, kwargs),
                                lambda t: t[lo:lo + n] if t.dim() >= 1 and t.shape[0] == n_total else t)
            out = self.fn(*local[0], **local[1])
            plan = self._plan_gather(out, n)  # its allocations too, before the ranks agree that all went well
        except BaseException as e:  # noqa: BLE001  (re-raised below, after the other ranks learn of it)
            error = e
        self._check_errors(error, device)
        return self._gather(out, n, plan)

    # ------------------------------------------------------------------ collectives
    def _wait(self, work) -> None:
        wait(work, self.timeout)

    def _check_errors(self, error: Optional[BaseException], device: torch.device) -> None:
        raise_if_any_failed(error, device, self.group, self.timeout, f"cfg_parallel({self.name})")

    def _plan_gather(self, out, n: int) -> list:
        """Per dtype: (the output tensors with ``n`` rows, their dense forms, the packed local
        rows, the receive buffer): every allocation of the all-gather, made before it."""
        local = [t for t in _tensors(out) if t.dim() >= 1 and t.shape[0] == n]
        plan = []
        for dtype in dict.fromkeys(t.dtype for t in local):
            tensors = [t for t in local if t.dtype == dtype]
            dense = [_dense_order(t) for t in tensors]
            packed = torch.cat([d.reshape(-1) for d, _ in dense])
            plan.append((tensors, dense, packed, packed.new_empty((self.world_size, packed.numel()))))
        return plan

    def _gather(self, out, n: int, plan: list):
        """``out`` with every tensor whose dim 0 is ``n`` all-gathered to W·n rows, in rank order:
        one all-gather per dtype of the packed rows, each tensor in its own dense order
        (channels-last stays channels-last), rank r's rows of tensor i at
        ``buffer[r, offset_i : offset_i + numel_i]``."""
        if not plan:
            return out
        gathered: dict[int, torch.Tensor] = {}
        for tensors, dense, packed, buffer in plan:
            self._wait(dist.all_gather(list(buffer.unbind(0)), packed, group=self.group, async_op=True))
            offset = 0
            for t, (d, restore) in zip(tensors, dense):
                chunk = buffer[:, offset:offset + d.numel()].reshape(self.world_size * n, *d.shape[1:])
                gathered[id(t)] = restore(chunk)
                offset += d.numel()
        return map_tensors(out, lambda t: gathered.get(id(t), t))


def wait(work, timeout: Optional[datetime.timedelta]) -> None:
    """Wait for an async collective, bounded by ``timeout`` (None: the process group's)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


def raise_if_any_failed(error: Optional[BaseException], device: torch.device, group: Optional[dist.ProcessGroup],
                        timeout: Optional[datetime.timedelta], name: str) -> None:
    """The ranks' failure protocol: all-reduce (MAX) a per-rank failure flag; if any rank
    failed, the failing rank re-raises ``error`` and every other rank raises
    ``RuntimeError("<name>: rank R failed: <its message>")`` (the messages travel in one
    all_gather_object, on the failure path only). Every rank of ``group`` must call it once
    per call of the parallel operation, failed or not, so none is left waiting."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    if error is not None:
        flags[rank] = 1
    try:
        wait(dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout)
    except Exception as comm:
        if error is not None:
            raise comm from error
        raise
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    # Failure path only: every rank saw the same flags, so all of them join this gather.
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages: list = [None] * world
    try:
        dist.all_gather_object(messages, message, group=group)
    except Exception:  # noqa: BLE001  (the rank is still named without its message)
        messages = [None] * world
    if error is not None:
        raise error
    first = failed[0]
    detail = messages[first] or "(message unavailable)"
    raise RuntimeError(f"{name}: rank {first} failed: {detail}")


def _dense_order(t: torch.Tensor):
    """(a contiguous tensor with ``t``'s dim 0 first, a function from its gathered form back to ``t``'s layout)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1), lambda g: g.permute(0, 3, 1, 2)
    return t.contiguous(), lambda g: g


def cfg_parallel(module: nn.Module, group: Optional[dist.ProcessGroup] = None, method: str = "forward",
                 timeout: Optional[datetime.timedelta] = None) -> CFGParallel:
    """Split ``module.<method>`` over the ranks of ``group`` along the batch (set as an instance attribute).

    Every rank of ``group`` must wrap the same module and make the same calls. The batch rule,
    the error behaviour and the costs are in the module doc. If ``module.<method>`` is a
    :class:`.graphs.GraphedCallable`, it is wrapped as is, so its graphs capture the local
    half. With W == 1 the wrapper calls straight through (no collective), so the same script
    runs under ``torchrun --nproc-per-node 1``.

    Raises RuntimeError if torch.distributed is not available or not initialized, and
    ValueError if ``module`` has no such method or it is already cfg-parallel.
    ``timeout`` bounds the wait of the failure-flag all-reduce and the all-gather (None: the
    process group's timeout, which also bounds the failure path's message exchange). A
    graph wrapper may be below it, never above it: :func:`.graphs.graph_module_forward`,
    :func:`.graphs.ungraph_module` and :func:`.unpatch` raise on a cfg-parallel method.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cfg_parallel: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group() first (e.g. under torchrun)")
    current = module.__dict__.get(method)
    if isinstance(current, CFGParallel):
        raise ValueError(f"{type(module).__name__}.{method} is already cfg-parallel; uncfg_parallel() it first")
    fn = getattr(module, method, None)
    if not callable(fn):
        raise ValueError(f"{type(module).__name__} has no method {method!r}")
    if dist.get_rank(group) < 0:
        raise ValueError("cfg_parallel: this process is not a member of the given process group")
    wrapper = CFGParallel(fn, group=group, timeout=timeout, name=f"{type(module).__name__}.{method}")
    wrapper._restore = (method in module.__dict__, current)
    module.__dict__[method] = wrapper
    return wrapper


def uncfg_parallel(module: nn.Module, method: str = "forward") -> bool:
    """Restore ``module.<method>`` as it was before :func:`cfg_parallel`. Returns whether it was wrapped."""
    wrapper = module.__dict__.get(method)
    if not isinstance(wrapper, CFGParallel):
        return False
    had_attr, previous = wrapper._restore
    if had_attr:
        module.__dict__[method] = previous
    else:
        del module.__dict__[method]
    return True
