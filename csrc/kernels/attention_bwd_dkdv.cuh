// Fused attention backward, dK and dV (FlashAttention-2 scheme, key-major).
//
// Math, in the notation of attn_kernels/reference.py (P = softmax(scores)):
//     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale * dS^T Q
// with delta = rowsum(dO * O) - dlse from attention_bwd_delta.cuh.
//
// Algorithm: one CTA of 4 warps per (64 keys, key/value head, z); warp w owns keys
// 16w..16w+15, whose dK / dV accumulate in registers. K and V stay in shared memory;
// the CTA walks the query tiles of every query head of its GQA group (one flat loop,
// so the 2-stage cp.async pipeline of Q / dO tiles runs across heads; its iteration
// count, group x query tiles, is 64-bit). P^T is recomputed per tile from the forward's
// base-2 lse2 as exp2(scale * log2(e) * K Q^T - lse2), never stored; the products of
// K Q^T are those of the forward's Q K^T, so a row with one visible key gets P == 1
// exactly. The dK / dV of a shared head are summed in registers, so there are no
// atomics and the result is bit-identical run to run.
// Query rows past L read lse2 = +inf (P = 0) and delta = 0, so they add nothing; keys
// past S and above the causal diagonal are masked on the tiles that need it. Causal:
// only query tiles at or below the key block are visited.
// With DO_DK / DO_DV one of the two products is skipped: head dim 256 runs the kernel
// twice (dV, then dK) so that one 16 x 256 fp32 accumulator per warp fits in registers.
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

template <typename T, int D, int BLOCK_M, int WARPS, bool DO_DK, bool DO_DV>
struct DkdvKernel {
  static constexpr int kBlockN = 16 * WARPS;
  static constexpr int kThreads = 32 * WARPS;
  // K, V (only for dK), 2 stages of Q, 2 stages of dO, 2 stages of (lse2, delta) rows
  static constexpr int kKvBytes = tile_bytes<D>(kBlockN) * (DO_DK ? 2 : 1);
  static constexpr int kSmemBytes = dkdv_smem_bytes<D>(kBlockN, BLOCK_M, DO_DK);
};

