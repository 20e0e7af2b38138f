// The bfloat16 attention backward on CPU with float32 gradient accumulators.
//
// torch's own bf16 flash backward (aten::_scaled_dot_product_flash_attention_for_cpu_backward)
// adds every block's dQ / dK / dV product into the bf16 gradient itself, so each
// gradient is rounded once per block it collects (L / 256 times for dV at L >= 768):
// 1.3-2.7x the test suite's accuracy budget. This kernel takes the same blocked route
// (the same block sizes and GEMMs) and keeps the running sums in float32. A task is one
// key / value head with the query heads that read it (GQA) and a range of key blocks;
// each key block's dK / dV come from one bf16 GEMM over up to ROW_CHUNK query rows of
// the whole group (the reference rounds once per gradient); dQ gets one bf16 GEMM per
// key block. Every sum across GEMMs is float32:
//   S  = Q_m K_n^T        bf16 x bf16 -> fp32   (torch's exported cpublas::brgemm)
//   P  = exp(scale S + mask - lse), 0 above the diagonal (top-left causal)
//   dP = dO_m V_n^T       bf16 x bf16 -> fp32
//   dS = scale P (dP - D), D = rowsum(dO * O)      (rounded to bf16, as FlashAttention does)
//   dV_n += P^T dO_m, dQ_m += dS K_n, dK_n += dS^T Q_m   bf16 GEMMs (oneDNN), fp32 sums
//
// Compiled at first use by attn_kernels/cpu_native.py (torch.utils.cpp_extension),
// with the vector ISA torch reports for this CPU; registered as
// torch.ops.attn_kernels_cpu.attention_backward_bf16.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t KEY_BLOCK = 512;
// query rows whose dK / dV products are one GEMM (one bf16 rounding) per key block
constexpr int64_t ROW_CHUNK = 2048;

// torch's query block for this length (its forward and backward use the same rule)
int64_t query_block(int64_t len_q) {
  return len_q >= 768 ? 256 : (len_q >= 192 ? 64 : 32);
}

// C[M, N] = A[M, K] B[K, N], row-major with leading dims, bf16 in, fp32 out
void gemm_f32(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda,
              const BFloat16* B, int64_t ldb, float* C, int64_t ldc) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/false, A, B, C, /*is_vnni=*/false);
}

// acc[i, :] += bf16 values[i, :], rows x cols, both with their own row strides
void add_rows(float* acc, int64_t acc_ld, const BFloat16* values, int64_t values_ld, int64_t rows,
              int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* a = acc + r * acc_ld;
    const BFloat16* v = values + r * values_ld;
    for (int64_t c = 0; c < cols; ++c) a[c] += static_cast<float>(v[c]);
  }
}

struct Mask {
  const float* data = nullptr;  // additive float32 mask, broadcast strides may be 0
  int64_t sz = 0, sh = 0, sl = 0, ss = 0;
  const float* row(int64_t z, int64_t h, int64_t i) const { return data + z * sz + h * sh + i * sl; }
};

// A row-major bf16 matrix per head: element (h, i, e) at data + h * hs + i * ld + e
struct Rows {
  const BFloat16* data;
  int64_t hs, ld;
  const BFloat16* row(int64_t h, int64_t i) const { return data + h * hs + i * ld; }
};

// One task: key / value head (z, g), its G query heads h0 .. h0 + G - 1, key blocks
// starting at key_begin up to key_end.
struct GroupTask {
  Rows q, dout, out;  // query heads of the group (local head index)
  const float* lse;   // lse of local head h, row i: lse[h * lse_hs + i * lse_ld]
  int64_t lse_hs, lse_ld;
  Mask mask;
  int64_t z, h0, G;
  at::Tensor k_view;  // (S, E)
  const BFloat16 *k_t, *v_t;  // (E, S) contiguous copies: the fp32 GEMMs take no transpose
  int64_t L, S, E;
  float scale;
  bool causal;
  int64_t key_begin, key_end;
  float *dk_acc, *dv_acc;  // (S, E) of this key / value head
  float* dq_acc;           // (G, L, E): this task's share of dQ
};

