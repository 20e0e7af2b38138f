// The CPU emulator of cuda_emulator.h: fibers, barriers, warp collectives, cp.async,
// ldmatrix, mma.sync, and stand-ins for the few CUDA runtime calls attention.cu makes.
#include "cuda_emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace attn_kernels {
alignas(128) unsigned char smem[emu::kMaxSmemBytes];
}

namespace emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr int kExchangeWords = 8;

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  std::vector<std::vector<Copy>> committed;  // oldest first
  std::vector<Copy> open;
};

struct Block {
  unsigned index = 0;
  int threads = 0;
  int smem_bytes = 0;
  int current = -1;
  const std::function<void()>* body = nullptr;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange;  // kExchangeWords per thread
};

thread_local Block* g_block = nullptr;
thread_local std::string g_error;

Fiber& self() { return g_block->fibers[g_block->current]; }
uint64_t* slot(int thread) { return &g_block->exchange[static_cast<size_t>(thread) * kExchangeWords]; }
int warp_base() { return g_block->current & ~31; }
int lane() { return g_block->current & 31; }

void fail(const std::string& message) {
  if (g_error.empty()) {
    g_error = "block " + std::to_string(g_block->index) + ", thread " + std::to_string(g_block->current) + ": " +
              message;
  }
}

void yield(State state) {
  Fiber& f = self();
  f.state = state;
  swapcontext(&f.context, &g_block->scheduler);
}

void fiber_main(int thread) {
  (*g_block->body)();
  g_block->fibers[thread].state = State::kDone;
}  // returns to uc_link, the scheduler

bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= attn_kernels::smem && c + bytes <= attn_kernels::smem + g_block->smem_bytes;
}

// Which warps go on when several wait at a warp barrier: all of them (lockstep), or
// only the lowest / highest, so that one warp runs ahead to its next block barrier
// and a missing __syncthreads (a warp overwriting a stage others still read) shows.
enum class Schedule { kLockstep, kAscending, kDescending };

Schedule schedule() {
  const char* v = std::getenv("ATTN_KERNELS_EMU_SCHEDULE");
  if (v == nullptr || std::strcmp(v, "ascending") == 0) return Schedule::kAscending;
  if (std::strcmp(v, "descending") == 0) return Schedule::kDescending;
  return Schedule::kLockstep;
}

// Release waiting warps (see Schedule), else the block if every live thread waits at
// the block barrier. False on a deadlock.
bool release(Block& b) {
  std::vector<int> ready;  // first thread of each warp whose live lanes all wait at a warp barrier
  for (int w0 = 0; w0 < b.threads; w0 += 32) {
    bool any = false, all = true;
    for (int t = w0; t < w0 + 32 && t < b.threads; ++t) {
      if (b.fibers[t].state == State::kDone) continue;
      any = true;
      all &= b.fibers[t].state == State::kWarpBarrier;
    }
    if (any && all) ready.push_back(w0);
  }
  if (!ready.empty()) {
    const Schedule policy = schedule();
    if (policy == Schedule::kAscending) ready.resize(1);
    if (policy == Schedule::kDescending) ready.erase(ready.begin(), ready.end() - 1);
    for (int w0 : ready) {
      for (int t = w0; t < w0 + 32 && t < b.threads; ++t) {
        if (b.fibers[t].state != State::kDone) b.fibers[t].state = State::kReady;
      }
    }
    return true;
  }
  bool all = true;
  for (const Fiber& f : b.fibers) all &= f.state == State::kDone || f.state == State::kBlockBarrier;
  if (!all) return false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kDone) f.state = State::kReady;
  }
  return true;
}

bool run_block(Block& b) {
  std::memset(attn_kernels::smem, 0xff, sizeof(attn_kernels::smem));  // NaN in fp16 / bf16 / fp32
  b.fibers.clear();
  b.fibers.resize(b.threads);
  b.exchange.assign(static_cast<size_t>(b.threads) * kExchangeWords, 0);
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 1, t);
  }
  while (true) {
    for (int t = 0; t < b.threads; ++t) {
      if (b.fibers[t].state != State::kReady) continue;
      b.current = t;
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
    bool done = true;
    for (const Fiber& f : b.fibers) done &= f.state == State::kDone;
    if (done) break;
    if (!release(b)) {
      std::fprintf(stderr, "emulator: deadlock in block %u (threads wait at different barriers)\n", b.index);
      std::abort();
    }
  }
  for (const Fiber& f : b.fibers) {
    if (!f.committed.empty() || !f.open.empty()) {
      b.current = static_cast<int>(&f - b.fibers.data());
      fail("exited with cp.async copies that were never waited for");
    }
  }
  return g_error.empty();
}

void apply(const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

uint16_t b16_at(const void* row, int element) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * element, 2);
  return v;
}

float to_float(uint16_t bits, const __half*) {
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

float to_float(uint16_t bits, const __nv_bfloat16*) {
  __nv_bfloat16 h;
  std::memcpy(&h, &bits, 2);
  return __bfloat162float(h);
}

const void* checked_row(const void* p) {
  if (!in_smem(p, 16) || reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fail("ldmatrix row address outside the dynamic shared memory or not 16-byte aligned");
    return attn_kernels::smem;
  }
  return p;
}

}  // namespace

