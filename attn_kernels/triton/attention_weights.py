"""Attention probabilities P = softmax(scores) in Triton, from the forward's LSE.

Math, in the notation of reference.py: P[i, j] = exp(scores[i, j] - lse[i]) with the
modifiers of tiling.py (softcap, ALiBi, mask, causal / window band); masked entries,
and every entry of a row whose lse is -inf, are 0. No dropout: these are the
weights before it.

Algorithm: the forward kernel runs without V to produce the LSE (O(L) memory); then
one program per (BLOCK_M queries, BLOCK_N keys, batch, head) recomputes its tile of
scores and writes exp2(s2 - lse2) with the forward's base-2 lse2 (so a row with one
visible key gets exactly 1). It writes L x S values: it is for looking at what
a model attends to, not for long sequences.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tuning
from .launch_config import FP_FUSION, dot_precision, head_block, upcast
from .tiling import alibi_slope_log2, lse_shift, scores_base2, split_program_id, to_lowp


@triton.jit
def _attn_weights_kernel(
    Q, K, Lse, P,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_pz, stride_ph, stride_pm, stride_pn,
    stride_lz, stride_lh,
    H, GROUP, L, S, E,
    qk_scale,
    Mask, stride_mz, stride_mh, stride_mm, stride_mn,
    Alibi, stride_az, stride_ah,
    Seed, dropout_p, softcap_scale, softcap_log2e, band_lo, band_hi,
    CuSeqQ, CuSeqK,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program -> (key block, query block, batch, head, key/value head)
    num_n = tl.cdiv(S, BLOCK_N)
    block, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), num_n * tl.cdiv(L, BLOCK_M), H, GROUP)
    n0 = (block % num_n) * BLOCK_N
    m0 = (block // num_n) * BLOCK_M
    tile_n = tl.arange(0, BLOCK_N)  # offsets within the tile; the bases are int64
    tile_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tile_n
    offs_m = m0 + tile_m
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < L
    cols_ok = offs_n < S
    alibi_log2e = alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI)

    Q += off_z * stride_qz + off_h * stride_qh + m0.to(tl.int64) * stride_qm
    K += off_z * stride_kz + off_hkv * stride_kh + n0.to(tl.int64) * stride_kn
    q = tl.load(Q + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=rows_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    kt = tl.load(K + tile_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=(offs_d[:, None] < E) & cols_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    lse2 = lse_shift(tl.load(Lse + off_z * stride_lz + off_h * stride_lh + offs_m, mask=rows_ok, other=0.0))
    s, _ = scores_base2(
        tl.dot(q, kt, input_precision=DOT_PRECISION), offs_m, offs_n, L, S,
        qk_scale, softcap_scale, softcap_log2e, Mask + off_z * stride_mz + off_h * stride_mh, stride_mm, stride_mn,
        alibi_log2e, band_lo, band_hi, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, False)
    p = tl.math.exp2(s - lse2[:, None])
    P += off_z * stride_pz + off_h * stride_ph + m0.to(tl.int64) * stride_pm + n0.to(tl.int64) * stride_pn
    p_ptrs = P + tile_m[:, None] * stride_pm + tile_n[None, :] * stride_pn
    tl.store(p_ptrs, to_lowp(p, P.dtype.element_ty, UPCAST), mask=rows_ok[:, None] & cols_ok[None, :])


def attention_weights(q, k, lse, probs, shape, mods):
    """Launch on (Z, H, N, D) views: q (Z, Hq, L, E), k (Z, Hkv, S, E), lse from the
    forward, probs (Z, Hq, L, S) allocated by the caller (`launch.py`)."""
    def launch(blocks):
        grid = (triton.cdiv(shape.L, blocks.BLOCK_M) * triton.cdiv(shape.S, blocks.BLOCK_N) * shape.Z * shape.H,)
        _attn_weights_kernel[grid](
            q, k, lse, probs,
            *q.stride(), *k.stride(), *probs.stride(), *shape.lse_strides,
            shape.H, shape.group, shape.L, shape.S, shape.E,
            mods.qk_scale,
            *mods.args,
            UPCAST=upcast(q.dtype),
            DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=blocks.BLOCK_M,
            BLOCK_N=blocks.BLOCK_N,
            BLOCK_D=head_block(shape.E),
            num_warps=blocks.num_warps,
            **FP_FUSION,
            **mods.constexprs,
        )
        return (probs,)

    tuning.run(tuning.Key.of("weights", q.dtype, shape.E, mods.banded), q.device, launch)
