"""Attention probabilities P = softmax(scale * Q K^T) in Triton, from the forward's LSE.

Math, in the notation of reference.py: P[i, j] = exp(scores[i, j] - lse[i]), with
causal-masked entries (and every entry of a row whose lse is -inf) equal to 0.

Algorithm: the forward kernel runs without V to produce the LSE (O(L) memory);
then one program per (BLOCK_M queries, BLOCK_N keys, batch, head) recomputes its
tile of scores and writes exp2(s * log2(e) - lse * log2(e)). This is what users
inspect; it writes L x S values, so it is for looking at, not for long sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_fwd import attention_fwd
from .launch_config import LOG2E, dot_precision, forward_blocks, head_block, upcast
from .tiling import lse_base2, split_program_id


@triton.jit
def _attn_weights_kernel(
    Q, K, Lse, P,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_pz, stride_ph, stride_pm, stride_pn,
    H, GROUP, L, S, E,
    qk_scale,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program -> (key block, query block, batch, head, key/value head)
    num_n = tl.cdiv(S, BLOCK_N)
    block, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), num_n * tl.cdiv(L, BLOCK_M), H, GROUP)
    start_n = (block % num_n) * BLOCK_N
    start_m = (block // num_n) * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < L
    cols_ok = offs_n < S

    q = tl.load(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=rows_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    kt = tl.load(K + off_z * stride_kz + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=(offs_d[:, None] < E) & cols_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    lse2 = lse_base2(tl.load(Lse + off_zh.to(tl.int64) * L + offs_m, mask=rows_ok, other=0.0))
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if IS_CAUSAL:
        p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
    p_ptrs = P + off_z * stride_pz + off_h * stride_ph + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(p_ptrs, p.to(P.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


def attention_weights(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    """q (Z, Hq, L, E), k (Z, Hkv, S, E) -> probabilities (Z, Hq, L, S) in q.dtype."""
    Z, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    probs = torch.zeros((Z, H, L, S), device=q.device, dtype=q.dtype)
    if probs.numel() == 0:
        return probs
    _, lse = attention_fwd(q, k, None, is_causal, scale)
    blocks = forward_blocks(E, q.dtype)
    grid = (triton.cdiv(L, blocks.BLOCK_M) * triton.cdiv(S, blocks.BLOCK_N) * Z * H,)
    _attn_weights_kernel[grid](
        q, k, lse, probs,
        *q.stride(), *k.stride(), *probs.stride(),
        H, H // Hkv, L, S, E,
        scale * LOG2E,
        IS_CAUSAL=is_causal,
        UPCAST=upcast(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=blocks.BLOCK_M,
        BLOCK_N=blocks.BLOCK_N,
        BLOCK_D=head_block(E),
        num_warps=blocks.num_warps,
    )
    return probs
