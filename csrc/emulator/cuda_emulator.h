// A CPU emulator for the attention kernels, for testing them on machines without a
// GPU. Not part of the extension: build_emulator.py compiles the kernel sources with
// the host compiler and `-include` of this header, which defines
// ATTN_KERNELS_EMULATED_PTX so that kernels/ptx.cuh and kernels/launch_utils.cuh leave
// cp.async, ldmatrix, mma.sync and the launch to the definitions below.
//
// Each CUDA thread of a block is a fiber (ucontext) run round-robin on one OS thread;
// __syncthreads and __syncwarp switch fibers and release when every live thread of
// the block / warp has arrived. Warp collectives (ldmatrix, mma.sync, shuffles)
// exchange values through a per-warp buffer between two warp barriers, so each lane
// computes exactly what the PTX documentation says it receives. cp.async is modelled
// as asynchronous: the destination holds a NaN pattern from the copy until the issuing
// thread's cp.async.wait_group retires its group, and shared memory starts as NaN,
// so a missing wait or barrier shows up as NaN in the results. Shared-memory
// addresses of cp.async / ldmatrix are checked against the launch's dynamic size and
// for 16-byte alignment; a violation makes the launch return cudaErrorIllegalAddress.
#pragma once

#define ATTN_KERNELS_EMULATED_PTX 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <functional>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__

namespace emu {

struct Index3 {
  unsigned x, y, z;
};

Index3 thread_index();
Index3 block_index();
void sync_block();
void sync_warp();
float shfl_xor(float value, int lane_mask);

// Run every block of a 1-D grid, one after the other; false if a check failed
// (message in last_error()).
bool run_grid(unsigned blocks, int threads, int smem_bytes, const std::function<void()>& body);
const char* last_error();

constexpr int kMaxSmemBytes = 227 * 1024;  // sm_90's opt-in maximum

}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define __syncthreads() ::emu::sync_block()
#define __syncwarp() ::emu::sync_warp()
#define __shfl_xor_sync(mask, value, lane_mask) ::emu::shfl_xor((value), (lane_mask))

namespace attn_kernels {

extern unsigned char smem[];  // the kernels' extern __shared__ array (one block at a time)

inline int min(int a, int b) { return a < b ? a : b; }

void cp_async_16(void* smem_ptr, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait_n(int n);
template <int N>
inline void cp_async_wait() {
  cp_async_wait_n(N);
}
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_ptr);
void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_ptr);
template <typename T>
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// The launch of launch_utils.cuh, on the emulator.
template <typename Params>
cudaError_t checked_launch(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                           const Params& params) {
  if (grid.x == 0) return cudaSuccess;
  if (smem_bytes > emu::kMaxSmemBytes) return cudaErrorInvalidValue;
  const bool ok = emu::run_grid(grid.x, threads, smem_bytes, [&] { kernel(params); });
  return ok ? cudaSuccess : cudaErrorIllegalAddress;
}

}  // namespace attn_kernels
