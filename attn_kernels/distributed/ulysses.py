"""Ulysses context parallelism (DeepSpeed-Ulysses): an all-to-all trades the
sequence split for a head split, each rank runs single-device attention over the
whole sequence for H/W of the heads, and a second all-to-all trades back.

Communication per call: forward one all-to-all each for Q, K, V and the output
(and the lse with return_lse); backward the same all-to-alls in reverse. Needs the
query and key/value head counts divisible by the world size; in exchange it takes
everything `fused_attention` takes over the whole sequence (causal, windows,
softcap, GQA, L != S).
"""

from __future__ import annotations

import torch

from ..api import fused_attention
from ._args import validate
from ._comm import all_to_all
from .sharding import chunk_owner, chunks_per_rank


class _AllToAll(torch.autograd.Function):
    """x (W, ...) -> block i from rank i. It is its own adjoint: the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group), None


def _global_chunk_order(layout: str, world: int) -> list:
    """For each global chunk in sequence order, its index in the (rank, local chunk) order."""
    per_rank = chunks_per_rank(layout)
    order = []
    for chunk in range(world * per_rank):
        owner, index = chunk_owner(layout, world, chunk)
        order.append(owner * per_rank + index)
    return order


def _sequence_to_heads(x: torch.Tensor, call) -> torch.Tensor:
    """This rank's sequence shard of all heads (B, H, N_local, D) -> its head group
    over the whole sequence (B, H/W, N, D), in global order."""
    B, H, n, D = x.shape
    world, per_rank = call.world, chunks_per_rank(call.layout)
    blocks = x.reshape(B, world, H // world, n, D).transpose(0, 1)  # head group j goes to rank j
    received = _AllToAll.apply(blocks, call.group)  # (W, B, H/W, N_local, D): rank i's shard
    chunks = received.reshape(world, B, H // world, per_rank, n // per_rank, D).permute(0, 3, 1, 2, 4, 5)
    chunks = chunks.reshape(world * per_rank, B, H // world, n // per_rank, D)
    ordered = chunks.index_select(0, torch.tensor(_global_chunk_order(call.layout, world), device=x.device))
    return ordered.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * n, D)


def _heads_to_sequence(x: torch.Tensor, call) -> torch.Tensor:
    """The inverse of `_sequence_to_heads`: (B, H/W, N, D) -> (B, H, N_local, D)."""
    B, h, N, D = x.shape
    world, per_rank = call.world, chunks_per_rank(call.layout)
    size = N // (world * per_rank)
    chunks = x.reshape(B, h, world * per_rank, size, D).permute(2, 0, 1, 3, 4)
    inverse = torch.argsort(torch.tensor(_global_chunk_order(call.layout, world), device=x.device))
    blocks = chunks.index_select(0, inverse).reshape(world, per_rank, B, h, size, D).permute(0, 2, 3, 1, 4, 5)
    received = _AllToAll.apply(blocks.reshape(world, B, h, per_rank * size, D), call.group)  # head group i
    return received.transpose(0, 1).reshape(B, world * h, per_rank * size, D)


def ulysses_attention(query, key, value, *, group=None, is_causal=False, scale=None, enable_gqa=False,
                      layout="zigzag", window_size=(-1, -1), softcap=0.0, return_lse=False, backend="auto"):
    """Attention over the whole sequence from this rank's shards, by all-to-all (Ulysses).

    Args:
        query: (B, Hq, L_local, E), this rank's shard in `layout` (see `shard_sequence`);
            Hq divisible by the world size.
        key: (B, Hkv, S_local, E); value: (B, Hkv, S_local, Ev); Hkv divisible by the world size.
        group: the process group (default: the world).
        is_causal, window_size, scale, enable_gqa, softcap, backend: as `fused_attention`
            on the whole sequences (global positions).
        layout: "zigzag" or "contiguous".
        return_lse: also return this rank's rows of the lse.

    Returns:
        out (B, Hq, L_local, Ev) in the input dtype; with return_lse also lse
        (B, Hq, L_local) as `fused_attention` returns it (float32, float64 on the
        reference for float64 inputs), differentiable.
    """
    call = validate("ulysses_attention", query, key, value, group=group, layout=layout, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa, window_size=window_size, softcap=softcap,
                    backend=backend, return_lse=return_lse)
    for name, heads in (("query", query.shape[1]), ("key/value", key.shape[1])):
        if heads % call.world:
            raise ValueError(f"ulysses_attention: {name} has {heads} heads, which world size {call.world} does not "
                             "divide; Ulysses splits the heads over the ranks (use ring_attention or "
                             "allgather_attention, or a world size that divides the heads)")
    q, k, v = (_sequence_to_heads(t, call) for t in (query, key, value))
    out, lse = fused_attention(q, k, v, is_causal=call.is_causal, enable_gqa=call.enable_gqa,
                               window_size=call.window, return_lse=True, **call.attention_kwargs())
    out = _heads_to_sequence(out, call)
    if not return_lse:
        return out
    return out, _heads_to_sequence(lse.unsqueeze(-1), call).squeeze(-1)
