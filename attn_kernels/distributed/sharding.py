"""Which part of the sequence each rank holds, and moving between shards and the whole.

The sequence of global length N is cut into equal chunks:

    layout="zigzag"      2W chunks; rank r holds chunks r and 2W-1-r, in that order
                         (head-tail load balancing: under a causal mask every rank
                         then has the same amount of work)
    layout="contiguous"  W chunks; rank r holds chunk r

So N must be divisible by 2W (zigzag) or W (contiguous), and a rank's local length
N/W by 2 (zigzag) or 1.
"""

from __future__ import annotations

import torch

from ._comm import AllGather, check_same_on_ranks, dtype_code, process_group, shape_field

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def rank_chunks(layout: str, world: int, rank: int) -> tuple:
    """The global chunk indices rank `rank` holds, in its local order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def chunk_owner(layout: str, world: int, chunk: int) -> tuple:
    """(rank, position among that rank's chunks) of global chunk `chunk`."""
    if layout == "contiguous":
        return chunk, 0
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def check_global_length(op: str, name: str, length: int, layout: str, world: int) -> None:
    parts = world * chunks_per_rank(layout)
    if length % parts:
        raise ValueError(
            f"{op}: {name} has sequence length {length}, which layout={layout!r} with world size {world} "
            f"cannot split: it must be divisible by {parts} ({chunks_per_rank(layout)} chunk(s) per rank)"
        )


def check_local_length(op: str, name: str, length: int, layout: str, world: int) -> None:
    """A rank's shard: its length must split into the layout's chunks per rank."""
    per_rank = chunks_per_rank(layout)
    if length < per_rank or length % per_rank:
        raise ValueError(
            f"{op}: {name} has local sequence length {length}; layout={layout!r} needs a multiple of {per_rank} "
            f"(>= {per_rank}) per rank, i.e. a global length divisible by {per_rank * world} with world size {world}"
        )


def local_spans(layout: str, world: int, rank: int, local_len: int) -> list:
    """[(local start, global start, length)] of the chunks this rank holds."""
    chunks = rank_chunks(layout, world, rank)
    size = local_len // len(chunks)
    return [(i * size, chunk * size, size) for i, chunk in enumerate(chunks)]


def _check_dim(x: torch.Tensor, dim: int, op: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full sequence `x` along `dim` (see the module docstring).

    x: the whole tensor, the same on every rank, with sequence length N = x.shape[dim]
    divisible by 2W (zigzag) or W (contiguous). Returns x with N/W along `dim`: a view
    for "contiguous", a copy (chunk r, then chunk 2W-1-r) for "zigzag". Differentiable.
    """
    op = "shard_sequence"
    group, rank, world = process_group(group, op)
    dim = _check_dim(x, dim, op)
    check_layout(layout)
    check_global_length(op, "x", x.shape[dim], layout, world)
    size = x.shape[dim] // (world * chunks_per_rank(layout))
    parts = [x.narrow(dim, chunk * size, size) for chunk in rank_chunks(layout, world, rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence on every rank, from every rank's shard `x` (the inverse of
    `shard_sequence`): x (..., N/W, ...) along `dim` -> (..., N, ...).

    One all-gather (after one small all-gather that checks that the shards' shapes
    agree). Differentiable: the backward sums the gradients of all ranks and returns
    each rank its slice (a reduce-scatter), i.e. it treats the ranks' losses as summed.
    """
    op = "unshard_sequence"
    group, rank, world = process_group(group, op)
    dim = _check_dim(x, dim, op)
    check_layout(layout)
    check_same_on_ranks(op, group, world, {"x.shape": shape_field(x), "x.dtype": (dtype_code(x.dtype),)}, x)
    check_local_length(op, "x", x.shape[dim], layout, world)
    gathered = AllGather.apply(x, group, world)  # (W, *x.shape)
    per_rank = chunks_per_rank(layout)
    size = x.shape[dim] // per_rank
    parts = []
    for chunk in range(world * per_rank):
        owner, index = chunk_owner(layout, world, chunk)
        parts.append(gathered[owner].narrow(dim, index * size, size))
    return torch.cat(parts, dim)
