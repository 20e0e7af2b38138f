// A CPU emulator for the attention kernels, for testing them on machines without a
// GPU. Not part of the extension: build_emulator.py compiles the kernel sources with
// the host compiler and `-include` of this header, which defines
// ATTN_KERNELS_EMULATED_PTX so that kernels/ptx.cuh and kernels/launch_utils.cuh leave
// cp.async, ldmatrix, mma.sync, the plain global accesses and the launch to the
// definitions below.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; __syncthreads and
// __syncwarp switch fibers. Warp collectives (ldmatrix, mma.sync, shuffles) exchange
// values through a per-warp buffer between two warp barriers, so each lane computes
// exactly what the PTX documentation says it receives.
//
// Memory model and checks (a violation fails the launch with cudaErrorIllegalAddress
// and a message naming the block, the thread and the access):
// - cp.async is asynchronous: the destination holds a NaN pattern from the copy until
//   the issuing thread's cp.async.wait_group retires its group; an ldmatrix of, or a
//   second cp.async to, a 16-byte chunk whose copy has not landed is reported (a missing
//   wait or barrier). Shared memory starts as NaN. Shared-memory addresses of cp.async /
//   ldmatrix are checked against the launch's dynamic size and 16-byte alignment.
// - Global memory: every access (cp.async sources, ld_global, st_global) must lie in
//   one of the tensors the launch's parameters describe (extents_of), and a store in
//   one the kernel writes; anything else is reported instead of touching memory.
//
// Schedules (environment ATTN_KERNELS_EMU_SCHEDULE, read at each launch): which warps
// go on when several could.
//   lockstep    every warp waiting at a warp barrier goes on; a block barrier releases all
//   ascending   (default) only the lowest warp waiting at a warp barrier goes on, so one
//               warp runs ahead to its next block barrier (a warp refilling a stage that
//               others still read shows); a block barrier releases all
//   descending  as ascending, highest warp first
//   staggered   as ascending, and a block barrier (and the launch) releases the warps one
//               at a time: each runs to its next block barrier before the next resumes,
//               so a warp that reads shared memory other threads copy with cp.async,
//               without a __syncthreads after their cp.async.wait_group, sees it unlanded
#pragma once

#define ATTN_KERNELS_EMULATED_PTX 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__

// An fp32 product that is never fused into an FMA (the build passes -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }

namespace attn_kernels {
struct FwdParams;
struct BwdParams;
}  // namespace attn_kernels

namespace emu {

struct Index3 {
  unsigned x, y, z;
};

Index3 thread_index();
Index3 block_index();
void sync_block();
void sync_warp();
float shfl_xor(float value, int lane_mask);

// Global memory a launch may access: one tensor of its parameters.
struct Extent {
  const char* name;
  uintptr_t begin, end;  // bytes [begin, end)
  bool writable;
};
using Extents = std::vector<Extent>;
Extents extents_of(const attn_kernels::FwdParams& p);
Extents extents_of(const attn_kernels::BwdParams& p);

// Whether [ptr, ptr + bytes) lies in one extent of the running launch (a writable one
// for a store); if not, the launch fails with a message saying where the access went.
bool check_global(const void* ptr, size_t bytes, bool store);

// Run every block of a 1-D grid, one after the other; false if a check failed
// (message in last_error()).
bool run_grid(unsigned blocks, int threads, int smem_bytes, Extents extents, const std::function<void()>& body);
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

// Checked plain global accesses: an access outside the launch's tensors reads zeros /
// writes nothing, and fails the launch.
template <typename T>
inline T ld_global(const T* ptr) {
  return emu::check_global(ptr, sizeof(T), false) ? *ptr : T{};
}

template <typename T>
inline void st_global(T* ptr, const T& value) {
  if (emu::check_global(ptr, sizeof(T), true)) *ptr = value;
}

// The launch of launch_utils.cuh, on the emulator.
template <typename Params>
cudaError_t checked_launch(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                           const Params& params) {
  if (grid.x == 0) return cudaSuccess;
  if (smem_bytes > emu::kMaxSmemBytes) return cudaErrorInvalidValue;
  const bool ok = emu::run_grid(grid.x, threads, smem_bytes, emu::extents_of(params), [&] { kernel(params); });
  return ok ? cudaSuccess : cudaErrorIllegalAddress;
}

}  // namespace attn_kernels
