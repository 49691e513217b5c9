#include "lm/skinny_matmul.h"

#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

namespace prefixcap {

namespace {

// Built twice (AVX2+FMA and the x86-64 baseline); the loader picks one for the processor.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define PREFIXCAP_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define PREFIXCAP_CLONES
#endif

// y[m, n] = dot(x[m, :], w[n, :]) for n in [n0, n1). The row w[n, :] comes from memory once;
// the M dot products re-read it from L1.
PREFIXCAP_CLONES
void nk_rows(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t M, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xm = x + m * K;
      float acc[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += wn[k + l] * xm[k + l];
      float s = 0;
      for (; k < K; ++k) s += wn[k] * xm[k];
      for (int l = 0; l < 16; ++l) s += acc[l];
      y[m * N + n] = s;
    }
  }
}

}  // namespace

bool skinny_applicable(const at::Tensor& x, const at::Tensor& weight) {
  if (x.dim() != 2 || x.size(0) > kMaxSkinnyRows || x.size(0) == 0) return false;
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (!x.device().is_cpu() || !weight.device().is_cpu()) return false;
  if (!weight.is_contiguous()) return false;
  if (c10::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) return false;
  return true;
}

at::Tensor skinny_matmul_nk(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& bias) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "skinny_matmul_nk: x ", x.sizes(), " and w ", w.sizes(), " do not fit");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { nk_rows(xp, wp, yp, M, K, N, n0, n1); });
  if (bias.defined()) y.add_(bias);
  return y;
}

}  // namespace prefixcap