struct Scratch {
  at::Tensor scores, dscores, probs_bf16, dscores_bf16, q_rows, dout_rows, kv_tmp, q_tmp, delta;
  Scratch(int64_t bm, int64_t bn, int64_t E, int64_t G, int64_t L) {
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
    const int64_t rows = std::min(ROW_CHUNK, G * L);
    scores = at::empty({bm, bn}, f32);
    dscores = at::empty({bm, bn}, f32);
    probs_bf16 = at::empty({rows, bn}, bf16);
    dscores_bf16 = at::empty({rows, bn}, bf16);
    q_rows = at::empty({rows, E}, bf16);
    dout_rows = at::empty({rows, E}, bf16);
    kv_tmp = at::empty({bn, E}, bf16);
    q_tmp = at::empty({bm, E}, bf16);
    delta = at::empty({G, L}, f32);
  }
};

// P and dS of local head h, query rows [m, m + bm), keys [n, n + bn), rounded to bf16
// into p_bf / ds_bf (row stride bn); s_buf / ds_buf are float32 scratch.
void probs_and_dscores(const GroupTask& a, const float* delta, int64_t h, int64_t m, int64_t bm,
                       int64_t n, int64_t bn, float* s_buf, float* ds_buf, BFloat16* p_bf,
                       BFloat16* ds_bf) {
  // S = Q_m K_n^T and dP = dO_m V_n^T, float32
  gemm_f32(bm, bn, a.E, a.q.row(h, m), a.q.ld, a.k_t + n, a.S, s_buf, bn);
  gemm_f32(bm, bn, a.E, a.dout.row(h, m), a.dout.ld, a.v_t + n, a.S, ds_buf, bn);
  const Vec v_scale(a.scale);
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = m + r;
    float* p = s_buf + r * bn;
    float* ds = ds_buf + r * bn;
    const float lse = a.lse[h * a.lse_hs + i * a.lse_ld];
    // keys past the diagonal (top-left causal) and rows with no allowed key get P = 0
    int64_t allowed = a.causal ? std::min<int64_t>(bn, std::max<int64_t>(i - n + 1, 0)) : bn;
    if (lse == -std::numeric_limits<float>::infinity()) allowed = 0;
    // P = exp(scale S + mask - lse)
    const Vec v_lse(lse);
    const float* mrow = a.mask.data ? a.mask.row(a.z, a.h0 + h, i) + n * a.mask.ss : nullptr;
    // the mask's key stride is 1, or 0 (one bias per row)
    const bool mask_per_key = mrow != nullptr && a.mask.ss == 1;
    const Vec row_bias(mrow != nullptr && !mask_per_key ? mrow[0] : 0.f);
    int64_t j = 0;
    for (; j + Vec::size() <= allowed; j += Vec::size()) {
      const Vec bias = mask_per_key ? Vec::loadu(mrow + j) : row_bias;
      (Vec::loadu(p + j) * v_scale + bias - v_lse).exp_u20().store(p + j);
    }
    for (; j < allowed; ++j) {
      const float bias = mrow ? mrow[j * a.mask.ss] : 0.f;
      p[j] = std::exp(p[j] * a.scale + bias - lse);
    }
    std::fill(p + allowed, p + bn, 0.f);
    // dS = scale P (dP - D): the gradient of the unscaled scores, as the reference rounds it
    const Vec v_delta(delta[h * a.L + i]);
    at::vec::map2<float>([&](Vec pv, Vec dpv) { return v_scale * pv * (dpv - v_delta); }, ds, p, ds, bn);
    at::vec::convert(p, p_bf + r * bn, bn);
    at::vec::convert(ds, ds_bf + r * bn, bn);
  }
}

void copy_rows(const Rows& src, int64_t h, int64_t m, int64_t rows, int64_t E, BFloat16* dst) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(src.row(h, m + r), E, dst + r * E);
}

