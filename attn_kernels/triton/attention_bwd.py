"""Fused attention backward (FlashAttention-2) in Triton.

Math, in the notation of reference.py (P = softmax(scores), D = dropout keep-mask
scaled by 1 / (1 - p), or 1 without dropout):
    dV    = (P * D)^T dO
    dP    = (dO V^T) * D
    delta = rowsum(dO * O) - dlse           (dlse: gradient reaching the returned lse)
    dS    = P * (dP - delta)                 gradient of the scores, = d(attn_mask) for a float mask
    dQ    = scale * (dS * c) K,   dK = scale * (dS * c)^T Q
with c = 1 - tanh^2(scale * q.k / softcap) under softcap, else 1.

Algorithm: P is never stored. It is recomputed tile by tile from Q, K and the
forward's LSE as exp2(s2 - lse2), with every modifier (tiling.scores_base2) and the
same Philox dropout mask as the forward; the LSE is the forward's base-2 one, so P
needs no change of base (exactly 1 where a row sees one key). Three kernels:
  1. preprocess: delta per query row;
  2. dK/dV: one program per (BLOCK_N keys, batch, key/value head), which walks the
     query tiles of every query head of its GQA group, so dK/dV of a shared head
     are summed in registers: no atomics, so the result is bit-identical run to run;
     it also writes dS when a float mask needs its gradient;
  3. dQ: one program per (BLOCK_M queries, batch, query head), walking key tiles.
Only the tiles inside the causal / window band are visited. Variant "interior"
(variants.py) splits the query loop of dK/dV and the key loop of dQ into edge and
interior tiles as in the forward: interior tiles recompute P = exp2(qk * qk_scale - lse2)
with no mask and no bound. Variant "onepass" (attention_bwd_onepass.py) replaces
kernels 2 and 3 by one that adds dQ with fp32 atomics (5 matmuls per tile instead of
7); it is not bit-reproducible, so `deterministic=True` keeps the three kernels.

Limits: as the forward. Rows with lse = -inf (no allowed key) get zero gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning, variants
from .launch_config import FP_FUSION, dot_precision, forward_blocks, head_block, upcast
from .tiling import (alibi_slope_log2, dropout_keep, interior_range, key_range, lse_shift, query_range, scores_base2,
                     sequence_bounds, split_program_id, to_lowp)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, DLse, Delta,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_lz, stride_lh,
    H, L, S, EV,
    CuSeqQ, CuSeqK,
    HAS_DLSE: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    block_m, off_zh, off_z, off_h, _ = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, 1)
    q_start, _, seq_len_q, _, _, _ = sequence_bounds(CuSeqQ, CuSeqK, off_z, L, S, 0, 0, VARLEN)
    m0 = block_m * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + tile_m
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len_q
    mask = rows_ok[:, None] & (offs_dv[None, :] < EV)
    Out += off_z * stride_oz + off_h * stride_oh + (q_start + m0) * stride_om
    DO += off_z * stride_dz + off_h * stride_dh + (q_start + m0) * stride_dm
    o = tl.load(Out + tile_m[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + tile_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_z * stride_lz + off_h * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=rows_ok, other=0.0)
    tl.store(Delta + row, delta, mask=rows_ok)


@triton.jit
def query_tile_grads(
    dk, dv, start_m,
    k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
    offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
    stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
    band_lo, band_hi,
    EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query tile (rows start_m + offs_m) against a program's resident keys: adds its
    dK, dV contributions and returns (dk, dv, dS^T in the input dtype, (keys, queries)),
    the last for the one-pass kernel's dQ = dS K. Shared by the dK/dV kernel's query walk
    (_dkdv_tiles) and the one-pass kernel's (attention_bwd_onepass). EDGE: every
    modifier, mask and bound. Not EDGE (interior: every row exists and sees every key
    of the block, no modifier): P^T = exp2(qk * qk_scale - lse2), one FMA, no mask and
    no bound."""
    rows = start_m + offs_m
    m64 = tl.cast(start_m, tl.int64)
    rows_ok = rows < seq_len_q  # used by the EDGE path only
    if EDGE:
        qt = tl.load(q_base + m64 * stride_qm + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=(offs_d[:, None] < E) & rows_ok[None, :], other=0.0)
        do = tl.load(do_base + m64 * stride_dm + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                     mask=rows_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    else:
        qt = tl.load(q_base + m64 * stride_qm + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=offs_d[:, None] < E, other=0.0)
        do = tl.load(do_base + m64 * stride_dm + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                     mask=offs_dv[None, :] < EV, other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    if EDGE:
        lse2 = lse_shift(tl.load(Lse + row_base + rows, mask=rows_ok, other=0.0))
        delta = tl.load(Delta + row_base + rows, mask=rows_ok, other=0.0)
        # recompute P^T for this (keys, queries) tile from the saved LSE
        st, tt = scores_base2(
            tl.dot(k, qt, input_precision=DOT_PRECISION), rows, offs_n, seq_len_q, seq_len_k,
            qk_scale, softcap_scale, softcap_log2e, mask_base, stride_mm, stride_mn, alibi_log2e,
            band_lo, band_hi, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, True)
        pt = tl.math.exp2(st - lse2[None, :])
    else:
        lse2 = tl.load(Lse + row_base + rows)  # finite: every row sees these keys
        delta = tl.load(Delta + row_base + rows)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    # dP^T = V dO^T
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    pt_dropped = pt
    if DROPOUT:
        keep = dropout_keep(seed, off_zh, rows, offs_n, L, S, dropout_p, True)
        pt_dropped = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
        dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
    # dV += (P * D)^T dO
    dv += tl.dot(to_lowp(pt_dropped, do_base.dtype.element_ty, UPCAST), do, input_precision=DOT_PRECISION)
    # dS^T = P^T * (dP^T - delta)
    dst = pt * (dpt - delta[None, :])
    if STORE_DS:  # a float mask: always the EDGE path
        ds_ptrs = DS + (off_zh * L + m64) * S + n0 + offs_m[None, :] * S + tile_n[:, None]
        tl.store(ds_ptrs, dst, mask=col_ok[:, None] & rows_ok[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tt * tt)
    # dK += dS^T Q (scale applied once at the end)
    dst_lowp = to_lowp(dst, q_base.dtype.element_ty, UPCAST)
    dk += tl.dot(dst_lowp, tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv, dst_lowp


@triton.jit
def _dkdv_tiles(
    dk, dv, start, stop,
    k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
    offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
    stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
    band_lo, band_hi,
    EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV contributions of the query tiles start, start + BLOCK_M, ... < stop of one
    query head (EDGE: see query_tile_grads)."""
    for start_m in range(start, stop, BLOCK_M):
        dk, dv, _ = query_tile_grads(
            dk, dv, start_m, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n,
            tile_n, offs_d, offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale,
            softcap_log2e, stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS,
            dropout_p, band_lo, band_hi,
            EDGE, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, DS,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    stride_lz, stride_lh,
    HKV, GROUP, L, S, E, EV,
    qk_scale, sm_scale,
    Mask, stride_mz, stride_mh, stride_mm, stride_mn,
    Alibi, stride_az, stride_ah,
    Seed, dropout_p, softcap_scale, softcap_log2e, band_lo, band_hi,
    CuSeqQ, CuSeqK,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    STORE_DS: tl.constexpr,
    INTERIOR: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (key block, batch, key/value head)
    block_n, _, off_z, off_hkv, _ = split_program_id(tl.program_id(0), tl.cdiv(S, BLOCK_N), HKV, 1)
    q_start, k_start, seq_len_q, seq_len_k, band_lo, band_hi = sequence_bounds(
        CuSeqQ, CuSeqK, off_z, L, S, band_lo, band_hi, VARLEN)
    n0 = block_n * BLOCK_N
    if n0 >= seq_len_k:
        return

    tile_n = tl.arange(0, BLOCK_N)  # keys within the tile: the only int32 key offsets
    offs_n = n0 + tile_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_len_k
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    # this program's K and V tiles stay in registers for the whole walk (int64 bases)
    K += off_z * stride_kz + off_hkv * stride_kh + (k_start + n0) * stride_kn
    V += off_z * stride_vz + off_hkv * stride_vh + (k_start + n0) * stride_vn
    k = tl.load(K + tile_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    v = tl.load(V + tile_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # only the query tiles inside the causal / window band
    lo, hi = query_range(n0, seq_len_q, band_lo, band_hi, BAND_LO, BAND_HI, BLOCK_M, BLOCK_N)
    if INTERIOR:
        # variant "interior": query tiles whose rows all exist and see all of this
        # program's keys skip masks and bounds (none when the key block is ragged)
        first_ok = 0
        if BAND_HI:  # the tile's highest j - i is n0 + BLOCK_N - 1 - start_m
            first_ok = n0 + BLOCK_N - 1 - band_hi
        last_ok = seq_len_q - BLOCK_M
        if BAND_LO:  # the tile's lowest j - i is n0 - (start_m + BLOCK_M - 1)
            last_ok = tl.minimum(last_ok, n0 - band_lo - BLOCK_M + 1)
        last_ok = tl.where(n0 + BLOCK_N <= seq_len_k, last_ok, -1)
        a, b = interior_range(lo, hi, first_ok, last_ok, BLOCK_M)
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        off_zh = off_z * HKV * GROUP + off_h
        q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
        do_base = DO + off_z * stride_dz + off_h * stride_dh + q_start * stride_dm
        row_base = off_z * stride_lz + off_h * stride_lh + q_start
        mask_base = Mask + off_z * stride_mz + off_h * stride_mh
        alibi_log2e = alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI)
        if INTERIOR:
            dk, dv = _dkdv_tiles(
                dk, dv, lo, a, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
                offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
                stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
                band_lo, band_hi,
                True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION, BLOCK_M)
            dk, dv = _dkdv_tiles(
                dk, dv, a, b, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
                offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
                stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
                band_lo, band_hi,
                False, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION, BLOCK_M)
            dk, dv = _dkdv_tiles(
                dk, dv, b, hi, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
                offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
                stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
                band_lo, band_hi,
                True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION, BLOCK_M)
        else:
            dk, dv = _dkdv_tiles(
                dk, dv, lo, hi, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
                offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
                stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS, dropout_p,
                band_lo, band_hi,
                True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION, BLOCK_M)

    dk *= sm_scale
    DK += off_z * stride_dkz + off_hkv * stride_dkh + (k_start + n0) * stride_dkn
    DV += off_z * stride_dvz + off_hkv * stride_dvh + (k_start + n0) * stride_dvn
    tl.store(DK + tile_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, to_lowp(dk, DK.dtype.element_ty, UPCAST),
             mask=col_ok[:, None] & (offs_d[None, :] < E))
    tl.store(DV + tile_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, to_lowp(dv, DV.dtype.element_ty, UPCAST),
             mask=col_ok[:, None] & (offs_dv[None, :] < EV))


@triton.jit
def _dq_tiles(
    dq, start, stop,
    q, do, K, V, Mask, lse2, delta, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S,
    qk_scale, softcap_scale, softcap_log2e, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p,
    EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ contributions of the key tiles start, start + BLOCK_N, ... < stop. EDGE: every
    modifier, mask and bound. Not EDGE (interior: every row exists and sees every key of
    the tile, no modifier): P = exp2(qk * qk_scale - lse2), one FMA, no mask, no bound."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        n64 = tl.cast(start_n, tl.int64)
        if EDGE:
            kt = tl.load(K + n64 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_d[:, None] < E) & (cols[None, :] < seq_len_k), other=0.0)
            vt = tl.load(V + n64 * stride_vn + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                         mask=(offs_dv[:, None] < EV) & (cols[None, :] < seq_len_k), other=0.0)
        else:
            kt = tl.load(K + n64 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=offs_d[:, None] < E, other=0.0)
            vt = tl.load(V + n64 * stride_vn + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                         mask=offs_dv[:, None] < EV, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        if EDGE:
            # recompute P for this tile from the saved LSE
            s, t = scores_base2(
                tl.dot(q, kt, input_precision=DOT_PRECISION), offs_m, cols, seq_len_q, seq_len_k,
                qk_scale, softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, alibi_log2e, band_lo, band_hi,
                MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, False)
            p = tl.math.exp2(s - lse2[:, None])
        else:
            p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, off_zh, offs_m, cols, L, S, dropout_p, False)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        # dS = P * (dP - delta); dQ += dS K
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # EDGE path only
            ds = ds * (1.0 - t * t)
        dq += tl.dot(to_lowp(ds, K.dtype.element_ty, UPCAST), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    stride_lz, stride_lh,
    H, GROUP, L, S, E, EV,
    qk_scale, sm_scale,
    Mask, stride_mz, stride_mh, stride_mm, stride_mn,
    Alibi, stride_az, stride_ah,
    Seed, dropout_p, softcap_scale, softcap_log2e, band_lo, band_hi,
    CuSeqQ, CuSeqK,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    INTERIOR: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (query block, batch, query head, key/value head), as in the forward
    block_m, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, GROUP)
    q_start, k_start, seq_len_q, seq_len_k, band_lo, band_hi = sequence_bounds(
        CuSeqQ, CuSeqK, off_z, L, S, band_lo, band_hi, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= seq_len_q:
        return

    tile_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < seq_len_q
    Q += off_z * stride_qz + off_h * stride_qh + (q_start + m0) * stride_qm
    DO += off_z * stride_dz + off_h * stride_dh + (q_start + m0) * stride_dm
    K += off_z * stride_kz + off_hkv * stride_kh + k_start * stride_kn
    V += off_z * stride_vz + off_hkv * stride_vh + k_start * stride_vn
    Mask += off_z * stride_mz + off_h * stride_mh
    alibi_log2e = alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    q = tl.load(Q + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=rows_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    do = tl.load(DO + tile_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 mask=rows_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = off_z * stride_lz + off_h * stride_lh + q_start + offs_m
    lse2 = lse_shift(tl.load(Lse + row, mask=rows_ok, other=0.0))
    delta = tl.load(Delta + row, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = key_range(m0, seq_len_k, band_lo, band_hi, BAND_LO, BAND_HI, BLOCK_M, BLOCK_N)
    if INTERIOR:
        # variant "interior": key tiles that every row of this block sees skip masks and
        # bounds (none when the query block is ragged)
        first_ok = 0
        if BAND_LO:  # the tile's lowest j - i is start_n - (m0 + BLOCK_M - 1)
            first_ok = m0 + BLOCK_M - 1 + band_lo
        last_ok = seq_len_k - BLOCK_N
        if BAND_HI:  # the tile's highest j - i is start_n + BLOCK_N - 1 - m0
            last_ok = tl.minimum(last_ok, m0 + band_hi - BLOCK_N + 1)
        last_ok = tl.where(m0 + BLOCK_M <= seq_len_q, last_ok, -1)
        a, b = interior_range(lo, hi, first_ok, last_ok, BLOCK_N)
        dq = _dq_tiles(
            dq, lo, a, q, do, K, V, Mask, lse2, delta, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S,
            qk_scale, softcap_scale, softcap_log2e, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)
        dq = _dq_tiles(
            dq, a, b, q, do, K, V, Mask, lse2, delta, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S,
            qk_scale, softcap_scale, softcap_log2e, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p,
            False, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)
        dq = _dq_tiles(
            dq, b, hi, q, do, K, V, Mask, lse2, delta, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S,
            qk_scale, softcap_scale, softcap_log2e, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)
    else:
        dq = _dq_tiles(
            dq, lo, hi, q, do, K, V, Mask, lse2, delta, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S,
            qk_scale, softcap_scale, softcap_log2e, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)

    dq *= sm_scale
    DQ += off_z * stride_dqz + off_h * stride_dqh + (q_start + m0) * stride_dqm
    tl.store(DQ + tile_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, to_lowp(dq, DQ.dtype.element_ty, UPCAST),
             mask=rows_ok[:, None] & (offs_d[None, :] < E))


def attention_bwd(do, q, k, v, out, lse, dlse, dq, dk, dv, ds, shape, mods, deterministic=False):
    """Launch the three backward kernels on (Z, H, N, D)-strided views (or, under variant
    "onepass" and not `deterministic`, the preprocess and attention_bwd_onepass.py's kernel).

    do, out (Z, Hq, *, Ev); q (Z, Hq, *, E); k (Z, Hkv, *, E); v (Z, Hkv, *, Ev); lse
    (base 2, from the forward) and dlse (or None; the gradient of the natural-log lse
    users see) laid out as shape.lse_strides; dq, dk, dv allocated by the
    caller (`launch.py`) and written here (dk/dv summed over each GQA group); ds, a
    float32 (Z, Hq, L, S) buffer or None, receives dS (the gradient of a float mask).
    """
    common = dict(
        UPCAST=upcast(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=head_block(shape.E),
        BLOCK_DV=head_block(shape.Ev),
    )
    sizes = (shape.L, shape.S, shape.E, shape.Ev)
    varlen_args = mods.args[-2:]  # cu_seqlens_q, cu_seqlens_k

    delta = torch.empty_like(lse)
    pre = forward_blocks(max(shape.E, shape.Ev), q.dtype)
    _bwd_preprocess_kernel[(triton.cdiv(shape.L, pre.BLOCK_M) * shape.Z * shape.H,)](
        out, do, dlse if dlse is not None else lse, delta,
        *out.stride(), *do.stride(), *shape.lse_strides,
        shape.H, shape.L, shape.S, shape.Ev,
        *varlen_args,
        HAS_DLSE=dlse is not None,
        VARLEN=mods.constexprs["VARLEN"],
        BLOCK_M=pre.BLOCK_M,
        BLOCK_DV=common["BLOCK_DV"],
        **FP_FUSION,
    )

    dim = max(shape.E, shape.Ev)
    key_dkdv = tuning.Key.of("dkdv", q.dtype, dim, mods.banded, mods.masked)
    key_dq = tuning.Key.of("dq", q.dtype, dim, mods.banded, mods.masked)
    if variants.onepass(key_dkdv, q.device, deterministic):
        from . import attention_bwd_onepass  # imported here: it takes query_tile_grads from this module

        # its own tiles (the dK/dV first guess unless the variant names some): the table's
        # dkdv entry and the search are for the 3-kernel dK/dV kernel
        blocks = variants.tiles(variants.Choice("onepass", ""), key_dkdv) or tuning.default(key_dkdv)
        tuning.run(key_dkdv, q.device, lambda b: attention_bwd_onepass.attention_bwd_onepass(
            do, q, k, v, lse, delta, dq, dk, dv, ds, shape, mods, b, common), blocks)
        return
    interior_dkdv, blocks_dkdv = variants.plan(key_dkdv, q.device, mods.constexprs)
    interior_dq, blocks_dq = variants.plan(key_dq, q.device, mods.constexprs)

    def launch_dkdv(blocks):
        _bwd_dkdv_kernel[(triton.cdiv(shape.S, blocks.BLOCK_N) * shape.Z * shape.Hkv,)](
            q, k, v, do, dk, dv, lse, delta, ds if ds is not None else lse,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *shape.lse_strides,
            shape.Hkv, shape.group, *sizes,
            mods.qk_scale, mods.scale,
            *mods.args,
            STORE_DS=ds is not None,
            INTERIOR=interior_dkdv,
            BLOCK_M=blocks.BLOCK_M,
            BLOCK_N=blocks.BLOCK_N,
            num_warps=blocks.num_warps,
            **FP_FUSION,
            num_stages=blocks.num_stages,
            **mods.constexprs,
            **common,
        )
        return dk, dv, ds

    def launch_dq(blocks):
        _bwd_dq_kernel[(triton.cdiv(shape.L, blocks.BLOCK_M) * shape.Z * shape.H,)](
            q, k, v, do, dq, lse, delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *shape.lse_strides,
            shape.H, shape.group, *sizes,
            mods.qk_scale, mods.scale,
            *mods.args,
            INTERIOR=interior_dq,
            BLOCK_M=blocks.BLOCK_M,
            BLOCK_N=blocks.BLOCK_N,
            num_warps=blocks.num_warps,
            **FP_FUSION,
            num_stages=blocks.num_stages,
            **mods.constexprs,
            **common,
        )
        return (dq,)

    tuning.run(key_dkdv, q.device, launch_dkdv, blocks_dkdv)
    tuning.run(key_dq, q.device, launch_dq, blocks_dq)
