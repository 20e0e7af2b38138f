// dK/dV launchers for head dim 64 (fp16, bf16).
#include "kernels/attention_bwd_dkdv.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_bwd_dkdv<__half, 64>(const BwdParams&, cudaStream_t);
template cudaError_t launch_attention_bwd_dkdv<__nv_bfloat16, 64>(const BwdParams&, cudaStream_t);
}  // namespace attn_kernels
