// C++ entry points of the CUDA backend, between bindings.cpp and attention.cu.
// Plain C++: no CUDA and no torch types; device pointers and the cudaStream_t travel
// as integers (what torch's data_ptr() and Stream.cuda_stream give).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace attn_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// A (Z, heads, rows, head_dim) tensor: {data pointer, stride of Z, of heads, of rows}
// in elements; the last dim is contiguous.
using TensorArg = std::array<int64_t, 4>;

struct Sizes {
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
};

struct ForwardArgs {
  DType dtype;
  TensorArg q, k, v, out;
  int64_t lse2;  // float32 (Z, Hq, L), contiguous: the log-sum-exp in base 2
  Sizes sizes;
  double scale;
  bool causal;
  int device;
  int64_t stream;
};

struct BackwardArgs {
  DType dtype;
  TensorArg q, k, v, out, dout, dq, dk, dv;
  int64_t lse2, dlse, delta;  // float32 (Z, Hq, L), contiguous; lse2 from the forward (base 2);
                              // dlse (w.r.t. the natural-log lse) may be 0 (none)
  Sizes sizes;
  double scale;
  bool causal;
  int device;
  int64_t stream;
};

enum class StatusCode { kOk = 0, kInvalidArgument = 1, kCudaError = 2 };

struct Status {
  StatusCode code;
  std::string message;  // names the kernel and the CUDA error when code is kCudaError
};

// out, lse2 = attention(q, k, v); launched on stream, not synchronised.
Status attention_forward(const ForwardArgs& args);

// dq, dk, dv from dout (and dlse); three kernels on stream (delta, dK/dV, dQ).
Status attention_backward(const BackwardArgs& args);

std::vector<int> supported_head_dims();

// The most dynamic shared memory per block any kernel of this head dim asks for (0 if
// the head dim is not compiled): a GPU whose opt-in limit is lower cannot run it.
int max_smem_bytes(int64_t head_dim);

// Whether this module's CUDA runtime sees a device (cudaGetDeviceCount), without
// launching anything; device_count is 0 on failure.
Status cuda_runtime_status(int* device_count);

int cuda_runtime_version();  // e.g. 13000 for CUDA 13.0

}  // namespace attn_kernels
