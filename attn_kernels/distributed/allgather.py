"""All-gather context parallelism (the Llama 3 scheme): every rank gathers the whole
K/V, attends its own queries to the keys they may see, and the backward returns
each rank the sum of every rank's dK/dV for its shard (a reduce-scatter in fp32).

Communication per call: forward one all-gather of K and one of V; backward one
reduce-scatter of dK and one of dV. Because every rank sees all keys, the score
masks are plain ranges of global positions, so this scheme also takes sliding
windows and packed documents (`cu_seqlens`), which the ring does not.

The local work is one `fused_attention_varlen` call per distinct window: the local
queries are cut into pieces, one per (batch row, local chunk, document), and each
piece gets the range of gathered keys it may see, [k0, k1), with the window
re-expressed for that range (varlen windows are aligned bottom-right per piece):
    global band  lo <= j - i <= hi   (lo = -left, hi = 0 if causal else right)
    k0 = max(doc start, first query + lo),   k1 = min(doc end, last query + 1 + hi)
    window' = (k1 - (last query + 1) - lo, hi + (last query + 1) - k1)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from ..api import fused_attention_varlen
from ._args import Call, _num, require_self_attention, validate
from ._comm import accumulation_dtype, all_gather, reduce_scatter_sum
from .sharding import chunk_owner, chunks_per_rank, local_spans


class _GatherRows(torch.autograd.Function):
    """All-gather of this rank's token-major shard x (B, N_local, H, D), returned as
    the rows `indices[g]` of the gathered (W * B * N_local, H, D), one tensor per
    index list (row (rank * B + b) * N_local + p is position p of batch row b on rank).
    Backward: the rows' gradients summed in fp32 into the gathered shape (a key seen
    by several pieces gets all their gradients), then reduce-scattered to the owners."""

    @staticmethod
    def forward(ctx, x, indices, group, world):
        ctx.indices, ctx.group, ctx.world, ctx.x_shape = indices, group, world, x.shape
        rows = all_gather(x, group, world).reshape(-1, *x.shape[2:])
        return tuple(rows.index_select(0, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads):
        acc = accumulation_dtype(grads[0].dtype)
        summed = torch.zeros((ctx.world * ctx.x_shape[0] * ctx.x_shape[1], *ctx.x_shape[2:]), dtype=acc,
                             device=grads[0].device)
        for index, grad in zip(ctx.indices, grads):
            if grad is not None:
                summed.index_add_(0, index, grad.to(acc))
        mine = reduce_scatter_sum(summed.view(ctx.world, *ctx.x_shape), ctx.group)
        return mine.to(grads[0].dtype), None, None, None


def _band(call: Call) -> tuple:
    """(lo, hi) bounds of j - i in global positions (None: unbounded)."""
    left, right = call.window
    hi = 0 if call.is_causal else (right if right >= 0 else None)
    lo = -left if left >= 0 else None
    return lo, hi


def _gathered_rows(call: Call, batch: int, local_len: int) -> torch.Tensor:
    """int64 (W * local_len,): row of global position g (batch row 0) in the gathered rows."""
    size = local_len // chunks_per_rank(call.layout)
    rows = []
    for chunk in range(call.world * chunks_per_rank(call.layout)):
        owner, index = chunk_owner(call.layout, call.world, chunk)
        start = owner * batch * local_len + index * size
        rows.append(torch.arange(start, start + size))
    return torch.cat(rows)


def _plan(call: Call, batch: int, len_q: int, len_k: int, docs: Optional[list]) -> dict:
    """window' -> (query rows, key rows, query lengths, key lengths) of the pieces
    that take that window; query rows index this rank's (B * L_local) token rows."""
    lo, hi = _band(call)
    key_rows = _gathered_rows(call, batch, len_k)
    ranges = docs if docs is not None else [(0, call.world * len_q, 0, call.world * len_k)]
    groups = defaultdict(lambda: ([], [], [], []))
    for b in range(batch):
        for local, start, n in local_spans(call.layout, call.world, call.rank, len_q):
            for q_start, q_end, k_start, k_end in ranges:
                a, e = max(start, q_start), min(start + n, q_end)  # global query rows [a, e)
                if a >= e:
                    continue
                k0 = k_start if lo is None else max(k_start, a + lo)
                k1 = k_end if hi is None else min(k_end, e + hi)
                window = (-1 if lo is None else k1 - e - lo, -1 if hi is None else hi + e - k1)
                q_rows, k_rows, q_lens, k_lens = groups[window]
                q_rows.append(torch.arange(a - start + local, e - start + local) + b * len_q)
                k_rows.append(key_rows[k0:k1] + b * len_k)
                q_lens.append(e - a)
                k_lens.append(k1 - k0)
    return groups


