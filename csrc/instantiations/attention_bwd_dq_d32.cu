// dQ launchers for head dim 32 (fp16, bf16).
#include "kernels/attention_bwd_dq.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_bwd_dq<__half, 32>(const BwdParams&, cudaStream_t);
template cudaError_t launch_attention_bwd_dq<__nv_bfloat16, 32>(const BwdParams&, cudaStream_t);
}  // namespace attn_kernels
