// The CPU emulator of cuda_emulator.h: fibers, schedules, barriers, warp collectives,
// cp.async, ldmatrix, mma.sync, checked global accesses, and stand-ins for the few CUDA
// runtime calls attention.cu makes.
#include "cuda_emulator.h"

#include <ucontext.h>

#include "kernels/params.cuh"

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
constexpr int kChunk = 16;  // bytes of one cp.async

// kPassed: a block barrier this thread waited at has completed, but the staggered
// schedule has not resumed its warp yet
enum class State { kReady, kBlockBarrier, kPassed, kWarpBarrier, kDone };

enum class Schedule { kLockstep, kAscending, kDescending, kStaggered };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  std::vector<std::vector<Copy>> committed;  // oldest first
  std::vector<Copy> open;
};

struct Block {
  unsigned index = 0;
  int threads = 0;
  int smem_bytes = 0;
  int current = -1;
  Schedule schedule = Schedule::kAscending;
  Extents extents;
  const std::function<void()>* body = nullptr;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;  // one per thread, reused by every block of a launch
  std::vector<uint64_t> exchange;               // kExchangeWords per thread
  std::vector<int> in_flight;      // per 16-byte chunk of smem: 1 + the thread whose cp.async has not landed, or 0
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

std::string hex(uintptr_t value) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(value));
  return text;
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

size_t smem_chunk(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - attn_kernels::smem) / kChunk;
}

bool parse_schedule(Schedule* schedule) {
  const char* v = std::getenv("ATTN_KERNELS_EMU_SCHEDULE");
  const std::pair<const char*, Schedule> names[] = {{"lockstep", Schedule::kLockstep},
                                                    {"ascending", Schedule::kAscending},
                                                    {"descending", Schedule::kDescending},
                                                    {"staggered", Schedule::kStaggered}};
  if (v == nullptr || *v == '\0') {
    *schedule = Schedule::kAscending;
    return true;
  }
  for (const auto& name : names) {
    if (std::strcmp(v, name.first) == 0) {
      *schedule = name.second;
      return true;
    }
  }
  g_error = std::string("ATTN_KERNELS_EMU_SCHEDULE=") + v +
            " is not a schedule of the emulator (lockstep, ascending, descending, staggered)";
  return false;
}

// warp_any: some thread of the warp starting at w0 is in state s; warp_all: every live
// one is (and one is live).
bool warp_any(const Block& b, int w0, State s) {
  for (int t = w0; t < w0 + 32 && t < b.threads; ++t) {
    if (b.fibers[t].state == s) return true;
  }
  return false;
}

bool warp_all(const Block& b, int w0, State s) {
  bool any = false;
  for (int t = w0; t < w0 + 32 && t < b.threads; ++t) {
    if (b.fibers[t].state == State::kDone) continue;
    if (b.fibers[t].state != s) return false;
    any = true;
  }
  return any;
}

void resume_warp(Block& b, int w0) {
  for (int t = w0; t < w0 + 32 && t < b.threads; ++t) {
    if (b.fibers[t].state != State::kDone) b.fibers[t].state = State::kReady;
  }
}

// Called when no thread is ready: resume warps waiting at a warp barrier (see Schedule),
// else (staggered) the next warp past the last block barrier, else complete the block
// barrier if every live thread waits at it. False on a deadlock.
bool release(Block& b) {
  std::vector<int> ready;  // first thread of each warp whose live lanes all wait at a warp barrier
  for (int w0 = 0; w0 < b.threads; w0 += 32) {
    if (warp_all(b, w0, State::kWarpBarrier)) ready.push_back(w0);
  }
  if (!ready.empty()) {
    if (b.schedule == Schedule::kAscending || b.schedule == Schedule::kStaggered) ready.resize(1);
    if (b.schedule == Schedule::kDescending) ready.erase(ready.begin(), ready.end() - 1);
    for (int w0 : ready) resume_warp(b, w0);
    return true;
  }
  for (int w0 = 0; w0 < b.threads; w0 += 32) {
    if (warp_any(b, w0, State::kPassed)) {
      resume_warp(b, w0);
      return true;
    }
  }
  for (const Fiber& f : b.fibers) {
    if (f.state != State::kDone && f.state != State::kBlockBarrier) return false;
  }
  const State next = b.schedule == Schedule::kStaggered ? State::kPassed : State::kReady;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kDone) f.state = next;
  }
  return true;
}

