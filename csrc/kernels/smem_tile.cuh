// Shared-memory tiles of ROWS x D elements (16-bit), row-major with each row padded by
// one 16-byte chunk: a row stride of 2D + 16 bytes puts the 8 rows an ldmatrix phase
// reads (one 16-byte chunk each) in 8 different bank groups for every D in
// {32, 64, 96, 128, 256}, so fragment loads are conflict-free without a swizzle.
//
// Also: the cp.async tile loader (zero-fill past the last row of the tensor) and the
// per-lane ldmatrix addresses of A and B fragments (see ptx.cuh for the layouts).
#pragma once

#include <cstdint>

#include "offsets.cuh"
#include "ptx.cuh"

namespace attn_kernels {

template <int D>
struct RowLayout {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  static constexpr int kStride = D + 8;  // elements between consecutive rows
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row of data
};

// Start copying rows [row0, row0 + ROWS) of a (rows, D) matrix at gmem with row stride
// row_stride (elements, the last dim contiguous) into smem; rows >= num_rows are zeroed.
// All NTHREADS threads of the CTA take part; the caller commits the group.
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int row0, int num_rows,
                                                int tid) {
  using L = RowLayout<D>;
  constexpr int kTotal = ROWS * L::kChunks;
#pragma unroll
  for (int i = tid; i < kTotal; i += NTHREADS) {
    const int r = i / L::kChunks;
    const int c = i % L::kChunks;
    const int row = row0 + r;
    const bool valid = row < num_rows;
    // an invalid row reads nothing; row 0 keeps the address inside the tensor anyway
    const T* src = gmem + row_offset(valid ? row : 0, row_stride) + c * 8;
    cp_async_16(smem + r * L::kStride + c * 8, src, valid);
  }
}

// Lane address for ldmatrix_x4 of the A fragment (16x16) whose top-left element is
// (row0, col0) of a row-major tile: lanes 0-15 point at rows 0-15 of column col0,
// lanes 16-31 at rows 0-15 of column col0 + 8 (matrices a0, a1, a2, a3 in order).
template <int D, typename T>
__device__ __forceinline__ const T* a_frag_addr(const T* tile, int row0, int col0, int lane) {
  return tile + (row0 + (lane & 15)) * RowLayout<D>::kStride + col0 + (lane >> 4) * 8;
}

// Lane address for ldmatrix_x4 (no .trans) of the B fragments of two n8 tiles, n0 and
// n0 + 8, at k step k0, from a tile stored [n][k] (k contiguous, e.g. K for Q K^T).
// Registers: {0, 1} = (b0, b1) of tile n0, {2, 3} = (b0, b1) of tile n0 + 8.
template <int D, typename T>
__device__ __forceinline__ const T* b_frag_addr_nk(const T* tile, int n0, int k0, int lane) {
  return tile + (n0 + (lane & 7) + (lane >> 4) * 8) * RowLayout<D>::kStride + k0 + ((lane >> 3) & 1) * 8;
}

// Lane address for ldmatrix_x4_trans of the B fragments of two n8 tiles, n0 and n0 + 8,
// at k step k0, from a tile stored [k][n] (n contiguous, e.g. V for P V). Registers as
// b_frag_addr_nk.
template <int D, typename T>
__device__ __forceinline__ const T* b_frag_addr_kn(const T* tile, int k0, int n0, int lane) {
  return tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * RowLayout<D>::kStride + n0 + (lane >> 4) * 8;
}

// acc (16 x N, fp32 mma accumulators of one warp) += A (16 x K) * B, where A is in shared
// memory at rows row0.. of tile_a (row-major, K contiguous) and B^T is stored [n][k] in
// tile_b (K contiguous): the "x @ y^T" product of two row-major tiles.
template <int K, int N, int DA, int DB, typename T>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[N / 8][4], const T* tile_a, int row0, const T* tile_b,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_frag_addr<DA>(tile_a, row0, kk * 16, lane));
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      ldmatrix_x4(b, b_frag_addr_nk<DB>(tile_b, nn * 16, kk * 16, lane));
      mma_16x8x16<T>(acc[2 * nn], a, b[0], b[1]);
      mma_16x8x16<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x N) += A (16 x K) * B, where A is held in registers as fp32 mma accumulators
