// Argument checks and dispatch of the CUDA backend: validates pointers, strides and
// sizes (before anything touches the GPU, so bad calls fail as ValueError), picks the
// launcher for the dtype and head dim, and turns CUDA errors into messages naming the
// kernel. Causal is a runtime flag of every kernel (it only changes which tiles are
// visited and masked), so it doubles no instantiation.
//
// ATTN_KERNELS_CUDA_SYNC=1 synchronises the stream after each launch, so that an
// asynchronous fault is reported against the kernel that caused it (for debugging).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention.h"
#include "kernels/launch_utils.cuh"
#include "kernels/launchers.cuh"

namespace attn_kernels {
namespace {

constexpr int kHeadDims[] = {32, 64, 96, 128, 256};
constexpr int64_t kMaxLen = INT32_MAX - 1024;  // row indices are int in the kernels

template <typename T>
struct TypeTag {
  using type = T;
};

Status ok() { return {StatusCode::kOk, ""}; }
Status invalid(const std::string& message) { return {StatusCode::kInvalidArgument, message}; }

const char* dtype_name(DType dtype) { return dtype == DType::kFloat16 ? "float16" : "bfloat16"; }

std::string kernel_name(const char* kernel, DType dtype, int64_t head_dim) {
  return std::string(kernel) + "<" + dtype_name(dtype) + ", " + std::to_string(head_dim) + ">";
}

Status cuda_failure(const std::string& what, cudaError_t err) {
  return {StatusCode::kCudaError,
          what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")"};
}

bool sync_after_launch() {
  static const bool on = [] {
    const char* value = std::getenv("ATTN_KERNELS_CUDA_SYNC");
    return value != nullptr && value[0] == '1';
  }();
  return on;
}

Status check_tensor(const char* name, const TensorArg& t, int64_t elements) {
  if (elements > 0 && t[0] == 0) return invalid(std::string(name) + " is a null pointer");
  if (t[0] % 16 != 0) return invalid(std::string(name) + " must be 16-byte aligned");
  for (int i = 1; i < 4; ++i) {
    if (t[i] < 0 || t[i] % 8 != 0) {
      return invalid(std::string(name) + " strides must be non-negative multiples of 8 elements (16 bytes), got " +
                     std::to_string(t[i]) + " for dim " + std::to_string(i - 1));
    }
  }
  return ok();
}

Status check_rows(const char* name, int64_t ptr, int64_t elements) {
  if (elements > 0 && ptr == 0) return invalid(std::string(name) + " is a null pointer");
  if (ptr % 4 != 0) return invalid(std::string(name) + " must be 4-byte aligned");
  return ok();
}

Status check_sizes(const Sizes& s, DType dtype, double scale) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return invalid("dtype must be float16 or bfloat16");
  if (s.batch < 0 || s.heads_q < 0 || s.len_q < 0 || s.len_k < 0) return invalid("sizes must be non-negative");
  if (s.heads_kv < 1 || s.heads_q % s.heads_kv != 0) {
    return invalid("heads_q (" + std::to_string(s.heads_q) + ") must be a multiple of heads_kv (" +
                   std::to_string(s.heads_kv) + ")");
  }
  if (s.len_q > kMaxLen || s.len_k > kMaxLen || s.batch * s.heads_q > INT32_MAX || s.batch * s.heads_kv > INT32_MAX) {
    return invalid("sequence lengths and batch * heads must fit in 31 bits");
  }
  bool compiled = false;
  for (int d : kHeadDims) compiled |= s.head_dim == d;
  if (!compiled) {
    return invalid("head dim " + std::to_string(s.head_dim) + " is not compiled (supported: 32, 64, 96, 128, 256)");
  }
  // element counts (computed by the callers in int64) must not overflow: < 2^62 each
  const int64_t rows_q = s.batch * s.heads_q, rows_kv = s.batch * s.heads_kv;  // < 2^31 each
  if ((s.len_q > 0 && rows_q > (int64_t{1} << 62) / (s.len_q * s.head_dim)) ||
      (s.len_k > 0 && rows_kv > (int64_t{1} << 62) / (s.len_k * s.head_dim))) {
    return invalid("tensor sizes must have fewer than 2^62 elements");
  }
  if (!std::isfinite(scale)) return invalid("scale must be finite");
  return ok();
}

// Make device current in this module's CUDA runtime (a no-op when it already is).
Status use_device(int device, const std::string& kernel) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_failure(kernel + ": selecting device " + std::to_string(device), err);
  }
  return ok();
}

