"""Packed sequences (varlen) and KV-cache decoding on the CPU backend's blocked path.

Both run cpu_blocked.forward / backward once per sequence on strided views of the
packed tensors (nothing is gathered, but the pages of a paged cache), with
FlashAttention's semantics: causal aligned bottom-right per sequence, windows and
ALiBi relative to each sequence's bottom-right diagonal (cpu_tiles.relative_band).

    varlen:  q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev)
             -> out (total_q, Hq, Ev), lse (Hq, total_q)
    kvcache: q (B, Lq, Hq, E) against the first seqlens[b] rows of each cache
             -> out (B, Lq, Hq, Ev), lse (B, Hq, Lq); forward only

Dropout in varlen draws per (sequence, head, i, j) what a padded (B, Hq, max_q, max_k)
call would (zh = sequence * Hq + h), so `dropout_keep_mask` on padded shapes replays it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .cpu_blocked import backward, forward, grad_buffers, row_delta
from .cpu_tiles import Problem, acc_dtype, relative_band, shift_band


def _heads_view(t: torch.Tensor, groups: Optional[int] = None) -> torch.Tensor:
    """(n, H, D) -> (1, H, n, D), or (1, H / groups, groups, n, D); views."""
    t = t.transpose(0, 1)
    if groups is not None:
        t = t.unflatten(0, (t.shape[0] // groups, groups))
    return t.unsqueeze(0)


def _slopes_of(alibi_slopes, index: int, heads_kv: int, dtype):
    """-slopes of one sequence / batch row as (1, Hkv, G, 1, 1), or None."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[index]
    return -slopes.detach().to(dtype).reshape(1, heads_kv, -1, 1, 1)


@dataclass
class VarlenPlan:
    bounds_q: list
    bounds_k: list
    heads_q: int
    heads_kv: int
    scale: float
    band: tuple  # relative to each sequence's bottom-right diagonal
    softcap: float
    alibi_slopes: Optional[torch.Tensor]
    dropout_p: float
    seed: int

    def problem(self, i: int, q, k, v) -> Problem:
        a, b = self.bounds_q[i], self.bounds_q[i + 1]
        c, d = self.bounds_k[i], self.bounds_k[i + 1]
        groups = self.heads_q // self.heads_kv
        diag = (d - c) - (b - a)
        return Problem(
            _heads_view(q[a:b], groups), _heads_view(k[c:d]), _heads_view(v[c:d]), self.scale,
            band=shift_band(self.band, diag), softcap=self.softcap,
            neg_slopes=_slopes_of(self.alibi_slopes, i, self.heads_kv, acc_dtype(q.dtype)), alibi_diag=diag,
            dropout_p=self.dropout_p, seed=self.seed, zh_offset=i * self.heads_q,
        )

    def rows(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """A sequence's rows of a (total_q, Hq, D) tensor as (1, Hkv, G, n, D)."""
        return _heads_view(t[self.bounds_q[i]: self.bounds_q[i + 1]], self.heads_q // self.heads_kv)

    def lse_rows(self, lse: torch.Tensor, i: int) -> torch.Tensor:
        """A sequence's columns of lse (Hq, total_q) as (1, Hkv, G, n)."""
        part = lse[:, self.bounds_q[i]: self.bounds_q[i + 1]]
        return part.unflatten(0, (self.heads_kv, self.heads_q // self.heads_kv)).unsqueeze(0)


class VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: VarlenPlan):
        out = torch.empty((q.shape[0], plan.heads_q, v.shape[-1]), dtype=q.dtype)
        lse = torch.empty((plan.heads_q, q.shape[0]), dtype=acc_dtype(q.dtype))
        for i in range(len(plan.bounds_q) - 1):
            forward(plan.problem(i, q, k, v), plan.rows(out, i), plan.lse_rows(lse, i))
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse.float() if lse.dtype != torch.float64 else lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        if dout is None and dlse is None:
            return None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        acc = acc_dtype(q.dtype)
        want = ctx.needs_input_grad
        full = {n: torch.zeros(t.shape, dtype=acc) for n, t, w in (("q", q, want[0]), ("k", k, want[1]),
                                                                   ("v", v, want[2])) if w}
        for i in range(len(plan.bounds_q) - 1):
            prob = plan.problem(i, q, k, v)
            c, d = plan.bounds_k[i], plan.bounds_k[i + 1]
            grads = {}
            if "q" in full:
                grads["q"] = plan.rows(full["q"], i)
            for n in ("k", "v"):
                if n in full:
                    grads[n] = _heads_view(full[n][c:d])
            out_i, dout_i = plan.rows(out, i), plan.rows(dout, i)
            dlse_i = None if dlse is None else plan.lse_rows(dlse, i)
            backward(prob, plan.lse_rows(lse, i), row_delta(dout_i, out_i, dlse_i), grads, dout=dout_i)
        return tuple(full[n].to(q.dtype) if n in full else None for n in ("q", "k", "v")) + (None,)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, spec, seed: int):
    """Packed attention -> (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    plan = VarlenPlan(
        cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), spec.heads_q, spec.heads_kv, spec.scale,
        relative_band(spec.is_causal, spec.window), spec.softcap, alibi_slopes, spec.dropout_p, seed,
    )
    return VarlenAttention.apply(q, k, v, plan)


def _cache_rows(cache: torch.Tensor, b: int, n: int, block_table) -> torch.Tensor:
    """The first n rows of batch row b: (n, Hkv, D); a view, or gathered from pages."""
    if block_table is None:
        return cache[b, :n]
    positions = torch.arange(n)
    block_size = cache.shape[1]
    return cache[block_table[b, positions // block_size].long(), positions % block_size]


@torch.no_grad()
def kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec):
    """Decoding attention over the caches as they stand -> (out, lse) (see module doc)."""
    B, Lq, Hq = spec.batch, spec.len_q, spec.heads_q
    groups = Hq // spec.heads_kv
    acc = acc_dtype(q.dtype)
    out = torch.empty((B, Lq, Hq, spec.dim_v), dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), dtype=acc)
    band = relative_band(spec.is_causal, spec.window)
    for b, n in enumerate(seqlens.tolist()):
        k_rows, v_rows = (_heads_view(_cache_rows(c, b, n, block_table)) for c in (k_cache, v_cache))
        prob = Problem(
            _heads_view(q[b], groups), k_rows, v_rows, spec.scale, band=shift_band(band, n - Lq),
            softcap=spec.softcap, neg_slopes=_slopes_of(alibi_slopes, b, spec.heads_kv, acc), alibi_diag=n - Lq,
        )
        forward(prob, _heads_view(out[b], groups), lse[b].unflatten(0, (spec.heads_kv, groups)).unsqueeze(0))
    return out, lse.float() if lse.dtype != torch.float64 else lse
