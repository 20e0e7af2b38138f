// Arguments of the attention kernels: raw device pointers, element strides and sizes.
// Torch-free. Tensors are viewed as (batch Z, heads, rows, head dim) with the last dim
// contiguous; the row statistics (lse2, dlse, delta) are contiguous (Z, Hq, L) float32.
// lse2 is the log-sum-exp in base 2 (log2 sum_j 2^(scale log2(e) s_j)): the forward stores
// it and the backward recomputes P = 2^(scale log2(e) s - lse2) from it with no change of
// base, so a row with one visible key gets P == 1 exactly; the host converts it to the
// natural log the user sees (attn_kernels/cuda.py).
#pragma once

#include <cstdint>

namespace attn_kernels {

struct Strides {
  int64_t batch, head, row;  // elements; 0 is allowed (broadcast)
};

struct FwdParams {
  const void *q, *k, *v;  // (Z, Hq, L, D), (Z, Hkv, S, D), (Z, Hkv, S, D)
  void* out;              // (Z, Hq, L, D)
  float* lse2;            // (Z, Hq, L), base 2
  Strides q_str, k_str, v_str, out_str;
  int batch, heads_q, heads_kv, len_q, len_k, head_dim;
  float scale_log2;  // softmax scale * log2(e): scores are kept in base 2
  bool causal;       // top-left: query i sees keys 0..i
};

struct BwdParams {
  const void *q, *k, *v, *out, *dout;
  void *dq, *dk, *dv;  // written, not accumulated; dk, dv summed over each GQA group
  const float* lse2;  // from the forward, base 2
  const float* dlse;  // gradient reaching the (natural-log) lse output, or nullptr
  float* delta;       // scratch: rowsum(dO * O) - dlse
  Strides q_str, k_str, v_str, out_str, dout_str, dq_str, dk_str, dv_str;
  int batch, heads_q, heads_kv, len_q, len_k, head_dim;
  float scale;       // softmax scale (dQ, dK are scaled by it)
  float scale_log2;  // scale * log2(e)
  bool causal;
};

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace attn_kernels
