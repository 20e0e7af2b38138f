// Declarations of the kernel launchers, defined in kernels/attention_*.cuh and
// instantiated per head dim in instantiations/*.cu (so they compile in parallel).
// Each launches one kernel (dK/dV: one or two passes of one kernel) on stream and
// returns the launch's cudaError_t. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.cuh"

namespace attn_kernels {

template <typename T, int D>
cudaError_t launch_attention_fwd(const FwdParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_attention_bwd_delta(const BwdParams& p, cudaStream_t stream);

template <typename T, int D>
cudaError_t launch_attention_bwd_dkdv(const BwdParams& p, cudaStream_t stream);

template <typename T, int D>
cudaError_t launch_attention_bwd_dq(const BwdParams& p, cudaStream_t stream);

}  // namespace attn_kernels
