"""Context-parallel attention: one attention over a sequence whose tokens are sharded across ranks.

Each of the W ranks of a process group holds a contiguous shard of the tokens: rank r holds
rows ``[r·Sq, (r+1)·Sq)`` of the queries and ``[r·Sk, (r+1)·Sk)`` of the keys and values, as
``q [B, Sq, H, D]`` and ``k, v [B, Sk, H, D]``, with the same B, Sq, Sk, H, D and dtype on
every rank. Both functions return this rank's rows of ``attention(q_all, k_all, v_all)``,
``[B, Sq, H, D]`` contiguous in q's dtype, as if the whole sequence were on one device::

    dist.init_process_group("nccl")                   # torchrun --nproc-per-node 2 ...
    o = ulysses_attention(q, k, v)                    # q, k, v: this rank's tokens

- :func:`ulysses_attention`: one all-to-all turns the token-sharded q/k/v into head-sharded
  ones (rank r gets heads ``[r·H/W, (r+1)·H/W)`` of the whole sequence), :func:`.ops.attention`
  runs on whole sequences, and one all-to-all returns this rank's tokens. H must be divisible
  by W. Each rank sends and receives (W-1)/W of its q, k, v and output.
- :func:`ring_attention`: the K/V shards travel around the ring in W-1 steps; each step sends
  the shard in hand to rank r+1 and receives the next from rank r-1 while the attention of
  the one in hand runs, and the partial outputs merge through their log-sum-exp (fp32). Any
  H; each rank sends and receives (W-1) K/V shards and holds two at a time. Each partial
  output is rounded to q's dtype before the merge (W roundings instead of one).

Both take no mask (the DiTs they serve attend unmasked); scale defaults to ``1/sqrt(D)``.
Communication is ``torch.distributed`` only (gloo on the CPU, NCCL on GPUs); ``group`` is the
process group (None: the default one), ``timeout`` bounds every wait (None: the group's).

Checks and errors (``check=True``, the default): a call first allocates every buffer its
exchanges need, then makes one small all-reduce in which the ranks agree on the sizes and
dtype and on whether each passed its own checks (shapes that fit, Ulysses' H divisible by W,
the allocations), before any data moves. Shards whose sizes differ raise ValueError on every
rank; a rank whose own check failed re-raises its error and every other rank raises
RuntimeError naming it (group rank). A rank whose attention raises still joins the remaining
exchanges, and the call ends with the same failure protocol
(:func:`.parallel.raise_if_any_failed`), so no rank hangs. That is two small all-reduces and
a few host reads of them per call; ``check=False`` skips them (a mismatch then surfaces as
the collective's own error or timeout, and a failing rank leaves the others waiting until
``timeout``). Inference only: no gradient flows through the exchanges.
"""
from __future__ import annotations

import datetime
import functools
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import ops
from .parallel import raise_if_any_failed, wait

__all__ = ["enable", "for_parallel_config", "processor_refusal", "ring_attention", "ulysses_attention"]

_SIZES = ("B", "Sq", "Sk", "H", "D", "dtype")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # "dtype" in _agree


