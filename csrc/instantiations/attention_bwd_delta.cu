// Backward preprocess launchers (fp16, bf16; any head dim).
#include "kernels/attention_bwd_delta.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_bwd_delta<__half>(const BwdParams&, cudaStream_t);
template cudaError_t launch_attention_bwd_delta<__nv_bfloat16>(const BwdParams&, cudaStream_t);
}  // namespace attn_kernels
