"""Host-side choices shared by the Triton launchers: block sizes, dot precision,
and what the interpreter needs (bf16 is computed in fp32 there, see `upcast`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# every launch asks for FMA contraction explicitly: the kernels are written for it (the
# scale as one FMA, exp2 arguments), and Triton 3.9 warns that its default turns to
# off in 3.10; the interpreter drops the option
FP_FUSION = dict(enable_fp_fusion=True)


@dataclass(frozen=True)
class Blocks:
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_block(dim: int) -> int:
    """Padded constexpr tile width for a head dim (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs stay IEEE unless the user opted into TF32 for matmuls. (fp16/bf16
    dots ignore it: they get Triton's default.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 arithmetic is wrong upstream: compute bf16 in fp32 there."""
    return interpreting() and dtype == torch.bfloat16


def _dim_class(dim: int) -> int:
    return 64 if dim <= 64 else 128 if dim <= 128 else 256


# float32 (IEEE dots: FMA, not tensor cores) holds whole operand rows per thread, so it
# takes small tiles and 8 warps. These compile without spills for sm_90 with Triton
# 3.6 (74-141 registers; the previous 4-warp 64x32 / 32x32 tiles spilled 1-75 KB per
# thread): scripts/compile_sweep.py, bench/results/static/sm90-*-compile-sweep.txt.
_FP32_FORWARD = {64: Blocks(64, 32, 8, 2), 128: Blocks(32, 16, 8, 2), 256: Blocks(32, 16, 8, 1)}
_FP32_DQ = {64: Blocks(64, 32, 8, 2), 128: Blocks(32, 32, 8, 2), 256: Blocks(32, 16, 8, 1)}
_FP32_KEY_MAJOR = {64: Blocks(16, 64, 8, 2), 128: Blocks(32, 32, 8, 2), 256: Blocks(16, 32, 8, 1)}


def forward_blocks(dim: int, dtype: torch.dtype, masked: bool = False) -> Blocks:
    """Tiles for the forward (query-major). Conservative first choices that fit the
    shared memory of sm_80 / sm_90; tuned per GPU later. masked (a user mask or
    dropout): a value loaded or drawn per score, with its 64-bit address, costs
    registers; for 16-bit inputs the plain tiles then spilled on sm_90 (D <= 64: 88-412 B
    at 4 warps, 24-852 B at 8 with the interior and tma variants; D <= 128: 1.4 KB at
    128x64), these (32 keys per tile) do not with Triton 3.6 and 3.9."""
    if dtype == torch.float32:
        return _FP32_FORWARD[_dim_class(dim)]
    if dim <= 64:
        return Blocks(128, 32, 8, 3) if masked else Blocks(128, 64, 4, 3)
    if dim <= 128:
        return Blocks(64, 32, 8, 3) if masked else Blocks(128, 64, 8, 3)
    return Blocks(64, 32, 8, 2)


def dq_blocks(dim: int, dtype: torch.dtype, masked: bool = False) -> Blocks:
    """Tiles for the dQ pass: 128x64 at 8 warps for 16-bit inputs up to D = 128 (at
    D <= 64 with 4 warps the tile spilled 16-48 B on sm_90; with 8, 137-149 registers
    and no spills with Triton 3.6 and 3.9: bench/results/static/), 128x32 with a mask
    or dropout at D > 64 (128x64 spilled 16-316 B there)."""
    if dtype == torch.float32:
        return _FP32_DQ[_dim_class(dim)]
    if dim <= 64:
        return Blocks(128, 64, 8, 3)
    if dim <= 128:
        return Blocks(128, 32, 8, 3) if masked else Blocks(128, 64, 8, 3)
    return forward_blocks(dim, dtype)


def key_major_blocks(dim: int, dtype: torch.dtype) -> Blocks:
    """Tiles for the dK/dV pass: BLOCK_N keys stay resident, BLOCK_M queries stream.
    16-bit inputs take 8 warps: with 4, these tiles spilled on sm_90 (D=64: 24-164 B
    at 255 registers; D=128: 8-16 B with Triton 3.6); with 8, no spills and 143-184
    registers with Triton 3.6 and 3.9 (bench/results/static/)."""
    if dtype == torch.float32:
        return _FP32_KEY_MAJOR[_dim_class(dim)]
    if dim <= 64:
        return Blocks(32, 128, 8, 3)
    if dim <= 128:
        return Blocks(32, 64, 8, 2)
    return Blocks(32, 32, 4, 1)


def strides(t: torch.Tensor) -> tuple:
    """Strides of a (Z, H, N, D) tensor, any of them may be 0 (broadcast) or non-unit."""
    return tuple(t.stride())
