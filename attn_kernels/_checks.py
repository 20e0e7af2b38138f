"""Argument validation shared by every backend.

`check_attention` turns the SDPA-style arguments into an `AttentionSpec` (the
sizes every backend needs) or raises a clear exception naming the argument.
It runs before any kernel, so a backend only ever sees well-formed input.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


class AttentionArgumentError(ValueError, RuntimeError):
    """A bad argument value. Also a RuntimeError, the class SDPA raises for bad input,
    so code written against SDPA (`except RuntimeError`) still catches it."""


class AttentionTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype; also a RuntimeError (see above)."""


@dataclass(frozen=True)
class AttentionSpec:
    """Sizes of one attention call: query (*batch, Hq, L, E), key (*batch, Hkv, S, E),
    value (*batch, Hkv, S, Ev). 2-D inputs have batch () and one head."""

    rank: int
    batch: tuple
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    dim_qk: int
    dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    is_causal: bool
    dropout_p: float
    has_mask: bool  # a tensor mask (a CausalBias becomes is_causal instead)
    causal_bottom_right: bool = False  # causal aligned so the last query sees every key
    window: tuple = (-1, -1)  # (left, right) extent of a sliding window, -1 = unbounded
    softcap: float = 0.0
    has_alibi: bool = False

    def band(self, packed: bool = False) -> tuple:
        """Bounds (lo, hi) of j - i for an allowed (query i, key j), None = unbounded.
        Windows are aligned bottom-right (FlashAttention); causal top-left unless
        causal_bottom_right. Packed batches: relative to each sequence's bottom-right
        diagonal, where causal is always bottom-right."""
        diag = 0 if packed else self.len_k - self.len_q
        hi = None
        if self.is_causal:
            hi = diag if (self.causal_bottom_right or packed) else 0
        left, right = self.window
        if right >= 0:
            hi = diag + right if hi is None else min(hi, diag + right)
        lo = diag - left if left >= 0 else None
        return lo, hi

    @property
    def out_shape(self) -> tuple:
        return self._head_shape(self.heads_q, self.len_q, self.dim_v)

    @property
    def lse_shape(self) -> tuple:
        return self._head_shape(self.heads_q, self.len_q)

    @property
    def weights_shape(self) -> tuple:
        return self._head_shape(self.heads_q, self.len_q, self.len_k)

    def _head_shape(self, heads: int, *rest: int) -> tuple:
        # 2-D inputs have no head dim to give back
        return (*self.batch, heads, *rest) if self.rank > 2 else tuple(rest)