def _cu(lengths: list, device) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _check_cu_seqlens(cu_seqlens, total: int) -> list:
    """[(start, end, start, end)] of the documents, from prefix sums over the global sequence."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32, torch.int64):
        raise TypeError("allgather_attention: cu_seqlens must be a 1-D int32 or int64 tensor of prefix sums "
                        f"(num_docs + 1,) over the global sequence, got {cu_seqlens!r:.80}")
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"allgather_attention: cu_seqlens must start at 0, never decrease and end at the global "
                         f"sequence length {total}; got {bounds}")
    return [(a, b, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _cu_field(cu_seqlens) -> tuple:
    if not isinstance(cu_seqlens, torch.Tensor):
        return (_num(cu_seqlens is None) - 2.0, 0.0)  # -1: None, -2: not a tensor
    values = cu_seqlens.detach().to("cpu", torch.float64).reshape(-1)
    return (float(values.numel()), float((values * torch.arange(1, values.numel() + 1)).sum()))


def allgather_attention(query, key, value, *, group=None, cu_seqlens=None, is_causal=False, scale=None,
                        enable_gqa=False, layout="zigzag", window_size=(-1, -1), softcap=0.0, return_lse=False,
                        backend="auto"):
    """Attention over the whole sequence from this rank's shards, by all-gathering K/V.

    Args:
        query: (B, Hq, L_local, E), this rank's shard in `layout` (see `shard_sequence`).
        key: (B, Hkv, S_local, E); value: (B, Hkv, S_local, Ev): this rank's shards.
        group: the process group (default: the world).
        cu_seqlens: optional int32/int64 (num_docs + 1,) prefix sums of the lengths of
            documents packed along the global sequence (the same on every rank, applied
            to every batch row): a query sees only keys of its own document.
        is_causal, window_size: in global positions (window: query i sees keys
            i - left .. i + right); with is_causal, window_size or cu_seqlens,
            L_local must equal S_local.
        scale, enable_gqa, softcap, backend: as `fused_attention`.
        layout: "zigzag" or "contiguous".
        return_lse: also return this rank's rows of the global lse.

    Returns:
        out (B, Hq, L_local, Ev) in the input dtype; with return_lse also lse
        (B, Hq, L_local), float32 (float64 for float64 inputs), differentiable.
    """
    call = validate("allgather_attention", query, key, value, group=group, layout=layout, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa, window_size=window_size, softcap=softcap,
                    backend=backend, return_lse=return_lse, extra={"cu_seqlens": _cu_field(cu_seqlens)})
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    docs = None
    if cu_seqlens is not None:
        require_self_attention(call, query, key, "cu_seqlens")
        docs = _check_cu_seqlens(cu_seqlens, call.world * L)
    if call.is_causal or call.window != (-1, -1):
        require_self_attention(call, query, key, "is_causal=True" if call.is_causal else "window_size")
    groups = _plan(call, B, L, S, docs)
    device = query.device
    q_rows = [torch.cat(g[0]).to(device) for g in groups.values()]
    k_rows = [torch.cat(g[1]).to(device) for g in groups.values()]
    k_parts = _GatherRows.apply(key.transpose(1, 2).contiguous(), k_rows, call.group, call.world)
    v_parts = _GatherRows.apply(value.transpose(1, 2).contiguous(), k_rows, call.group, call.world)
    q_tokens = query.transpose(1, 2).reshape(B * L, Hq, query.shape[-1])
    outs, lses = [], []
    for (window, (_, _, q_lens, k_lens)), rows, k_part, v_part in zip(groups.items(), q_rows, k_parts, v_parts):
        out, lse = fused_attention_varlen(
            q_tokens.index_select(0, rows), k_part, v_part, _cu(q_lens, device), _cu(k_lens, device),
            max(q_lens), max(k_lens), window_size=window, return_lse=True, **call.attention_kwargs(),
        )
        outs.append(out)
        lses.append(lse)
    order = torch.argsort(torch.cat(q_rows))  # pieces back into (b, local position) order
    out = torch.cat(outs).index_select(0, order).view(B, L, Hq, -1).transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1).index_select(1, order).view(Hq, B, L).transpose(0, 1)
    return out, lse
