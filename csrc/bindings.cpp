// pybind11 module attn_kernels._C: the CUDA attention kernels for Python, without
// libtorch. Tensors arrive as (data_ptr, stride_batch, stride_head, stride_row) tuples,
// the stream as the integer torch.cuda.Stream.cuda_stream. Bad arguments raise
// ValueError; CUDA failures raise RuntimeError naming the kernel and the CUDA error.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "attention.h"

#if __has_include("attn_kernels_build.h")
#include "attn_kernels_build.h"  // written by setup.py: ATTN_KERNELS_ARCHS
#endif
#ifndef ATTN_KERNELS_ARCHS
#define ATTN_KERNELS_ARCHS "unknown"
#endif

namespace py = pybind11;
namespace ak = attn_kernels;

namespace {

void raise_on_error(const ak::Status& status) {
  if (status.code == ak::StatusCode::kInvalidArgument) throw py::value_error(status.message);
  if (status.code == ak::StatusCode::kCudaError) throw std::runtime_error(status.message);
}

ak::DType to_dtype(int dtype) {
  if (dtype != static_cast<int>(ak::DType::kFloat16) && dtype != static_cast<int>(ak::DType::kBFloat16)) {
    throw py::value_error("dtype must be _C.FLOAT16 or _C.BFLOAT16");
  }
  return static_cast<ak::DType>(dtype);
}

void forward(int dtype, const ak::TensorArg& q, const ak::TensorArg& k, const ak::TensorArg& v,
             const ak::TensorArg& out, int64_t lse2, const ak::Sizes& sizes, double scale, bool causal, int device,
             int64_t stream) {
  const ak::ForwardArgs args{to_dtype(dtype), q, k, v, out, lse2, sizes, scale, causal, device, stream};
  ak::Status status;
  {
    py::gil_scoped_release no_gil;
    status = ak::attention_forward(args);
  }
  raise_on_error(status);
}

void backward(int dtype, const ak::TensorArg& q, const ak::TensorArg& k, const ak::TensorArg& v,
              const ak::TensorArg& out, const ak::TensorArg& dout, const ak::TensorArg& dq, const ak::TensorArg& dk,
              const ak::TensorArg& dv, int64_t lse2, int64_t dlse, int64_t delta, const ak::Sizes& sizes,
              double scale, bool causal, int device, int64_t stream) {
  const ak::BackwardArgs args{to_dtype(dtype), q, k, v, out, dout, dq, dk, dv, lse2, dlse, delta,
                              sizes, scale, causal, device, stream};
  ak::Status status;
  {
    py::gil_scoped_release no_gil;
    status = ak::attention_backward(args);
  }
  raise_on_error(status);
}

ak::Sizes to_sizes(const std::array<int64_t, 6>& s) { return {s[0], s[1], s[2], s[3], s[4], s[5]}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "CUDA C++ fused attention kernels of attn_kernels (FlashAttention-2 on tensor cores), "
      "linked against the CUDA runtime only. Use attn_kernels.cuda, not this module.";
  m.attr("FLOAT16") = static_cast<int>(ak::DType::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(ak::DType::kBFloat16);
  m.attr("ARCHS") = ATTN_KERNELS_ARCHS;
  m.attr("CUDA_RUNTIME_VERSION") = ak::cuda_runtime_version();

  m.def("head_dims", &ak::supported_head_dims, "Head dims (E = Ev) with compiled kernels.");
  m.def("smem_bytes", &ak::max_smem_bytes, py::arg("head_dim"),
        "Dynamic shared memory per block the kernels of a head dim need (0: not compiled).");
  m.def(
      "runtime_status",
      []() {
        int count = 0;
        const ak::Status status = ak::cuda_runtime_status(&count);
        return py::make_tuple(status.code == ak::StatusCode::kOk, count, status.message);
      },
      "(ok, device_count, error message) from this module's CUDA runtime; never raises.");
  m.def(
      "forward",
      [](int dtype, const ak::TensorArg& q, const ak::TensorArg& k, const ak::TensorArg& v, const ak::TensorArg& out,
         int64_t lse2, const std::array<int64_t, 6>& sizes, double scale, bool causal, int device, int64_t stream) {
        forward(dtype, q, k, v, out, lse2, to_sizes(sizes), scale, causal, device, stream);
      },
      py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse2"), py::arg("sizes"),
      py::arg("scale"), py::arg("causal"), py::arg("device"), py::arg("stream"),
      "Launch the forward: out, lse2 (float32 (Z, Hq, L), the log-sum-exp in base 2) from q, k, v. Tensors are "
      "(data_ptr, stride_batch, stride_head, stride_row); sizes = (Z, Hq, Hkv, L, S, head_dim).");
  m.def(
      "backward",
      [](int dtype, const ak::TensorArg& q, const ak::TensorArg& k, const ak::TensorArg& v, const ak::TensorArg& out,
         const ak::TensorArg& dout, const ak::TensorArg& dq, const ak::TensorArg& dk, const ak::TensorArg& dv,
         int64_t lse2, int64_t dlse, int64_t delta, const std::array<int64_t, 6>& sizes, double scale, bool causal,
         int device, int64_t stream) {
        backward(dtype, q, k, v, out, dout, dq, dk, dv, lse2, dlse, delta, to_sizes(sizes), scale, causal, device,
                 stream);
      },
      py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("dq"),
      py::arg("dk"), py::arg("dv"), py::arg("lse2"), py::arg("dlse"), py::arg("delta"), py::arg("sizes"),
      py::arg("scale"), py::arg("causal"), py::arg("device"), py::arg("stream"),
      "Launch the backward: dq, dk, dv from dout, the forward's base-2 lse2 and dlse (the gradient reaching the "
      "natural-log lse, 0 = none); delta is float32 (Z, Hq, L) scratch.");
}