def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise NotImplementedError(
            f"{name} is a nested tensor: only fused_attention takes nested (jagged) inputs, all three of them nested"
        )
    if t.dim() < 2:
        raise AttentionArgumentError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(f"{name}.dtype must be one of float16, bfloat16, float32, float64; got {t.dtype}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise AttentionTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_scale(scale, dim_qk: int) -> float:
    """None -> 1/sqrt(E) (1 when E = 0: every score is 0 then); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim_qk) if dim_qk > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise AttentionTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise AttentionArgumentError(f"scale must be finite, got {scale}")
    return float(scale)


def check_dropout(dropout_p) -> float:
    """A probability in [0, 1]; 1 drops every weight (the output is 0, as in SDPA)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise AttentionTypeError(f"dropout_p must be a float in [0, 1], got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise AttentionArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def check_window(window_size) -> tuple:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise AttentionTypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise AttentionArgumentError(f"window_size entries must be >= 0, or -1 for unbounded; got {tuple(window_size)}")
    return tuple(window_size)


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise AttentionTypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise AttentionArgumentError(f"softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return float(softcap)


def check_alibi(alibi_slopes, batch: tuple, heads_q: int, device: torch.device) -> None:
    if not isinstance(alibi_slopes, torch.Tensor):
        raise AttentionTypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if not alibi_slopes.is_floating_point():
        raise AttentionTypeError(f"alibi_slopes must be a floating tensor, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads_q,), (*batch, heads_q)):
        allowed = f"({heads_q},)" + (f" or {(*batch, heads_q)}" if batch else "")
        raise AttentionArgumentError(f"alibi_slopes must have shape {allowed}, got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise AttentionArgumentError(f"alibi_slopes is on {alibi_slopes.device} but query is on {device}")


def _causal_bias(attn_mask):
    """The variant of a torch.nn.attention.bias.CausalBias mask, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # older torch: no such objects to accept
        return None
    if isinstance(attn_mask, CausalBias):
        return attn_mask.variant == CausalVariant.LOWER_RIGHT, attn_mask.seq_len_q, attn_mask.seq_len_kv
    return None


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise AttentionArgumentError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def _check_mask(attn_mask, dtype: torch.dtype, device: torch.device, scores_shape: tuple) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise AttentionTypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, dtype):  # SDPA's rule
        raise AttentionTypeError(
            f"attn_mask.dtype must be torch.bool, torch.float32 or the query dtype {dtype}; got {attn_mask.dtype}"
        )
    if attn_mask.device != device:
        raise AttentionArgumentError(f"attn_mask is on {attn_mask.device} but query is on {device}")
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, scores_shape)
    except RuntimeError:
        shape = None
    if shape != tuple(scores_shape):
        raise AttentionArgumentError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape {tuple(scores_shape)}"
        )


def _broadcast_batch(named: list, rank: int) -> tuple:
    """The broadcast of the inputs' batch dims (all but the last three), each input
    first left-padded with size-1 dims to `rank` (SDPA's matmul broadcasting)."""
    shapes = [(1,) * (rank - max(t.dim(), 3)) + tuple(t.shape[:-3]) for _, t in named]
    try:
        return tuple(torch.broadcast_shapes(*shapes)) if rank > 3 else ()
    except RuntimeError:
        dims = ", ".join(f"{name} {shape}" for (name, _), shape in zip(named, shapes))
        raise AttentionArgumentError(f"the batch dims of the inputs do not broadcast: {dims}") from None


def _heads(heads_q: int, heads_k: int, heads_v: int, enable_gqa: bool) -> tuple:
    """(output heads, key/value heads the kernels read) for SDPA's head rules: without
    enable_gqa the three head counts broadcast (equal, or 1); with it, key's and value's
    must each divide query's (query head h reads head h // (Hq / Hk) of key)."""
    if enable_gqa:
        for name, h in (("key", heads_k), ("value", heads_v)):
            if h == 0 or heads_q % h != 0:
                raise AttentionArgumentError(
                    f"with enable_gqa, query heads ({heads_q}) must be a multiple of {name} heads ({h})"
                )
        # key and value with different head counts: one grouping that serves both
        return heads_q, heads_k if heads_k == heads_v else math.lcm(heads_k, heads_v)
    counts = {heads_q, heads_k, heads_v} - {1}
    if len(counts) > 1:
        raise AttentionArgumentError(
            f"query, key and value have {heads_q}, {heads_k} and {heads_v} heads: head counts must be equal or 1 "
            "(broadcast); pass enable_gqa=True for grouped-query attention"
        )
    heads = counts.pop() if counts else 1
    # key and value both 1: a group of every query head (read, never copied); else they broadcast to heads
    return heads, heads_k if heads_k == heads_v else heads


def check_attention(
    query,
    key,
    value=None,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
) -> AttentionSpec:
    """Validate SDPA-style arguments (plus the keyword extras); value=None for
    `attention_weights`. A `CausalBias` attn_mask becomes is_causal with its alignment;
    a tensor mask together with is_causal=True applies both (as SDPA).

    As in SDPA, inputs of fewer dims are left-padded with size-1 dims, and batch dims
    and heads of size 1 broadcast: the spec holds the broadcast sizes (the output's),
    with heads_kv the key/value heads the kernels read (`expand_to_spec` gives the
    matching views)."""
    named = [("query", query), ("key", key)] + ([("value", value)] if value is not None else [])
    for name, t in named:
        _check_tensor(name, t)
    for name, t in named[1:]:
        if t.dtype != query.dtype:
            raise AttentionTypeError(f"{name}.dtype ({t.dtype}) must match query.dtype ({query.dtype})")
        if t.device != query.device:
            raise AttentionArgumentError(f"{name} is on {t.device} but query is on {query.device}")
    rank = max(t.dim() for _, t in named)
    batch = _broadcast_batch(named, rank)

    heads = [t.shape[-3] if t.dim() > 2 else 1 for _, t in named]
    len_q, dim_qk = query.shape[-2:]
    len_k = key.shape[-2]
    if key.shape[-1] != dim_qk:
        raise AttentionArgumentError(f"key head dim ({key.shape[-1]}) must equal query head dim ({dim_qk})")
    dim_v = dim_qk
    if value is not None:
        if value.shape[-2] != len_k:
            raise AttentionArgumentError(f"value sequence length ({value.shape[-2]}) must equal key's ({len_k})")
        dim_v = value.shape[-1]
    enable_gqa = _check_flag("enable_gqa", enable_gqa)
    heads_q, heads_kv = _heads(heads[0], heads[1], heads[-1], enable_gqa)

    is_causal = _check_flag("is_causal", is_causal)
    dropout_p = check_dropout(dropout_p)
    bottom_right = False
    if attn_mask is not None:
        causal = _causal_bias(attn_mask)
        if causal is not None:
            if is_causal:  # SDPA's words (torch.nn.attention.bias)
                raise AttentionArgumentError("CausalBias should not be used with causal=True")
            bottom_right, bias_len_q, bias_len_k = causal
            if (bias_len_q, bias_len_k) != (len_q, len_k):
                raise AttentionArgumentError(
                    f"attn_mask is a causal bias for L={bias_len_q}, S={bias_len_k} but the inputs have L={len_q}, S={len_k}"
                )
            is_causal, attn_mask = True, None
        else:
            scores_shape = (*batch, heads_q, len_q, len_k) if rank > 2 else (len_q, len_k)
            _check_mask(attn_mask, query.dtype, query.device, scores_shape)
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, batch, heads_q, query.device)

    return AttentionSpec(
        rank=rank,
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        len_q=len_q,
        len_k=len_k,
        dim_qk=dim_qk,
        dim_v=dim_v,
        dtype=query.dtype,
        device=query.device,
        scale=check_scale(scale, dim_qk),
        is_causal=is_causal,
        dropout_p=dropout_p,
        has_mask=attn_mask is not None,
        causal_bottom_right=bottom_right,
        window=check_window(window_size),
        softcap=check_softcap(softcap),
        has_alibi=alibi_slopes is not None,
    )


def expand_to_spec(spec: AttentionSpec, *tensors):
    """query, key[, value] as the spec's shapes: query (*batch, heads_q, L, E), key and
    value (*batch, heads_kv, S, *); rank-2 calls are returned as they are.

    Missing leading dims and size-1 batch / head dims become stride-0 views: nothing
    is copied, and a tensor already of its shape is returned itself. The one copy:
    under enable_gqa, key and value with different head counts, both > 1 (the one
    with fewer heads is repeated to their least common multiple)."""
    if spec.rank == 2:
        return tensors

    def fit(t, heads):
        shape = (*spec.batch, heads, *t.shape[-2:])
        if tuple(t.shape) == shape:
            return t
        t = t[(None,) * (spec.rank - t.dim())]
        if t.shape[-3] not in (1, heads):
            t = t.repeat_interleave(heads // t.shape[-3], dim=-3)
        return t.expand(shape)

    return tuple(fit(t, spec.heads_q if i == 0 else spec.heads_kv) for i, t in enumerate(tensors))


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen, device: torch.device) -> int:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise AttentionTypeError(f"{name} must be a 1-D int32 tensor of prefix sums (num_seqs + 1,), got {got}")
    if cu.device != device:
        raise AttentionArgumentError(f"{name} is on {cu.device} but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise AttentionTypeError(f"max_seqlen for {name} must be an int >= 0, got {max_seqlen!r}")
    # one small host read: a wrong prefix sum would make the kernels read out of bounds
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 0:
        raise AttentionArgumentError(f"{name} must start at 0, never decrease and end at the packed length {total}; got {bounds}")
    if max(lengths, default=0) > max_seqlen:
        raise AttentionArgumentError(f"a sequence in {name} is {max(lengths)} long, more than its max_seqlen {max_seqlen}")
    return len(lengths)


def check_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, is_causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
) -> AttentionSpec:
    """Validate packed inputs: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev).
    The spec has batch (num_seqs,), len_q / len_k = the max lengths, and is_causal
    meaning bottom-right (FlashAttention's varlen)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 3:
            raise AttentionArgumentError(f"{name} must be packed as (total, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape[1] != v.shape[1]:
        raise AttentionArgumentError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    # the per-head checks are those of a single (heads, total, dim) call
    check_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None, dropout_p, is_causal, scale,
                    True, window_size, softcap)
    num_seqs = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device) != num_seqs:
        raise AttentionArgumentError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, (num_seqs,), q.shape[1], q.device)
    return AttentionSpec(
        rank=3, batch=(num_seqs,), heads_q=q.shape[1], heads_kv=k.shape[1], len_q=max_seqlen_q,
        len_k=max_seqlen_k, dim_qk=q.shape[2], dim_v=v.shape[2], dtype=q.dtype, device=q.device,
        scale=check_scale(scale, q.shape[2]), is_causal=is_causal, dropout_p=float(dropout_p), has_mask=False,
        window=tuple(window_size), softcap=float(softcap), has_alibi=alibi_slopes is not None,
    )


@dataclass(frozen=True)
class KVCacheSpec:
    """A decoding call: q (B, Lq, Hq, E) against a cache of Hkv heads, contiguous
    (B, S_max, Hkv, *) or paged (num_blocks, block_size, Hkv, *)."""

    batch: int
    len_q: int
    heads_q: int
    heads_kv: int
    dim_qk: int
    dim_v: int
    capacity: int  # keys a batch row can hold: S_max, or max_blocks * block_size
    paged: bool
    len_new: int
    max_keys: int  # the longest key range after the append
    scale: float
    is_causal: bool
    window: tuple
    softcap: float
    num_splits: int
    dtype: torch.dtype
    device: torch.device
    # the AttentionSpec fields that backend selection reads
    has_mask: bool = False
    dropout_p: float = 0.0


def _check_shape(name: str, t, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise AttentionArgumentError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_kvcache(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, is_causal, window_size, softcap,
    alibi_slopes, num_splits,
) -> tuple:
    """Validate a `fused_attention_with_kvcache` call before anything runs (this reads
    cache_seqlens and block_table on the host once). Returns (KVCacheSpec, cache_seqlens
    as an int32 tensor of shape (B,))."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise AttentionArgumentError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise AttentionTypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new) if t is not None):
        raise RuntimeError("fused_attention_with_kvcache is forward only (inference): call it under torch.no_grad() "
                           "or with tensors that do not require grad")
    B, len_q, heads_q, dim_qk = q.shape
    heads_kv, dim_v = k_cache.shape[2], v_cache.shape[3]
    _check_shape("v_cache", v_cache, (*k_cache.shape[:3], dim_v))
    if k_cache.shape[3] != dim_qk:
        raise AttentionArgumentError(f"k_cache head dim ({k_cache.shape[3]}) must equal q's ({dim_qk})")
    if heads_kv == 0 or heads_q % heads_kv:
        raise AttentionArgumentError(f"q heads ({heads_q}) must be a multiple of the cache's key/value heads ({heads_kv})")

    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise AttentionTypeError("block_table must be an int32 tensor (B, max_blocks)")
        if block_table.shape[0] != B or block_table.device != q.device:
            raise AttentionArgumentError(f"block_table must have {B} rows on {q.device}, got {tuple(block_table.shape)} on {block_table.device}")
        block_size = k_cache.shape[1]
        if block_size % 16:
            raise AttentionArgumentError(f"paged caches need a block_size that is a multiple of 16, got {block_size}")
        capacity = block_table.shape[1] * block_size
    else:
        if k_cache.shape[0] != B:
            raise AttentionArgumentError(f"k_cache batch ({k_cache.shape[0]}) must equal q's ({B}); pass block_table for a paged cache")
        capacity = k_cache.shape[1]

    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise AttentionTypeError("cache_seqlens must be an int or an int32 tensor (B,)")
    _check_shape("cache_seqlens", cache_seqlens, (B,))
    if cache_seqlens.device != q.device:
        raise AttentionArgumentError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")

    len_new = 0
    if (k_new is None) != (v_new is None):
        raise AttentionArgumentError("pass k_new and v_new together")
    if k_new is not None:
        for name, t, dim in (("k_new", k_new, dim_qk), ("v_new", v_new, dim_v)):
            _check_tensor(name, t)
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (heads_kv, dim):
                raise AttentionArgumentError(f"{name} must have shape ({B}, Lq_new, {heads_kv}, {dim}), got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise AttentionTypeError(f"{name} must have q's dtype and device")
        if v_new.shape[1] != k_new.shape[1]:
            raise AttentionArgumentError("k_new and v_new must have the same number of new tokens")
        len_new = k_new.shape[1]

    lengths = cache_seqlens.tolist()
    if min(lengths, default=0) < 0 or max(lengths, default=0) + len_new > capacity:
        raise AttentionArgumentError(
            f"the cache holds {capacity} keys per sequence, too few for cache_seqlens + Lq_new "
            f"(max {max(lengths, default=0)} + {len_new})"
        )
    if paged:
        block_size = k_cache.shape[1]
        used = [(n + len_new + block_size - 1) // block_size for n in lengths]
        cols = torch.arange(block_table.shape[1], device=q.device)[None, :]
        needed = block_table[cols < torch.tensor(used, device=q.device)[:, None]]
        if needed.numel() and (needed.min() < 0 or needed.max() >= k_cache.shape[0]):
            raise AttentionArgumentError(f"block_table points outside the {k_cache.shape[0]} cache blocks")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise AttentionTypeError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, (B,), heads_q, q.device)
    spec = KVCacheSpec(
        batch=B, len_q=len_q, heads_q=heads_q, heads_kv=heads_kv, dim_qk=dim_qk, dim_v=dim_v, capacity=capacity,
        paged=paged, len_new=len_new, max_keys=max(lengths, default=0) + len_new, scale=check_scale(scale, dim_qk), is_causal=_check_flag("is_causal", is_causal),
        window=check_window(window_size), softcap=check_softcap(softcap), num_splits=num_splits,
        dtype=q.dtype, device=q.device,
    )
    return spec, cache_seqlens
