"""One attention problem of the CPU backend's blocked path, cut into tiles.

A `Problem` holds the inputs of one call as strided views in the grouped layout

    q (Z, Hkv, G, L, E)   k (Z, Hkv, S, E)   v (Z, Hkv, S, Ev)     query head h = kv * G + g

(grouped-query attention reads key/value head h // G; nothing is repeated) and
computes any tile of the scores, in the order of reference.py:

    s = (scale * q_i) . k_j                      float32 (float64 for float64 inputs)
    s = softcap * tanh(s / softcap)              if softcap > 0
    s = s - slope_h * |i + diag - j|             ALiBi, diag = S - L (per sequence when packed)
    s = s + mask_ij  /  -inf where mask_ij is False
    s = -inf where j - i < lo or j - i > hi      the causal / sliding-window band

Tiles are (Z, Hkv, G, bm, bn): every batch row and head at once, so one tile is a few
batched matmuls and elementwise ops; tiles wholly outside the band are never visited
and the band is only applied to tiles that cross its edges. `plan_blocks` keeps a
tile near TILE_ELEMS values, so the working set is O(Z * H * (L + S) * D + tile),
never L x S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_dropout

TILE_ELEMS = 1 << 18  # scores per tile (1 MiB in float32): a few tiles stay in cache
MIN_BLOCK = 16
MAX_BLOCK_N = 4096


def plan_blocks(heads: int, len_q: int, len_k: int) -> tuple:
    """(bm, bn): query and key rows per tile for `heads` = Z * Hq score matrices."""
    heads = max(heads, 1)
    bm = max(1, min(len_q, 128, max(MIN_BLOCK, TILE_ELEMS // (heads * 64))))
    bn = max(MIN_BLOCK, min(MAX_BLOCK_N, TILE_ELEMS // (heads * bm)))
    bn = max(1, min(len_k, bn))
    if bn == len_k:  # every key in one tile: spend the budget on more query rows
        bm = max(bm, min(len_q, TILE_ELEMS // (heads * bn)))
    return bm, bn


def relative_band(is_causal: bool, window: tuple) -> tuple:
    """(lo, hi) of j - i relative to the bottom-right diagonal (varlen, KV cache)."""
    lo = -window[0] if window[0] >= 0 else None
    hi = 0 if is_causal else None
    if window[1] >= 0:
        hi = window[1] if hi is None else min(hi, window[1])
    return lo, hi


def shift_band(band: tuple, diag: int) -> tuple:
    lo, hi = band
    return (None if lo is None else lo + diag), (None if hi is None else hi + diag)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class MaskLayout:
    """A mask broadcastable to (*batch, Hq, L, S) as a 5-D (Zm, Hkvm, Gm, Lm, Sm) view
    that broadcasts against a tile (size-1 dims where the mask is broadcast; no copy
    unless its batch dims mix broadcast and full sizes), and the way back for its
    gradient (summed over the broadcast dims, in the mask's own shape)."""

    def __init__(self, mask: torch.Tensor, batch: tuple, heads_q: int, heads_kv: int):
        nb = len(batch)
        self.shape = tuple(mask.shape)
        padded = mask.reshape((1,) * (nb + 3 - mask.dim()) + self.shape)
        self.padded_shape = tuple(padded.shape)
        self.batch = batch
        heads_m, len_m, keys_m = padded.shape[nb:]
        z = math.prod(batch)
        if all(d == 1 for d in padded.shape[:nb]):
            mz = padded.reshape(1, heads_m, len_m, keys_m)
        else:
            mz = padded.expand(*batch, heads_m, len_m, keys_m).reshape(z, heads_m, len_m, keys_m)
        groups = (heads_kv, heads_q // heads_kv) if heads_m == heads_q else (1, 1)
        self.mask5 = mz.reshape(mz.shape[0], *groups, len_m, keys_m)

    def tile(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        m = self.mask5
        rows = slice(i0, i1) if m.shape[3] > 1 else slice(None)
        cols = slice(j0, j1) if m.shape[4] > 1 else slice(None)
        return m[:, :, :, rows, cols]

    def accumulate(self, grad5: torch.Tensor, ds: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """grad5[tile] += ds (Z, Hkv, G, bm, bn), summed over the dims the mask broadcasts."""
        dims = [d for d in range(5) if grad5.shape[d] == 1 and ds.shape[d] != 1]
        if dims:
            ds = ds.sum(dim=dims, keepdim=True)
        rows = slice(i0, i1) if grad5.shape[3] > 1 else slice(None)
        cols = slice(j0, j1) if grad5.shape[4] > 1 else slice(None)
        grad5[:, :, :, rows, cols] += ds

    def restore(self, grad5: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        nb = len(self.batch)
        heads_m, len_m, keys_m = self.padded_shape[nb:]
        grad = grad5.reshape(grad5.shape[0], heads_m, len_m, keys_m)
        if grad.shape[0] == 1:
            grad = grad.reshape(self.padded_shape)
        else:
            grad = grad.reshape(*self.batch, heads_m, len_m, keys_m)
            summed = [d for d in range(nb) if self.padded_shape[d] == 1]
            if summed:
                grad = grad.sum(dim=summed, keepdim=True)
        return grad.reshape(self.shape).to(dtype)


@dataclass
class Problem:
    """Inputs and modifiers of one blocked call (see the module docstring)."""

    q: torch.Tensor  # (Z, Hkv, G, L, E)
    k: torch.Tensor  # (Z, Hkv, S, E)
    v: Optional[torch.Tensor]  # (Z, Hkv, S, Ev); None when only the softmax is wanted
    scale: float
    band: tuple = (None, None)  # (lo, hi) bounds of j - i, None = unbounded
    softcap: float = 0.0
    neg_slopes: Optional[torch.Tensor] = None  # -ALiBi slopes, (Z or 1, Hkv, G, 1, 1), acc dtype
    alibi_diag: int = 0  # i + diag is the query's key position for ALiBi
    mask: Optional[MaskLayout] = None
    dropout_p: float = 0.0
    seed: int = 0
    zh_offset: int = 0  # first global (batch, head) index, for the dropout hash
    blocks: Optional[tuple] = None  # (bm, bn); default from plan_blocks

    def __post_init__(self):
        Z, Hkv, G, L, _ = self.q.shape
        self.sizes = (Z, Hkv, G)
        self.len_q, self.len_k = L, self.k.shape[2]
        self.acc = acc_dtype(self.q.dtype)
        if self.blocks is None:
            self.blocks = plan_blocks(Z * Hkv * G, L, self.len_k)
        if self.dropout_p > 0.0:
            self.zh = (torch.arange(Z * Hkv * G, dtype=torch.int64) + self.zh_offset).view(Z, Hkv, G, 1, 1)

    # --- which tiles to visit -------------------------------------------------
    def key_span(self, i0: int, i1: int) -> tuple:
        """Keys [jlo, jhi) that some query in [i0, i1) may see."""
        lo, hi = self.band
        jlo = 0 if lo is None else max(0, i0 + lo)
        jhi = self.len_k if hi is None else min(self.len_k, i1 - 1 + hi + 1)
        return jlo, max(jlo, jhi)

    def query_span(self, j0: int, j1: int) -> tuple:
        """Queries [ilo, ihi) that may see some key in [j0, j1)."""
        lo, hi = self.band
        ilo = 0 if hi is None else max(0, j0 - hi)
        ihi = self.len_q if lo is None else min(self.len_q, j1 - 1 - lo + 1)
        return ilo, max(ilo, ihi)

    def query_blocks(self):
        bm = self.blocks[0]
        return [(i0, min(i0 + bm, self.len_q)) for i0 in range(0, self.len_q, bm)]

    def key_blocks(self, i0: int, i1: int):
        jlo, jhi = self.key_span(i0, i1)
        bn = self.blocks[1]
        return [(j0, min(j0 + bn, jhi)) for j0 in range(jlo, jhi, bn)]

    def key_blocks_all(self):
        bn = self.blocks[1]
        return [(j0, min(j0 + bn, self.len_k)) for j0 in range(0, self.len_k, bn)]

    def query_blocks_for(self, j0: int, j1: int):
        ilo, ihi = self.query_span(j0, j1)
        bm = self.blocks[0]
        return [(i0, min(i0 + bm, ihi)) for i0 in range(ilo, ihi, bm)]

    # --- tiles ----------------------------------------------------------------
    def q_tile(self, i0: int, i1: int) -> torch.Tensor:
        """scale * q rows i0..i1 as (Z, Hkv, G * bm, E) in the accumulation dtype."""
        Z, Hkv, G = self.sizes
        qi = self.q[:, :, :, i0:i1].to(self.acc) * self.scale
        return qi.reshape(Z, Hkv, G * (i1 - i0), qi.shape[-1])

    def kv_tile(self, t: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        return t[:, :, j0:j1].to(self.acc)

    def scores(self, qi: torch.Tensor, kj: torch.Tensor, i0: int, i1: int, j0: int, j1: int, keep_tanh=False):
        """Scores of the tile (Z, Hkv, G, bm, bn), -inf where not allowed; with
        keep_tanh, also tanh(raw / softcap) for the softcap derivative (else None)."""
        Z, Hkv, G = self.sizes
        s = torch.matmul(qi, kj.transpose(-1, -2)).view(Z, Hkv, G, i1 - i0, j1 - j0)
        tanh = None
        if self.softcap > 0.0:
            s.div_(self.softcap).tanh_()
            if keep_tanh:
                tanh = s.clone()
            s.mul_(self.softcap)
        rows = cols = None
        if self.neg_slopes is not None:
            rows, cols = self._positions(i0, i1, j0, j1)
            distance = (rows + self.alibi_diag - cols).abs_().to(self.acc)
            s.addcmul_(self.neg_slopes, distance)
        if self.mask is not None:
            m = self.mask.tile(i0, i1, j0, j1)
            if m.dtype == torch.bool:
                s.masked_fill_(~m, float("-inf"))
            else:
                s.add_(m)
        lo, hi = self.band
        cut_lo = lo is not None and j0 - (i1 - 1) < lo
        cut_hi = hi is not None and (j1 - 1) - i0 > hi
        if cut_lo or cut_hi:
            if rows is None:
                rows, cols = self._positions(i0, i1, j0, j1)
            offset = cols - rows
            outside = (offset < lo) if cut_lo else None
            if cut_hi:
                outside = (offset > hi) if outside is None else outside | (offset > hi)
            s.masked_fill_(outside, float("-inf"))
        return s, tanh

    def keep(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Dropout keep-mask of the tile, bool (Z, Hkv, G, bm, bn)."""
        return cpu_dropout.keep_tile(self.seed, self.dropout_p, self.zh, i0, i1, j0, j1)

    @staticmethod
    def _positions(i0, i1, j0, j1):
        return torch.arange(i0, i1)[:, None], torch.arange(j0, j1)[None, :]
