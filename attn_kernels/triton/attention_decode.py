"""Decoding attention over a KV cache with split-KV (flash-decoding), Triton.

Math, in the notation of reference.py, for batch b with S_b = seqlens[b] cached keys
(the new keys already appended), query position i in 0..Lq-1 and head h (key/value head h // GROUP):
    s[i, j] = scale * q_i . k_j, then softcap, ALiBi (-slope_h * |i + S_b - Lq - j|),
              causal (j <= i + S_b - Lq, bottom-right) and the sliding window
    O[i]    = softmax(s[i, :S_b]) V,  lse[i] = logsumexp(s[i, :S_b])

Algorithm: decoding has few query rows, so one program takes the rows of all GROUP
query heads that share a key/value head (rows r = (g, i), g = r // Lq) and reads
each K/V tile once for all of them. The key range of each (b, key/value head) is cut
into NUM_SPLITS chunks processed by separate programs (enough programs to fill the
GPU at batch 1), each writing a normalised partial output and its LSE; the combine
kernel merges them: lse = logsumexp_s(lse_s), O = sum_s exp(lse_s - lse) O_s. The
partial LSEs stay in base 2 (no change of base before the merge); only the merged
lse is converted to natural log for the caller.
Paged caches: key position j lives in block block_table[b, j // BLOCK_SIZE] at row
j % BLOCK_SIZE, looked up per column, so any block size works with any BLOCK_N.

Limits: forward only; head dims 1..256; fp16 / bf16 / fp32. A row with no allowed
key (an empty cache, or a window past every key) gets O = 0 and lse = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import FP_FUSION, LOG2E, dot_precision, head_block, upcast
from .tiling import tanh, to_lowp

LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _decode_split_kernel(
    Q, KCache, VCache, BlockTable, SeqLens, Alibi, OPart, LsePart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_ab, stride_ah,
    HKV, GROUP, LQ, E, EV, NUM_SPLITS, SPLIT_LEN,
    qk_scale, softcap_scale, softcap_log2e, win_left, win_right,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # program -> (split, row block, batch, key/value head); the splits of one head are adjacent
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    num_m = tl.cdiv(GROUP * LQ, BLOCK_M)
    block_m = pid // NUM_SPLITS % num_m
    off_bh = pid // (NUM_SPLITS * num_m)
    off_b = (off_bh // HKV).to(tl.int64)
    off_hkv = (off_bh % HKV).to(tl.int64)
    seq_len = tl.load(SeqLens + off_b)  # keys in the cache, the new ones included

    # rows are (query head in the group, query position) pairs
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < GROUP * LQ
    pos = rows % LQ
    head = off_hkv * GROUP + rows // LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = off_b * stride_qb + pos[:, None].to(tl.int64) * stride_qm + head[:, None] * stride_qh
    q = tl.load(Q + q_rows + offs_d[None, :] * stride_qd,
                mask=rows_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + head * stride_ah, mask=rows_ok, other=0.0).to(tl.float32) * _LOG2E

    # this split's keys, clipped to what the band lets any of these rows see
    diag = seq_len - LQ  # bottom-right alignment: query i sits at key position i + diag
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, seq_len)
    if IS_CAUSAL:
        hi = tl.minimum(hi, LQ + diag)
    elif WINDOW_RIGHT:
        hi = tl.minimum(hi, LQ + diag + win_right)
    if WINDOW_LEFT:
        lo = tl.maximum(lo, (diag - win_left) // BLOCK_N * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < hi
        # cache rows of these key positions (a block-table lookup when paged)
        if PAGED:
            block = tl.load(BlockTable + off_b * stride_tb + cols // BLOCK_SIZE, mask=cols_ok, other=0).to(tl.int64)
            k_rows = block * stride_kb + (cols % BLOCK_SIZE) * stride_kn
            v_rows = block * stride_vb + (cols % BLOCK_SIZE) * stride_vn
        else:  # int64 base per tile: S_max x Hkv x D can pass 2^31
            k_rows = off_b * stride_kb + tl.cast(start_n, tl.int64) * stride_kn + offs_n * stride_kn
            v_rows = off_b * stride_vb + tl.cast(start_n, tl.int64) * stride_vn + offs_n * stride_vn
        kt = tl.load(KCache + off_hkv * stride_kh + k_rows[None, :] + offs_d[:, None] * stride_kd,
                     mask=cols_ok[None, :] & (offs_d[:, None] < E), other=0.0)
        v = tl.load(VCache + off_hkv * stride_vh + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=cols_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        # base-2 scores: softcap, ALiBi, then the causal / window band
        if SOFTCAP:
            s = tanh(qk * softcap_scale) * softcap_log2e
        else:
            s = qk * qk_scale
        rel = cols[None, :] - (pos[:, None] + diag)  # key position relative to the query's
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(rel).to(tl.float32)
        keep = cols_ok[None, :] & rows_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (rel <= 0)
        if WINDOW_RIGHT:
            keep = keep & (rel <= win_right)
        if WINDOW_LEFT:
            keep = keep & (rel >= -win_left)
        s = tl.where(keep, s, float("-inf"))
        # online softmax, as in attention_fwd
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(to_lowp(p, VCache.dtype.element_ty, UPCAST), v,
                                            input_precision=DOT_PRECISION)
        m_i = m_new

    # partial result of this split: normalised output and base-2 LSE (-inf if empty)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = ((off_b * HKV * GROUP + head) * LQ + pos) * NUM_SPLITS + split
    tl.store(LsePart + part, m_i + tl.math.log2(l_safe), mask=rows_ok)
    tl.store(OPart + part[:, None] * EV + offs_dv[None, :], acc / l_safe[:, None],
             mask=rows_ok[:, None] & (offs_dv[None, :] < EV))


@triton.jit
def _decode_combine_kernel(
    OPart, LsePart, Out, Lse,
    stride_ob, stride_om, stride_oh, stride_od,
    HQ, LQ, EV, NUM_SPLITS,
    UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # program -> one (batch, head, query position) row; merges its splits
    row = tl.program_id(0).to(tl.int64)
    off_b = row // (HQ * LQ)
    off_h = row // LQ % HQ
    pos = row % LQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LsePart + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - shift)  # split weights; empty splits (lse -inf) weigh 0
    total = tl.sum(w, 0)
    o_s = tl.load(OPart + (row * NUM_SPLITS + offs_s[:, None]) * EV + offs_dv[None, :],
                  mask=(offs_s[:, None] < NUM_SPLITS) & (offs_dv[None, :] < EV), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o_s * w[:, None], 0) / total_safe
    tl.store(Out + off_b * stride_ob + pos * stride_om + off_h * stride_oh + offs_dv * stride_od,
             to_lowp(out, Out.dtype.element_ty, UPCAST), mask=offs_dv < EV)
    # the caller's lse: natural log
    tl.store(Lse + row, tl.where(total == 0.0, float("-inf"), (shift + tl.math.log2(total_safe)) * LN2))


def decode_blocks(group_rows: int, dim: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps) for GROUP * Lq rows: small row tiles, long key tiles.
    float32 above D = 64 takes 8 warps: with 4 the paged D = 128 kernel spilled 916 B on
    sm_90 (48-72 registers with 8: bench/results/static/*compile-sweep.txt)."""
    block_m = min(64, max(16, triton.next_power_of_2(group_rows)))
    block_n = 32 if (dim > 128 or dtype == torch.float32) else 64
    return block_m, block_n, 8 if (dtype == torch.float32 and dim > 64) else 4


