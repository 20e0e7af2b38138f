"""The torch.distributed calls of the context-parallel schemes, in one place.

Every collective and point-to-point call of `attn_kernels.distributed` goes
through the functions here, looked up on `torch.distributed` at call time (so a
test can count them by wrapping the module's functions):

    process_group        the group, this rank and the world size; a clear error when uninitialised
    check_same_on_ranks  one all-gather of a small float64 record: shapes and flags must agree
    all_gather           (W, *x.shape) from every rank's x
    reduce_scatter_sum   this rank's slice of the sum over ranks of a (W, *shape) tensor
    all_to_all           block j of this rank's (W, ...) tensor goes to rank j
    ring_exchange        send tensors to rank + 1, receive the same shapes from rank - 1 (batch_isend_irecv)
    AllGather            autograd: all_gather forward, reduce-scatter (fp32) backward
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def process_group(group, op: str):
    """(group, rank in the group, world size of the group), or a RuntimeError naming `op`."""
    if not dist.is_available():
        raise RuntimeError(f"{op} needs torch.distributed, which this PyTorch build does not include")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{op} needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (backend 'nccl' on GPUs, 'gloo' on CPU)"
        )
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{op}: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _record_device(group, like: torch.Tensor) -> torch.device:
    # gloo reduces host memory; NCCL only device memory
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else like.device


def _gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, x, group=group)


def check_same_on_ranks(op: str, group, world: int, fields: dict, like: torch.Tensor) -> None:
    """Raise a ValueError on every rank if any field differs across ranks.

    fields: name -> tuple of numbers (shapes, flags; the same number of entries on
    every rank, which the callers guarantee by padding). One all-gather of a small
    float64 record; skipped when the world has one rank.
    """
    if world == 1:
        return
    names, values = list(fields), [tuple(float(x) for x in v) for v in fields.values()]
    record = torch.tensor([x for v in values for x in v], dtype=torch.float64, device=_record_device(group, like))
    records = all_gather(record, group, world)
    rows = records.tolist()
    start = 0
    for name, value in zip(names, values):
        seen = [tuple(row[start:start + len(value)]) for row in rows]
        start += len(value)
        if any(s != seen[0] for s in seen):
            listed = ", ".join(f"rank {r}: {_show(name, s)}" for r, s in enumerate(seen))
            raise ValueError(f"{op}: {name} must be the same on every rank; got {listed}")


def _show(name: str, values: tuple) -> str:
    if name.endswith(".shape"):
        values = tuple(x for x in values if x != -2.0)  # -2 pads shapes of fewer dims
    values = tuple(int(x) if x.is_integer() else x for x in values)
    return str(values if len(values) != 1 else values[0])


def shape_field(t: torch.Tensor, dims: int = 6) -> tuple:
    """t.shape padded with -2 to a fixed length, so that records line up across ranks."""
    shape = tuple(t.shape)[:dims]
    return shape + (-2,) * (dims - len(shape))


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def dtype_code(dtype: torch.dtype) -> int:
    """A number per dtype, for `check_same_on_ranks` (-1: any other dtype)."""
    return _DTYPE_CODES.get(dtype, -1)


def all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(world, *x.shape): every rank's x, in rank order."""
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # gloo takes the ranks' tensors concatenated on dim 0
    _gather_into(out, x.contiguous(), group)
    return out.view(world, *x.shape)


def reduce_scatter_sum(x: torch.Tensor, group) -> torch.Tensor:
    """x (world, *shape) on every rank -> the sum over ranks of x[rank]: (*shape)."""
    out = x.new_empty(x.shape[1:])
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    fn(out, x.reshape(-1, *x.shape[2:]).contiguous(), group=group)  # ranks' parts concatenated on dim 0
    return out


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x (world, ...): block j goes to rank j; the result's block i came from rank i."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def ring_exchange(tensors: Sequence[torch.Tensor], group, rank: int, world: int, tag: int = 0):
    """Start sending `tensors` to rank + 1 and receiving their like from rank - 1
    (one batch_isend_irecv). Returns (received buffers, works); wait() the works
    before reading the buffers."""
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, send_to, group, tag) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group, tag) for r in received]
    return received, dist.batch_isend_irecv(ops)


def wait(works: Optional[list]) -> None:
    for work in works or ():
        work.wait()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results and gradients are summed in fp32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AllGather(torch.autograd.Function):
    """x -> (world, *x.shape) from every rank. Backward: the gradients of every rank,
    summed (in fp32) and scattered back to the owner of each slice."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group = group
        return all_gather(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        summed = reduce_scatter_sum(grad.to(accumulation_dtype(grad.dtype)), ctx.group)
        return summed.to(grad.dtype), None, None
