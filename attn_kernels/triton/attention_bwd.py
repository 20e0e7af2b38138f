"""Fused attention backward (FlashAttention-2) in Triton.

Math, in the notation of reference.py (P = softmax(scores), scores = scale * Q K^T):
    dV    = P^T dO
    dP    = dO V^T
    delta = rowsum(dO * O) - dlse           (dlse: gradient reaching the returned lse)
    dS    = P * (dP - delta)
    dQ    = scale * dS K,   dK = scale * dS^T Q

Algorithm: P is never stored. It is recomputed tile by tile from Q, K and the
forward's LSE as exp2(scale * log2(e) * q.k - lse * log2(e)). Three kernels:
  1. preprocess: delta per query row (BLOCK_M rows per program);
  2. dK/dV: one program per (BLOCK_N keys, batch, key/value head), which walks the
     query tiles of every query head of its GQA group, so dK/dV of a shared head
     are summed in registers: no atomics, deterministic;
  3. dQ: one program per (BLOCK_M queries, batch, query head), walking key tiles.
Causal programs skip the tiles that lie wholly above the diagonal.

Limits: as the forward (head dims 1..256, any strides, fp16 / bf16 / fp32).
Rows with lse = -inf (no allowed key) get zero gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import LOG2E, dot_precision, forward_blocks, head_block, key_major_blocks, upcast
from .tiling import lse_base2, split_program_id


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, DLse, Delta,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_dz, stride_dh, stride_dm, stride_dd,
    H, L, EV,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    start_m, off_zh, off_z, off_h, _ = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, 1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < EV)
    o = tl.load(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + off_z * stride_dz + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_zh.to(tl.int64) * L + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < L, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < L)


@triton.jit
def _load_row_stats(Lse, Delta, row, rows_ok):
    """Base-2 lse and delta of some query rows."""
    lse2 = lse_base2(tl.load(Lse + row, mask=rows_ok, other=0.0))
    delta = tl.load(Delta + row, mask=rows_ok, other=0.0)
    return lse2, delta


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    HKV, GROUP, L, S, E, EV,
    qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (key block, batch, key/value head)
    block_n, _, off_z, off_hkv, _ = split_program_id(tl.program_id(0), tl.cdiv(S, BLOCK_N), HKV, 1)
    start_n = block_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S

    # this program's K and V tiles stay in registers for the whole walk
    k = tl.load(K + off_z * stride_kz + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    v = tl.load(V + off_z * stride_vz + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # causal: query rows above start_n see none of these keys
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        qt_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd
        do_ptrs = DO + off_z * stride_dz + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd
        row0 = (off_z * HKV * GROUP + off_h) * L
        for start_m in range(lo, L, BLOCK_M):
            rows = start_m + offs_m
            rows_ok = rows < L
            qt = tl.load(qt_ptrs + start_m * stride_qm, mask=(offs_d[:, None] < E) & rows_ok[None, :], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dm, mask=rows_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse2, delta = _load_row_stats(Lse, Delta, row0 + rows, rows_ok)
            # recompute P^T for this tile from the saved LSE
            pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
            keep = col_ok[:, None] & rows_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (rows[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
            # dV += P^T dO
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            # dS^T = P^T * (dP^T - delta), dP^T = V dO^T
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            # dK += dS^T Q (scale applied once at the end)
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk *= sm_scale
    dk_ptrs = DK + off_z * stride_dkz + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < E))
    dv_ptrs = DV + off_z * stride_dvz + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < EV))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, L, S, E, EV,
    qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (query block, batch, query head, key/value head), as in the forward
    start_m, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, GROUP)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < L

    q = tl.load(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=rows_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    do = tl.load(DO + off_z * stride_dz + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 mask=rows_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2, delta = _load_row_stats(Lse, Delta, off_zh.to(tl.int64) * L + offs_m, rows_ok)
    kt_ptrs = K + off_z * stride_kz + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vt_ptrs = V + off_z * stride_vz + off_hkv * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # causal: key tiles right of this block's last row are fully masked, skip them
    if IS_CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=(offs_d[:, None] < E) & (cols[None, :] < S), other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=(offs_dv[:, None] < EV) & (cols[None, :] < S), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # recompute P for this tile from the saved LSE
        p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        keep = rows_ok[:, None] & (cols[None, :] < S)
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, p, 0.0)
        # dS = P * (dO V^T - delta); dQ += dS K
        ds = p * (tl.dot(do, vt, input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq *= sm_scale
    dq_ptrs = DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None] & (offs_d[None, :] < E))


def attention_bwd(do, q, k, v, out, lse, dlse, is_causal: bool, scale: float):
    """Gradients of `attention_fwd`.

    do, out (Z, Hq, L, Ev); q (Z, Hq, L, E); k (Z, Hkv, S, E); v (Z, Hkv, S, Ev);
    lse (Z, Hq, L) float32 from the forward; dlse (Z, Hq, L) or None.
    Returns dq, dk, dv shaped and typed like q, k, v (dk/dv summed over each GQA group).
    """
    Z, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    dq = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.zeros(v.shape, device=v.device, dtype=v.dtype)
    if Z * H == 0 or L == 0 or S == 0:
        return dq, dk, dv
    common = dict(
        UPCAST=upcast(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=head_block(E),
        BLOCK_DV=head_block(Ev),
    )
    qk_scale = scale * LOG2E

    delta = torch.empty((Z, H, L), device=q.device, dtype=torch.float32)
    pre = forward_blocks(max(E, Ev), q.dtype)
    _bwd_preprocess_kernel[(triton.cdiv(L, pre.BLOCK_M) * Z * H,)](
        out, do, dlse if dlse is not None else lse, delta,
        *out.stride(), *do.stride(),
        H, L, Ev,
        HAS_DLSE=dlse is not None,
        BLOCK_M=pre.BLOCK_M,
        BLOCK_DV=common["BLOCK_DV"],
    )

    kv = key_major_blocks(max(E, Ev), q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(S, kv.BLOCK_N) * Z * Hkv,)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        Hkv, H // Hkv, L, S, E, Ev,
        qk_scale, scale,
        IS_CAUSAL=is_causal,
        BLOCK_M=kv.BLOCK_M,
        BLOCK_N=kv.BLOCK_N,
        num_warps=kv.num_warps,
        num_stages=kv.num_stages,
        **common,
    )

    qm = forward_blocks(max(E, Ev), q.dtype)
    _bwd_dq_kernel[(triton.cdiv(L, qm.BLOCK_M) * Z * H,)](
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // Hkv, L, S, E, Ev,
        qk_scale, scale,
        IS_CAUSAL=is_causal,
        BLOCK_M=qm.BLOCK_M,
        BLOCK_N=qm.BLOCK_N,
        num_warps=qm.num_warps,
        num_stages=qm.num_stages,
        **common,
    )
    return dq, dk, dv