def attention_decode(q, k_cache, v_cache, seqlens, block_table, alibi, out, lse, *, num_splits, split_len,
                     scale, is_causal, window, softcap):
    """Launch on flash_attn_with_kvcache's layouts: q (B, Lq, Hq, E); caches (B, S_max,
    Hkv, *) or paged (num_blocks, block_size, Hkv, *) with block_table (B, max_blocks);
    seqlens int32 (B,) keys per batch row; alibi (B, Hq) float32 view or None; out
    (B, Lq, Hq, Ev) and lse float32 (B, Hq, Lq) written here. Splits of split_len keys
    (a multiple of BLOCK_N, see `decode_blocks`)."""
    B, LQ, HQ, E = q.shape
    HKV, EV = k_cache.shape[2], v_cache.shape[-1]
    group = HQ // HKV
    block_m, block_n, warps = decode_blocks(group * LQ, max(E, EV), q.dtype)
    o_part = torch.empty((B, HQ, LQ, num_splits, EV), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((B, HQ, LQ, num_splits), device=q.device, dtype=torch.float32)
    paged = block_table is not None
    table = block_table if paged else seqlens
    slopes = alibi if alibi is not None else lse_part
    left, right = window
    grid = (num_splits * triton.cdiv(group * LQ, block_m) * B * HKV,)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, table, seqlens, slopes, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        table.stride(0) if paged else 0, *(alibi.stride() if alibi is not None else (0, 0)),
        HKV, group, LQ, E, EV, num_splits, split_len,
        scale * LOG2E, scale / softcap if softcap > 0 else 0.0, softcap * LOG2E, max(left, 0), max(right, 0),
        PAGED=paged, BLOCK_SIZE=k_cache.shape[1] if paged else 1,
        IS_CAUSAL=is_causal, WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0,
        SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
        UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(E), BLOCK_DV=head_block(EV),
        num_warps=warps, num_stages=2, **FP_FUSION,
    )
    _decode_combine_kernel[(B * HQ * LQ,)](
        o_part, lse_part, out, lse,
        *out.stride(),
        HQ, LQ, EV, num_splits,
        UPCAST=upcast(q.dtype), BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_DV=head_block(EV),
        **FP_FUSION,
    )


