"""Nested (jagged) tensors in `fused_attention`: SDPA's variable-length batches,
routed to the packed varlen kernels, which is what they are.

A jagged nested tensor (torch.nested, layout=torch.jagged) of shape (B, j, H, D)
stores its rows packed: values() is (total, H, D) and offsets() the B + 1 prefix sums
of the lengths, i.e. `fused_attention_varlen`'s q and cu_seqlens_q. SDPA takes them
transposed to (B, H, j, D) (ragged dim 2): attention over each sequence's tokens;
with is_causal the alignment is bottom-right per sequence, as in FlashAttention's
varlen kernels and SDPA's CUDA flash path for nested inputs (SDPA's CPU path refuses
is_causal for them). Untransposed (B, j, H, D) inputs (ragged dim 1) attend over the
H dim of each token, as SDPA does: plain dense attention on values() (total, H, D).
The output is nested like the query, (B, H, j, Ev), and shares its offsets (and so its
ragged size j); a returned lse is nested (B, H, j) too. Autograd flows through values().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import AttentionArgumentError


def any_nested(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors)


@dataclass(frozen=True)
class JaggedCall:
    """A nested call in packed form: values (total, H, D) and what wraps the result."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ragged_dim: int  # 2: (B, H, j, D), the varlen kernels; 1: (B, j, H, D), dense over H
    offsets_q: torch.Tensor  # the query's own offsets (int64), reused for the output
    cu_seqlens_q: torch.Tensor  # int32
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    def wrap(self, values: torch.Tensor) -> torch.Tensor:
        """(total_q, H, X) -> nested like the query: (B, H, j, X), or (B, j, H, X) for ragged dim 1."""
        nested = torch.nested.nested_tensor_from_jagged(values, offsets=self.offsets_q)
        return nested.transpose(1, 2) if self.ragged_dim == 2 else nested

    def wrap_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """varlen lse (H, total_q), or dense (total_q, H) for ragged dim 1 -> nested (B, H, j) / (B, j, H)."""
        if self.ragged_dim == 2:
            return torch.nested.nested_tensor_from_jagged(lse.transpose(0, 1), offsets=self.offsets_q).transpose(1, 2)
        return torch.nested.nested_tensor_from_jagged(lse, offsets=self.offsets_q)


def _lengths(offsets: torch.Tensor) -> tuple:
    cu = offsets.to(torch.int32)
    return cu, int((offsets[1:] - offsets[:-1]).max().item()) if offsets.numel() > 1 else 0


def unpack(query, key, value, attn_mask, enable_gqa: bool) -> JaggedCall:
    """Check a nested call the way SDPA does (clear errors naming the argument) and
    give its packed form."""
    named = (("query", query), ("key", key), ("value", value))
    if not all(isinstance(t, torch.Tensor) and t.is_nested for _, t in named):
        kinds = ", ".join(f"{n}.is_nested={isinstance(t, torch.Tensor) and t.is_nested}" for n, t in named)
        raise AttentionArgumentError(f"query, key and value must all be nested tensors or none of them; got {kinds}")
    for name, t in named:
        if t.layout != torch.jagged:
            raise NotImplementedError(
                f"{name} is a nested tensor of layout {t.layout}; only layout=torch.jagged is supported"
            )
        if t.dim() != 4 or t._ragged_idx not in (1, 2):
            raise NotImplementedError(
                f"{name}: nested inputs must be (B, H, j, D) (ragged dim 2) or (B, j, H, D) (ragged dim 1); "
                f"got {t.dim()} dims ragged at dim {t._ragged_idx}"
            )
        if t.lengths() is not None:
            raise NotImplementedError(
                f"{name} is a nested tensor with holes (lengths() set); pass a contiguous one"
            )
    if len({t._ragged_idx for _, t in named}) != 1:
        raise AttentionArgumentError("query, key and value must be ragged on the same dim")
    if attn_mask is not None:  # SDPA's ValueError too
        raise AttentionArgumentError("attn_mask is not supported with nested (jagged) inputs (as in SDPA)")
    if query.size(0) != key.size(0) or key.size(0) != value.size(0):
        raise AttentionArgumentError(
            f"query, key and value must have the same batch size; got {query.size(0)}, {key.size(0)}, {value.size(0)}"
        )
    ragged = query._ragged_idx
    # (B, H, j, D) -> (B, j, H, D): values() are then the packed (total, H, D) rows
    values = [(t.transpose(1, 2) if ragged == 2 else t).values() for _, t in named]
    if ragged == 2:
        if key.offsets() is not value.offsets() and not torch.equal(key.offsets(), value.offsets()):
            raise AttentionArgumentError("key and value must have the same sequence lengths (offsets)")
        heads_q, heads_kv = values[0].shape[1], values[1].shape[1]
        if heads_q != heads_kv and not enable_gqa:
            raise AttentionArgumentError(
                f"query has {heads_q} heads but key/value have {heads_kv}; "
                "pass enable_gqa=True for grouped-query attention"
            )
    cu_q, max_q = _lengths(query.offsets())
    cu_k, max_k = _lengths(key.offsets())
    return JaggedCall(*values, ragged, query.offsets(), cu_q, cu_k, max_q, max_k)