bool run_block(Block& b) {
  std::memset(attn_kernels::smem, 0xff, sizeof(attn_kernels::smem));  // NaN in fp16 / bf16 / fp32
  b.fibers.clear();
  b.fibers.resize(b.threads);
  b.exchange.assign(static_cast<size_t>(b.threads) * kExchangeWords, 0);
  b.in_flight.assign(static_cast<size_t>(b.smem_bytes) / kChunk + 1, 0);
  // staggered: the launch, too, starts the warps one at a time
  const State start = b.schedule == Schedule::kStaggered ? State::kPassed : State::kReady;
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = start;
    if (b.stacks.size() <= static_cast<size_t>(t)) b.stacks.emplace_back(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = b.stacks[t].get();
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
      // the fibers are abandoned mid-kernel: the kernels hold no resources on their stacks
      b.current = 0;
      fail("deadlock: the threads wait at different barriers");
      return false;
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
  g_block->in_flight[smem_chunk(c.dst)] = 0;
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
  const int owner = g_block->in_flight[smem_chunk(p)];
  if (owner != 0) {
    fail("ldmatrix reads shared memory (byte " + std::to_string(smem_chunk(p) * kChunk) +
         ") that a cp.async of thread " + std::to_string(owner - 1) +
         " has not landed yet: a missing cp.async.wait_group or __syncthreads");
  }
  return p;
}

// Where a global access outside every extent went, for the message.
std::string describe_miss(uintptr_t at, size_t bytes) {
  std::string nearest;
  uintptr_t best = UINTPTR_MAX;
  for (const Extent& e : g_block->extents) {
    if (e.begin <= at && at + bytes <= e.end) return std::string("inside ") + e.name + ", which this launch only reads";
    const uintptr_t distance = at + bytes <= e.begin ? e.begin - at : at >= e.end ? at - e.end + 1 : 0;
    if (distance < best) {
      best = distance;
      nearest = std::string(e.name) + " [" + hex(e.begin) + ", " + hex(e.end) + ")";
      if (at >= e.end) {
        nearest += ", " + std::to_string(at - e.end) + " bytes past its end";
      } else if (at + bytes <= e.begin) {
        nearest += ", " + std::to_string(e.begin - at) + " bytes before its start";
      } else {
        nearest += ", straddling its bounds";
      }
    }
  }
  return nearest.empty() ? "the launch has no tensors" : "nearest tensor: " + nearest;
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

bool run_grid(unsigned blocks, int threads, int smem_bytes, Extents extents, const std::function<void()>& body) {
  g_error.clear();
  Block b;
  if (!parse_schedule(&b.schedule)) return false;
  b.threads = threads;
  b.smem_bytes = smem_bytes;
  b.extents = std::move(extents);
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

bool check_global(const void* ptr, size_t bytes, bool store) {
  const auto at = reinterpret_cast<uintptr_t>(ptr);
  for (const Extent& e : g_block->extents) {
    if (e.begin <= at && at + bytes <= e.end && (e.writable || !store)) return true;
  }
  fail(std::string("global ") + (store ? "store" : "load") + " of " + std::to_string(bytes) + " bytes at " + hex(at) +
       " is outside every tensor this launch may " + (store ? "write" : "read") + " (" +
       describe_miss(at, bytes) + ")");
  return false;
}

namespace {

// Bytes [ptr, ptr + span) of a (Z, H, N, D) 16-bit tensor with these strides; empty if
// any size is 0.
Extent tensor_extent(const char* name, const void* ptr, int z, int h, int n, int d, const attn_kernels::Strides& s,
                     bool writable) {
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  if (z <= 0 || h <= 0 || n <= 0 || d <= 0) return {name, begin, begin, writable};
  const int64_t span = (z - 1) * s.batch + (h - 1) * s.head + (n - 1) * s.row + d;
  return {name, begin, begin + static_cast<uintptr_t>(span) * 2, writable};
}

Extent rows_extent(const char* name, const float* ptr, const int64_t rows, bool writable) {
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  return {name, begin, ptr == nullptr ? begin : begin + static_cast<uintptr_t>(rows) * sizeof(float), writable};
}

}  // namespace

Extents extents_of(const attn_kernels::FwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  return {
      tensor_extent("q", p.q, p.batch, p.heads_q, p.len_q, p.head_dim, p.q_str, false),
      tensor_extent("k", p.k, p.batch, p.heads_kv, p.len_k, p.head_dim, p.k_str, false),
      tensor_extent("v", p.v, p.batch, p.heads_kv, p.len_k, p.head_dim, p.v_str, false),
      tensor_extent("out", p.out, p.batch, p.heads_q, p.len_q, p.head_dim, p.out_str, true),
      rows_extent("lse2", p.lse2, rows, true),
  };
}

Extents extents_of(const attn_kernels::BwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  return {
      tensor_extent("q", p.q, p.batch, p.heads_q, p.len_q, p.head_dim, p.q_str, false),
      tensor_extent("k", p.k, p.batch, p.heads_kv, p.len_k, p.head_dim, p.k_str, false),
      tensor_extent("v", p.v, p.batch, p.heads_kv, p.len_k, p.head_dim, p.v_str, false),
      tensor_extent("out", p.out, p.batch, p.heads_q, p.len_q, p.head_dim, p.out_str, false),
      tensor_extent("dout", p.dout, p.batch, p.heads_q, p.len_q, p.head_dim, p.dout_str, false),
      tensor_extent("dq", p.dq, p.batch, p.heads_q, p.len_q, p.head_dim, p.dq_str, true),
      tensor_extent("dk", p.dk, p.batch, p.heads_kv, p.len_k, p.head_dim, p.dk_str, true),
      tensor_extent("dv", p.dv, p.batch, p.heads_kv, p.len_k, p.head_dim, p.dv_str, true),
      rows_extent("lse2", p.lse2, rows, false),
      rows_extent("dlse", p.dlse, rows, false),
      rows_extent("delta", p.delta, rows, true),
  };
}

}  // namespace emu

namespace attn_kernels {

void cp_async_16(void* smem_ptr, const void* gmem, bool valid) {
  using namespace emu;
  if (!in_smem(smem_ptr, 16) || reinterpret_cast<uintptr_t>(smem_ptr) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)) {
    fail("cp.async to an address outside the dynamic shared memory, or misaligned");
    return;
  }
  if (valid && !check_global(gmem, 16, false)) valid = false;  // reported; zero-filled instead
  int& owner = g_block->in_flight[smem_chunk(smem_ptr)];
  if (owner != 0) {
    fail("cp.async to shared memory (byte " + std::to_string(smem_chunk(smem_ptr) * kChunk) +
         ") that a cp.async of thread " + std::to_string(owner - 1) + " has not landed yet");
  }
  owner = g_block->current + 1;
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
