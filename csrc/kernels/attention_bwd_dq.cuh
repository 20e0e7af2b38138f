// Fused attention backward, dQ (FlashAttention-2 scheme, query-major, no atomics).
//
// Math, in the notation of attn_kernels/reference.py (P = softmax(scores)):
//     dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K
// with delta = rowsum(dO * O) - dlse from attention_bwd_delta.cuh.
//
// Algorithm: one CTA of 4 warps per (64 query rows, query head, z), as the forward;
// Q and dO are staged in shared memory, K and V stream through a 2-stage cp.async
// pipeline. Per key tile each warp recomputes P = exp2(scale * log2(e) * Q K^T - lse2)
// for its 16 rows from the forward's base-2 lse2 (the same unfused product as the
// forward, so a row with one visible key gets P == 1 exactly), computes dP and dS in
// registers and accumulates dS K (dS rounded to the input dtype) with the dS
// accumulators reused as A fragments. Rows past L or with no key (lse2 = -inf) get
// P = 0. Causal: key tiles below the diagonal only, longest rows first; crossing tiles
// and the end of K are masked.
//
// Limits: as the forward.
#pragma once

#include <cuda_runtime.h>

#include "launch_utils.cuh"
#include "offsets.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "smem_tile.cuh"

namespace attn_kernels {

template <typename T, int D, int BLOCK_N, int WARPS>
struct DqKernel {
  static constexpr int kBlockM = 16 * WARPS;
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kSmemBytes = dq_smem_bytes<D>(kBlockM, BLOCK_N);  // Q, dO, 2 x K, 2 x V
};

template <typename T, int D, int BLOCK_N, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attention_bwd_dq_kernel(const BwdParams p) {
  using Cfg = DqKernel<T, D, BLOCK_N, WARPS>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int kStride = RowLayout<D>::kStride;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * kStride;
  T* sK = sdO + BM * kStride;          // stage s at sK + s * BLOCK_N * kStride
  T* sV = sK + 2 * BLOCK_N * kStride;  // likewise

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_m = (p.len_q + BM - 1) / BM;
  const GridIndex idx = split_grid(num_m, p.heads_q);
  const int m_block = p.causal ? num_m - 1 - idx.block : idx.block;
  const int h = idx.head, z = idx.batch;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int m0 = m_block * BM;

  const T* q = static_cast<const T*>(p.q) + head_offset(z, h, p.q_str);
  const T* dout = static_cast<const T*>(p.dout) + head_offset(z, h, p.dout_str);
  const T* k = static_cast<const T*>(p.k) + head_offset(z, hkv, p.k_str);
  const T* v = static_cast<const T*>(p.v) + head_offset(z, hkv, p.v_str);

  const int n_end = p.causal ? min(p.len_k, m0 + BM) : p.len_k;
  const int n_tiles = (n_end + BLOCK_N - 1) / BLOCK_N;

  load_tile_async<BM, D, Cfg::kThreads>(sQ, q, p.q_str.row, m0, p.len_q, tid);
  load_tile_async<BM, D, Cfg::kThreads>(sdO, dout, p.dout_str.row, m0, p.len_q, tid);
  if (n_tiles > 0) {
    load_tile_async<BLOCK_N, D, Cfg::kThreads>(sK, k, p.k_str.row, 0, p.len_k, tid);
    load_tile_async<BLOCK_N, D, Cfg::kThreads>(sV, v, p.v_str.row, 0, p.len_k, tid);
  }
  cp_async_commit();

  // row statistics of accumulator rows g and g + 8
  const int g = lane >> 2, c = lane & 3;
  const int row_lo = m0 + warp * 16 + g;
  const int64_t stats = stats_offset(z, h, p.heads_q, p.len_q);
  float lse2[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row_lo + 8 * i;
    lse2[i] = INFINITY;  // rows past L: P = 0
    delta[i] = 0.0f;
    if (row < p.len_q) {
      const float lse2_row = ld_global(p.lse2 + stats + row);
      lse2[i] = lse2_row == -INFINITY ? INFINITY : lse2_row;  // a row with no key: P = 0, not NaN
      delta[i] = ld_global(p.delta + stats + row);
    }
  }

  float dq[D / 8][4];
  zero_acc<D>(dq);

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    // prefetch tile j + 1, wait for tile j
    kv_pipeline_step<BLOCK_N, D, Cfg::kThreads>(sK, sV, stage, j, n_tiles, k, p.k_str.row, v, p.v_str.row, p.len_k,
                                                tid);
    const T* sKj = sK + stage * BLOCK_N * kStride;
    const T* sVj = sV + stage * BLOCK_N * kStride;

    // P for this warp's 16 rows x BLOCK_N keys, from the lse
    float pr[BLOCK_N / 8][4];
    zero_acc<BLOCK_N>(pr);
    warp_gemm_nt<D, BLOCK_N, D, D>(pr, sQ, warp * 16, sKj, lane);
    const int n0 = j * BLOCK_N;
    const bool masked = n0 + BLOCK_N > p.len_k || (p.causal && n0 + BLOCK_N - 1 > m0);
#pragma unroll
    for (int t = 0; t < BLOCK_N / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = exp2f(__fmul_rn(pr[t][e], p.scale_log2) - lse2[e >> 1]);
        if (masked) {
          const int col = n0 + t * 8 + 2 * c + (e & 1);
          if (col >= p.len_k || (p.causal && col > row_lo + (e >> 1) * 8)) x = 0.0f;
        }
        pr[t][e] = x;
      }
    }

    // dP = dO V^T, then dS = P * (dP - delta), then dQ += dS K
    float ds[BLOCK_N / 8][4];
    zero_acc<BLOCK_N>(ds);
    warp_gemm_nt<D, BLOCK_N, D, D>(ds, sdO, warp * 16, sVj, lane);
#pragma unroll
    for (int t = 0; t < BLOCK_N / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[t][e] = pr[t][e] * (ds[t][e] - delta[e >> 1]);
    }
    warp_gemm_rn<BLOCK_N, D, D>(dq, ds, sKj, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_acc<D>(sQ, warp * 16, dq, p.scale, p.scale, lane);
  __syncwarp();
  T* dq_out = static_cast<T*>(p.dq) + head_offset(z, h, p.dq_str);
  store_rows<D>(dq_out, p.dq_str.row, m0 + warp * 16, p.len_q, sQ, warp * 16, lane);
}

template <typename T, int D>
cudaError_t launch_attention_bwd_dq(const BwdParams& p, cudaStream_t stream) {
  using Tl = Tiles<D>;
  using Cfg = DqKernel<T, D, Tl::kDqBlockN, Tl::kWarps>;
  static_assert(Cfg::kSmemBytes <= Tl::kMaxSmemBytes, "Tiles<D>::kMaxSmemBytes must cover every kernel");
  dim3 grid;
  const cudaError_t err = grid_size((p.len_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads_q, p.batch, &grid);
  if (err != cudaSuccess) return err;
  return checked_launch(attention_bwd_dq_kernel<T, D, Tl::kDqBlockN, Tl::kWarps>, grid, Cfg::kThreads,
                        Cfg::kSmemBytes, stream, p);
}

}  // namespace attn_kernels
