// Backward preprocess: delta = rowsum(dO * O) - dlse per query row (float32), the
// softmax-gradient term of dS = P * (dP - delta). dlse, the gradient reaching the lse
// output, enters here because d lse_i / d s_ij = P_ij. One warp per row; any head dim
// (even); O and dO read through their strides.
#pragma once

#include <cuda_runtime.h>

#include "launch_utils.cuh"
#include "offsets.cuh"
#include "params.cuh"
#include "ptx.cuh"

namespace attn_kernels {

constexpr int kDeltaWarps = 8;

template <typename T>
__global__ void __launch_bounds__(32 * kDeltaWarps) attention_bwd_delta_kernel(const BwdParams p) {
  using T2 = typename Pair<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + warp;  // over (Z, Hq, L)
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.len_q);
  const int64_t zh = row / p.len_q;
  const int h = static_cast<int>(zh % p.heads_q);
  const int z = static_cast<int>(zh / p.heads_q);
  const T2* o = reinterpret_cast<const T2*>(static_cast<const T*>(p.out) + head_offset(z, h, p.out_str) +
                                            row_offset(i, p.out_str.row));
  const T2* d = reinterpret_cast<const T2*>(static_cast<const T*>(p.dout) + head_offset(z, h, p.dout_str) +
                                            row_offset(i, p.dout_str.row));
  float sum = 0.0f;
  for (int j = lane; j < p.head_dim / 2; j += 32) {
    const float2 a = unpack2(ld_global(o + j));
    const float2 b = unpack2(ld_global(d + j));
    sum += a.x * b.x + a.y * b.y;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) st_global(p.delta + row, p.dlse != nullptr ? sum - ld_global(p.dlse + row) : sum);
}

template <typename T>
cudaError_t launch_attention_bwd_delta(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  const int64_t blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return checked_launch(attention_bwd_delta_kernel<T>, dim3(static_cast<unsigned>(blocks)), 32 * kDeltaWarps, 0,
                        stream, p);
}

}  // namespace attn_kernels