Status launched(cudaError_t err, const std::string& kernel, cudaStream_t stream) {
  if (err == cudaSuccess && sync_after_launch()) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cuda_failure(kernel, err);
  return ok();
}

// f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the runtime dtype and head dim.
template <typename F>
Status dispatch(DType dtype, int64_t head_dim, F&& f) {
  auto by_dim = [&](auto type) -> Status {
    switch (head_dim) {
      case 32: return f(type, std::integral_constant<int, 32>{});
      case 64: return f(type, std::integral_constant<int, 64>{});
      case 96: return f(type, std::integral_constant<int, 96>{});
      case 128: return f(type, std::integral_constant<int, 128>{});
      case 256: return f(type, std::integral_constant<int, 256>{});
      default: return invalid("head dim " + std::to_string(head_dim) + " is not compiled");
    }
  };
  if (dtype == DType::kFloat16) return by_dim(TypeTag<__half>{});
  return by_dim(TypeTag<__nv_bfloat16>{});
}

Strides strides_of(const TensorArg& t) { return {t[1], t[2], t[3]}; }

// The problem sizes and softmax constants both parameter structs share.
template <typename Params>
void set_problem(Params& p, const Sizes& s, double scale, bool causal) {
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_kv = static_cast<int>(s.heads_kv);
  p.len_q = static_cast<int>(s.len_q);
  p.len_k = static_cast<int>(s.len_k);
  p.head_dim = static_cast<int>(s.head_dim);
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.causal = causal;
}

}  // namespace

Status attention_forward(const ForwardArgs& a) {
  const Sizes& s = a.sizes;
  Status st = check_sizes(s, a.dtype, a.scale);
  const int64_t q_elems = s.batch * s.heads_q * s.len_q * s.head_dim;
  const int64_t kv_elems = s.batch * s.heads_kv * s.len_k * s.head_dim;
  if (st.code == StatusCode::kOk) st = check_tensor("q", a.q, q_elems);
  if (st.code == StatusCode::kOk) st = check_tensor("k", a.k, kv_elems);
  if (st.code == StatusCode::kOk) st = check_tensor("v", a.v, kv_elems);
  if (st.code == StatusCode::kOk) st = check_tensor("out", a.out, q_elems);
  if (st.code == StatusCode::kOk) st = check_rows("lse2", a.lse2, s.batch * s.heads_q * s.len_q);
  if (st.code != StatusCode::kOk) return st;
  if (q_elems == 0) return ok();  // nothing to write

  FwdParams p{};
  p.q = reinterpret_cast<const void*>(a.q[0]);
  p.k = reinterpret_cast<const void*>(a.k[0]);
  p.v = reinterpret_cast<const void*>(a.v[0]);
  p.out = reinterpret_cast<void*>(a.out[0]);
  p.lse2 = reinterpret_cast<float*>(a.lse2);
  p.q_str = strides_of(a.q);
  p.k_str = strides_of(a.k);
  p.v_str = strides_of(a.v);
  p.out_str = strides_of(a.out);
  set_problem(p, s, a.scale, a.causal);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);

  return dispatch(a.dtype, s.head_dim, [&](auto type, auto dim) -> Status {
    using T = typename decltype(type)::type;
    constexpr int D = decltype(dim)::value;
    const std::string name = kernel_name("attention_fwd", a.dtype, D);
    Status used = use_device(a.device, name);
    if (used.code != StatusCode::kOk) return used;
    return launched(launch_attention_fwd<T, D>(p, stream), name, stream);
  });
}