// (K / 8 tiles of 16 x 8, rounded to T here: FlashAttention's register reuse of P and dS)
// and B is stored [k][n] in tile_b (N contiguous), rows 0..K-1.
template <int K, int N, int DB, typename T>
__device__ __forceinline__ void warp_gemm_rn(float (&acc)[N / 8][4], const float (&a_acc)[K / 8][4], const T* tile_b,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    // the C fragments of tiles 2kk and 2kk+1 are exactly the A fragment of k step kk
    const uint32_t a[4] = {
        pack2<T>(a_acc[2 * kk][0], a_acc[2 * kk][1]),
        pack2<T>(a_acc[2 * kk][2], a_acc[2 * kk][3]),
        pack2<T>(a_acc[2 * kk + 1][0], a_acc[2 * kk + 1][1]),
        pack2<T>(a_acc[2 * kk + 1][2], a_acc[2 * kk + 1][3]),
    };
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_frag_addr_kn<DB>(tile_b, kk * 16, nn * 16, lane));
      mma_16x8x16<T>(acc[2 * nn], a, b[0], b[1]);
      mma_16x8x16<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N / 8][4]) {
#pragma unroll
  for (int t = 0; t < N / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }
}

// Write a warp's 16 x D fp32 accumulators, times row_scale[0] (row g) / row_scale[1]
// (row g + 8), as T into rows row0..row0+15 of a padded smem tile.
template <int D, typename T>
__device__ __forceinline__ void stage_acc(T* tile, int row0, const float (&acc)[D / 8][4], float scale_lo,
                                          float scale_hi, int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
    const int col = t * 8 + 2 * c;
    *reinterpret_cast<uint32_t*>(tile + (row0 + g) * RowLayout<D>::kStride + col) =
        pack2<T>(acc[t][0] * scale_lo, acc[t][1] * scale_lo);
    *reinterpret_cast<uint32_t*>(tile + (row0 + g + 8) * RowLayout<D>::kStride + col) =
        pack2<T>(acc[t][2] * scale_hi, acc[t][3] * scale_hi);
  }
}

// Copy rows row0..row0+15 of a padded smem tile (written by this warp) to global rows
// grow0.. (row stride row_stride, 16-byte vectors), skipping rows >= num_rows.
template <int D, typename T>
__device__ __forceinline__ void store_rows(T* gmem, int64_t row_stride, int grow0, int num_rows, const T* tile,
                                           int row0, int lane) {
  using L = RowLayout<D>;
#pragma unroll
  for (int i = lane; i < 16 * L::kChunks; i += 32) {
    const int r = i / L::kChunks;
    const int c = i % L::kChunks;
    const int row = grow0 + r;
    if (row < num_rows) {
      st_global(reinterpret_cast<uint4*>(gmem + row_offset(row, row_stride) + c * 8),
                *reinterpret_cast<const uint4*>(tile + (row0 + r) * L::kStride + c * 8));
    }
  }
}

// One step of the double-buffered K/V pipeline: start copying tile j + 1 into the stage
// that tile j - 1 used, then wait until tile j (in `stage`) has landed and every thread
// of the CTA sees it.
template <int BLOCK_N, int D, int NTHREADS, typename T>
__device__ __forceinline__ void kv_pipeline_step(T* sK, T* sV, int stage, int j, int n_tiles, const T* k,
                                                 int64_t k_row_stride, const T* v, int64_t v_row_stride,
                                                 int len_k, int tid) {
  constexpr int kTile = BLOCK_N * RowLayout<D>::kStride;
  if (j + 1 < n_tiles) {
    const int next = (j + 1) * BLOCK_N;
    load_tile_async<BLOCK_N, D, NTHREADS>(sK + (stage ^ 1) * kTile, k, k_row_stride, next, len_k, tid);
    load_tile_async<BLOCK_N, D, NTHREADS>(sV + (stage ^ 1) * kTile, v, v_row_stride, next, len_k, tid);
    cp_async_commit();
    cp_async_wait<1>();  // everything but tile j + 1 has landed
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();  // tile j, copied by every thread, is visible to all
}

}  // namespace attn_kernels
