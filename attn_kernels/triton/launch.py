"""Host side of the Triton backend: layouts, allocation and kernel arguments.

Callers (the custom ops of `attn_kernels/triton_ops.py`) hand over tensors in one of two layouts:
  padded  q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev)   any strides
  packed  q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev), with
          `Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`
Kernels see both as (Z, H, N, D)-strided views: a packed tensor becomes
(num_seqs, H, total, D) with batch stride 0, and each program finds its sequence's
start and length in cu_seqlens. LSE is (Z, Hq, L) padded and (Hq, total_q) packed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from . import attention_bwd, attention_fwd, attention_weights
from .launch_config import LOG2E


class Packed(NamedTuple):
    cu_seqlens_q: torch.Tensor  # int32 (num_seqs + 1,)
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True)
class Shape:
    Z: int
    H: int
    Hkv: int
    L: int  # the longest query sequence when packed
    S: int
    E: int
    Ev: int
    lse_strides: tuple  # (z, h) strides of lse and delta, whose rows are contiguous

    @property
    def group(self) -> int:
        return self.H // self.Hkv


@dataclass(frozen=True)
class ScoreMods:
    """What every kernel takes after its tensors: the score modifiers of tiling.py,
    dropout and packing, as positional arguments plus constexpr flags."""

    scale: float
    qk_scale: float
    args: tuple
    constexprs: dict = field(default_factory=dict)

    @property
    def banded(self) -> bool:
        """Causal or sliding window: the kernels visit only the tiles in the band."""
        return bool(self.constexprs.get("BAND_LO") or self.constexprs.get("BAND_HI"))

    @property
    def masked(self) -> bool:
        """A user mask or dropout: the kernels load or draw a value per score (tuning.Key.masked)."""
        return bool(self.constexprs.get("MASK_KIND") or self.constexprs.get("DROPOUT"))


def score_mods(
    dummy: torch.Tensor,
    scale: float,
    *,
    mask: Optional[torch.Tensor] = None,
    alibi: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    band: tuple = (None, None),
    packed: Optional[Packed] = None,
) -> ScoreMods:
    """mask: (Z, Hq, L, S) view (stride 0 where broadcast), bool or float; alibi:
    (Z, Hq) float32 view; seed: int64 (1,) tensor on the device (needed when
    dropout_p > 0); band: (lo, hi) bounds of j - i, None = unbounded (relative to
    the bottom-right diagonal when packed). `dummy` fills unused pointer slots."""
    if mask is None:
        mask_kind, mask_args = 0, (dummy, 0, 0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_t = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_args = (mask_t, *mask_t.stride())
    alibi_args = (dummy, 0, 0) if alibi is None else (alibi, *alibi.stride())
    lo, hi = band
    cu = (packed.cu_seqlens_q, packed.cu_seqlens_k) if packed is not None else (dummy, dummy)
    args = (
        *mask_args,
        *alibi_args,
        seed if seed is not None else dummy,
        float(dropout_p),
        scale / softcap if softcap > 0 else 0.0,
        softcap * LOG2E,
        0 if lo is None else int(lo),
        0 if hi is None else int(hi),
        *cu,
    )
    constexprs = dict(
        MASK_KIND=mask_kind,
        HAS_ALIBI=alibi is not None,
        SOFTCAP=softcap > 0,
        BAND_LO=lo is not None,
        BAND_HI=hi is not None,
        DROPOUT=dropout_p > 0,
        VARLEN=packed is not None,
    )
    return ScoreMods(scale=scale, qk_scale=scale * LOG2E, args=args, constexprs=constexprs)


def _kernel_view(t: torch.Tensor, packed: Optional[Packed]) -> torch.Tensor:
    """Padded tensors are already (Z, H, N, D); packed (total, H, D) -> (Z, H, total, D), batch stride 0."""
    if packed is None:
        return t
    return t.transpose(0, 1).unsqueeze(0).expand(packed.cu_seqlens_q.numel() - 1, -1, -1, -1)


def _shape(q, k, v, packed: Optional[Packed]) -> Shape:
    E = q.shape[-1]
    Ev = v.shape[-1] if v is not None else E
    if packed is None:
        Z, H, L, _ = q.shape
        return Shape(Z, H, k.shape[1], L, k.shape[2], E, Ev, (H * L, L))
    total_q, H, _ = q.shape
    return Shape(packed.cu_seqlens_q.numel() - 1, H, k.shape[1], packed.max_seqlen_q, packed.max_seqlen_k,
                 E, Ev, (0, total_q))


def _lse_like(q: torch.Tensor, shape: Shape, packed: Optional[Packed]) -> torch.Tensor:
    size = (shape.Z, shape.H, shape.L) if packed is None else (shape.H, q.shape[0])
    return torch.empty(size, device=q.device, dtype=torch.float32)


def forward(q, k, v, mods: ScoreMods, packed: Optional[Packed] = None):
    """-> (out like q with v's head dim, or None when v is None; lse float32)."""
    shape = _shape(q, k, v, packed)
    lse = _lse_like(q, shape, packed)
    out = None if v is None else torch.empty((*q.shape[:-1], shape.Ev), device=q.device, dtype=q.dtype)
    if shape.Z * shape.H * shape.L == 0:
        return out, lse
    if shape.S == 0:  # nothing to attend to
        lse.fill_(float("-inf"))
        if out is not None:
            out.zero_()
        return out, lse
    view = lambda t: None if t is None else _kernel_view(t, packed)  # noqa: E731
    attention_fwd.attention_fwd(view(q), view(k), view(v), lse, view(out), shape, mods)
    return out, lse


def backward(do, q, k, v, out, lse, dlse, mods: ScoreMods, packed: Optional[Packed] = None, need_ds=False,
             deterministic=False):
    """-> (dq, dk, dv like q, k, v; ds float32 (Z, Hq, L, S) when need_ds, else None).
    deterministic: bit-reproducible (no dQ atomics: variant "onepass" is not used)."""
    shape = _shape(q, k, v, packed)
    dq, dk, dv = (torch.zeros(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    ds = torch.zeros((shape.Z, shape.H, shape.L, shape.S), device=q.device, dtype=torch.float32) if need_ds else None
    if shape.Z * shape.H * shape.L * shape.S == 0:
        return dq, dk, dv, ds
    view = lambda t: _kernel_view(t, packed)  # noqa: E731
    attention_bwd.attention_bwd(
        view(do), view(q), view(k), view(v), view(out), lse, dlse, view(dq), view(dk), view(dv), ds, shape, mods,
        deterministic=deterministic,
    )
    return dq, dk, dv, ds


def weights(q, k, mods: ScoreMods) -> torch.Tensor:
    """Padded q (Z, Hq, L, E), k (Z, Hkv, S, E) -> probabilities (Z, Hq, L, S) in q.dtype."""
    shape = _shape(q, k, None, None)
    probs = torch.zeros((shape.Z, shape.H, shape.L, shape.S), device=q.device, dtype=q.dtype)
    if probs.numel() == 0:
        return probs
    _, lse = forward(q, k, None, mods)
    attention_weights.attention_weights(q, k, lse, probs, shape, mods)
    return probs
