"""The dropout keep-mask of the fused kernels, written out for inspection and tests.

Math: keep[z, h, i, j] = uniform(seed, (z * H + h) * L * S + i * S + j) >= p, with the
Philox draws of tiling.dropout_keep, i.e. exactly the mask the forward and backward
kernels apply for the same seed. Pairs with `reference.attention(dropout_mask=...)`.
One program per (BLOCK_M, BLOCK_N) tile of one (z, h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import FP_FUSION
from .tiling import dropout_keep, split_program_id

BLOCK = 64


@triton.jit
def _dropout_mask_kernel(Seed, Keep, H, L, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    num_n = tl.cdiv(S, BLOCK_N)
    block, off_zh, _, _, _ = split_program_id(tl.program_id(0), num_n * tl.cdiv(L, BLOCK_M), H, 1)
    rows = (block // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (block % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(Seed), off_zh, rows, cols, L, S, dropout_p, False)
    ptrs = Keep + off_zh.to(tl.int64) * L * S + rows[:, None].to(tl.int64) * S + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < L) & (cols[None, :] < S))


def dropout_mask(seed: torch.Tensor, Z: int, H: int, L: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """-> bool (Z, H, L, S): True where the kernels keep the probability."""
    keep = torch.zeros((Z, H, L, S), device=device, dtype=torch.int8)
    if keep.numel():
        grid = (triton.cdiv(L, BLOCK) * triton.cdiv(S, BLOCK) * Z * H,)
        _dropout_mask_kernel[grid](seed, keep, H, L, S, float(dropout_p), BLOCK_M=BLOCK, BLOCK_N=BLOCK, **FP_FUSION)
    return keep.bool()