Status attention_backward(const BackwardArgs& a) {
  const Sizes& s = a.sizes;
  Status st = check_sizes(s, a.dtype, a.scale);
  const int64_t q_elems = s.batch * s.heads_q * s.len_q * s.head_dim;
  const int64_t kv_elems = s.batch * s.heads_kv * s.len_k * s.head_dim;
  const int64_t rows = s.batch * s.heads_q * s.len_q;
  const std::pair<const char*, const TensorArg*> q_like[] = {{"q", &a.q}, {"out", &a.out}, {"dout", &a.dout},
                                                              {"dq", &a.dq}};
  const std::pair<const char*, const TensorArg*> kv_like[] = {{"k", &a.k}, {"v", &a.v}, {"dk", &a.dk}, {"dv", &a.dv}};
  for (const auto& t : q_like) {
    if (st.code == StatusCode::kOk) st = check_tensor(t.first, *t.second, q_elems);
  }
  for (const auto& t : kv_like) {
    if (st.code == StatusCode::kOk) st = check_tensor(t.first, *t.second, kv_elems);
  }
  if (st.code == StatusCode::kOk) st = check_rows("lse2", a.lse2, rows);
  if (st.code == StatusCode::kOk) st = check_rows("delta", a.delta, rows);
  if (st.code == StatusCode::kOk) st = check_rows("dlse", a.dlse, 0);  // optional
  if (st.code != StatusCode::kOk) return st;
  if (q_elems == 0 && kv_elems == 0) return ok();

  BwdParams p{};
  p.q = reinterpret_cast<const void*>(a.q[0]);
  p.k = reinterpret_cast<const void*>(a.k[0]);
  p.v = reinterpret_cast<const void*>(a.v[0]);
  p.out = reinterpret_cast<const void*>(a.out[0]);
  p.dout = reinterpret_cast<const void*>(a.dout[0]);
  p.dq = reinterpret_cast<void*>(a.dq[0]);
  p.dk = reinterpret_cast<void*>(a.dk[0]);
  p.dv = reinterpret_cast<void*>(a.dv[0]);
  p.lse2 = reinterpret_cast<const float*>(a.lse2);
  p.dlse = reinterpret_cast<const float*>(a.dlse);  // nullptr when 0
  p.delta = reinterpret_cast<float*>(a.delta);
  p.q_str = strides_of(a.q);
  p.k_str = strides_of(a.k);
  p.v_str = strides_of(a.v);
  p.out_str = strides_of(a.out);
  p.dout_str = strides_of(a.dout);
  p.dq_str = strides_of(a.dq);
  p.dk_str = strides_of(a.dk);
  p.dv_str = strides_of(a.dv);
  set_problem(p, s, a.scale, a.causal);
  p.scale = static_cast<float>(a.scale);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);

  return dispatch(a.dtype, s.head_dim, [&](auto type, auto dim) -> Status {
    using T = typename decltype(type)::type;
    constexpr int D = decltype(dim)::value;
    Status used = use_device(a.device, kernel_name("attention_bwd", a.dtype, D));
    if (used.code != StatusCode::kOk) return used;
    // delta first: both other kernels read it; L == 0 still runs dK/dV (it writes zeros)
    Status done = launched(launch_attention_bwd_delta<T>(p, stream), kernel_name("attention_bwd_delta", a.dtype, D),
                           stream);
    if (done.code == StatusCode::kOk) {
      done = launched(launch_attention_bwd_dkdv<T, D>(p, stream), kernel_name("attention_bwd_dkdv", a.dtype, D),
                      stream);
    }
    if (done.code == StatusCode::kOk) {
      done = launched(launch_attention_bwd_dq<T, D>(p, stream), kernel_name("attention_bwd_dq", a.dtype, D), stream);
    }
    return done;
  });
}

int max_smem_bytes(int64_t head_dim) {
  switch (head_dim) {
    case 32: return Tiles<32>::kMaxSmemBytes;
    case 64: return Tiles<64>::kMaxSmemBytes;
    case 96: return Tiles<96>::kMaxSmemBytes;
    case 128: return Tiles<128>::kMaxSmemBytes;
    case 256: return Tiles<256>::kMaxSmemBytes;
    default: return 0;
  }
}

std::vector<int> supported_head_dims() { return std::vector<int>(std::begin(kHeadDims), std::end(kHeadDims)); }

Status cuda_runtime_status(int* device_count) {
  *device_count = 0;
  const cudaError_t err = cudaGetDeviceCount(device_count);
  if (err != cudaSuccess) {
    *device_count = 0;
    cudaGetLastError();  // clear it, so that it is not reported by a later call
    return cuda_failure("cudaGetDeviceCount", err);
  }
  if (*device_count == 0) return {StatusCode::kCudaError, "cudaGetDeviceCount: no CUDA device"};
  return ok();
}

int cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace attn_kernels
