"""Dropout keep-masks of the CPU backend, drawn tile by tile from a counter-based hash.

    keep[zh, i, j] = mix(row(zh, i) ^ col(j)) >= p * 2^32        zh = z * Hq + h
    row(zh, i)     = mix((mix((zh + seed_lo) mod 2^32) + i) mod 2^32)
    col(j)         = mix((j + seed_hi) mod 2^32)

`mix` is an xorshift-multiply finalizer on 32-bit values (a bijection). Any tile of
the mask is a pure function of (seed, zh, i, j), so the blocked forward, its backward
and `dropout_keep_mask(backend="cpu")` draw the same bits whatever their tile sizes or
order, and a packed (varlen) call draws what a padded (B, H, max_q, max_k) call would
(zh counts sequences). The seed is one draw from torch's CPU generator per call, so
`torch.manual_seed` replays a call. Limits: the row keys are 32 bits, so two of the
~N^2 / 2^33 row pairs of a huge call may share their mask; p is resolved to 2^-32.

The arithmetic is int64 on values below 2^32, with multipliers below 2^31, so no
product overflows (no reliance on wrap-around).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
SEED_HIGH = 2**62
_MUL_A = 0x2C1B3C6D  # odd multipliers < 2^31
_MUL_B = 0x297A2D39


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) with good avalanche; x int64, values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & M32
    return x ^ (x >> 16)


def draw_seed() -> int:
    """One draw from torch's CPU generator (what `torch.manual_seed` replays)."""
    return int(torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64).item())


def threshold(p: float) -> int:
    return min(int(round(p * 2.0**32)), 2**32)


def keep_tile(seed: int, p: float, zh: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """bool (*zh.shape[:-2], i1 - i0, j1 - j0), True = kept.

    zh: int64 (..., 1, 1), the global index z * Hq + h of each (batch, head) of the tile.
    """
    seed_lo, seed_hi = seed & M32, (seed >> 32) & M32
    rows = torch.arange(i0, i1, dtype=torch.int64)[:, None]
    cols = torch.arange(j0, j1, dtype=torch.int64)[None, :]
    row = _mix((_mix((zh + seed_lo) & M32) + rows) & M32)  # (..., bm, 1)
    col = _mix((cols + seed_hi) & M32)  # (1, bn)
    return _mix(row ^ col) >= threshold(p)


def keep_mask(seed: int, p: float, z: int, heads_q: int, len_q: int, len_k: int) -> torch.Tensor:
    """The whole keep-mask, bool (z, heads_q, len_q, len_k), of a call with these sizes."""
    zh = torch.arange(z * heads_q, dtype=torch.int64).view(z, heads_q, 1, 1)
    return keep_tile(seed, p, zh, 0, len_q, 0, len_k)
