"""SDPA inputs the fused kernels do not take as they are, turned into ones they do.

The Triton and CUDA kernels take q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev)
(any strides) with Hq a multiple of Hkv, E, Ev >= 1 and dropout_p < 1. SDPA also takes:
  - batch / head dims that broadcast, and inputs of fewer dims: `expand_to_spec` makes
    stride-0 views of the broadcast shapes, so key and value are never copied;
  - E = 0 (every score is 0: uniform weights over the allowed keys) and Ev = 0 (an
    empty output): a zero column, q.sum(-1, keepdim=True), makes the head dim 1 and
    keeps the inputs in the autograd graph;
  - dropout_p = 1 (every weight dropped): the output is 0, computed as out * 0 of a
    call without dropout (so the lse and its gradient are those of the scores);
  - inputs of 5 or more dims whose broadcast batch dims cannot be flattened into one
    without a copy: one call per index of the first batch dim (each draws its own
    dropout seed, so `dropout_keep_mask` does not replay such a call).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ._checks import AttentionSpec, expand_to_spec


def _zero_column(t: torch.Tensor) -> torch.Tensor:
    """(..., N, 0) -> zeros (..., N, 1), differentiable in t."""
    return t.sum(-1, keepdim=True)


def as_4d(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """(*batch, H, N, D) or (N, D) -> (Z, H, N, D), the backends' layout; a view whenever strides allow."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(spec.batch), *t.shape[-3:])


def _flattens(t: torch.Tensor) -> bool:
    """Whether (*batch, H, N, D) views as (Z, H, N, D) without a copy."""
    try:
        t.view(math.prod(t.shape[:-3]), *t.shape[-3:])
        return True
    except RuntimeError:
        return False


def _per_leading_index(run, spec: AttentionSpec, tensors: list, mask, alibi):
    """run(tensors, mask, alibi, spec) -> tuple of (*batch, H, ...) results, one call
    per index of the first batch dim when a tensor would not flatten (see module doc)."""
    if spec.rank < 5 or all(_flattens(t) for t in tensors):
        return run(tensors, mask, alibi, spec)
    sub = replace(spec, rank=spec.rank - 1, batch=spec.batch[1:])

    def pick(t, i, full_rank):
        if t is None or t.dim() < full_rank:  # broadcast over the first batch dim
            return t
        return t[i if t.shape[0] > 1 else 0]

    results = [
        _per_leading_index(run, sub, [t[i] for t in tensors], pick(mask, i, spec.rank), pick(alibi, i, spec.rank - 2))
        for i in range(spec.batch[0])
    ]
    return tuple(torch.stack(parts) for parts in zip(*results))


def _kernel_form(spec: AttentionSpec, q, k, v):
    """The kernels' form of a call with SDPA's edges (E = 0, Ev = 0, dropout_p = 1):
    (q, k, v, spec for the kernels, finish: kernel output -> the call's output)."""
    drop_all, empty_v = spec.dropout_p == 1.0, v is not None and spec.dim_v == 0
    if drop_all:
        spec = replace(spec, dropout_p=0.0)
    if spec.dim_qk == 0:
        q, k, spec = _zero_column(q), _zero_column(k), replace(spec, dim_qk=1)
    if empty_v:
        v, spec = _zero_column(v), replace(spec, dim_v=1)

    def finish(out):
        if empty_v:
            out = out[..., :0]
        return out * 0.0 if drop_all else out

    return q, k, v, spec, finish


def attention(run, query, key, value, attn_mask, alibi_slopes, spec: AttentionSpec):
    """run(q, k, v, mask, alibi, spec) -> (out, lse) on inputs of the spec's shapes,
    E, Ev >= 1 and dropout_p < 1; returns (out, lse) of the call as SDPA defines it."""
    query, key, value, spec, finish = _kernel_form(spec, query, key, value)
    q, k, v = expand_to_spec(spec, query, key, value)
    out, lse = _per_leading_index(lambda t, m, a, s: run(*t, m, a, s), spec, [q, k, v], attn_mask, alibi_slopes)
    return finish(out), lse


def weights(run, query, key, attn_mask, alibi_slopes, spec: AttentionSpec):
    """run(q, k, mask, alibi, spec) -> probabilities on inputs of the spec's shapes and E >= 1."""
    query, key, _, spec, _ = _kernel_form(spec, query, key, None)
    q, k = expand_to_spec(spec, query, key)
    (probs,) = _per_leading_index(lambda t, m, a, s: (run(*t, m, a, s),), spec, [q, k], attn_mask, alibi_slopes)
    return probs


def varlen(run, q, k, v, spec: AttentionSpec):
    """run(q, k, v, spec) -> (out, lse) for packed q (total_q, Hq, E), k / v (total_k,
    Hkv, *) with E, Ev >= 1 and dropout_p < 1; the same edges as `attention`."""
    q, k, v, spec, finish = _kernel_form(spec, q, k, v)
    out, lse = run(q, k, v, spec)
    return finish(out), lse
