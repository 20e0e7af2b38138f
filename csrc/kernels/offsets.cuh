// 64-bit element offsets into the kernels' global memory. Every product of a batch,
// head or row index with a stride, every row-statistics index and the dK/dV kernel's
// iteration count go through these helpers: each index fits in an int, but a product
// passes 2^31 for ordinary long-context shapes (e.g. row 2^24 of a tensor with 32 heads
// x 128 dims per row). The helpers widen once, where a CTA or a tile row computes its
// base offset, never per element of a tile. Torch-free; host and device.
#pragma once

#include <cstdint>
#include <type_traits>

#include "params.cuh"

namespace attn_kernels {

// Offset of (batch z, head h) in a (Z, H, N, D) tensor with these strides.
__host__ __device__ constexpr int64_t head_offset(int z, int h, const Strides& s) {
  return static_cast<int64_t>(z) * s.batch + static_cast<int64_t>(h) * s.head;
}

// Offset of row `row` of one head.
__host__ __device__ constexpr int64_t row_offset(int row, int64_t row_stride) {
  return static_cast<int64_t>(row) * row_stride;
}

// Index of row 0 of (z, h) in a contiguous (Z, heads, len) float32 array (lse2, dlse, delta).
__host__ __device__ constexpr int64_t stats_offset(int z, int h, int heads, int len) {
  return (static_cast<int64_t>(z) * heads + h) * len;
}

// (query head, query tile) pairs one dK/dV CTA walks: group x ceil(L / BLOCK_M), up to
// heads_q x 2^26 (L < 2^31, BLOCK_M >= 32).
__host__ __device__ constexpr int64_t query_iterations(int group, int m_tiles) {
  return static_cast<int64_t>(group) * m_tiles;
}

// Compile-time checks with operands past 2^31 (no 4 GiB tensor needed): an int
// intermediate anywhere in these would wrap and fail the build.
static_assert(std::is_same<decltype(head_offset(0, 0, Strides{})), int64_t>::value &&
                  std::is_same<decltype(row_offset(0, 0)), int64_t>::value &&
                  std::is_same<decltype(stats_offset(0, 0, 0, 0)), int64_t>::value &&
                  std::is_same<decltype(query_iterations(0, 0)), int64_t>::value,
              "offsets must be 64-bit");
static_assert(head_offset(65535, 32767, Strides{int64_t{1} << 31, int64_t{1} << 24, 128}) ==
                  65535 * (int64_t{1} << 31) + 32767 * (int64_t{1} << 24),
              "batch / head offsets past 2^31");
static_assert(row_offset(INT32_MAX - 1024, 32 * 256) == (int64_t{INT32_MAX} - 1024) * 8192,
              "row offsets past 2^31");
static_assert(stats_offset(1023, 127, 128, INT32_MAX - 1024) == (int64_t{1023} * 128 + 127) * (INT32_MAX - 1024),
              "row-statistics offsets past 2^31");
static_assert(query_iterations(1 << 16, 1 << 26) == int64_t{1} << 42, "dK/dV iteration counts past 2^31");

}  // namespace attn_kernels
