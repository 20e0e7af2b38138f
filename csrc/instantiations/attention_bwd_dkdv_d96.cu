// dK/dV launchers for head dim 96 (fp16, bf16).
#include "kernels/attention_bwd_dkdv.cuh"

namespace attn_kernels {
template cudaError_t launch_attention_bwd_dkdv<__half, 96>(const BwdParams&, cudaStream_t);
template cudaError_t launch_attention_bwd_dkdv<__nv_bfloat16, 96>(const BwdParams&, cudaStream_t);
}  // namespace attn_kernels
