"""Fused attention forward (FlashAttention-2) in Triton.

Math, in the notation of reference.py, for each batch z and query head h:
    scores = scale * Q K^T  (causal: key j > query i is masked)
    lse    = logsumexp(scores, -1)          float32, natural log
    O      = softmax(scores) V

Algorithm: one program per (BLOCK_M query rows, z, h). It streams K and V in
BLOCK_N-row tiles and keeps, per query row, the running max m, the running
denominator l and an unnormalised accumulator, rescaling both when the max grows
(online softmax). Scores are kept in base 2 (log2(e) is folded into the scale) so
each exponential is one exp2. Causal programs stop at their diagonal block, so the
tiles above it are never loaded. GQA: query head h reads key/value head
h // GROUP, so K and V are never copied. With HAS_V=False only the LSE is
computed (what `attention_weights` needs).

Limits: head dims 1..256 (tiles padded to a power of two >= 16 and masked), any
strides (stride 0 included), fp16 / bf16 / fp32. A row whose keys are all masked
gets O = 0 and lse = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import LOG2E, dot_precision, forward_blocks, head_block, upcast
from .tiling import split_program_id

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    H, GROUP, L, S, E, EV,
    qk_scale,
    IS_CAUSAL: tl.constexpr,
    HAS_V: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # program -> (query block, batch, head, key/value head)
    start_m, off_zh, off_z, off_h, off_hkv = split_program_id(tl.program_id(0), tl.cdiv(L, BLOCK_M), H, GROUP)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L

    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kt_ptrs = K + off_z * stride_kz + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + off_z * stride_vz + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # causal: key tiles right of this block's last row are fully masked, skip them
    if IS_CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    else:
        hi = S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=(offs_d[:, None] < E) & (cols[None, :] < S), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        # scores in base 2: (q . k) * scale * log2(e)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        keep = cols[None, :] < S
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        # new running max; a row that has seen no allowed key yet shifts by 0, not -inf
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - shift[:, None])
        # rescale the old denominator (and accumulator) to the new max
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(cols[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            # P is rounded to the input dtype for the tensor-core PV product, as in FlashAttention
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # epilogue: lse back to natural log; rows with no allowed key get O = 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    tl.store(Lse + off_zh.to(tl.int64) * L + offs_m, lse, mask=row_ok)
    if HAS_V:
        out = acc / l_safe[:, None]
        o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < EV))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v, is_causal: bool, scale: float):
    """q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev) or None.

    Returns (out (Z, Hq, L, Ev) in q.dtype, or None when v is None; lse (Z, Hq, L) float32).
    """
    Z, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Ev = v.shape[-1] if v is not None else E
    lse = torch.empty((Z, H, L), device=q.device, dtype=torch.float32)
    out = torch.empty((Z, H, L, Ev), device=q.device, dtype=q.dtype) if v is not None else None
    if lse.numel() == 0:
        return out, lse
    blocks = forward_blocks(max(E, Ev), q.dtype)
    # without V the kernel never touches V / Out: pass placeholders of the right kind
    v_arg = v if v is not None else k
    o_arg = out if out is not None else q
    grid = (triton.cdiv(L, blocks.BLOCK_M) * Z * H,)
    _attn_fwd_kernel[grid](
        q, k, v_arg, o_arg, lse,
        *q.stride(), *k.stride(), *v_arg.stride(), *o_arg.stride(),
        H, H // Hkv, L, S, E, Ev,
        scale * LOG2E,
        IS_CAUSAL=is_causal,
        HAS_V=v is not None,
        UPCAST=upcast(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=blocks.BLOCK_M,
        BLOCK_N=blocks.BLOCK_N,
        BLOCK_D=head_block(E),
        BLOCK_DV=head_block(Ev),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return out, lse
