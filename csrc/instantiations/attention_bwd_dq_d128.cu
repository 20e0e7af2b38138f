// dQ launchers for head dim 128 (fp16, bf16).
#include "kernels/attention_bwd_dq.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_bwd_dq<__half, 128>(const BwdParams&, cudaStream_t);
template cudaError_t launch_attention_bwd_dq<__nv_bfloat16, 128>(const BwdParams&, cudaStream_t);
}  // namespace attn_kernels
