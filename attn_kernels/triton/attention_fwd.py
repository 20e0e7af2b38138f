"""Fused attention forward (FlashAttention-2) in Triton.

Math, in the notation of reference.py, for each batch z and query head h:
    scores = scale * Q K^T, then the modifiers of tiling.py (softcap, ALiBi, mask,
             causal / sliding-window band)
    lse2   = logsumexp(scores, -1) / ln 2   float32, base 2 (users get lse2 * ln 2)
    O      = dropout(softmax(scores)) V

Algorithm: one program per (BLOCK_M query rows, z, h). It streams K and V in
BLOCK_N-row tiles and keeps, per query row, the running max m, the running
denominator l and an unnormalised accumulator, rescaling both when the max grows
(online softmax). Scores are kept in base 2 (log2(e) is folded into the scale) so
each exponential is one exp2. Only the key tiles inside the causal / window band
are visited. GQA: query head h reads key/value head h // GROUP, so K and V are never
copied. Dropout draws a Philox keep-mask per element (tiling.dropout_keep) and
scales kept probabilities by 1 / (1 - p); the denominator l is not dropped.
VARLEN: z indexes packed sequences through cu_seqlens. With HAS_V=False only the
LSE is computed (what `attention_weights` needs).

Limits: head dims 1..256 (tiles padded to a power of two >= 16 and masked), any
strides (stride 0 included), fp16 / bf16 / fp32. A row whose keys are all masked
gets O = 0 and lse = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tuning
from .launch_config import dot_precision, head_block, upcast
from .tiling import alibi_slope_log2, dropout_keep, key_range, scores_base2, sequence_bounds, split_program_id, to_lowp


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_lz, stride_lh,
    H, GROUP, L, S, E, EV,
    qk_scale,
    # score modifiers (tiling.scores_base2), dropout and packed sequences
    Mask, stride_mz, stride_mh, stride_mm, stride_mn,
    Alibi, stride_az, stride_ah,
    Seed, dropout_p, softcap_scale, softcap_log2e, band_lo, band_hi,
    CuSeqQ, CuSeqK,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_V: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (query block, batch, head, key/value head); L, S are the largest lengths
    block_m, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, GROUP)
    q_start, k_start, seq_len_q, seq_len_k, band_lo, band_hi = sequence_bounds(
        CuSeqQ, CuSeqK, off_z, L, S, band_lo, band_hi, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= seq_len_q:  # a packed sequence shorter than the longest
        return

    tile_m = tl.arange(0, BLOCK_M)  # rows within the tile: the only int32 row offsets
    offs_m = m0 + tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len_q

    # int64 base offsets, once per program (tiling.py: addresses past 2^31)
    Q += off_z * stride_qz + off_h * stride_qh + (q_start + m0) * stride_qm
    K += off_z * stride_kz + off_hkv * stride_kh + k_start * stride_kn
    V += off_z * stride_vz + off_hkv * stride_vh + k_start * stride_vn
    Mask += off_z * stride_mz + off_h * stride_mh
    alibi_log2e = alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    q = tl.load(Q + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # only the key tiles inside the causal / window band
    lo, hi = key_range(m0, seq_len_k, band_lo, band_hi, BAND_LO, BAND_HI, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        K_tile = K + tl.cast(start_n, tl.int64) * stride_kn
        kt = tl.load(K_tile + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_d[:, None] < E) & (cols[None, :] < seq_len_k), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        # base-2 scores with every modifier; -inf where masked
        s, _ = scores_base2(
            tl.dot(q, kt, input_precision=DOT_PRECISION), offs_m, cols, seq_len_q, seq_len_k,
            qk_scale, softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, alibi_log2e, band_lo, band_hi,
            MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, False)
        # new running max; a row that has seen no allowed key yet shifts by 0, not -inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        # rescale the old denominator (and accumulator) to the new max
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            V_tile = V + tl.cast(start_n, tl.int64) * stride_vn
            v = tl.load(V_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=(cols[:, None] < seq_len_k) & (offs_dv[None, :] < EV), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if DROPOUT:
                # dropped weights are zeroed; 1 / (1 - p) is applied once in the epilogue
                p = tl.where(dropout_keep(seed, off_zh, offs_m, cols, L, S, dropout_p, False), p, 0.0)
            # P is rounded to the input dtype for the tensor-core PV product, as in FlashAttention
            acc = acc * alpha[:, None] + tl.dot(to_lowp(p, V.dtype.element_ty, UPCAST), v,
                                                input_precision=DOT_PRECISION)
        m_i = m_new

    # epilogue: base-2 lse (exact: m_i when one key is visible); rows with no allowed
    # key get O = 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = m_i + tl.math.log2(l_safe)
    tl.store(Lse + off_z * stride_lz + off_h * stride_lh + q_start + offs_m, lse2, mask=row_ok)
    if HAS_V:
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out / (1.0 - dropout_p)
        Out += off_z * stride_oz + off_h * stride_oh + (q_start + m0) * stride_om
        tl.store(Out + tile_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                 to_lowp(out, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_dv[None, :] < EV))


def attention_fwd(q, k, v, lse, out, shape, mods):
    """Launch on (Z, H, N, D) views (see launch.py): q (Z, Hq, *, E), k (Z, Hkv, *, E),
    v (Z, Hkv, *, Ev) or None, out like q with Ev (or None), lse float32 laid out as
    shape.lse_strides, written in base 2. `mods` carries the score modifiers' kernel arguments."""
    v_arg = v if v is not None else k  # without V the kernel never reads V / Out
    o_arg = out if out is not None else q

    def launch(blocks):
        grid = (triton.cdiv(shape.L, blocks.BLOCK_M) * shape.Z * shape.H,)
        _attn_fwd_kernel[grid](
            q, k, v_arg, o_arg, lse,
            *q.stride(), *k.stride(), *v_arg.stride(), *o_arg.stride(), *shape.lse_strides,
            shape.H, shape.group, shape.L, shape.S, shape.E, shape.Ev,
            mods.qk_scale,
            *mods.args,
            HAS_V=v is not None,
            UPCAST=upcast(q.dtype),
            DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=blocks.BLOCK_M,
            BLOCK_N=blocks.BLOCK_N,
            BLOCK_D=head_block(shape.E),
            BLOCK_DV=head_block(shape.Ev),
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
            **mods.constexprs,
        )
        return out, lse

    tuning.run(tuning.Key.of("fwd", q.dtype, max(shape.E, shape.Ev), mods.banded), q.device, launch)
