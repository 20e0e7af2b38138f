// Fused attention forward (FlashAttention-2) on tensor cores.
//
// Math, in the notation of attn_kernels/reference.py, for batch z and query head h
// (GQA: key/value head h / (Hq / Hkv)):
//     scores = scale * Q K^T, -inf where causal (key j > query i, top-left aligned)
//     lse2   = logsumexp(scores, -1) / ln 2   float32, base 2 (attn_kernels/cuda.py
//                                             turns it into the natural-log lse)
//     O      = softmax(scores) V
//
// Algorithm: one CTA of 4 warps per (64 query rows, h, z); warp w owns rows 16w..16w+15.
// Q is staged in shared memory; K and V stream through a 2-stage cp.async pipeline in
// BLOCK_N-row tiles (tile j+1 is in flight while tile j is used). Per tile, each warp:
//   S = Q K^T (mma.m16n8k16, fp32), in base 2: s = S * scale * log2(e), an unfused
//   product (__fmul_rn) that the backward kernels recompute bit for bit
//   online softmax in registers: running max m and sum l per row, p = exp2(s - m),
//   the accumulator rescaled by exp2(m_old - m_new); a row that has seen no key yet
//   shifts by 0, so nothing becomes NaN
//   O += P V with P rounded to the input dtype, reusing the S accumulators as the A
//   fragments (no trip through shared memory)
// Causal: only key tiles below the diagonal are visited, in reverse block order (the
// longest rows first); tiles crossing the diagonal or the end of K are masked.
// Epilogue: O / l (0 for a row with no key), lse2 = m + log2 l (-inf then; exactly m
// when l == 1, so that a row with one visible key recomputes P = 2^(s - lse2) = 1
// exactly), staged through the warp's own Q rows for 16-byte stores.
//
// Limits: D in {32, 64, 96, 128, 256}, Ev == E; fp16 / bf16; strides in multiples of 8
// elements and 16-byte aligned pointers (checked by attention.cu).
#pragma once

#include <cuda_runtime.h>

#include "launch_utils.cuh"
#include "offsets.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "smem_tile.cuh"

namespace attn_kernels {

template <typename T, int D, int BLOCK_N, int WARPS>
struct FwdKernel {
  static constexpr int kBlockM = 16 * WARPS;
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kSmemBytes = fwd_smem_bytes<D>(kBlockM, BLOCK_N);  // Q, 2 x K, 2 x V
};

template <typename T, int D, int BLOCK_N, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attention_fwd_kernel(const FwdParams p) {
  using Cfg = FwdKernel<T, D, BLOCK_N, WARPS>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int kStride = RowLayout<D>::kStride;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * kStride;          // stage s at sK + s * BLOCK_N * kStride
  T* sV = sK + 2 * BLOCK_N * kStride;  // likewise

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_m = (p.len_q + BM - 1) / BM;
  const GridIndex idx = split_grid(num_m, p.heads_q);
  const int m_block = p.causal ? num_m - 1 - idx.block : idx.block;  // long causal rows first
  const int h = idx.head, z = idx.batch;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int m0 = m_block * BM;

  const T* q = static_cast<const T*>(p.q) + head_offset(z, h, p.q_str);
  const T* k = static_cast<const T*>(p.k) + head_offset(z, hkv, p.k_str);
  const T* v = static_cast<const T*>(p.v) + head_offset(z, hkv, p.v_str);

  // keys this row block may see: causal rows m0..m0+BM-1 see keys 0..m0+BM-1
  const int n_end = p.causal ? min(p.len_k, m0 + BM) : p.len_k;
  const int n_tiles = (n_end + BLOCK_N - 1) / BLOCK_N;

  load_tile_async<BM, D, Cfg::kThreads>(sQ, q, p.q_str.row, m0, p.len_q, tid);
  if (n_tiles > 0) {
    load_tile_async<BLOCK_N, D, Cfg::kThreads>(sK, k, p.k_str.row, 0, p.len_k, tid);
    load_tile_async<BLOCK_N, D, Cfg::kThreads>(sV, v, p.v_str.row, 0, p.len_k, tid);
  }
  cp_async_commit();

  float acc[D / 8][4];
  zero_acc<D>(acc);
  float row_max[2] = {-INFINITY, -INFINITY};  // base 2; rows g and g + 8 of this warp
  float row_sum[2] = {0.0f, 0.0f};
  const int g = lane >> 2, c = lane & 3;
  const int row_lo = m0 + warp * 16 + g;  // query index of accumulator rows g, g + 8

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    // prefetch tile j + 1, wait for tile j
    kv_pipeline_step<BLOCK_N, D, Cfg::kThreads>(sK, sV, stage, j, n_tiles, k, p.k_str.row, v, p.v_str.row, p.len_k,
                                                tid);
    const T* sKj = sK + stage * BLOCK_N * kStride;
    const T* sVj = sV + stage * BLOCK_N * kStride;

    float s[BLOCK_N / 8][4];
    zero_acc<BLOCK_N>(s);
    warp_gemm_nt<D, BLOCK_N, D, D>(s, sQ, warp * 16, sKj, lane);

    // base-2 scores, -inf past the end of K and above the causal diagonal
    const int n0 = j * BLOCK_N;
    const bool masked = n0 + BLOCK_N > p.len_k || (p.causal && n0 + BLOCK_N - 1 > m0);
#pragma unroll
    for (int t = 0; t < BLOCK_N / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = __fmul_rn(s[t][e], p.scale_log2);
        if (masked) {
          const int col = n0 + t * 8 + 2 * c + (e & 1);
          const int row = row_lo + (e >> 1) * 8;
          if (col >= p.len_k || (p.causal && col > row)) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }

    // online softmax, one row at a time (e = 2i, 2i+1 hold row g + 8i)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = row_max[i];
#pragma unroll
      for (int t = 0; t < BLOCK_N / 8; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * i], s[t][2 * i + 1]));
      mx = quad_max(mx);
      const float shift = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(row_max[i] - shift);
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < BLOCK_N / 8; ++t) {
        s[t][2 * i] = exp2f(s[t][2 * i] - shift);
        s[t][2 * i + 1] = exp2f(s[t][2 * i + 1] - shift);
        sum += s[t][2 * i] + s[t][2 * i + 1];
      }
      row_sum[i] = row_sum[i] * alpha + quad_sum(sum);
      row_max[i] = mx;
