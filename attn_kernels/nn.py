"""torch.nn modules whose attention runs through `attn_kernels.fused_attention`.

    MultiheadAttention    drop-in for torch.nn.MultiheadAttention (same parameters,
                          state dict, forward arguments, masks and return values)
    SelfAttentionBlock    pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))
    CrossAttentionBlock   the same with queries from x, keys/values from `memory`
    AttentionPooling      learned queries attending over a sequence -> (B, Q, dim)

Heads use the (B, H, L, D) layout as strided views of the projections
(`.view(B, L, H, D).transpose(1, 2)`): the kernels take strided inputs, so
splitting heads copies nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .api import attention_weights, fused_attention


def _check_num_heads(dim: int, num_heads: int, dim_name: str = "dim") -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
    if dim % num_heads != 0:
        raise ValueError(f"{dim_name} ({dim}) must be divisible by num_heads ({num_heads})")
    return dim // num_heads


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H * D) -> (B, H, L, D), a view."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H * D)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _padding_to_attend_mask(
    key_padding_mask: Optional[torch.Tensor], batch: int, len_q: int, len_k: int, causal: bool, device
) -> Optional[torch.Tensor]:
    """(B, S) bool, True = padding -> SDPA bool mask (B, 1, L or 1, S), True = may attend.

    None when there is nothing to mask beyond what `is_causal` can say by itself.
    """
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
    if tuple(key_padding_mask.shape) != (batch, len_k):
        got = tuple(key_padding_mask.shape)
        raise ValueError(f"key_padding_mask must have shape (B, S) = {(batch, len_k)}, got {got}")
    attend = (~key_padding_mask).view(batch, 1, 1, len_k)
    if causal:
        # SDPA takes attn_mask or is_causal, not both: fold the causal triangle in
        tril = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril()
        attend = attend & tril
    return attend


def _check_tokens(name: str, x, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, L, {dim}), got {tuple(x.shape)}")


def _torch_mask_to_sdpa(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A torch-MHA mask (bool True = NOT allowed, or additive float) -> SDPA's
    convention: bool True = may attend, or additive float in `dtype`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return ~mask
    if mask.dtype != dtype:
        raise TypeError(f"{name} must be bool or of the query dtype {dtype}, got {mask.dtype}")
    return mask


def _merge_masks(masks, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Combine SDPA-style masks (each broadcastable to (N, H, L, S)) into one:
    bool when all are bool (attend where all allow), else additive float."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged & m
        return merged
    merged = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(~m, float("-inf"))
        merged = m if merged is None else merged + m
    return merged


def _pad_keys(mask: Optional[torch.Tensor], extra: int) -> Optional[torch.Tensor]:
    """Allow `extra` appended keys (bias_k / zero attention) in a mask (..., S)."""
    if mask is None or extra == 0:
        return mask
    allow = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([mask, allow(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)], dim=-1)


def _batch_first_views(tensors, batched: bool, batch_first: bool) -> list:
    """(L, N, E), (N, L, E) with batch_first, or unbatched (L, E) -> (N, L, E) views.
    A tensor passed more than once maps to one view, so `query is key` still tells
    the in-projection that one GEMM serves both."""
    views = {}
    for t in tensors:
        if id(t) not in views:
            views[id(t)] = t.unsqueeze(0) if not batched else (t if batch_first else t.transpose(0, 1))
    return [views[id(t)] for t in tensors]


class MultiheadAttention(nn.Module):
    """Drop-in for `torch.nn.MultiheadAttention`, attention by `fused_attention`.

    Same constructor, parameter names and shapes (so state dicts load both ways),
    forward arguments, mask conventions and return values as torch's:

        forward(query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False)
        -> (attn_output, attn_weights or None)

    query (L, N, E) ((N, L, E) with batch_first, (L, E) unbatched), key (S, N, kdim),
    value (S, N, vdim). attn_mask: (L, S) or (N * num_heads, L, S); key_padding_mask:
    (N, S) or (S,); bool masks True = NOT allowed, float masks are added to the scores.
    is_causal is a hint that attn_mask is the causal mask: with no key_padding_mask and
    need_weights=False the mask is dropped and the causal kernel runs instead.
    attn_weights: (N, L, S) averaged over heads, or (N, num_heads, L, S).

    Unlike torch, a query row with no allowed key gives output 0 (and weights 0), not NaN.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.head_dim = _check_num_heads(embed_dim, num_heads, "embed_dim")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout = _check_dropout(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)

        # same registration order as torch, so named_parameters() lines up too
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation, so that a fresh module is statistically the same
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _in_projection(self, query, key, value):
        """(N, L, E), (N, S, kdim), (N, S, vdim) -> q (N, L, E), k (N, S, E), v (N, S, E)."""
        E = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        else:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, w, self.in_proj_bias).chunk(3, dim=-1)
            if key is value:  # encoder-decoder: one GEMM for k and v
                b_kv = None if self.in_proj_bias is None else self.in_proj_bias[E:]
                k, v = F.linear(key, w[E:], b_kv).chunk(2, dim=-1)
                return F.linear(query, w[:E], b_q), k, v
            w_q, w_k, w_v = w.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate shapes as torch does (raising ValueError/TypeError); True if batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and {value.dim()}-D"
            )
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features in its last dim, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree but for the last dim")
        seq_dim = 1 if (self.batch_first and batched) else 0
        batch = (query.shape[1 - seq_dim] if batched else 1)
        if batched and key.shape[1 - seq_dim] != batch:
            raise ValueError(f"key batch size ({key.shape[1 - seq_dim]}) must equal query's ({batch})")
        len_q, len_k = query.shape[seq_dim], key.shape[seq_dim]
        if key_padding_mask is not None:
            expected = (batch, len_k) if batched else (len_k,)
            if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != expected:
                got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else key_padding_mask
                raise ValueError(f"key_padding_mask must have shape {expected}, got {got}")
        if attn_mask is not None:
            allowed = ((len_q, len_k), (batch * self.num_heads, len_q, len_k))
            if not isinstance(attn_mask, torch.Tensor) or tuple(attn_mask.shape) not in allowed:
                got = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else attn_mask
                raise ValueError(f"attn_mask must have shape {allowed[0]} or {allowed[1]}, got {got}")
        return batched

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is causal: pass the causal attn_mask too")
        query, key, value = _batch_first_views((query, key, value), batched, self.batch_first)
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, len_q, _ = query.shape

        q, k, v = self._in_projection(query, key, value)
        extra_keys = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            extra_keys += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.embed_dim)], dim=1)
            extra_keys += 1
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))

        # torch: the causal hint replaces the mask only when nothing else needs it
        use_causal = bool(is_causal) and key_padding_mask is None and not need_weights
        mask = None
        if not use_causal:
            sdpa_attn = None
            if attn_mask is not None:
                sdpa_attn = _torch_mask_to_sdpa(attn_mask, "attn_mask", q.dtype)
                if sdpa_attn.dim() == 3:
                    sdpa_attn = sdpa_attn.view(batch, self.num_heads, len_q, -1)
            sdpa_kpm = None
            if key_padding_mask is not None:
                sdpa_kpm = _torch_mask_to_sdpa(key_padding_mask, "key_padding_mask", q.dtype).view(batch, 1, 1, -1)
            mask = _merge_masks([_pad_keys(sdpa_attn, extra_keys), _pad_keys(sdpa_kpm, extra_keys)], q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            weights = attention_weights(q, k, attn_mask=mask)
        if need_weights and dropout_p > 0.0:
            # torch returns the dropped-out weights it used: do the same, eagerly
            weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
        else:
            out = fused_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal)
        out = self.out_proj(_merge_heads(out))  # (N, L, E)

        if need_weights and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), (None if weights is None else weights.squeeze(0))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)).

    forward(x (B, L, dim), key_padding_mask (B, L) bool, True = padding) -> (B, L, dim).
    Padded keys are ignored by every query; padded positions still produce outputs.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        _check_num_heads(dim, num_heads)
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.dim, self.num_heads, self.causal = dim, num_heads, bool(causal)
        self.dropout = _check_dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dropout)

    def attention(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention sub-layer alone (no norm, no residual): (B, L, dim) -> (B, L, dim)."""
        batch, length, _ = x.shape
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        mask = _padding_to_attend_mask(key_padding_mask, batch, length, length, self.causal, x.device)
        out = fused_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )
        return self.proj_drop(self.proj(_merge_heads(out)))

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens("x", x, self.dim)
        x = x + self.attention(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(q=norm1(x), kv=norm_memory(memory)), then + mlp(norm2(x)).

    forward(x (B, L, dim), memory (B, S, kv_dim), memory_padding_mask (B, S) bool,
    True = padding) -> (B, L, dim). kv_dim defaults to dim.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, kv_dim: Optional[int] = None
    ):
        super().__init__()
        _check_num_heads(dim, num_heads)
        kv_dim = dim if kv_dim is None else kv_dim
        if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim < 1:
            raise ValueError(f"kv_dim must be a positive int or None, got {kv_dim!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.dim, self.kv_dim, self.num_heads = dim, kv_dim, num_heads
        self.dropout = _check_dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(kv_dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dropout)

    def attention(self, x, memory, memory_padding_mask=None) -> torch.Tensor:
        """The attention sub-layer alone: x (B, L, dim), memory (B, S, kv_dim) -> (B, L, dim)."""
        batch, len_q, _ = x.shape
        len_k = memory.shape[1]
        q = _split_heads(self.q(x), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(memory).chunk(2, dim=-1))
        mask = _padding_to_attend_mask(memory_padding_mask, batch, len_q, len_k, False, x.device)
        out = fused_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_padding_mask=None) -> torch.Tensor:
        _check_tokens("x", x, self.dim)
        _check_tokens("memory", memory, self.kv_dim)
        if memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory batch ({memory.shape[0]}) must equal x batch ({x.shape[0]})")
        x = x + self.attention(self.norm1(x), self.norm_memory(memory), memory_padding_mask)
        return x + self.mlp(self.norm2(x))


class AttentionPooling(nn.Module):
    """`num_queries` learned queries attend over the tokens: (B, L, dim) -> (B, Q, dim).

    forward(x, key_padding_mask (B, L) bool True = padding, return_weights=False);
    with return_weights it returns (pooled, weights (B, H, Q, L)) and keeps the
    weights in `.last_weights` (None after a call without return_weights).
    """

    def __init__(self, dim: int, num_heads: int = 1, num_queries: int = 1):
        super().__init__()
        _check_num_heads(dim, num_heads)
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        self.dim, self.num_heads, self.num_queries = dim, num_heads, num_queries
        self.query = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.last_weights: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, return_weights: bool = False):
        _check_tokens("x", x, self.dim)
        batch, length, _ = x.shape
        q = _split_heads(self.query.to(x.dtype).expand(batch, -1, -1), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(self.norm(x)).chunk(2, dim=-1))
        mask = _padding_to_attend_mask(key_padding_mask, batch, self.num_queries, length, False, x.device)
        pooled = self.proj(_merge_heads(fused_attention(q, k, v, attn_mask=mask)))
        if not return_weights:
            self.last_weights = None
            return pooled
        weights = attention_weights(q, k, attn_mask=mask)
        self.last_weights = weights.detach()
        return pooled, weights