void group_backward(const GroupTask& a, Scratch& w) {
  const int64_t BM = query_block(a.L), E = a.E;
  float* s_buf = w.scores.data_ptr<float>();
  float* ds_buf = w.dscores.data_ptr<float>();
  BFloat16* p_bf = w.probs_bf16.data_ptr<BFloat16>();
  BFloat16* ds_bf = w.dscores_bf16.data_ptr<BFloat16>();
  BFloat16* q_rows = w.q_rows.data_ptr<BFloat16>();
  BFloat16* dout_rows = w.dout_rows.data_ptr<BFloat16>();
  float* delta = w.delta.data_ptr<float>();
  const int64_t chunk = w.probs_bf16.size(0);

  // D = rowsum(dO * O), in float32 from the bf16 values
  for (int64_t h = 0; h < a.G; ++h) {
    for (int64_t i = 0; i < a.L; ++i) {
      const BFloat16* d = a.dout.row(h, i);
      const BFloat16* o = a.out.row(h, i);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += static_cast<float>(d[e]) * static_cast<float>(o[e]);
      delta[h * a.L + i] = sum;
    }
  }

  for (int64_t n = a.key_begin; n < a.key_end; n += KEY_BLOCK) {
    const int64_t bn = std::min(KEY_BLOCK, a.key_end - n);
    auto kv_tmp = w.kv_tmp.narrow(0, 0, bn);
    int64_t filled = 0;  // rows of P / dS (and their Q / dO rows) waiting for the dK / dV GEMMs
    auto flush = [&]() {
      if (filled == 0) return;
      auto P = w.probs_bf16.as_strided({filled, bn}, {bn, 1});
      auto dS = w.dscores_bf16.as_strided({filled, bn}, {bn, 1});
      // dV_n += P^T dO and dK_n += dS^T Q over the gathered rows, summed in float32
      at::mm_out(kv_tmp, P.t(), w.dout_rows.narrow(0, 0, filled));
      add_rows(a.dv_acc + n * E, E, kv_tmp.data_ptr<BFloat16>(), E, bn, E);
      at::mm_out(kv_tmp, dS.t(), w.q_rows.narrow(0, 0, filled));
      add_rows(a.dk_acc + n * E, E, kv_tmp.data_ptr<BFloat16>(), E, bn, E);
      filled = 0;
    };
    // top-left causal: rows before n see none of these keys
    const int64_t first = a.causal ? std::min(a.L, n / BM * BM) : 0;
    for (int64_t h = 0; h < a.G; ++h) {
      for (int64_t m = first; m < a.L; m += BM) {
        const int64_t bm = std::min(BM, a.L - m);
        if (filled + bm > chunk) flush();
        const int64_t offset = filled * bn;
        probs_and_dscores(a, delta, h, m, bm, n, bn, s_buf, ds_buf, p_bf + offset, ds_bf + offset);
        // dQ_m += dS K_n: a bf16 GEMM per key block, summed in float32
        auto q_tmp = w.q_tmp.narrow(0, 0, bm);
        at::mm_out(q_tmp, w.dscores_bf16.as_strided({bm, bn}, {bn, 1}, offset), a.k_view.narrow(0, n, bn));
        add_rows(a.dq_acc + (h * a.L + m) * E, E, q_tmp.data_ptr<BFloat16>(), E, bm, E);
        // and its Q / dO rows, for dK / dV at the flush
        copy_rows(a.q, h, m, bm, E, q_rows + filled * E);
        copy_rows(a.dout, h, m, bm, E, dout_rows + filled * E);
        filled += bm;
      }
    }
    flush();
  }
}

