"""@triton.jit helpers shared by the attention kernels: which tile a program owns,
which keys a query may see, and the score of one tile with every modifier applied.

Score of query i and key j, in the notation of reference.py, before the softmax:
    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)                    if SOFTCAP
    s = s - slope_h * |i + S - L - j|                  if HAS_ALIBI (FlashAttention's ALiBi)
    s = s + mask[i, j]                                 if MASK_KIND == 2 (additive float)
    s = -inf where  mask[i, j] is False                if MASK_KIND == 1 (boolean)
                    j - i < band_lo                    if BAND_LO (left edge of a window)
                    j - i > band_hi                    if BAND_HI (causal, right edge of a window)
Kernels keep s in base 2 (times log2(e)) so that every exponential is one exp2, and
the LSE they store for each other is base 2 too (lse2 = m2 + log2(l)): recomputing
P = exp2(s2 - lse2) then involves no change of base, so a row with one visible key
gets P == 1 exactly. Only the LSE handed to users is converted to natural log.

Addresses: a sequence start or a row index times a stride can pass 2^31 (packed
batches of ~500k tokens), so base offsets are formed in int64 once per program or
per tile, and only offsets inside a tile (0 .. BLOCK - 1) multiply strides in int32.
"""

import triton
import triton.language as tl

from .launch_config import LOG2E

_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def split_program_id(pid, num_blocks, H, GROUP):
    """1-D program id -> (block along the sequence, z * H + h, z, h, h // GROUP).

    The blocks of one head get adjacent ids, so they run together and share K/V in L2.
    z and h come back as int64 so that base offsets of large tensors cannot overflow.
    """
    block = pid % num_blocks
    off_zh = pid // num_blocks
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    return block, off_zh, off_z, off_h, off_h // GROUP


@triton.jit
def lse_shift(lse2):
    """The forward's base-2 LSE as the shift for recomputing P = exp2(s2 - shift):
    lse2 = -inf (a row with no allowed key) becomes +inf, so its P is 0, not NaN."""
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. The interpreter
    converts fp32 to bf16 by truncation where a GPU rounds; rounding first makes its
    conversion exact, so bf16 under the interpreter computes what the GPU computes."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def to_lowp(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x (fp32) rounded to the input dtype, as the GPU's `x.to(dtype)`: for tensor-core
    operands (P, dS) and stores. Under UPCAST (bf16 in the interpreter) the kernel
    computes in fp32, so the value is rounded to bf16 and kept in fp32."""
    if UPCAST:
        return round_bf16(x)
    else:
        return x.to(dtype)


@triton.jit
def key_range(start_m, S, band_lo, band_hi, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries start_m .. start_m + BLOCK_M - 1 may see; lo is
    BLOCK_N-aligned. Tiles outside it are wholly masked and never loaded."""
    lo = 0
    hi = S
    if BAND_LO:
        lo = tl.maximum(start_m + band_lo, 0) // BLOCK_N * BLOCK_N
    if BAND_HI:
        hi = tl.minimum(S, start_m + BLOCK_M + band_hi)
    return lo, hi