Index3 thread_index() { return {static_cast<unsigned>(g_block->current), 0, 0}; }
Index3 block_index() { return {g_block->index, 0, 0}; }
void sync_block() { yield(State::kBlockBarrier); }
void sync_warp() { yield(State::kWarpBarrier); }

float shfl_xor(float value, int lane_mask) {
  std::memcpy(slot(g_block->current), &value, 4);
  sync_warp();
  float other;
  std::memcpy(&other, slot(warp_base() + (lane() ^ lane_mask)), 4);
  sync_warp();
  return other;
}

bool run_grid(unsigned blocks, int threads, int smem_bytes, const std::function<void()>& body) {
  g_error.clear();
  Block b;
  b.threads = threads;
  b.smem_bytes = smem_bytes;
  b.body = &body;
  Block* outer = g_block;
  g_block = &b;
  bool ok = true;
  for (unsigned i = 0; i < blocks && ok; ++i) {
    b.index = i;
    ok = run_block(b);
  }
  g_block = outer;
  return ok;
}

const char* last_error() { return g_error.c_str(); }

}  // namespace emu

namespace attn_kernels {

void cp_async_16(void* smem_ptr, const void* gmem, bool valid) {
  using namespace emu;
  if (!in_smem(smem_ptr, 16) || reinterpret_cast<uintptr_t>(smem_ptr) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)) {
    fail("cp.async to an address outside the dynamic shared memory, or misaligned");
    return;
  }
  std::memset(smem_ptr, 0xff, 16);  // not there yet
  self().open.push_back({smem_ptr, gmem, valid});
}

void cp_async_commit() {
  emu::Fiber& f = emu::self();
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait_n(int n) {
  emu::Fiber& f = emu::self();
  while (static_cast<int>(f.committed.size()) > n) {
    for (const emu::Copy& c : f.committed.front()) emu::apply(c);
    f.committed.erase(f.committed.begin());
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_ptr) {
  using namespace emu;
  slot(g_block->current)[0] = reinterpret_cast<uint64_t>(checked_row(smem_ptr));
  sync_warp();
  const int t = lane();
  for (int j = 0; j < 4; ++j) {
    // matrix j, row t / 4 (addressed by lane 8j + t / 4), columns 2(t % 4), +1
    const void* row = reinterpret_cast<const void*>(slot(warp_base() + 8 * j + t / 4)[0]);
    r[j] = b16_at(row, 2 * (t % 4)) | (static_cast<uint32_t>(b16_at(row, 2 * (t % 4) + 1)) << 16);
  }
  sync_warp();
}

void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_ptr) {
  using namespace emu;
  slot(g_block->current)[0] = reinterpret_cast<uint64_t>(checked_row(smem_ptr));
  sync_warp();
  const int t = lane();
  for (int j = 0; j < 4; ++j) {
    // matrix j, rows 2(t % 4) and 2(t % 4) + 1, column t / 4
    const void* row0 = reinterpret_cast<const void*>(slot(warp_base() + 8 * j + 2 * (t % 4))[0]);
    const void* row1 = reinterpret_cast<const void*>(slot(warp_base() + 8 * j + 2 * (t % 4) + 1)[0]);
    r[j] = b16_at(row0, t / 4) | (static_cast<uint32_t>(b16_at(row1, t / 4)) << 16);
  }
  sync_warp();
}

template <typename T>
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace emu;
  uint64_t* mine = slot(g_block->current);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  sync_warp();
  // the whole A (16 x 16) and B (16 x 8, k x n) from the PTX fragment layouts
  float A[16][16], B[16][8];
  const T* tag = nullptr;
  for (int l = 0; l < 32; ++l) {
    const uint64_t* s = slot(warp_base() + l);
    const int g = l / 4, c = l % 4;
    auto lo = [&](uint64_t w) { return to_float(static_cast<uint16_t>(w & 0xffff), tag); };
    auto hi = [&](uint64_t w) { return to_float(static_cast<uint16_t>((w >> 16) & 0xffff), tag); };
    A[g][2 * c] = lo(s[0]);
    A[g][2 * c + 1] = hi(s[0]);
    A[g + 8][2 * c] = lo(s[1]);
    A[g + 8][2 * c + 1] = hi(s[1]);
    A[g][2 * c + 8] = lo(s[2]);
    A[g][2 * c + 9] = hi(s[2]);
    A[g + 8][2 * c + 8] = lo(s[3]);
    A[g + 8][2 * c + 9] = hi(s[3]);
    B[2 * c][g] = lo(s[4]);
    B[2 * c + 1][g] = hi(s[4]);
    B[2 * c + 8][g] = lo(s[5]);
    B[2 * c + 9][g] = hi(s[5]);
  }
  const int g = lane() / 4, c = lane() % 4;
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
  for (int e = 0; e < 4; ++e) {
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum += A[rows[e]][k] * B[k][cols[e]];
    d[e] = sum;
  }
  sync_warp();
}

template void mma_16x8x16<__half>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t);
template void mma_16x8x16<__nv_bfloat16>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t);

}  // namespace attn_kernels

// The CUDA runtime calls attention.cu makes, for one emulated device.
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t error) {
  return error == cudaErrorIllegalAddress ? "cudaErrorIllegalAddress (emulator)" : "cudaError (emulator)";
}
const char* cudaGetErrorString(cudaError_t) { return emu::last_error(); }
}
