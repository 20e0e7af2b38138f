// Launch plumbing shared by the launchers: tile choices per head dim, the 1-D grid
// decomposition, and a checked launch (dynamic shared memory opt-in, then the launch
// error). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attn_kernels {

// Shared memory of a padded (rows x D) 16-bit tile, in bytes.
template <int D>
constexpr int tile_bytes(int rows) {
  return rows * (D + 8) * 2;
}

// Shared memory of each kernel (the one place these layouts are sized):
// forward: Q, 2 stages of K and of V
template <int D>
constexpr int fwd_smem_bytes(int block_m, int block_n) {
  return tile_bytes<D>(block_m) + 4 * tile_bytes<D>(block_n);
}
// dQ: Q, dO, 2 stages of K and of V
template <int D>
constexpr int dq_smem_bytes(int block_m, int block_n) {
  return 2 * tile_bytes<D>(block_m) + 4 * tile_bytes<D>(block_n);
}
// dK/dV: K (and V), 2 stages of Q and of dO, 2 stages of (lse2, delta) floats
template <int D>
constexpr int dkdv_smem_bytes(int block_n, int block_m, bool with_v) {
  return tile_bytes<D>(block_n) * (with_v ? 2 : 1) + 4 * tile_bytes<D>(block_m) + 4 * block_m * 4;
}

constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

// Tiles per head dim. Every kernel runs 4 warps; each warp owns 16 rows of the
// "resident" operand (queries in the forward / dQ, keys in dK/dV).
template <int D>
struct Tiles {
  static constexpr int kWarps = 4;
  static constexpr int kRows = 16 * kWarps;               // resident rows per CTA
  static constexpr int kFwdBlockN = D <= 128 ? 64 : 32;   // keys per forward step
  static constexpr int kDqBlockN = D <= 64 ? 64 : 32;     // keys per dQ step
  static constexpr int kDkdvBlockM = D <= 64 ? 64 : 32;   // queries per dK/dV step
  static constexpr bool kDkdvSplit = D > 128;             // dK and dV in two passes (registers)
  // the most any kernel of this head dim asks for (the GPU must allow it per block)
  static constexpr int kMaxSmemBytes =
      max3(fwd_smem_bytes<D>(kRows, kFwdBlockN), dq_smem_bytes<D>(kRows, kDqBlockN),
           dkdv_smem_bytes<D>(kRows, kDkdvBlockM, true));
};

// One CTA per (row block, head, batch) on a 1-D grid, row block fastest so that the
// blocks of one head run together and share K / V in L2.
struct GridIndex {
  int block, head, batch;
};

__device__ __forceinline__ GridIndex split_grid(int num_blocks, int heads) {
  const int bid = blockIdx.x;
  const int zh = bid / num_blocks;
  return {bid % num_blocks, zh % heads, zh / heads};
}

inline cudaError_t grid_size(int64_t num_blocks, int heads, int batch, dim3* grid) {
  const int64_t total = num_blocks * heads * batch;
  if (total > INT32_MAX) return cudaErrorInvalidConfiguration;
  *grid = dim3(static_cast<unsigned>(total));
  return cudaSuccess;
}

#ifndef ATTN_KERNELS_EMULATED_PTX  // csrc/emulator/ runs the blocks on the CPU instead
// Launch kernel<<<grid, threads, smem, stream>>>(params) and return the launch error.
template <typename Params>
cudaError_t checked_launch(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                           const Params& params) {
  if (grid.x == 0) return cudaSuccess;  // nothing to compute
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();  // not left behind for the next launch's check
      return err;
    }
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}
#endif

}  // namespace attn_kernels
