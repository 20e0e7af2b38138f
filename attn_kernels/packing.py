"""Between padded batches and the packed layout of `fused_attention_varlen`.

    pack(x (B, L, H, D), lengths (B,))  -> (packed (total, H, D), cu_seqlens int32 (B + 1,), max_seqlen)
    unpack(packed, cu_seqlens, L)        -> (B, L, H, D), zeros past each length
"""

from __future__ import annotations

import torch


def _lengths_tensor(lengths, batch: int, max_len: int, device) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.numel() != batch or lengths.is_floating_point():
        raise ValueError(f"lengths must be {batch} integers, got {tuple(lengths.shape)} {lengths.dtype}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > max_len):
        raise ValueError(f"lengths must be in [0, {max_len}], got {lengths.tolist()}")
    return lengths


def pack(x: torch.Tensor, lengths) -> tuple:
    """Keep the first lengths[b] positions of each batch row: (packed, cu_seqlens, max_seqlen)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor (B, L, ...)")
    lengths = _lengths_tensor(lengths, x.shape[0], x.shape[1], x.device)
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    cu_seqlens = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x[keep], cu_seqlens, max_seqlen


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Inverse of `pack`: (total, ...) -> (B, seqlen, ...), zero-padded."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > seqlen:
        raise ValueError(f"seqlen {seqlen} is shorter than the longest sequence {longest}")
    keep = torch.arange(seqlen, device=packed.device)[None, :] < lengths[:, None]
    out = packed.new_zeros(lengths.numel(), seqlen, *packed.shape[1:])
    out[keep] = packed
    return out
