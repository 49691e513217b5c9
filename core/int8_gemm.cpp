#include "core/int8_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFIXCAP_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace prefixcap {

namespace {

constexpr int64_t kGroup = 64;     // output rows per packed panel (4 vectors of 16 int32)
constexpr int64_t kTileRows = 6;   // activation rows per register tile (6 x 4 accumulators)
constexpr int64_t kTaskRows = 48;  // activation rows per parallel task

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define PREFIXCAP_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define PREFIXCAP_CLONES
#endif

// A row's scale sx = amax / 127 into *sx; returns the factor its values are multiplied by.
inline float activation_step(float amax, float* sx) {
  *sx = amax / 127.0f;
  return amax > 0 ? 127.0f / amax : 0.0f;
}

// One activation as the integer kernels read it: nearbyint(x * inv), within +-127, plus 128.
inline uint8_t quantize_activation(float x, float inv) {
  const float p = std::min(127.0f, std::max(-127.0f, std::nearbyint(x * inv)));
  return static_cast<uint8_t>(static_cast<int32_t>(p) + 128);
}

// y = float(d - offset) * (sx * scale) + bias: the same float operations in both kernels.
inline float finish(int32_t d, int32_t offset, float sx, float scale, float bias) {
  return std::fma(static_cast<float>(d - offset), sx * scale, bias);
}

PREFIXCAP_CLONES void generic_quantize_row(const float* __restrict x, int64_t K, uint8_t* __restrict q, float* sx) {
  float amax = 0;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = activation_step(amax, sx);
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_activation(x[k], inv);
}

// Rows [m0, m1) x outputs [g * 64, g * 64 + 64) of the product, plain C++ (the compiler
// vectorises the 64 outputs).
PREFIXCAP_CLONES void generic_task(const uint8_t* __restrict xq, const float* __restrict sx, int64_t ldq,
                                   const Int8Matrix& w, float* __restrict y, int64_t g, int64_t m0, int64_t m1) {
  const int64_t K4 = ldq / 4, N = w.rows;
  const int8_t* __restrict panel = w.packed.data_ptr<int8_t>() + g * K4 * kGroup * 4;
  const float* scale = w.scale.data_ptr<float>() + g * kGroup;
  const float* bias = w.bias.data_ptr<float>() + g * kGroup;
  const int32_t* offset = w.offset.data_ptr<int32_t>() + g * kGroup;
  const int64_t outputs = std::min(kGroup, N - g * kGroup);
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* __restrict xm = xq + m * ldq;
    int32_t acc[kGroup] = {0};
    for (int64_t k4 = 0; k4 < K4; ++k4) {
      const int8_t* __restrict wk = panel + k4 * kGroup * 4;
      for (int64_t c = 0; c < kGroup; ++c)
        for (int t = 0; t < 4; ++t) acc[c] += static_cast<int32_t>(xm[4 * k4 + t]) * static_cast<int32_t>(wk[c * 4 + t]);
    }
    float* ym = y + m * N + g * kGroup;
    for (int64_t c = 0; c < outputs; ++c) ym[c] = finish(acc[c], offset[c], sx[m], scale[c], bias[c]);
  }
}

#if PREFIXCAP_X86_KERNELS
#define PREFIXCAP_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,fma")))
// GCC 12 reports its own _mm512_undefined_* (inside the reduce intrinsics) as uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// generic_quantize_row's arithmetic, 16 values at a time (cvtps_epi32 rounds to nearest even, as
// nearbyint does in the default rounding mode).
PREFIXCAP_VNNI void vnni_quantize_row(const float* x, int64_t K, uint8_t* q, float* sx) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i code_of_zero = _mm512_set1_epi32(128);
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(x[t]));
  const __m512 inv = _mm512_set1_ps(activation_step(amax, sx));
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512 p = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(x + k), inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(p), code_of_zero)));
  }
  const float inv1 = _mm512_cvtss_f32(inv);
  for (; k < K; ++k) q[k] = quantize_activation(x[k], inv1);
}

