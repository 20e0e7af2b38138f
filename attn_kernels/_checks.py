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
BACKENDS = ("auto", "triton", "reference")


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
    has_mask: bool

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
) -> AttentionSpec:
    """Validate SDPA-style arguments; value=None for `attention_weights`."""
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
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
        scores_shape = (*batch, heads_q, len_q, len_k) if rank > 2 else (len_q, len_k)
        _check_mask(attn_mask, query.dtype, query.device, scores_shape)

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
    )