template <typename T, int D, int BLOCK_M, int WARPS, bool DO_DK, bool DO_DV>
__global__ void __launch_bounds__(32 * WARPS) attention_bwd_dkdv_kernel(const BwdParams p) {
  using Cfg = DkdvKernel<T, D, BLOCK_M, WARPS, DO_DK, DO_DV>;
  constexpr int BN = Cfg::kBlockN;
  constexpr int kStride = RowLayout<D>::kStride;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * kStride;                                                // used only with DO_DK
  T* sQ = reinterpret_cast<T*>(smem + Cfg::kKvBytes);                       // stage s at + s * BLOCK_M * kStride
  T* sdO = sQ + 2 * BLOCK_M * kStride;                                      // likewise
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * BLOCK_M * kStride);   // [2][BLOCK_M], base 2
  float* sDelta = sLse2 + 2 * BLOCK_M;                                      // [2][BLOCK_M]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int num_n = (p.len_k + BN - 1) / BN;
  const GridIndex idx = split_grid(num_n, p.heads_kv);
  const int hkv = idx.head, z = idx.batch;
  const int group = p.heads_q / p.heads_kv;
  const int n0 = idx.block * BN;
  // causal: query i sees key j iff j <= i, so the queries before n0 see none of these keys
  const int m_begin = p.causal ? n0 / BLOCK_M * BLOCK_M : 0;
  const int m_tiles = p.len_q > m_begin ? (p.len_q - m_begin + BLOCK_M - 1) / BLOCK_M : 0;
  const int64_t n_iters = query_iterations(group, m_tiles);  // (query head of the group, query tile) pairs

  const T* k = static_cast<const T*>(p.k) + head_offset(z, hkv, p.k_str);
  const T* v = static_cast<const T*>(p.v) + head_offset(z, hkv, p.v_str);
  load_tile_async<BN, D, kThreads>(sK, k, p.k_str.row, n0, p.len_k, tid);
  if constexpr (DO_DK) load_tile_async<BN, D, kThreads>(sV, v, p.v_str.row, n0, p.len_k, tid);

  // start loading the Q, dO tiles and row statistics of (query head hkv * group +
  // head_in_group, query tile `tile`) into a stage
  auto load_query_tile = [&](int head_in_group, int tile, int stage) {
    const int h = hkv * group + head_in_group;
    const int m0 = m_begin + tile * BLOCK_M;
    const T* q = static_cast<const T*>(p.q) + head_offset(z, h, p.q_str);
    const T* dout = static_cast<const T*>(p.dout) + head_offset(z, h, p.dout_str);
    load_tile_async<BLOCK_M, D, kThreads>(sQ + stage * BLOCK_M * kStride, q, p.q_str.row, m0, p.len_q, tid);
    load_tile_async<BLOCK_M, D, kThreads>(sdO + stage * BLOCK_M * kStride, dout, p.dout_str.row, m0, p.len_q, tid);
    const int64_t stats = stats_offset(z, h, p.heads_q, p.len_q);
    for (int r = tid; r < BLOCK_M; r += kThreads) {
      const int row = m0 + r;
      float lse2 = INFINITY, delta = 0.0f;  // rows past L: P = 0, dS = 0
      if (row < p.len_q) {
        const float lse2_row = ld_global(p.lse2 + stats + row);
        lse2 = lse2_row == -INFINITY ? INFINITY : lse2_row;  // a row with no key: P = 0, not NaN
        delta = ld_global(p.delta + stats + row);
      }
      sLse2[stage * BLOCK_M + r] = lse2;
      sDelta[stage * BLOCK_M + r] = delta;
    }
  };
  if (n_iters > 0) load_query_tile(0, 0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero_acc<D>(dk);
  zero_acc<D>(dv);
  const int g = lane >> 2, c = lane & 3;
  const int key_lo = n0 + warp * 16 + g;  // key index of accumulator rows g, g + 8

  // iteration it visits query tile `tile` of head `head_in_group`; both advance by
  // counting, so the 64-bit it is never divided
  int head_in_group = 0, tile = 0;
  for (int64_t it = 0; it < n_iters; ++it) {
    const int stage = static_cast<int>(it & 1);
    const bool last_tile = tile + 1 == m_tiles;
    const int next_head = last_tile ? head_in_group + 1 : head_in_group;
    const int next_tile = last_tile ? 0 : tile + 1;
    if (it + 1 < n_iters) {  // prefetch the next tile into the stage iteration it-1 used
      load_query_tile(next_head, next_tile, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this stage's tiles, copied by every thread, are visible to all
    const int m0 = m_begin + tile * BLOCK_M;
    const T* sQi = sQ + stage * BLOCK_M * kStride;
    const T* sdOi = sdO + stage * BLOCK_M * kStride;
    const float* lse2 = sLse2 + stage * BLOCK_M;
    const float* delta = sDelta + stage * BLOCK_M;

    // P^T (this warp's 16 keys x BLOCK_M queries), recomputed from the lse
    float pt[BLOCK_M / 8][4];
    zero_acc<BLOCK_M>(pt);
    warp_gemm_nt<D, BLOCK_M, D, D>(pt, sK, warp * 16, sQi, lane);
    const bool masked = n0 + BN > p.len_k || (p.causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int t = 0; t < BLOCK_M / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + 2 * c + (e & 1);  // query m0 + col
        float x = exp2f(__fmul_rn(pt[t][e], p.scale_log2) - lse2[col]);
        if (masked) {
          const int key = key_lo + (e >> 1) * 8;
          if (key >= p.len_k || (p.causal && key > m0 + col)) x = 0.0f;
        }
        pt[t][e] = x;
      }
    }

    if constexpr (DO_DV) warp_gemm_rn<BLOCK_M, D, D>(dv, pt, sdOi, lane);  // dV += P^T dO
    if constexpr (DO_DK) {
      // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta), then dK += dS^T Q
      float ds[BLOCK_M / 8][4];
      zero_acc<BLOCK_M>(ds);
      warp_gemm_nt<D, BLOCK_M, D, D>(ds, sV, warp * 16, sdOi, lane);
#pragma unroll
      for (int t = 0; t < BLOCK_M / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[t][e] = pt[t][e] * (ds[t][e] - delta[t * 8 + 2 * c + (e & 1)]);
      }
      warp_gemm_rn<BLOCK_M, D, D>(dk, ds, sQi, lane);
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    head_in_group = next_head;
    tile = next_tile;
  }

  // epilogue through the warp's own rows of sK (no other warp reads them)
  cp_async_wait<0>();
  __syncthreads();
  const int key0 = n0 + warp * 16;
  if constexpr (DO_DK) {
    stage_acc<D>(sK, warp * 16, dk, p.scale, p.scale, lane);
    __syncwarp();
    T* dk_out = static_cast<T*>(p.dk) + head_offset(z, hkv, p.dk_str);
    store_rows<D>(dk_out, p.dk_str.row, key0, p.len_k, sK, warp * 16, lane);
    __syncwarp();
  }
  if constexpr (DO_DV) {
    stage_acc<D>(sK, warp * 16, dv, 1.0f, 1.0f, lane);
    __syncwarp();
    T* dv_out = static_cast<T*>(p.dv) + head_offset(z, hkv, p.dv_str);
    store_rows<D>(dv_out, p.dv_str.row, key0, p.len_k, sK, warp * 16, lane);
  }
}

template <typename T, int D, int BLOCK_M, int WARPS, bool DO_DK, bool DO_DV>
cudaError_t launch_dkdv_pass(const BwdParams& p, cudaStream_t stream) {
  using Cfg = DkdvKernel<T, D, BLOCK_M, WARPS, DO_DK, DO_DV>;
  static_assert(Cfg::kSmemBytes <= Tiles<D>::kMaxSmemBytes, "Tiles<D>::kMaxSmemBytes must cover every kernel");
  dim3 grid;
  const cudaError_t err = grid_size((p.len_k + Cfg::kBlockN - 1) / Cfg::kBlockN, p.heads_kv, p.batch, &grid);
  if (err != cudaSuccess) return err;
  return checked_launch(attention_bwd_dkdv_kernel<T, D, BLOCK_M, WARPS, DO_DK, DO_DV>, grid, Cfg::kThreads,
                        Cfg::kSmemBytes, stream, p);
}

template <typename T, int D>
cudaError_t launch_attention_bwd_dkdv(const BwdParams& p, cudaStream_t stream) {
  using Tl = Tiles<D>;
  if constexpr (Tl::kDkdvSplit) {
    const cudaError_t err = launch_dkdv_pass<T, D, Tl::kDkdvBlockM, Tl::kWarps, false, true>(p, stream);
    if (err != cudaSuccess) return err;
    return launch_dkdv_pass<T, D, Tl::kDkdvBlockM, Tl::kWarps, true, false>(p, stream);
  } else {
    return launch_dkdv_pass<T, D, Tl::kDkdvBlockM, Tl::kWarps, true, true>(p, stream);
  }
}

}  // namespace attn_kernels
