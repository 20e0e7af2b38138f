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
BACKENDS = ("auto", "triton", "cuda", "reference")


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
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.dtype must be one of float16, bfloat16, float32, float64; got {t.dtype}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_scale(scale, dim_qk: int) -> float:
    """None -> 1/sqrt(E); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim_qk)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_window(window_size) -> tuple:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded; got {tuple(window_size)}")
    return tuple(window_size)


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return float(softcap)


def check_alibi(alibi_slopes, batch: tuple, heads_q: int, device: torch.device) -> None:
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if not alibi_slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating tensor, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads_q,), (*batch, heads_q)):
        allowed = f"({heads_q},)" + (f" or {(*batch, heads_q)}" if batch else "")
        raise ValueError(f"alibi_slopes must have shape {allowed}, got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but query is on {device}")


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
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def _check_mask(attn_mask, dtype: torch.dtype, device: torch.device, scores_shape: tuple) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
        raise TypeError(f"attn_mask.dtype must be torch.bool or the query dtype {dtype}; got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, scores_shape)
    except RuntimeError:
        shape = None
    if shape != tuple(scores_shape):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape {tuple(scores_shape)}"
        )


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
    `attention_weights`. A `CausalBias` attn_mask becomes is_causal with its alignment."""
    named = [("query", query), ("key", key)] + ([("value", value)] if value is not None else [])
    for name, t in named:
        _check_tensor(name, t)
    for name, t in named[1:]:
        if t.dtype != query.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must match query.dtype ({query.dtype})")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim():
            raise ValueError(
                f"{name} must have the same number of dims as query: {tuple(t.shape)} vs {tuple(query.shape)}"
            )
    rank = query.dim()
    batch = tuple(query.shape[:-3])
    for name, t in named[1:]:
        if tuple(t.shape[:-3]) != batch:
            raise ValueError(f"{name} batch dims {tuple(t.shape[:-3])} must equal query batch dims {batch}")

    heads_q = query.shape[-3] if rank > 2 else 1
    heads_kv = key.shape[-3] if rank > 2 else 1
    len_q, dim_qk = query.shape[-2:]
    len_k = key.shape[-2]
    if key.shape[-1] != dim_qk:
        raise ValueError(f"key head dim ({key.shape[-1]}) must equal query head dim ({dim_qk})")
    if dim_qk < 1:
        raise ValueError("query head dim E must be at least 1")
    dim_v = dim_qk
    if value is not None:
        if rank > 2 and value.shape[-3] != heads_kv:
            raise ValueError(f"value heads ({value.shape[-3]}) must equal key heads ({heads_kv})")
        if value.shape[-2] != len_k:
            raise ValueError(f"value sequence length ({value.shape[-2]}) must equal key's ({len_k})")
        dim_v = value.shape[-1]
        if dim_v < 1:
            raise ValueError("value head dim Ev must be at least 1")

    enable_gqa = _check_flag("enable_gqa", enable_gqa)
    if heads_q != heads_kv:
        if not enable_gqa:
            raise ValueError(
                f"query has {heads_q} heads but key/value have {heads_kv}; pass enable_gqa=True for grouped-query attention"
            )
        if heads_kv == 0 or heads_q % heads_kv != 0:
            raise ValueError(f"with enable_gqa, query heads ({heads_q}) must be a multiple of key/value heads ({heads_kv})")

    is_causal = _check_flag("is_causal", is_causal)
    dropout_p = check_dropout(dropout_p)
    bottom_right = False
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
        causal = _causal_bias(attn_mask)
        if causal is not None:
            bottom_right, bias_len_q, bias_len_k = causal
            if (bias_len_q, bias_len_k) != (len_q, len_k):
                raise ValueError(
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


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen, device: torch.device) -> int:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise TypeError(f"{name} must be a 1-D int32 tensor of prefix sums (num_seqs + 1,), got {got}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen for {name} must be an int >= 0, got {max_seqlen!r}")
    # one small host read: a wrong prefix sum would make the kernels read out of bounds
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}; got {bounds}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"a sequence in {name} is {max(lengths)} long, more than its max_seqlen {max_seqlen}")
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
            raise ValueError(f"{name} must be packed as (total, heads, head_dim), got shape {tuple(t.shape)}")
    # the per-head checks are those of a single (heads, total, dim) call
    check_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None, dropout_p, is_causal, scale,
                    True, window_size, softcap)
    num_seqs = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device) != num_seqs:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
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
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


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
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new) if t is not None):
        raise RuntimeError("fused_attention_with_kvcache is forward only (inference): call it under torch.no_grad() "
                           "or with tensors that do not require grad")
    B, len_q, heads_q, dim_qk = q.shape
    heads_kv, dim_v = k_cache.shape[2], v_cache.shape[3]
    _check_shape("v_cache", v_cache, (*k_cache.shape[:3], dim_v))
    if k_cache.shape[3] != dim_qk:
        raise ValueError(f"k_cache head dim ({k_cache.shape[3]}) must equal q's ({dim_qk})")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of the cache's key/value heads ({heads_kv})")

    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError("block_table must be an int32 tensor (B, max_blocks)")
        if block_table.shape[0] != B or block_table.device != q.device:
            raise ValueError(f"block_table must have {B} rows on {q.device}, got {tuple(block_table.shape)} on {block_table.device}")
        block_size = k_cache.shape[1]
        if block_size % 16:
            raise ValueError(f"paged caches need a block_size that is a multiple of 16, got {block_size}")
        capacity = block_table.shape[1] * block_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache batch ({k_cache.shape[0]}) must equal q's ({B}); pass block_table for a paged cache")
        capacity = k_cache.shape[1]

    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError("cache_seqlens must be an int or an int32 tensor (B,)")
    _check_shape("cache_seqlens", cache_seqlens, (B,))
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")

    len_new = 0
    if (k_new is None) != (v_new is None):
        raise ValueError("pass k_new and v_new together")
    if k_new is not None:
        for name, t, dim in (("k_new", k_new, dim_qk), ("v_new", v_new, dim_v)):
            _check_tensor(name, t)
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (heads_kv, dim):
                raise ValueError(f"{name} must have shape ({B}, Lq_new, {heads_kv}, {dim}), got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} must have q's dtype and device")
        if v_new.shape[1] != k_new.shape[1]:
            raise ValueError("k_new and v_new must have the same number of new tokens")
        len_new = k_new.shape[1]

    lengths = cache_seqlens.tolist()
    if min(lengths, default=0) < 0 or max(lengths, default=0) + len_new > capacity:
        raise ValueError(
            f"the cache holds {capacity} keys per sequence, too few for cache_seqlens + Lq_new "
            f"(max {max(lengths, default=0)} + {len_new})"
        )
    if paged:
        block_size = k_cache.shape[1]
        used = [(n + len_new + block_size - 1) // block_size for n in lengths]
        cols = torch.arange(block_table.shape[1], device=q.device)[None, :]
        needed = block_table[cols < torch.tensor(used, device=q.device)[:, None]]
        if needed.numel() and (needed.min() < 0 or needed.max() >= k_cache.shape[0]):
            raise ValueError(f"block_table points outside the {k_cache.shape[0]} cache blocks")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise TypeError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, (B,), heads_q, q.device)
    spec = KVCacheSpec(
        batch=B, len_q=len_q, heads_q=heads_q, heads_kv=heads_kv, dim_qk=dim_qk, dim_v=dim_v, capacity=capacity,
        paged=paged, len_new=len_new, max_keys=max(lengths, default=0) + len_new, scale=check_scale(scale, dim_qk), is_causal=_check_flag("is_causal", is_causal),
        window=check_window(window_size), softcap=check_softcap(softcap), num_splits=num_splits,
        dtype=q.dtype, device=q.device,
    )
    return spec, cache_seqlens
