"""Variant "onepass" of the fused attention backward (variants.py): one kernel, with dQ
accumulated by fp32 atomic adds (FlashAttention-2/3's backward).

Math as attention_bwd.py. The 3-kernel path recomputes P twice (once for dK/dV, once
for dQ): 7 matmuls per tile. Here one program per (BLOCK_N keys, batch, key/value
head) walks the query tiles of every query head of its GQA group, as the dK/dV kernel
does, and per tile computes
    P^T  = exp2(s2^T - lse2)          (1 matmul: K Q^T, every modifier of scores_base2)
    dP^T = V dO^T                     (2)
    dV  += (P * D)^T dO               (3)
    dS^T = P^T * (dP^T - delta)       (written out for a float mask's gradient)
    dK  += dS^T Q                     (4)
    dQ  += dS K                       (5)  atomic add into an fp32 (Z, Hq, L, E) buffer
5 matmuls instead of 7. Programs of different key blocks add into the same dQ rows,
in whatever order they run: the sum is not bit-reproducible, so deterministic=True
keeps the 3-kernel path (variants.onepass). The host scales the buffer by the softmax
scale and casts it to dQ's dtype. Delta comes from attention_bwd's preprocess kernel.
No interior / edge split: every tile takes the edge path (every modifier, mask and bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_bwd import query_tile_grads
from .launch_config import FP_FUSION
from .tiling import alibi_slope_log2, query_range, sequence_bounds, split_program_id, to_lowp


@triton.jit
def _onepass_tiles(
    dk, dv, start, stop,
    k, v, q_base, do_base, dq_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n, tile_n, offs_d,
    offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale, softcap_log2e,
    stride_qm, stride_qd, stride_dm, stride_dd, stride_dqm, stride_dqd, stride_mm, stride_mn, Lse, Delta, DS,
    dropout_p, band_lo, band_hi,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV (returned) and dQ (atomically added) contributions of the query tiles
    start, start + BLOCK_M, ... < stop of one query head, against this program's keys."""
    for start_m in range(start, stop, BLOCK_M):
        # P^T, dP^T, dV, dS^T (and a float mask's dS) and dK exactly as the dK/dV kernel's edge tiles
        dk, dv, dst_lowp = query_tile_grads(
            dk, dv, start_m, k, v, q_base, do_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m, offs_n,
            tile_n, offs_d, offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale,
            softcap_log2e, stride_qm, stride_qd, stride_dm, stride_dd, stride_mm, stride_mn, Lse, Delta, DS,
            dropout_p, band_lo, band_hi,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION)
        # dQ += dS K, summed over key blocks by atomics (scale applied on the host)
        rows_ok = start_m + offs_m < seq_len_q
        dq = tl.dot(tl.trans(dst_lowp), k, input_precision=DOT_PRECISION)
        tl.atomic_add(dq_base + tl.cast(start_m, tl.int64) * stride_dqm + offs_m[:, None] * stride_dqm
                      + offs_d[None, :] * stride_dqd, dq, mask=rows_ok[:, None] & (offs_d[None, :] < E), sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_onepass_kernel(
    Q, K, V, DO, DQ, DK, DV, Lse, Delta, DS,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
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

    tile_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + tile_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_len_k
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

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

    lo, hi = query_range(n0, seq_len_q, band_lo, band_hi, BAND_LO, BAND_HI, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        off_zh = off_z * HKV * GROUP + off_h
        q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
        do_base = DO + off_z * stride_dz + off_h * stride_dh + q_start * stride_dm
        dq_base = DQ + off_z * stride_dqz + off_h * stride_dqh + q_start * stride_dqm
        row_base = off_z * stride_lz + off_h * stride_lh + q_start
        mask_base = Mask + off_z * stride_mz + off_h * stride_mh
        alibi_log2e = alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI)
        dk, dv = _onepass_tiles(
            dk, dv, lo, hi, k, v, q_base, do_base, dq_base, row_base, mask_base, alibi_log2e, off_zh, seed, offs_m,
            offs_n, tile_n, offs_d, offs_dv, col_ok, n0, seq_len_q, seq_len_k, E, EV, L, S, qk_scale, softcap_scale,
            softcap_log2e, stride_qm, stride_qd, stride_dm, stride_dd, stride_dqm, stride_dqd, stride_mm, stride_mn,
            Lse, Delta, DS, dropout_p, band_lo, band_hi,
            MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, STORE_DS, UPCAST, DOT_PRECISION, BLOCK_M)

    dk *= sm_scale
    DK += off_z * stride_dkz + off_hkv * stride_dkh + (k_start + n0) * stride_dkn
    DV += off_z * stride_dvz + off_hkv * stride_dvh + (k_start + n0) * stride_dvn
    tl.store(DK + tile_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, to_lowp(dk, DK.dtype.element_ty, UPCAST),
             mask=col_ok[:, None] & (offs_d[None, :] < E))
    tl.store(DV + tile_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, to_lowp(dv, DV.dtype.element_ty, UPCAST),
             mask=col_ok[:, None] & (offs_dv[None, :] < EV))


def _distinct(t: torch.Tensor) -> torch.Tensor:
    """The elements of a (Z, H, N, D) kernel view once: a packed view repeats one
    (1, H, total, D) tensor along Z with stride 0."""
    return t[:1] if t.shape[0] > 1 and t.stride(0) == 0 else t


def attention_bwd_onepass(do, q, k, v, lse, delta, dq, dk, dv, ds, shape, mods, blocks, common):
    """Launch the one-pass kernel with `blocks` (tuning.Blocks, BLOCK_N keys resident).

    Layouts as attention_bwd.attention_bwd: do (Z, Hq, *, Ev), q (Z, Hq, *, E), k (Z, Hkv,
    *, E), v (Z, Hkv, *, Ev) kernel views; lse (base 2) and delta laid out as
    shape.lse_strides; dq, dk, dv written here (dq through an fp32 (Z, Hq, *, E) buffer
    summed by atomics, then scaled and cast); ds float32 (Z, Hq, L, S) or None.
    -> (dq, dk, dv, ds), for tuning.run."""
    target = _distinct(dq)
    acc = torch.zeros(target.shape, device=dq.device, dtype=torch.float32).expand(dq.shape)
    _bwd_onepass_kernel[(triton.cdiv(shape.S, blocks.BLOCK_N) * shape.Z * shape.Hkv,)](
        q, k, v, do, acc, dk, dv, lse, delta, ds if ds is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *acc.stride(), *dk.stride(), *dv.stride(),
        *shape.lse_strides,
        shape.Hkv, shape.group, shape.L, shape.S, shape.E, shape.Ev,
        mods.qk_scale, mods.scale,
        *mods.args,
        STORE_DS=ds is not None,
        BLOCK_M=blocks.BLOCK_M,
        BLOCK_N=blocks.BLOCK_N,
        num_warps=blocks.num_warps,
        **FP_FUSION,
        num_stages=blocks.num_stages,
        **mods.constexprs,
        **common,
    )
    target.copy_(_distinct(acc) * mods.scale)  # rounds to dq's dtype as the GPU's cast does
    return dq, dk, dv, ds