// acc += the 16 sums of four products u8 x s8, in place (through the intrinsic GCC 12 moves the
// accumulators through the stack; see lm/skinny_matmul.cpp).
PREFIXCAP_VNNI inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// MB rows from m x the 64 outputs of panel g: per 4 values of k, 4 vectors of weights (16
// outputs x 4 k each) and MB broadcasts of 4 activation bytes feed 4 x MB vpdpbusd.
template <int MB>
PREFIXCAP_VNNI void vnni_tile(const uint8_t* xq, const float* sx, int64_t ldq, const int8_t* panel, const float* scale,
                              const int32_t* offset, const float* bias, float* y, int64_t N, int64_t outputs, int64_t m) {
  __m512i acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  const int64_t K4 = ldq / 4;
  const uint8_t* xm = xq + m * ldq;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* wk = panel + k4 * kGroup * 4;
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(wk + 64 * j);
    for (int i = 0; i < MB; ++i) {
      int32_t four;
      std::memcpy(&four, xm + i * ldq + 4 * k4, 4);
      const __m512i xv = _mm512_set1_epi32(four);
      for (int j = 0; j < 4; ++j) acc[i][j] = dpbusd(acc[i][j], xv, wv[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t c0 = 16 * j;
    if (c0 >= outputs) break;
    const __mmask16 keep = outputs - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (outputs - c0)) - 1);
    const __m512i off = _mm512_loadu_si512(offset + c0);
    const __m512 sc = _mm512_loadu_ps(scale + c0), b = _mm512_loadu_ps(bias + c0);
    for (int i = 0; i < MB; ++i) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], off));
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(sx[m + i]), sc);
      _mm512_mask_storeu_ps(y + (m + i) * N + c0, keep, _mm512_fmadd_ps(v, s, b));
    }
  }
}

PREFIXCAP_VNNI void vnni_task(const uint8_t* xq, const float* sx, int64_t ldq, const Int8Matrix& w, float* y, int64_t g,
                              int64_t m0, int64_t m1) {
  const int64_t K4 = ldq / 4, N = w.rows;
  const int8_t* panel = w.packed.data_ptr<int8_t>() + g * K4 * kGroup * 4;
  const float* scale = w.scale.data_ptr<float>() + g * kGroup;
  const float* bias = w.bias.data_ptr<float>() + g * kGroup;
  const int32_t* offset = w.offset.data_ptr<int32_t>() + g * kGroup;
  const int64_t outputs = std::min(kGroup, N - g * kGroup);
  float* yg = y + g * kGroup;
  int64_t m = m0;
  for (; m + kTileRows <= m1; m += kTileRows)
    vnni_tile<kTileRows>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m);
  switch (m1 - m) {
    case 5: vnni_tile<5>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m); break;
    case 4: vnni_tile<4>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m); break;
    case 3: vnni_tile<3>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m); break;
    case 2: vnni_tile<2>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m); break;
    case 1: vnni_tile<1>(xq, sx, ldq, panel, scale, offset, bias, yg, N, outputs, m); break;
    default: break;
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool detect_vnni() {
#if PREFIXCAP_X86_KERNELS
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

std::atomic<Int8GemmIsa>& isa_choice() {
  static std::atomic<Int8GemmIsa> choice{detect_vnni() ? Int8GemmIsa::Vnni : Int8GemmIsa::Generic};
  return choice;
}

void check_cpu_float(const at::Tensor& t, int64_t dim, const char* what) {
  if (!t.defined() || t.dim() != dim || !t.device().is_cpu() || !at::isFloatingType(t.scalar_type()))
    throw std::invalid_argument(std::string("int8 product: the ") + what + " must be a " + std::to_string(dim) +
                                "-d floating-point CPU tensor");
}

}  // namespace

bool cpu_has_avx512vnni() { return detect_vnni(); }

Int8GemmIsa int8_gemm_isa() { return isa_choice().load(); }

void force_int8_gemm_isa(Int8GemmIsa isa) {
  if (isa == Int8GemmIsa::Vnni && !detect_vnni())
    throw std::invalid_argument("the VNNI int8 kernel needs a processor with AVX-512 VNNI; this one has none");
  isa_choice().store(isa);
}

void quantize_activation_rows(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq, float* sx,
                              bool vnni) {
  (void)vnni;
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* qm = q + m * ldq;
#if PREFIXCAP_X86_KERNELS
    if (vnni) vnni_quantize_row(x + m * ldx, K, qm, sx + m);
    else
#endif
      generic_quantize_row(x + m * ldx, K, qm, sx + m);
    std::memset(qm + K, 128, static_cast<size_t>(ldq - K));
  }
}

at::Tensor Int8Matrix::dequantize() const {
  const int64_t K4 = padded_cols() / 4, groups = packed.size(0);
  // [g, k4, c, t] -> [g, c, k4, t] -> [g * 64, K4 * 4]
  at::Tensor q = packed.permute({0, 2, 1, 3}).reshape({groups * kGroup, K4 * 4}).to(at::kFloat);
  return (q * scale.unsqueeze(1)).narrow(0, 0, rows).narrow(1, 0, cols).contiguous();
}

