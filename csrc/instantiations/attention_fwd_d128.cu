// Forward launchers for head dim 128 (fp16, bf16); one file per (kernel, head dim) so
// that the build compiles them in parallel.
#include "kernels/attention_fwd.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_fwd<__half, 128>(const FwdParams&, cudaStream_t);
template cudaError_t launch_attention_fwd<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);
}  // namespace attn_kernels