def _local_error(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[ValueError]:
    """Why this rank's q, k, v do not fit (None if they do)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return ValueError(f"{name}: q must be [B, Sq, H, D] and k, v [B, Sk, H, D], got q {tuple(q.shape)}, "
                          f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        return ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, H or D")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return ValueError(f"{name}: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                          f"on {q.device}/{k.device}/{v.device}")
    return None


def _agree(name: str, q: torch.Tensor, k: torch.Tensor, error: Optional[BaseException],
           group: Optional[dist.ProcessGroup], timeout: Optional[datetime.timedelta]) -> None:
    """One all-reduce (MAX) of every rank's failure flag and of its sizes and their negatives:
    raises on every rank if a rank failed its own checks (the failure protocol) or the ranks'
    sizes differ (ValueError naming each size's range)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = ([q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], _DTYPE_CODES.get(q.dtype, -1)]
             if error is None else [0] * len(_SIZES))
    buf = torch.zeros(world + 2 * len(sizes), dtype=torch.int64, device=q.device)
    buf[rank] = int(error is not None)
    buf[world:world + len(sizes)] = torch.tensor(sizes)
    buf[world + len(sizes):] = -torch.tensor(sizes)
    wait(dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout)
    if buf[:world].any():
        raise_if_any_failed(error, q.device, group, timeout, name)
    high = buf[world:world + len(sizes)].tolist()
    low = (-buf[world + len(sizes):]).tolist()
    if high != low:
        ranges = ", ".join(f"{n} {lo}..{hi}" for n, lo, hi in zip(_SIZES, low, high) if lo != hi)
        raise ValueError(f"{name}: the ranks' shards differ ({ranges}); every rank needs the same B, Sq, Sk, H, "
                         "D and dtype")


def _start(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, error: Optional[BaseException],
           allocate: Callable[[], tuple], check: bool, group: Optional[dist.ProcessGroup],
           timeout: Optional[datetime.timedelta]) -> Optional[tuple]:
    """A call's start: this rank's checks (and ``error``, the caller's own), then ``allocate()``
    (every buffer the exchanges need, so that an out-of-memory there is one more failure the
    ranks agree on), then with ``check`` the ranks' agreement (:func:`_agree`), raising where
    they fail. Returns the buffers, or None when the group has one rank (the caller then
    attends locally)."""
    error = _local_error(name, q, k, v) or error
    buffers = None
    if error is None and dist.get_world_size(group) > 1:
        try:
            buffers = allocate()
        except BaseException as e:  # noqa: BLE001  (raised below, on every rank)
            if not check:
                raise
            error = e
    if check:
        _agree(name, q, k, error, group, timeout)
    elif error is not None:
        raise error
    return buffers


def _global(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                      group: Optional[dist.ProcessGroup] = None, timeout: Optional[datetime.timedelta] = None,
                      check: bool = True, precision: str = "exact") -> torch.Tensor:
    """This rank's rows of attention over the token-sharded sequence, by head-sharding (see the
    module doc). q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``: this rank's tokens; H divisible
    by the world size W. Returns ``[B, Sq, H, D]``. ``precision``: the attention op's."""
    name = "ulysses_attention"
    world = dist.get_world_size(group)
    heads = None if q.dim() != 4 or q.shape[2] % world == 0 else ValueError(
        f"{name}: {q.shape[2]} heads do not split over {world} ranks; use ring_attention for head counts the "
        "world size does not divide")

    def pieces(buf: torch.Tensor, B: int, Sq: int, Sk: int, Hl: int, D: int) -> tuple:
        """q, k, v of a send / receive buffer [W, ...] as [W, S, B, Hl, D] views: row j is rank
        j's (to send: head group j of this rank's tokens; received: this rank's head group of
        rank j's tokens), token-major. With Sq == Sk a token's q, k and v sit side by side."""
        if Sq == Sk:
            six = buf.view(world, Sq, 3, B, Hl, D)
            return six[:, :, 0], six[:, :, 1], six[:, :, 2]
        nq, nk = Sq * B * Hl * D, Sk * B * Hl * D
        return (buf[:, :nq].view(world, Sq, B, Hl, D), buf[:, nq:nq + nk].view(world, Sk, B, Hl, D),
                buf[:, nq + nk:].view(world, Sk, B, Hl, D))

    def allocate() -> tuple:  # the packed q/k/v to send, its receive buffer, the output's send and receive buffers
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        send = q.new_empty(world, (Sq + 2 * Sk) * B * (H // world) * D)
        for piece, t in zip(pieces(send, B, Sq, Sk, H // world, D), (q, k, v)):
            piece.copy_(t.reshape(B, t.shape[1], world, H // world, D).permute(2, 1, 0, 3, 4))
        n_out = q.numel() // world
        return send, torch.empty_like(send), q.new_empty(world, n_out), q.new_empty(world, n_out)

    buffers = _start(name, q, k, v, heads, allocate, check, group, timeout)
    if buffers is None:
        return ops.attention(q, k, v, None, scale, precision=precision)[0]
    send, recv, back, out = buffers
    B, Sq, H, D = q.shape
    Sk, Hl = k.shape[1], H // world

    def whole_sequence(piece: torch.Tensor) -> torch.Tensor:
        """[W, S, B, Hl, D] (rank w's tokens) -> [1, W·S, B·Hl, D]: the batch folded into the heads
        (attention treats every (b, h) alike, and takes no mask here). A strided view of the
        receive buffer when q, k and v are interleaved; a copy otherwise."""
        return piece.reshape(world * piece.shape[1], B * Hl, D).unsqueeze(0)

    wait(dist.all_to_all_single(recv, send, group=group, async_op=True), timeout)
    error: Optional[BaseException] = None
    try:
        qh, kh, vh = map(whole_sequence, pieces(recv, B, Sq, Sk, Hl, D))
        # written straight into the buffer sent back: row j = rank j's tokens, this head group
        ops.attention_out(qh, kh, vh, None, scale, back.view(1, world * Sq, B * Hl, D), precision=precision)
    except BaseException as e:  # noqa: BLE001  (the exchange goes on; raised after it, on every rank)
        if not check:
            raise
        error = e  # back is sent as it is; every rank raises below
    wait(dist.all_to_all_single(out, back, group=group, async_op=True), timeout)
    if check:
        raise_if_any_failed(error, q.device, group, timeout, name)
    # out[j]: head group j of this rank's tokens, [Sq, B, Hl, D]
    return out.view(world, Sq, B, Hl, D).permute(2, 1, 0, 3, 4).reshape(B, Sq, H, D).contiguous()


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                   group: Optional[dist.ProcessGroup] = None, timeout: Optional[datetime.timedelta] = None,
                   check: bool = True, precision: str = "exact") -> torch.Tensor:
    """This rank's rows of attention over the token-sharded sequence, with the K/V shards passed
    around the ring and the partial outputs merged through their log-sum-exp (see the module
    doc). q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``: this rank's tokens; any H. Returns
    ``[B, Sq, H, D]``. ``precision``: the attention op's (an 8-bit one smooths each K shard by
    its own mean; its lse is that of the unsmoothed scores, so the merge holds)."""
    name = "ring_attention"
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def allocate() -> tuple:  # the K/V shard in hand (this rank's, then rank-1's, ...) and the one arriving
        held = torch.stack((k, v))
        return held, torch.empty_like(held)

    buffers = _start(name, q, k, v, None, allocate, check, group, timeout)
    if buffers is None:
        return ops.attention(q, k, v, None, scale, precision=precision)[0]
    held, spare = buffers
    error: Optional[BaseException] = None
    nxt, prv = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
    acc: Optional[torch.Tensor] = None  # fp32 [B, Sq, H, D]
    lse: Optional[torch.Tensor] = None  # fp32 [B, H, Sq]
    for step in range(world):
        pending = []
        if step < world - 1:
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, held, nxt, group),
                                              dist.P2POp(dist.irecv, spare, prv, group)])
        if error is None:
            try:
                o, part = ops.attention(q, held[0], held[1], None, scale, return_lse=True, precision=precision)
                acc, lse = _merge(acc, lse, o.float(), part)
            except BaseException as e:  # noqa: BLE001  (the ring goes on; raised at the end on every rank)
                if not check:
                    raise
                error = e
        for work in pending:
            wait(work, timeout)
        held, spare = spare, held
    if check:
        raise_if_any_failed(error, q.device, group, timeout, name)
    return acc.to(q.dtype)


def _merge(acc: Optional[torch.Tensor], lse: Optional[torch.Tensor], o: torch.Tensor,
           part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-normalised partial outputs over disjoint keys as one: each weighted by
    exp(its lse - the joint lse), the joint lse = logaddexp of the two. o ``[B, Sq, H, D]``,
    lse ``[B, H, Sq]``, both fp32."""
    if acc is None:
        return o, part
    joint = torch.logaddexp(lse, part)
    w_acc = torch.exp(lse - joint).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(part - joint).transpose(1, 2).unsqueeze(-1)
    return acc * w_acc + o * w_new, joint


def for_parallel_config(parallel_config) -> Optional[Callable]:
    """The attention that serves diffusers' context-parallel ``parallel_config`` (the
    ``ParallelConfig`` that ``enable_parallelism`` puts on a processor), or None when it asks
    for none: ``attend(q, k, v, scale, precision="exact")`` running :func:`ulysses_attention`
    over the config's Ulysses mesh, or :func:`ring_attention` over its ring mesh. diffusers' hooks split the
    model's inputs and gather its output (the model's ``_cp_plan``); this replaces only the
    attention between them. ValueError for configs it does not run: ring and Ulysses degrees
    both above 1, ``ulysses_anything`` / ``ring_anything`` (uneven shards), a mesh not set up,
    an object that is not a ``ParallelConfig``."""
    if parallel_config is None:
        return None
    if not hasattr(parallel_config, "context_parallel_config"):
        raise ValueError(f"a parallel_config that is not diffusers' ParallelConfig ({type(parallel_config).__name__}, "
                         "no context_parallel_config): our attention runs only its context-parallel configs")
    cp = parallel_config.context_parallel_config
    if cp is None:  # tensor parallelism only: each rank attends over its own heads, no exchange
        return None
    ring, ulysses = getattr(cp, "ring_degree", 1) or 1, getattr(cp, "ulysses_degree", 1) or 1
    if ring > 1 and ulysses > 1:
        raise ValueError(f"context parallelism with ring_degree {ring} and ulysses_degree {ulysses} together is "
                         "not run by our attention; use one of them")
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise ValueError("ulysses_anything / ring_anything (uneven sequence shards) are not run by our attention; "
                         "every rank's shard must have the same length")
    mesh = getattr(cp, "_ulysses_mesh" if ulysses > 1 else "_ring_mesh", None)
    if mesh is None:
        raise ValueError("the context-parallel config has no device mesh (enable_parallelism sets it up)")
    return functools.partial(ulysses_attention if ulysses > 1 else ring_attention, group=mesh.get_group())


def processor_refusal(processor) -> list[str]:
    """Why the context-parallel config that diffusers' ``enable_parallelism`` set on
    ``processor`` is not one our attention runs (:func:`for_parallel_config`'s ValueError);
    empty if none is set or we run it. The patch-time reason of the adapters."""
    try:
        for_parallel_config(getattr(processor, "_parallel_config", None))
    except ValueError as e:
        return [str(e)]
    return []


def enable(model, mode: str, degree: Optional[int] = None) -> None:
    """diffusers' ``model.enable_parallelism(config=ContextParallelConfig(<mode>_degree=degree))``
    over the default process group (``degree``: its world size), for a patched or stock DiT
    whose class has a ``_cp_plan`` (Wan, Flux, ...); ``mode`` is ``"ulysses"`` or ``"ring"``.
    For a model on the CPU (gloo), where diffusers' own call picks the accelerator device (or
    fails without one), it takes the same steps itself: the config and its device mesh on the CPU, the
    config on every attention processor, the split/gather hooks of the model's ``_cp_plan``."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    if mode not in ("ulysses", "ring"):
        raise ValueError(f"mode must be 'ulysses' or 'ring', got {mode!r}")
    cp = ContextParallelConfig(**{f"{mode}_degree": degree or dist.get_world_size()})
    if next(model.parameters()).device.type != "cpu":
        model.enable_parallelism(config=cp)
        return
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"),
                 mesh=init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names))
    model._parallel_config = config
    for module in model.modules():  # the modules diffusers' own call reaches
        if not isinstance(module, (Attention, MochiAttention, AttentionModuleMixin)):
            continue
        processor = module.processor
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp, model._cp_plan)