#pragma unroll
      for (int t = 0; t < D / 8; ++t) {
        acc[t][2 * i] *= alpha;
        acc[t][2 * i + 1] *= alpha;
      }
    }

    warp_gemm_rn<BLOCK_N, D, D>(acc, s, sVj, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // epilogue; all copies (also an unused Q tile's) have landed before sQ is rewritten
  cp_async_wait<0>();
  __syncthreads();
  float inv[2], lse2[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = row_sum[i] == 0.0f ? 1.0f : row_sum[i];
    inv[i] = 1.0f / l;
    // -inf for a row with no key; m itself for l == 1, whatever log2f's approximation gives
    lse2[i] = l == 1.0f ? row_max[i] : row_max[i] + log2f(l);
  }
  stage_acc<D>(sQ, warp * 16, acc, inv[0], inv[1], lane);
  __syncwarp();
  T* out = static_cast<T*>(p.out) + head_offset(z, h, p.out_str);
  store_rows<D>(out, p.out_str.row, m0 + warp * 16, p.len_q, sQ, warp * 16, lane);
  if (c == 0) {
    float* lse2_row = p.lse2 + stats_offset(z, h, p.heads_q, p.len_q);
    if (row_lo < p.len_q) st_global(lse2_row + row_lo, lse2[0]);
    if (row_lo + 8 < p.len_q) st_global(lse2_row + row_lo + 8, lse2[1]);
  }
}

template <typename T, int D>
cudaError_t launch_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tl = Tiles<D>;
  using Cfg = FwdKernel<T, D, Tl::kFwdBlockN, Tl::kWarps>;
  static_assert(Cfg::kSmemBytes <= Tl::kMaxSmemBytes, "Tiles<D>::kMaxSmemBytes must cover every kernel");
  dim3 grid;
  const cudaError_t err =
      grid_size((p.len_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads_q, p.batch, &grid);
  if (err != cudaSuccess) return err;
  return checked_launch(attention_fwd_kernel<T, D, Tl::kFwdBlockN, Tl::kWarps>, grid, Cfg::kThreads,
                        Cfg::kSmemBytes, stream, p);
}

}  // namespace attn_kernels