Int8Matrix pack_int8_matrix(const at::Tensor& weight, const at::Tensor& bias) {
  check_cpu_float(weight, 2, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (N == 0 || K == 0) throw std::invalid_argument("int8 product: the weight has no rows or no columns");
  if (bias.defined()) {
    check_cpu_float(bias, 1, "bias");
    if (bias.size(0) != N)
      throw std::invalid_argument("int8 product: " + std::to_string(bias.size(0)) + " biases for " + std::to_string(N) +
                                  " output rows");
  }
  const at::Tensor w = weight.detach().to(at::kFloat).contiguous();
  const at::Tensor amax = w.abs().amax(1);
  const at::Tensor scale = amax / 127.0f;
  // q = round(w / scale) (ties to even); a zero row stays 0
  const at::Tensor q = at::where(amax.unsqueeze(1) > 0, at::round(w / scale.unsqueeze(1)), at::zeros_like(w))
                           .clamp(-127, 127)
                           .to(at::kInt);
  Int8Matrix m;
  m.rows = N;
  m.cols = K;
  const int64_t groups = (N + kGroup - 1) / kGroup, K4 = m.padded_cols() / 4, Np = groups * kGroup;
  at::Tensor qp = at::zeros({Np, K4 * 4}, at::kInt);
  qp.narrow(0, 0, N).narrow(1, 0, K).copy_(q);
  // [Np, K4 * 4] -> [g, c, k4, t] -> [g, k4, c, t]
  m.packed = qp.view({groups, kGroup, K4, 4}).permute({0, 2, 1, 3}).contiguous().to(at::kChar);
  m.scale = at::zeros({Np}, at::kFloat);
  m.scale.narrow(0, 0, N).copy_(scale);
  m.offset = (qp.sum(1) * 128).to(at::kInt).contiguous();
  m.bias = at::zeros({Np}, at::kFloat);
  if (bias.defined()) m.bias.narrow(0, 0, N).copy_(bias.detach().to(at::kFloat));
  return m;
}

Int8Rows quantize_rows(const at::Tensor& x) {
  check_cpu_float(x, 2, "activations");
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), ldq = (K + 3) / 4 * 4;
  Int8Rows r;
  r.q = at::empty({M, ldq}, at::kByte);
  r.scale = at::empty({M}, at::kFloat);
  const bool vnni = int8_gemm_isa() == Int8GemmIsa::Vnni;
  const float* xp = xf.data_ptr<float>();
  uint8_t* qp = r.q.data_ptr<uint8_t>();
  float* sp = r.scale.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    quantize_activation_rows(xp + m0 * K, m1 - m0, K, K, qp + m0 * ldq, ldq, sp + m0, vnni);
  });
  return r;
}

at::Tensor int8_matmul(const Int8Rows& x, const Int8Matrix& w) {
  if (!w.defined()) throw std::invalid_argument("int8 product: the weight is not packed");
  if (!x.q.defined() || x.q.dim() != 2 || x.q.scalar_type() != at::kByte || x.q.size(1) != w.padded_cols() ||
      !x.scale.defined() || x.scale.numel() != x.q.size(0))
    throw std::invalid_argument("int8 product: activations quantised for " +
                                std::to_string(x.q.defined() ? x.q.size(-1) : 0) + " columns, the weight has " +
                                std::to_string(w.cols) + " (" + std::to_string(w.padded_cols()) + " padded)");
  const int64_t M = x.q.size(0), N = w.rows, ldq = w.padded_cols();
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M == 0) return y;
  const uint8_t* xq = x.q.data_ptr<uint8_t>();
  const float* sx = x.scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Rows split into chunks of at most kTaskRows, as even as whole tiles allow (50 rows: 30 + 20,
  // not 48 + 2).
  const int64_t groups = w.packed.size(0), chunks = (M + kTaskRows - 1) / kTaskRows;
  const int64_t chunk_rows = ((M + chunks - 1) / chunks + kTileRows - 1) / kTileRows * kTileRows;
  const bool vnni = int8_gemm_isa() == Int8GemmIsa::Vnni;
  (void)vnni;
  // Tasks run rows-chunk major: a thread's consecutive tasks reuse its chunk of activations.
  at::parallel_for(0, groups * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t % groups, m0 = (t / groups) * chunk_rows, m1 = std::min(M, m0 + chunk_rows);
      if (m0 >= m1) continue;
#if PREFIXCAP_X86_KERNELS
      if (vnni) {
        vnni_task(xq, sx, ldq, w, yp, g, m0, m1);
        continue;
      }
#endif
      generic_task(xq, sx, ldq, w, yp, g, m0, m1);
    }
  });
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const Int8Matrix& w) {
  if (!x.defined() || x.dim() < 1 || x.size(-1) != w.cols)
    throw std::invalid_argument("int8 product: activations of " + std::to_string(x.defined() ? x.size(-1) : 0) +
                                " columns for a weight of " + std::to_string(w.cols));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.rows;
  return int8_matmul(quantize_rows(x.reshape({-1, w.cols})), w).view(shape);
}

}  // namespace prefixcap