@triton.jit
def query_range(start_n, L, band_lo, band_hi, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Queries [lo, hi) that may see keys start_n .. start_n + BLOCK_N - 1; lo is
    BLOCK_M-aligned."""
    lo = 0
    hi = L
    if BAND_HI:
        lo = tl.maximum(start_n - band_hi, 0) // BLOCK_M * BLOCK_M
    if BAND_LO:
        hi = tl.minimum(L, start_n + BLOCK_N - band_lo)
    return lo, hi


@triton.jit
def interior_range(lo, hi, first_ok, last_ok, BLOCK: tl.constexpr):
    """Split the tiles starting at lo, lo + BLOCK, ... (< hi) into three runs:
    [lo, a) edge, [a, b) interior, [b, hi) edge, the interior being the tiles whose
    start lies in [first_ok, last_ok] (no mask or bounds check needed there).
    lo <= a <= b <= hi, and a, b are lo plus multiples of BLOCK unless equal to hi."""
    zero = tl.zeros([], tl.int32)  # scalars that may be constexprs (a length of 1) become tensors
    lo, hi, first_ok, last_ok = lo + zero, hi + zero, first_ok + zero, last_ok + zero
    a = tl.minimum(lo + (tl.maximum(first_ok - lo, 0) + BLOCK - 1) // BLOCK * BLOCK, hi)
    b = tl.minimum(a + tl.maximum(last_ok - a + BLOCK, 0) // BLOCK * BLOCK, hi)
    return a, b


@triton.jit
def _grid(rows, cols, TRANSPOSED: tl.constexpr):
    """Broadcast 1-D query rows and key cols to a (queries, keys) tile, or to a
    (keys, queries) tile when TRANSPOSED (the dK/dV kernel's orientation)."""
    if TRANSPOSED:
        return rows[None, :], cols[:, None]
    else:
        return rows[:, None], cols[None, :]


@triton.jit
def tanh(x):
    # tl.math has no tanh on every triton we support; this form saturates cleanly at +-1
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def scores_base2(
    qk, rows, cols, L, S,
    qk_scale, softcap_scale, softcap_log2e,
    Mask, stride_mm, stride_mn,
    alibi_log2e, band_lo, band_hi,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Base-2 scores of a tile of raw dot products qk, -inf where masked (see the module
    docstring). Mask points at this (batch, head)'s mask plane. Also returns
    tanh(s / softcap), which the backward needs (qk itself when not SOFTCAP)."""
    r, c = _grid(rows, cols, TRANSPOSED)
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        s = t * softcap_log2e
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s -= alibi_log2e * tl.abs(r + (S - L) - c).to(tl.float32)
    keep = (r < L) & (c < S)
    if BAND_LO:
        keep = keep & (c - r >= band_lo)
    if BAND_HI:
        keep = keep & (c - r <= band_hi)
    if MASK_KIND != 0:  # an L x S mask can pass 2^31 elements: int64 offsets
        mask_ptrs = Mask + r.to(tl.int64) * stride_mm + c.to(tl.int64) * stride_mn
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptrs, mask=keep, other=0)
        keep = keep & (allowed != 0)
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=keep, other=0.0).to(tl.float32) * _LOG2E
    return tl.where(keep, s, float("-inf")), t


@triton.jit
def dropout_keep(seed, off_zh, rows, cols, L_MAX, S_MAX, dropout_p, TRANSPOSED: tl.constexpr):
    """Philox keep-mask of a tile: element (z, h, i, j) is kept iff its uniform draw is
    >= dropout_p. Counters are unique per element (sized by the largest L, S), so
    every kernel, in either orientation, regenerates the same mask."""
    r, c = _grid(rows, cols, TRANSPOSED)
    offsets = (off_zh.to(tl.int64) * L_MAX + r) * S_MAX + c
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def sequence_bounds(CuSeqQ, CuSeqK, off_z, L, S, band_lo, band_hi, VARLEN: tl.constexpr):
    """Where sequence z starts in the packed q and k, its lengths, and its band.

    Padded batches: every sequence starts at 0 with lengths L, S and the band offsets
    are absolute. Packed (VARLEN) batches: the cu_seqlens prefix sums give both, and
    the band offsets are relative to the bottom-right diagonal (j - i = S_z - L_z).
    The starts are int64: they multiply strides."""
    if VARLEN:
        q_start = tl.load(CuSeqQ + off_z)
        k_start = tl.load(CuSeqK + off_z)
        seq_len_q = tl.load(CuSeqQ + off_z + 1) - q_start  # int32: lengths are < 2^31
        seq_len_k = tl.load(CuSeqK + off_z + 1) - k_start
        return q_start.to(tl.int64), k_start.to(tl.int64), seq_len_q, seq_len_k, band_lo + seq_len_k - seq_len_q, band_hi + seq_len_k - seq_len_q
    else:
        return tl.zeros([], tl.int64), tl.zeros([], tl.int64), L, S, band_lo, band_hi


@triton.jit
def alibi_slope_log2(Alibi, off_z, off_h, stride_az, stride_ah, HAS_ALIBI: tl.constexpr):
    """ALiBi slope of (batch z, head h) times log2(e), or 0 without ALiBi."""
    if HAS_ALIBI:
        return tl.load(Alibi + off_z * stride_az + off_h * stride_ah).to(tl.float32) * _LOG2E
    else:
        return 0.0