def _auto_splits(spec, programs: int, max_keys: int) -> int:
    """Enough splits to give the GPU ~2 programs per SM, none shorter than 256 keys."""
    if spec.device.type == "cuda":
        sms = torch.cuda.get_device_properties(spec.device).multi_processor_count
    else:
        sms = 4  # the interpreter: a few splits, so the merge is exercised
    wanted = -(-2 * sms // max(programs, 1))
    return max(1, min(wanted, -(-max_keys // 256), 128))


def attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, spec):
    """api.py's entry (an AttentionSpec of _checks.check_kvcache): picks the splits and
    launches; returns out (B, Lq, Hq, Ev) and lse float32 (B, Hq, Lq)."""
    B, Lq, Hq = spec.batch, spec.len_q, spec.heads_q
    out = torch.zeros((B, Lq, Hq, spec.dim_v), device=q.device, dtype=q.dtype)
    lse = torch.full((B, Hq, Lq), float("-inf"), device=q.device, dtype=torch.float32)
    max_keys = spec.max_keys
    if out.numel() == 0 or max_keys == 0:
        return out, lse
    group_rows = Hq // spec.heads_kv * Lq
    block_m, block_n, _ = decode_blocks(group_rows, max(spec.dim_qk, spec.dim_v), q.dtype)
    num_splits = spec.num_splits or _auto_splits(spec, B * spec.heads_kv * -(-group_rows // block_m), max_keys)
    num_splits = min(num_splits, -(-max_keys // block_n))  # no split without a tile of keys
    split_len = -(-max_keys // (num_splits * block_n)) * block_n
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.float().reshape(-1, Hq).expand(B, Hq)
    attention_decode(
        q, k_cache, v_cache, seqlens, block_table, alibi, out, lse, num_splits=num_splits, split_len=split_len,
        scale=spec.scale, is_causal=spec.is_causal, window=spec.window, softcap=spec.softcap,
    )
    return out, lse