// dout, q, out: (Z, Hq, L, E); k, v: (Z, Hkv, S, E); all bf16 with unit last stride and
// rows at least E apart. lse: float32 (Z, Hq, L). mask: float32, broadcastable to
// (Z, Hq, L, S), last stride 0 or 1, or none. Top-left causal.
// -> dq (Z, Hq, L, E), dk, dv (Z, Hkv, S, E), bf16, contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_bf16(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    double scale) {
  for (const auto* t : {&dout, &q, &k, &v, &out}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1 &&
                    t->stride(2) >= t->size(3),
                "attention_backward_bf16: dout, q, k, v, out must be 4-D bfloat16, unit last stride, "
                "rows at least a row apart");
  }
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention_backward_bf16: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.size(0) == Z && k.size(3) == E && v.sizes() == k.sizes() && out.sizes() == q.sizes() &&
                  dout.sizes() == q.sizes(),
              "attention_backward_bf16: shapes do not match");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == Z && lse.size(1) == Hq &&
                  lse.size(2) == L,
              "attention_backward_bf16: lse must be float32 (Z, Hq, L)");
  const int64_t G = Hq / Hkv;

  Mask m4;
  at::Tensor mask_view;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 4, "attention_backward_bf16: mask must be float32 4-D");
    mask_view = mask->expand({Z, Hq, L, S});
    const int64_t key_stride = S == 1 ? 0 : mask_view.stride(3);
    TORCH_CHECK(key_stride <= 1, "attention_backward_bf16: the mask's last stride must be 0 or 1");
    m4 = Mask{mask_view.const_data_ptr<float>(), mask_view.stride(0), mask_view.stride(1), mask_view.stride(2),
              key_stride};
  }

  // (E, S) copies of each key / value head
  auto k_t = k.transpose(2, 3).contiguous();
  auto v_t = v.transpose(2, 3).contiguous();
  // key blocks split into `parts` ranges when there are fewer groups than threads (MQA):
  // each range has its own dQ share, summed below
  const int64_t groups = Z * Hkv, blocks = (S + KEY_BLOCK - 1) / KEY_BLOCK;
  const int64_t parts = std::max<int64_t>(1, std::min(blocks, (at::get_num_threads() + groups - 1) / groups));
  const int64_t blocks_per_part = (blocks + parts - 1) / parts;
  auto f32 = q.options().dtype(at::kFloat);
  auto dq_acc = at::zeros({parts, Z, Hq, L, E}, f32);
  auto dk_acc = at::zeros({Z, Hkv, S, E}, f32);
  auto dv_acc = at::zeros({Z, Hkv, S, E}, f32);

  const int64_t BM = query_block(L), BN = std::min(KEY_BLOCK, S);
  // the bf16 GEMMs are ATen ops on views of inputs that may require grad; the dispatch
  // mode is thread-local, so every worker sets it
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::parallel_for(0, groups * parts, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
    Scratch scratch(BM, BN, E, G, L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task % parts, zg = task / parts, z = zg / Hkv, g = zg % Hkv, h0 = g * G;
      GroupTask a;
      a.q = Rows{q[z][h0].const_data_ptr<BFloat16>(), q.stride(1), q.stride(2)};
      a.dout = Rows{dout[z][h0].const_data_ptr<BFloat16>(), dout.stride(1), dout.stride(2)};
      a.out = Rows{out[z][h0].const_data_ptr<BFloat16>(), out.stride(1), out.stride(2)};
      a.lse = lse.const_data_ptr<float>() + z * lse.stride(0) + h0 * lse.stride(1);
      a.lse_hs = lse.stride(1);
      a.lse_ld = lse.stride(2);
      a.mask = m4;
      a.z = z;
      a.h0 = h0;
      a.G = G;
      a.k_view = k[z][g];
      a.k_t = k_t[z][g].const_data_ptr<BFloat16>();
      a.v_t = v_t[z][g].const_data_ptr<BFloat16>();
      a.L = L;
      a.S = S;
      a.E = E;
      a.scale = static_cast<float>(scale);
      a.causal = is_causal;
      a.key_begin = std::min(S, part * blocks_per_part * KEY_BLOCK);
      a.key_end = std::min(S, (part + 1) * blocks_per_part * KEY_BLOCK);
      a.dk_acc = dk_acc[z][g].data_ptr<float>();
      a.dv_acc = dv_acc[z][g].data_ptr<float>();
      a.dq_acc = dq_acc[part][z][h0].data_ptr<float>();
      group_backward(a, scratch);
    }
  });
  auto dq = (parts == 1 ? dq_acc[0] : dq_acc.sum(0)).to(at::kBFloat16);
  return {dq, dk_acc.to(at::kBFloat16), dv_acc.to(at::kBFloat16)};
}

}  // namespace

TORCH_LIBRARY(attn_kernels_cpu, m) {
  m.def(
      "attention_backward_bf16(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.impl("attention_backward_bf16", c10::DispatchKey::CPU, TORCH_FN(attention_backward_bf16));
}
