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

Variants (variants.py decides per launch): INTERIOR splits the key loop into edge
tiles [lo, a), interior tiles [a, b) and edge tiles [b, hi) (tiling.interior_range);
interior tiles (every key exists and every row may see it, no mask / ALiBi / softcap)
skip masks and bounds, and their scores cost one FMA, qk * qk_scale - m. TMA (variants
"tma", "ws") reads Q, K, V and writes O through host-side tensor descriptors of the
(Z, H, N, D) tensors, one (1, 1, rows, D) box per tile, so the hardware zero-fills rows
past the (batch, head)'s own length and clips the store there (never with VARLEN, where a
sequence's bounds are not the tensor's). WS (variant "ws") warp-specialises the key loop.

Limits: head dims 1..256 (tiles padded to a power of two >= 16 and masked), any
strides (stride 0 included), fp16 / bf16 / fp32. A row whose keys are all masked
gets O = 0 and lse = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .launch_config import FP_FUSION, dot_precision, head_block, upcast
from . import variants
from .tiling import (alibi_slope_log2, dropout_keep, interior_range, key_range, scores_base2, sequence_bounds,
                     split_program_id, to_lowp)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, start, stop,
    Q, K, V, q, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S, qk_scale,
    softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
    alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p, DescK, DescV, desc_z, desc_hkv,
    EDGE: tl.constexpr, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, HAS_V: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr,
):
    """Online softmax over the key tiles start, start + BLOCK_N, ... < stop.
    EDGE: every modifier, mask and bound (tiling.scores_base2). Not EDGE (interior
    tiles: every key exists and is visible to every row, no modifier): no mask,
    no bound, and the scale is one FMA, s2 - m = qk * qk_scale - m.
    TMA: K and V tiles come through the (Z, Hkv, S, D) descriptors DescK / DescV at
    (desc_z, desc_hkv), which zero-fill keys >= S and columns >= E, Ev (K, V unused).
    WS: the loop is warp-specialised (producer warps load, consumer warps compute)."""
    for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        K_tile = K + tl.cast(start_n, tl.int64) * stride_kn
        V_tile = V + tl.cast(start_n, tl.int64) * stride_vn
        if TMA:
            kt = tl.trans(DescK.load([desc_z, desc_hkv, start_n, 0]).reshape(BLOCK_N, offs_d.shape[0]))
        elif EDGE:
            kt = tl.load(K_tile + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_d[:, None] < E) & (cols[None, :] < seq_len_k), other=0.0)
        else:
            kt = tl.load(K_tile + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=offs_d[:, None] < E, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if EDGE:
            # base-2 scores with every modifier; -inf where masked
            s, _ = scores_base2(
                qk, offs_m, cols, seq_len_q, seq_len_k,
                qk_scale, softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, alibi_log2e, band_lo, band_hi,
                MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, False)
            # new running max; a row that has seen no allowed key yet shifts by 0, not -inf
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - shift[:, None])
        else:
            # qk_scale >= 0 here (the caller folded its sign into q): max(s2) = max(qk) * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            shift = m_new  # finite: every row sees this tile's keys
            p = tl.math.exp2(qk * qk_scale - shift[:, None])
        # rescale the old denominator (and accumulator) to the new max
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            if TMA:
                v = DescV.load([desc_z, desc_hkv, start_n, 0]).reshape(BLOCK_N, offs_dv.shape[0])
            elif EDGE:
                v = tl.load(V_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=(cols[:, None] < seq_len_k) & (offs_dv[None, :] < EV), other=0.0)
            else:
                v = tl.load(V_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                            mask=offs_dv[None, :] < EV, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if DROPOUT:
                # dropped weights are zeroed; 1 / (1 - p) is applied once in the epilogue
                p = tl.where(dropout_keep(seed, off_zh, offs_m, cols, L, S, dropout_p, False), p, 0.0)
            # P is rounded to the input dtype for the tensor-core PV product, as in FlashAttention
            acc = acc * alpha[:, None] + tl.dot(to_lowp(p, V.dtype.element_ty, UPCAST), v,
                                                input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


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
    DescQ, DescK, DescV, DescO,  # tensor descriptors of q, k, v, out when TMA (else unused)
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_V: tl.constexpr,
    INTERIOR: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
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

    # descriptor coordinates are int32 (TMA's); only used for padded batches (no VARLEN)
    desc_z, desc_h, desc_hkv = off_z.to(tl.int32), off_h.to(tl.int32), off_hkv.to(tl.int32)
    if TMA:
        q = DescQ.load([desc_z, desc_h, m0, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(Q + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # only the key tiles inside the causal / window band
    lo, hi = key_range(m0, seq_len_k, band_lo, band_hi, BAND_LO, BAND_HI, BLOCK_M, BLOCK_N)
    if INTERIOR:
        # variant "interior": tiles with every key visible to every row skip masks and bounds
        first_ok = 0
        if BAND_LO:  # the tile's lowest j - i is start_n - (m0 + BLOCK_M - 1)
            first_ok = m0 + BLOCK_M - 1 + band_lo
        last_ok = seq_len_k - BLOCK_N  # no ragged last tile
        if BAND_HI:  # the tile's highest j - i is start_n + BLOCK_N - 1 - m0
            last_ok = tl.minimum(last_ok, m0 + band_hi - BLOCK_N + 1)
        a, b = interior_range(lo, hi, first_ok, last_ok, BLOCK_N)
        # the interior's max is max(qk) * scale: fold a negative scale into q (exact)
        flip = qk_scale < 0
        q = tl.where(flip, -q, q)
        qk_scale = tl.where(flip, -qk_scale, qk_scale)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, lo, a,
            Q, K, V, q, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S, qk_scale,
            softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p, DescK, DescV, desc_z, desc_hkv,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, HAS_V, UPCAST, DOT_PRECISION, BLOCK_N,
            TMA, False)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, a, b,
            Q, K, V, q, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S, qk_scale,
            softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p, DescK, DescV, desc_z, desc_hkv,
            False, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, HAS_V, UPCAST, DOT_PRECISION, BLOCK_N,
            TMA, False)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, b, hi,
            Q, K, V, q, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S, qk_scale,
            softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p, DescK, DescV, desc_z, desc_hkv,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, HAS_V, UPCAST, DOT_PRECISION, BLOCK_N,
            TMA, False)
    else:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, lo, hi,
            Q, K, V, q, offs_m, offs_n, offs_d, offs_dv, seq_len_q, seq_len_k, E, EV, L, S, qk_scale,
            softcap_scale, softcap_log2e, Mask, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
            alibi_log2e, band_lo, band_hi, seed, off_zh, dropout_p, DescK, DescV, desc_z, desc_hkv,
            True, MASK_KIND, HAS_ALIBI, SOFTCAP, BAND_LO, BAND_HI, DROPOUT, HAS_V, UPCAST, DOT_PRECISION, BLOCK_N,
            TMA, WS)

    # epilogue: base-2 lse (exact: m_i when one key is visible); rows with no allowed
    # key get O = 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = m_i + tl.math.log2(l_safe)
    tl.store(Lse + off_z * stride_lz + off_h * stride_lh + q_start + offs_m, lse2, mask=row_ok)
    if HAS_V:
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out / (1.0 - dropout_p)
        if TMA:  # the descriptor clips rows >= L and columns >= Ev
            DescO.store([desc_z, desc_h, m0, 0],
                        to_lowp(out, Out.dtype.element_ty, UPCAST).reshape(1, 1, BLOCK_M, BLOCK_DV))
        else:
            Out += off_z * stride_oz + off_h * stride_oh + (q_start + m0) * stride_om
            tl.store(Out + tile_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                     to_lowp(out, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_dv[None, :] < EV))


def attention_fwd(q, k, v, lse, out, shape, mods):
    """Launch on (Z, H, N, D) views (see launch.py): q (Z, Hq, *, E), k (Z, Hkv, *, E),
    v (Z, Hkv, *, Ev) or None, out like q with Ev (or None), lse float32 laid out as
    shape.lse_strides, written in base 2. `mods` carries the score modifiers' kernel arguments."""
    v_arg = v if v is not None else k  # without V the kernel never reads V / Out
    o_arg = out if out is not None else q

    key = tuning.Key.of("fwd", q.dtype, max(shape.E, shape.Ev), mods.banded, mods.masked)
    interior, variant_blocks, tma, ws = variants.forward_plan(key, q.device, mods.constexprs,
                                                              dict(q=q, k=k, v=v, out=out))

    def launch(blocks):
        grid = (triton.cdiv(shape.L, blocks.BLOCK_M) * shape.Z * shape.H,)
        d, dv = head_block(shape.E), head_block(shape.Ev)
        if tma:  # one (1, 1, rows, D) box per tile of a (Z, H, N, D) tensor: bounds per (batch, head)
            descs = (TensorDescriptor.from_tensor(q, [1, 1, blocks.BLOCK_M, d]),
                     TensorDescriptor.from_tensor(k, [1, 1, blocks.BLOCK_N, d]),
                     TensorDescriptor.from_tensor(v_arg, [1, 1, blocks.BLOCK_N, dv]),
                     TensorDescriptor.from_tensor(o_arg, [1, 1, blocks.BLOCK_M, dv]))
        else:
            descs = (q, k, v_arg, o_arg)
        _attn_fwd_kernel[grid](
            q, k, v_arg, o_arg, lse,
            *q.stride(), *k.stride(), *v_arg.stride(), *o_arg.stride(), *shape.lse_strides,
            shape.H, shape.group, shape.L, shape.S, shape.E, shape.Ev,
            mods.qk_scale,
            *mods.args,
            *descs,
            HAS_V=v is not None,
            INTERIOR=interior,
            TMA=tma,
            WS=ws,
            UPCAST=upcast(q.dtype),
            DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=blocks.BLOCK_M,
            BLOCK_N=blocks.BLOCK_N,
            BLOCK_D=d,
            BLOCK_DV=dv,
            num_warps=blocks.num_warps,
            **FP_FUSION,
            num_stages=blocks.num_stages,
            **mods.constexprs,
        )
        return out, lse

    tuning.run(key, q.device, launch, variant_blocks)
