#include "lm/skinny_matmul.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "core/int8_gemm.h"
#include "core/x86_kernels.h"
#include "lm/short_attention.h"

namespace prefixcap {

namespace {

// Weight element -> float. bfloat16 is carried as its raw 16 bits (the upper half of a float).
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[m, n] = scale[n] * dot(x[m, :], w[n, :]) + bias[n] for n in [n0, n1) (scale null = 1, bias
// null = 0). The row w[n, :] comes from memory once; the M dot products re-read it from L1.
template <typename W>
PREFIXCAP_CLONES void generic_rows(const float* __restrict x, const W* __restrict w, const float* __restrict scale,
                                   const float* __restrict bias, float* __restrict y, int64_t M, int64_t K, int64_t N,
                                   int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* __restrict wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xm = x + m * K;
      float acc[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += to_float(wn[k + l]) * xm[k + l];
      float s = 0;
      for (; k < K; ++k) s += to_float(wn[k]) * xm[k];
      for (int l = 0; l < 16; ++l) s += acc[l];
      if (scale) s *= scale[n];
      y[m * N + n] = bias ? s + bias[n] : s;
    }
  }
}

// out[r, :] = scale[r] * w[r, :] for `rows` rows of K (scale null = 1): a block of packed
// weights as float32, for BLAS.
template <typename W>
PREFIXCAP_CLONES void dequantize_block(const W* __restrict w, const float* __restrict scale, float* __restrict out,
                                       int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = scale ? scale[r] : 1.0f;
    const W* __restrict wr = w + r * K;
    float* __restrict o = out + r * K;
    for (int64_t k = 0; k < K; ++k) o[k] = to_float(wr[k]) * s;
  }
}

// Int8Dynamic (W8A8). Activations: per row, amax = max |x|, p = nearbyint(x * (127 / amax))
// (ties to even), stored as p + 128; sx = amax / 127 (0 and all p = 0 for a zero row).
struct QuantRows {
  const uint8_t* q = nullptr;  // [M, K]: p + 128
  const float* scale = nullptr;  // [M]
};

// The end of one output: the integer dot product d = sum_k (p + 128) q minus 128 row_sum is
// exact; both kernels scale it with the same float operations, so they give the same bits.
inline float finish_dynamic(int32_t d, int32_t row_sum, float sx, float sw, const float* bias, int64_t n) {
  const float v = static_cast<float>(d - 128 * row_sum);
  return bias ? std::fma(v, sx * sw, bias[n]) : v * (sx * sw);
}

PREFIXCAP_CLONES void generic_dynamic_rows(const QuantRows& x, const int8_t* __restrict w, const float* __restrict sw,
                                           const int32_t* __restrict row_sum, const float* __restrict bias,
                                           float* __restrict y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* __restrict wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* __restrict xm = x.q + m * K;
      int32_t d = 0;
      for (int64_t k = 0; k < K; ++k) d += static_cast<int32_t>(xm[k]) * static_cast<int32_t>(wn[k]);
      y[m * N + n] = finish_dynamic(d, row_sum[n], x.scale[m], sw[n], bias, n);
    }
  }
}

#if PREFIXCAP_X86_KERNELS
#define PREFIXCAP_AVX512 __attribute__((target("avx512f")))
// GCC 12 reports its own _mm512_undefined_* (inside the reduce intrinsics) as uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// 16 weights as 16 floats.
PREFIXCAP_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PREFIXCAP_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
PREFIXCAP_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One tile: NB weight rows from n times MB input rows from m0, all of K (K % 16 == 0). Each
// 16 weights are loaded and converted once and used MB times from registers: 4 x 6 tiles keep
// 24 accumulators + 4 weight vectors + 1 input vector in the 32 zmm registers, so that a beam
// of 5 converts each weight once (conversion, not FMAs, is what int8/bfloat16 spend most on).
template <int NB, int MB, typename W>
PREFIXCAP_AVX512 void avx512_tile(const float* __restrict x, const W* __restrict w, const float* __restrict scale,
                                  const float* __restrict bias, float* __restrict y, int64_t K, int64_t N, int64_t n,
                                  int64_t m0) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const W* wrow = w + n * K;
  const float* xrow = x + m0 * K;
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wrow + (NB + j) * K + k), _MM_HINT_T0);  // the next tile
      wv[j] = load16(wrow + j * K + k);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(xrow + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      if (scale) s *= scale[n + j];
      y[(m0 + i) * N + n + j] = bias ? s + bias[n + j] : s;
    }
}

template <int NB, typename W>
PREFIXCAP_AVX512 void avx512_row_block(const float* x, const W* w, const float* scale, const float* bias, float* y,
                                       int64_t M, int64_t K, int64_t N, int64_t n) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) avx512_tile<NB, 6>(x, w, scale, bias, y, K, N, n, m);
  switch (M - m) {
    case 5: avx512_tile<NB, 5>(x, w, scale, bias, y, K, N, n, m); break;
    case 4: avx512_tile<NB, 4>(x, w, scale, bias, y, K, N, n, m); break;
    case 3: avx512_tile<NB, 3>(x, w, scale, bias, y, K, N, n, m); break;
    case 2: avx512_tile<NB, 2>(x, w, scale, bias, y, K, N, n, m); break;
    case 1: avx512_tile<NB, 1>(x, w, scale, bias, y, K, N, n, m); break;
    default: break;
  }
}

template <typename W>
PREFIXCAP_AVX512 void avx512_rows(const float* x, const W* w, const float* scale, const float* bias, float* y,
                                  int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) avx512_row_block<4>(x, w, scale, bias, y, M, K, N, n);
  for (; n < n1; ++n) avx512_row_block<1>(x, w, scale, bias, y, M, K, N, n);
}
// exp(x) for 16 floats (Cephes' expf: x = n ln2 + r, a degree-7 polynomial for exp(r), then
// scaled by 2^n); inputs are clamped to [-87.3, 88.7], so -inf gives ~1e-38, not 0.
PREFIXCAP_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// One row's block of n logits (ids from id0) folded into what is kept of the row: its k best by
// insertion (descending, earlier id first among equals; values/ids start at -inf / -1), testing
// 16 values at a time against the k-th so far, and its running max *m and sum *s of exp(x - *m)
// (the block's sum rescaled to the larger max). fused_rows_topk_logsumexp calls it per block of
// outputs, row_topk_logsumexp once per row.
PREFIXCAP_AVX512 void avx512_block_topk_logsumexp(const float* x, int64_t n, int64_t id0, int64_t k, float* values,
                                                  int64_t* ids, float* m, double* s) {
  auto insert = [&](float v, int64_t i) {
    if (!(v > values[k - 1]) && ids[k - 1] >= 0) return;
    int64_t j = k - 1;
    while (j > 0 && (v > values[j - 1] || ids[j - 1] < 0)) {
      values[j] = values[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    values[j] = v;
    ids[j] = i;
  };
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    mx = _mm512_max_ps(mx, v);
    __mmask16 mask = ids[k - 1] < 0 ? __mmask16(0xFFFF)
                                    : _mm512_cmp_ps_mask(v, _mm512_set1_ps(values[k - 1]), _CMP_GT_OQ);
    while (mask) {
      const int j = __builtin_ctz(mask);
      insert(x[i + j], id0 + i + j);
      mask = static_cast<__mmask16>(mask & (mask - 1));
    }
  }
  float bm = _mm512_reduce_max_ps(mx);
  for (; i < n; ++i) {
    insert(x[i], id0 + i);
    bm = std::max(bm, x[i]);
  }
  __m512 sum = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(bm);
  i = 0;
  for (; i + 16 <= n; i += 16) sum = _mm512_add_ps(sum, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv)));
  double bs = _mm512_reduce_add_ps(sum);
  for (; i < n; ++i) bs += std::exp(double(x[i]) - bm);
  if (bm > *m) {
    *s = *s * std::exp(double(*m) - bm) + bs;
    *m = bm;
  } else {
    *s += bs * std::exp(double(bm) - *m);
  }
}

// One row: its k largest values (descending, earlier index first among equals) and logsumexp:
// the row as one block (pass 1 keeps the top k by insertion, testing 16 values at a time against
// the k-th so far; pass 2 sums exp(x - max)).
PREFIXCAP_AVX512 void row_topk_logsumexp(const float* x, int64_t V, int64_t k, float* values, int64_t* ids,
                                         float* lse) {
  std::fill(values, values + k, -std::numeric_limits<float>::infinity());
  std::fill(ids, ids + k, int64_t(-1));
  float m = -std::numeric_limits<float>::infinity();
  double s = 0;
  avx512_block_topk_logsumexp(x, V, 0, k, values, ids, &m, &s);
  *lse = m + static_cast<float>(std::log(s));
}

// In place: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), tanh(u) = 1 - 2 / (exp(2u) + 1).
// The tail goes through the same vector arithmetic (masked), so each value's result does not
// depend on where a block of work starts (the fused decode step activates blocks of outputs).
PREFIXCAP_AVX512 inline __m512 gelu_tanh16(__m512 v) {
  const __m512 c = _mm512_set1_ps(0.7978845608028654f), a = _mm512_set1_ps(0.044715f);
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), half = _mm512_set1_ps(0.5f);
  const __m512 u = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, v), _mm512_mul_ps(v, v), v));
  const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp16(_mm512_add_ps(u, u)), one)));
  return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, t));
}

PREFIXCAP_AVX512 void gelu_tanh_rows(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gelu_tanh16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(x + i, tail, gelu_tanh16(_mm512_maskz_loadu_ps(tail, x + i)));
  }
}
// One decode-attention head (decode_attention_heads' arithmetic, 16 lanes at a time): scores
// q.k_s * scale + bias_s, softmax with exp16, out = sum_s p_s v_s. D % 16 == 0.
PREFIXCAP_AVX512 void attention_head(const DecodeAttentionArgs& a, int64_t b, int64_t h, float* p) {
  const int64_t S = a.S, D = a.D;
  const float* qr = a.q + b * a.q_stride_b + h * a.q_stride_h;
  const float* br = a.bias ? a.bias + (a.bias_rows == 1 ? 0 : b) * S : nullptr;
  const int64_t* row = a.row_index ? a.row_index + b * S : nullptr;
  float mx = -std::numeric_limits<float>::infinity();
  auto key = [&](int64_t s) { return a.k + (row ? row[s] : b) * a.k_stride_b + h * a.k_stride_h + s * a.k_stride_s; };
  auto value = [&](int64_t s) { return a.v + (row ? row[s] : b) * a.v_stride_b + h * a.v_stride_h + s * a.v_stride_s; };
  // Beams read their keys from other rows (row_index): the next position's key is fetched ahead.
  auto prefetch = [&](const float* r) {
    for (int64_t j = 0; j < D; j += 16) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T0);
  };
  for (int64_t s = 0; s < S; ++s) {
    const float* kr = key(s);
    if (s + 4 < S) prefetch(key(s + 4));
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qr), _mm512_loadu_ps(kr));
    for (int64_t j = 16; j < D; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + j), _mm512_loadu_ps(kr + j), acc);
    p[s] = _mm512_reduce_add_ps(acc) * a.scale + (br ? br[s] : 0.f);
    mx = std::max(mx, p[s]);
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + s), m));
    _mm512_storeu_ps(p + s, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (s < S) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (S - s)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + s), m)));
    _mm512_mask_storeu_ps(p + s, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(sum);
  float* out = a.y + (b * a.H + h) * D;
  if (D == 64) {
    // GPT-2's heads: each value row read once, into four accumulators (the same sums in the same
    // order as below, so the same bits)
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t t = 0; t < S; ++t) {
      const float* vr = value(t);
      if (t + 4 < S) prefetch(value(t + 4));
      const __m512 w = _mm512_set1_ps(p[t] * inv);
      o0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr), o0);
      o1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16), o1);
      o2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 32), o2);
      o3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 48), o3);
    }
    _mm512_storeu_ps(out, o0);
    _mm512_storeu_ps(out + 16, o1);
    _mm512_storeu_ps(out + 32, o2);
    _mm512_storeu_ps(out + 48, o3);
    return;
  }
  for (int64_t j = 0; j < D; j += 16) {
    __m512 o = _mm512_setzero_ps();
    for (int64_t t = 0; t < S; ++t) o = _mm512_fmadd_ps(_mm512_set1_ps(p[t] * inv), _mm512_loadu_ps(value(t) + j), o);
    _mm512_storeu_ps(out + j, o);
  }
}

using x86::dpbusd;

// The sums of the 16 lanes of a, b, c and d, in that order (13 instructions where four
// _mm512_reduce_add_epi32 take about 32): pairs of vectors are interleaved and added, then the
// four 128-bit quarters.
PREFIXCAP_VNNI inline __m128i reduce4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // per quarter: [a0+a1+a2+a3, b..., c..., d...] (each sum over that quarter's four lanes)
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// One tile of the integer product: NB weight rows from n times MB activation rows from m0. Each
// 64 weights are loaded once and multiplied with 64 activations of each row by one vpdpbusd
// (64 products summed in fours into 16 int32 lanes); the last K % 64 through byte masks (masked
// bytes are 0 on both sides, so they add nothing). With x86::dpbusd, the inner loop keeps its
// 20-24 accumulators in registers (checked in the disassembly: 4 + MB loads, NB x MB vpdpbusd,
// 4 prefetches, no stack traffic; masked loads in the main loop brought the spills back).
template <int NB, int MB>
PREFIXCAP_VNNI void vnni_tile(const QuantRows& x, const int8_t* __restrict w, const float* __restrict sw,
                              const int32_t* __restrict row_sum, const float* __restrict bias, float* __restrict y,
                              int64_t K, int64_t N, int64_t n, int64_t m0) {
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const int8_t* wrow = w + n * K;
  const uint8_t* xrow = x.q + m0 * K;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wrow + (NB + j) * K + k), _MM_HINT_T0);  // the next tile
      wv[j] = _mm512_loadu_si512(wrow + j * K + k);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(xrow + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = dpbusd(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    const __mmask64 tail = (~uint64_t(0)) >> (64 - (K - k));
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi8(tail, wrow + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi8(tail, xrow + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = dpbusd(acc[i][j], xv, wv[j]);
    }
  }
  if constexpr (NB == 4) {
    // finish_dynamic on four outputs at once (the same operations, so the same bits)
    const __m128i rs = _mm_mullo_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_sum + n)), _mm_set1_epi32(128));
    const __m128 swv = _mm_loadu_ps(sw + n);
    for (int i = 0; i < MB; ++i) {
      const __m128i d = reduce4_epi32(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      const __m128 v = _mm_cvtepi32_ps(_mm_sub_epi32(d, rs));
      const __m128 s = _mm_mul_ps(_mm_set1_ps(x.scale[m0 + i]), swv);
      float* out = y + (m0 + i) * N + n;
      _mm_storeu_ps(out, bias ? _mm_fmadd_ps(v, s, _mm_loadu_ps(bias + n)) : _mm_mul_ps(v, s));
    }
  } else {
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j)
        y[(m0 + i) * N + n + j] = finish_dynamic(_mm512_reduce_add_epi32(acc[i][j]), row_sum[n + j], x.scale[m0 + i],
                                                 sw[n + j], bias, n + j);
  }
}

template <int NB>
PREFIXCAP_VNNI void vnni_row_block(const QuantRows& x, const int8_t* w, const float* sw, const int32_t* row_sum,
                                   const float* bias, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) vnni_tile<NB, 6>(x, w, sw, row_sum, bias, y, K, N, n, m);
  switch (M - m) {
    case 5: vnni_tile<NB, 5>(x, w, sw, row_sum, bias, y, K, N, n, m); break;
    case 4: vnni_tile<NB, 4>(x, w, sw, row_sum, bias, y, K, N, n, m); break;
    case 3: vnni_tile<NB, 3>(x, w, sw, row_sum, bias, y, K, N, n, m); break;
    case 2: vnni_tile<NB, 2>(x, w, sw, row_sum, bias, y, K, N, n, m); break;
    case 1: vnni_tile<NB, 1>(x, w, sw, row_sum, bias, y, K, N, n, m); break;
    default: break;
  }
}

PREFIXCAP_VNNI void vnni_dynamic_rows(const QuantRows& x, const int8_t* w, const float* sw, const int32_t* row_sum,
                                      const float* bias, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                                      int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) vnni_row_block<4>(x, w, sw, row_sum, bias, y, M, K, N, n);
  for (; n < n1; ++n) vnni_row_block<1>(x, w, sw, row_sum, bias, y, M, K, N, n);
}

// The AMX kernel for Int8Dynamic (rows of activations >= kAmxMinRows, K % 64 == 0). The weights
// stay in their [N, K] rows and are the tiles' A side (16 weight rows x 64 bytes of k, signed);
// the activations are laid out once per product as B tiles ([row block of 16][K / 4][16 rows][4
// bytes], unsigned; rows past M are 0), and tdpbsud gives C[n][m] = sum_k w[n, k] (p[m, k] + 128)
// exactly, as vpdpbusd does. A pass takes 32 weight rows x 32 activation rows (tmm0-3 the sums,
// tmm4/5 weights, tmm6/7 activations); the sums are finished with finish_dynamic's operations
// (the same bits as the other kernels), transposed back to y[m, n].
struct AmxRows {
  const uint8_t* b = nullptr;  // the B tiles, [Mp / 16][K / 4][16][4]
  const float* scale = nullptr;
  int64_t M = 0, blocks = 0;  // rows, row blocks of 16
};

constexpr int64_t kAmxMinRows = 16;

// Rows [m0, m1) of q [M, K] into their places in out (sized (M + 15) / 16 * 16 * K; the padding
// rows' places are set by whoever takes the last rows).
void layout_amx_rows(const uint8_t* q, int64_t m0, int64_t m1, int64_t M, int64_t K, uint8_t* out) {
  const int64_t K4 = K / 4, padded = (M + 15) / 16 * 16;
  auto* dst = reinterpret_cast<uint32_t*>(out);
  if (m1 == M)
    for (int64_t m = M; m < padded; ++m) {
      uint32_t* block = dst + (m / 16) * K4 * 16 + m % 16;
      for (int64_t k4 = 0; k4 < K4; ++k4) block[k4 * 16] = 0;
    }
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* row = q + m * K;
    uint32_t* block = dst + (m / 16) * K4 * 16 + m % 16;
    for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(block + k4 * 16, row + 4 * k4, 4);
  }
}

// C (16 weight rows x 16 activation rows, int32, [n][m]) -> y[m0 + i, n0 + j] for i < rows.
PREFIXCAP_AMX void amx_finish(const int32_t* c, const AmxRows& x, int64_t m0, const float* sw, const int32_t* row_sum,
                              const float* bias, float* y, int64_t N, int64_t n0) {
  const int64_t rows = std::min<int64_t>(16, x.M - m0);
  const __m512i rs = _mm512_mullo_epi32(_mm512_loadu_si512(row_sum + n0), _mm512_set1_epi32(128));
  const __m512 swv = _mm512_loadu_ps(sw + n0);
  const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  for (int64_t i = 0; i < rows; ++i) {
    const __m512i d = _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(static_cast<int>(i))), c, 4);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(d, rs));
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(x.scale[m0 + i]), swv);
    _mm512_storeu_ps(y + (m0 + i) * N + n0, bias ? _mm512_fmadd_ps(v, s, b) : _mm512_mul_ps(v, s));
  }
}

// Outputs [n, n + 16 * NT) (NT = 1 or 2) of every row.
template <int NT>
PREFIXCAP_AMX void amx_output_block(const AmxRows& x, const int8_t* w, const float* sw, const int32_t* row_sum,
                                    const float* bias, float* y, int64_t K, int64_t N, int64_t n) {
  alignas(64) int32_t c[4][256];
  const int64_t K4 = K / 4;
  const int8_t* w0 = w + n * K;
  const int8_t* w1 = w0 + 16 * K;
  for (int64_t mb = 0; mb < x.blocks; mb += 2) {
    const bool two = mb + 1 < x.blocks;
    const uint8_t* b0 = x.b + mb * K4 * 64;
    const uint8_t* b1 = b0 + K4 * 64;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += 64) {
      _tile_loadd(4, w0 + k, K);
      _tile_loadd(6, b0 + k * 16, 64);
      _tile_dpbsud(0, 4, 6);
      if (two) {
        _tile_loadd(7, b1 + k * 16, 64);
        _tile_dpbsud(1, 4, 7);
      }
      if constexpr (NT == 2) {
        _tile_loadd(5, w1 + k, K);
        _tile_dpbsud(2, 5, 6);
        if (two) _tile_dpbsud(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    if (two) _tile_stored(1, c[1], 64);
    if constexpr (NT == 2) {
      _tile_stored(2, c[2], 64);
      if (two) _tile_stored(3, c[3], 64);
    }
    for (int t = 0; t < NT; ++t) {
      amx_finish(c[2 * t], x, mb * 16, sw, row_sum, bias, y, N, n + 16 * t);
      if (two) amx_finish(c[2 * t + 1], x, (mb + 1) * 16, sw, row_sum, bias, y, N, n + 16 * t);
    }
  }
}

// Outputs [n0, n1): blocks of 32 and 16 by AMX, the last N % 16 by the VNNI kernel.
PREFIXCAP_AMX void amx_dynamic_rows(const AmxRows& ax, const QuantRows& x, const int8_t* w, const float* sw,
                                    const int32_t* row_sum, const float* bias, float* y, int64_t K, int64_t N,
                                    int64_t n0, int64_t n1) {
  x86::load_full_tiles();
  int64_t n = n0;
  for (; n + 32 <= n1; n += 32) amx_output_block<2>(ax, w, sw, row_sum, bias, y, K, N, n);
  for (; n + 16 <= n1; n += 16) amx_output_block<1>(ax, w, sw, row_sum, bias, y, K, N, n);
  _tile_release();
  if (n < n1) vnni_dynamic_rows(x, w, sw, row_sum, bias, y, ax.M, K, N, n, n1);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool detect_avx512f() {
#if PREFIXCAP_X86_KERNELS
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

std::atomic<SkinnyIsa>& isa_choice() {
  static std::atomic<SkinnyIsa> isa{detect_avx512f() ? SkinnyIsa::Avx512 : SkinnyIsa::Generic};
  return isa;
}

// Outputs [0, N) split over LibTorch's threads in blocks of 4 weight rows (at least `grain` blocks
// a task): `rows(n0, n1)` computes outputs [n0, n1) of every row, then `epilogue(n0, n1)` (if
// given) runs on them, on the same thread.
template <typename Rows>
void for_output_blocks(int64_t N, int64_t grain, const std::function<void(int64_t, int64_t)>* epilogue,
                       const Rows& rows) {
  at::parallel_for(0, (N + 3) / 4, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
    rows(n0, n1);
    if (epilogue) (*epilogue)(n0, n1);
  });
}

// y = scale * (x @ w^T) + bias, split by for_output_blocks.
template <typename W>
void run_rows(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t M, int64_t K,
              int64_t N, const std::function<void(int64_t, int64_t)>* epilogue = nullptr) {
  const bool avx512 = isa_choice().load() == SkinnyIsa::Avx512 && K % 16 == 0;
  for_output_blocks(N, 16, epilogue, [&](int64_t n0, int64_t n1) {
#if PREFIXCAP_X86_KERNELS
    if (avx512) return avx512_rows(x, w, scale, bias, y, M, K, N, n0, n1);
#endif
    (void)avx512;
    generic_rows(x, w, scale, bias, y, M, K, N, n0, n1);
  });
}

// Int8Dynamic: x quantised by rows (in parallel from 64 rows), then the integer product split over
// LibTorch's threads as run_rows splits its own (the VNNI kernel with the AVX-512 kernels on a
// processor that has VNNI, else the generic loop: both give the same bits).
void run_dynamic(const float* x, const WeightRows& w, const float* bias, float* y, int64_t M,
                 const std::function<void(int64_t, int64_t)>* epilogue) {
  const int64_t K = w.cols, N = w.rows;
  thread_local std::vector<uint8_t> q_buffer;
  thread_local std::vector<float> scale_buffer;
  q_buffer.resize(static_cast<size_t>(M * K));
  scale_buffer.resize(static_cast<size_t>(M));
  const bool vnni = isa_choice().load() == SkinnyIsa::Avx512 && cpu_has_avx512vnni();
  const bool amx = vnni && M >= kAmxMinRows && K % 64 == 0 && int8_gemm_isa() == Int8GemmIsa::Amx;
  thread_local std::vector<uint8_t> b_buffer;
  if (amx) b_buffer.resize(static_cast<size_t>((M + 15) / 16 * 16 * K));
  // (the calling thread's buffers: a worker naming them would get its own)
  uint8_t* const q = q_buffer.data();
  uint8_t* const b = b_buffer.data();
  float* const sx = scale_buffer.data();
  // many rows (batches of clips x beams) are quantised in parallel, in blocks of 16
  at::parallel_for(0, (M + 15) / 16, M >= 64 ? 1 : 1 << 20, [&](int64_t b0, int64_t b1) {
    const int64_t m0 = b0 * 16, m1 = std::min(M, b1 * 16);
    quantize_activation_rows(x + m0 * K, m1 - m0, K, K, q + m0 * K, K, sx + m0, vnni);
#if PREFIXCAP_X86_KERNELS
    if (amx) layout_amx_rows(q, m0, m1, M, K, b);
#endif
  });
  QuantRows xq;
  xq.q = q;
  xq.scale = sx;
  const int8_t* wq = static_cast<const int8_t*>(w.data);
#if PREFIXCAP_X86_KERNELS
  if (amx) {
    AmxRows ax;
    ax.b = b;
    ax.scale = sx;
    ax.M = M;
    ax.blocks = (M + 15) / 16;
    // blocks of 32 outputs (the last one shorter)
    at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * 32, n1 = std::min(N, b1 * 32);
      amx_dynamic_rows(ax, xq, wq, w.scale, w.row_sum, bias, y, K, N, n0, n1);
      if (epilogue) (*epilogue)(n0, n1);
    });
    return;
  }
#endif
  for_output_blocks(N, M > 64 ? 1 : 16, epilogue, [&](int64_t n0, int64_t n1) {
#if PREFIXCAP_X86_KERNELS
    if (vnni) return vnni_dynamic_rows(xq, wq, w.scale, w.row_sum, bias, y, M, K, N, n0, n1);
#endif
    generic_dynamic_rows(xq, wq, w.scale, w.row_sum, bias, y, M, K, N, n0, n1);
  });
}

bool cpu_float_input(const at::Tensor& x) {
  return x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu();
}

bool wants_grad(const at::Tensor& x) { return c10::GradMode::is_enabled() && x.requires_grad(); }

// The bias as N contiguous floats, or undefined.
at::Tensor float_bias(const at::Tensor& bias, int64_t N) {
  if (!bias.defined()) return bias;
  TORCH_CHECK(bias.numel() == N && bias.scalar_type() == at::kFloat && bias.device().is_cpu(),
              "skinny matmul: expected a float32 CPU bias of ", N, " values, got ", bias.scalar_type(), " ",
              bias.sizes());
  return bias.contiguous();
}

}  // namespace

bool cpu_has_avx512f() { return detect_avx512f(); }
SkinnyIsa skinny_isa() { return isa_choice().load(); }

const char* skinny_isa_name(SkinnyIsa isa) { return isa == SkinnyIsa::Avx512 ? "avx512" : "generic"; }

void force_skinny_isa(SkinnyIsa isa) {
  if (isa == SkinnyIsa::Avx512 && !detect_avx512f())
    throw std::invalid_argument("the AVX-512 kernels need a processor with AVX-512F; this one has none");
  isa_choice().store(isa);
}

bool skinny_applicable(const at::Tensor& x, const at::Tensor& weight) {
  if (!cpu_float_input(x) || x.size(0) > kMaxSkinnyRows || x.size(0) == 0) return false;
  if (weight.scalar_type() != at::kFloat || !weight.device().is_cpu()) return false;
  if (!weight.is_contiguous()) return false;
  if (c10::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) return false;
  return true;
}

at::Tensor skinny_matmul_nk(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& bias) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "skinny_matmul_nk: x ", x.sizes(), " and w ", w.sizes(), " do not fit");
  const at::Tensor b = float_bias(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  run_rows(x.data_ptr<float>(), w.data_ptr<float>(), nullptr, b.defined() ? b.data_ptr<float>() : nullptr,
           y.data_ptr<float>(), M, K, N);
  return y;
}

// ---------------------------------------------------------------------------------------
// packed weights

size_t PackedWeight::bytes() const {
  size_t n = defined() ? data.numel() * data.element_size() : 0;
  if (scale.defined()) n += scale.numel() * scale.element_size();
  if (row_sum.defined()) n += row_sum.numel() * row_sum.element_size();
  return n;
}

at::Tensor PackedWeight::dequantize() const {
  at::Tensor w = data.to(at::kFloat);
  return scale.defined() ? w.mul_(scale.unsqueeze(1)) : w;
}

at::Tensor PackedWeight::lookup_rows(const at::Tensor& index) const {
  const at::Tensor flat = index.reshape({-1});
  at::Tensor rows = data.index_select(0, flat).to(at::kFloat);
  if (scale.defined()) rows.mul_(scale.index_select(0, flat).unsqueeze(1));
  auto shape = index.sizes().vec();
  shape.push_back(cols());
  return rows.view(shape);
}

PackedWeight pack_weight(const at::Tensor& weight, WeightDtype dtype) {
  if (weight.dim() != 2 || weight.scalar_type() != at::kFloat || !weight.device().is_cpu())
    throw std::invalid_argument("pack_weight: expected a float32 CPU matrix, got " +
                                std::string(c10::toString(weight.scalar_type())) + " " + c10::str(weight.sizes()));
  c10::NoGradGuard no_grad;
  PackedWeight p;
  p.dtype = dtype;
  const at::Tensor w = weight.detach();
  switch (dtype) {
    case WeightDtype::Float32: p.data = w.contiguous().clone(); break;
    case WeightDtype::BFloat16: p.data = w.to(at::kBFloat16).contiguous(); break;
    case WeightDtype::Int8:
    case WeightDtype::Int8Dynamic: {
      const at::Tensor amax = w.abs().amax(1);
      p.scale = (amax / 127.0f).contiguous();
      // An all-zero row keeps scale 0 and q 0; divide by 1 there instead of 0.
      const at::Tensor divisor = at::where(amax > 0, p.scale, at::ones_like(p.scale));
      p.data = (w / divisor.unsqueeze(1)).round_().clamp_(-127, 127).to(at::kChar).contiguous();
      if (dtype == WeightDtype::Int8Dynamic) p.row_sum = p.data.sum(1, /*keepdim=*/false, at::kInt).contiguous();
      break;
    }
  }
  return p;
}

namespace {
// Above the fused kernel's rows (batches of clips times beams): a few output rows of the weight
// at a time are dequantised into one float32 block of about 1 MiB, which stays in cache while
// BLAS multiplies every input row by it, instead of a float32 copy of the whole matrix per call
// (~0.5 GB written and read back per step for GPT-2 124M). At 80-320 rows int8 runs at
// 0.68-1.15x the float32 product's speed (bench/linear_bench, docs/decoding.md): packed weights
// pay at small batches, not large ones.
at::Tensor blockwise_dequantized_linear(const at::Tensor& x_in, const PackedWeight& w, const at::Tensor& bias) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.rows();
  const int64_t block = std::max<int64_t>(16, ((int64_t(1) << 18) / std::max<int64_t>(K, 1)) / 16 * 16);
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t blocks = (N + block - 1) / block;
  // Each thread dequantises its own blocks into its own buffer and multiplies them with a
  // one-thread BLAS call (BLAS runs single-threaded inside LibTorch's parallel region), so
  // dequantising no longer leaves the other cores idle between the products.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor buffer = at::empty({block, K}, x.options());
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t n0 = bi * block, n = std::min(block, N - n0);
      if (w.dtype == WeightDtype::Int8)
        dequantize_block(w.data.data_ptr<int8_t>() + n0 * K, w.scale.data_ptr<float>() + n0, buffer.data_ptr<float>(), n, K);
      else
        dequantize_block(reinterpret_cast<const uint16_t*>(w.data.data_ptr<at::BFloat16>()) + n0 * K, nullptr,
                         buffer.data_ptr<float>(), n, K);
      const at::Tensor wb = buffer.narrow(0, 0, n);
      at::Tensor yb = bias.defined() ? at::addmm(bias.narrow(0, n0, n), x, wb.t()) : at::mm(x, wb.t());
      y.narrow(1, n0, n).copy_(yb);
    }
  });
  return y;
}
}  // namespace

at::Tensor packed_linear(const at::Tensor& x_in, const PackedWeight& w, const at::Tensor& bias) {
  TORCH_CHECK(w.defined(), "packed_linear: the weight is empty");
  TORCH_CHECK(cpu_float_input(x_in), "packed_linear: expected float32 CPU rows [M, K], got ",
              x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.rows();
  TORCH_CHECK(w.cols() == K, "packed_linear: x ", x_in.sizes(), " and w [", N, ", ", w.cols(), "] do not fit");
  const int64_t fused_rows = fused_rows_limit(w.dtype);
  if (M == 0 || wants_grad(x_in) || (M > fused_rows && w.dtype == WeightDtype::Float32))
    return at::linear(x_in, w.dequantize(), bias);
  if (M > fused_rows) return blockwise_dequantized_linear(x_in, w, float_bias(bias, N));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor b = float_bias(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  fused_rows_product(x.data_ptr<float>(), weight_rows(w), b.defined() ? b.data_ptr<float>() : nullptr,
                     y.data_ptr<float>(), M);
  return y;
}

// ---------------------------------------------------------------------------------------
// raw products for a fused decode step

WeightRows weight_rows(const PackedWeight& w) {
  TORCH_CHECK(w.defined(), "weight_rows: the weight is empty");
  WeightRows r;
  r.dtype = w.dtype;
  r.rows = w.rows();
  r.cols = w.cols();
  switch (w.dtype) {
    case WeightDtype::Float32: r.data = w.data.data_ptr<float>(); break;
    case WeightDtype::BFloat16: r.data = w.data.data_ptr<at::BFloat16>(); break;
    case WeightDtype::Int8:
    case WeightDtype::Int8Dynamic:
      r.data = w.data.data_ptr<int8_t>();
      r.scale = w.scale.data_ptr<float>();
      if (w.dtype == WeightDtype::Int8Dynamic) r.row_sum = w.row_sum.data_ptr<int32_t>();
      break;
  }
  return r;
}

WeightRows weight_rows(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu() && w.is_contiguous(),
              "weight_rows: expected a contiguous float32 CPU matrix, got ", w.scalar_type(), " ", w.sizes());
  WeightRows r;
  r.data = w.data_ptr<float>();
  r.rows = w.size(0);
  r.cols = w.size(1);
  return r;
}

int64_t fused_rows_limit(WeightDtype dtype) {
  switch (dtype) {
    case WeightDtype::Float32: return kMaxSkinnyRows;
    case WeightDtype::Int8Dynamic: return std::numeric_limits<int64_t>::max();
    default: return kMaxPackedFusedRows;
  }
}

namespace {

// avx512_block_topk_logsumexp in plain C++.
void generic_block_topk_logsumexp(const float* x, int64_t n, int64_t id0, int64_t k, float* values, int64_t* ids,
                                  float* m, double* s) {
  float bm = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    bm = std::max(bm, x[i]);
    if (!(x[i] > values[k - 1]) && ids[k - 1] >= 0) continue;
    int64_t j = k - 1;
    while (j > 0 && (x[i] > values[j - 1] || ids[j - 1] < 0)) {
      values[j] = values[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    values[j] = x[i];
    ids[j] = id0 + i;
  }
  double bs = 0;
  for (int64_t i = 0; i < n; ++i) bs += std::exp(double(x[i]) - bm);
  if (bm > *m) {
    *s = *s * std::exp(double(*m) - bm) + bs;
    *m = bm;
  } else {
    *s += bs * std::exp(double(bm) - *m);
  }
}

// Rows [n0, n0 + rows) of w.
WeightRows weight_rows_slice(const WeightRows& w, int64_t n0, int64_t rows) {
  WeightRows r = w;
  const size_t bytes = w.dtype == WeightDtype::Float32 ? 4 : w.dtype == WeightDtype::BFloat16 ? 2 : 1;
  r.data = static_cast<const char*>(w.data) + static_cast<size_t>(n0 * w.cols) * bytes;
  if (w.scale) r.scale = w.scale + n0;
  if (w.row_sum) r.row_sum = w.row_sum + n0;
  r.rows = rows;
  return r;
}

}  // namespace

void fused_rows_topk_logsumexp(const float* x, const WeightRows& w, int64_t M, int64_t k, float* values, int64_t* ids,
                               float* lse) {
  const int64_t N = w.rows;
  TORCH_CHECK(k >= 1 && k <= N, "fused_rows_topk_logsumexp: k = ", k, " for ", N, " outputs");
  constexpr int64_t kBlock = 2048;  // outputs per product: [M, 2048] floats stay in the caches
  thread_local std::vector<float> y;  // kept by the calling thread (megabytes for many rows)
  y.resize(static_cast<size_t>(M * std::min(kBlock, N)));
  std::vector<float> m(static_cast<size_t>(M), -std::numeric_limits<float>::infinity());
  std::vector<double> s(static_cast<size_t>(M), 0.0);
  float* const yp = y.data();  // (workers naming y would get their own)
  std::fill(values, values + M * k, -std::numeric_limits<float>::infinity());
  std::fill(ids, ids + M * k, int64_t(-1));
  const bool avx512 = isa_choice().load() == SkinnyIsa::Avx512;
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    const int64_t n = std::min(kBlock, N - n0);
    fused_rows_product(x, weight_rows_slice(w, n0, n), nullptr, yp, M);
    at::parallel_for(0, M, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
#if PREFIXCAP_X86_KERNELS
        if (avx512) {
          avx512_block_topk_logsumexp(yp + r * n, n, n0, k, values + r * k, ids + r * k, &m[r], &s[r]);
          continue;
        }
#endif
        (void)avx512;
        generic_block_topk_logsumexp(yp + r * n, n, n0, k, values + r * k, ids + r * k, &m[r], &s[r]);
      }
    });
  }
  for (int64_t r = 0; r < M; ++r) lse[r] = m[r] + static_cast<float>(std::log(s[r]));
}

void fused_rows_product(const float* x, const WeightRows& w, const float* bias, float* y, int64_t M,
                        const std::function<void(int64_t, int64_t)>& epilogue) {
  const int64_t limit = fused_rows_limit(w.dtype);
  TORCH_CHECK(M >= 1 && M <= limit, "fused_rows_product: ", M, " rows (1 to ", limit, " for ",
              weight_dtype_name(w.dtype), " weights)");
  const auto* e = epilogue ? &epilogue : nullptr;
  switch (w.dtype) {
    case WeightDtype::Float32:
      run_rows(x, static_cast<const float*>(w.data), nullptr, bias, y, M, w.cols, w.rows, e);
      break;
    case WeightDtype::BFloat16:
      run_rows(x, static_cast<const uint16_t*>(w.data), nullptr, bias, y, M, w.cols, w.rows, e);
      break;
    case WeightDtype::Int8:
      run_rows(x, static_cast<const int8_t*>(w.data), w.scale, bias, y, M, w.cols, w.rows, e);
      break;
    case WeightDtype::Int8Dynamic: run_dynamic(x, w, bias, y, M, e); break;
  }
}

void weight_row(const WeightRows& w, int64_t n, float* out) {
  const int64_t K = w.cols;
  switch (w.dtype) {
    case WeightDtype::Float32: std::memcpy(out, static_cast<const float*>(w.data) + n * K, K * sizeof(float)); break;
    case WeightDtype::BFloat16: {
      const uint16_t* row = static_cast<const uint16_t*>(w.data) + n * K;
      for (int64_t k = 0; k < K; ++k) out[k] = to_float(row[k]);
      break;
    }
    case WeightDtype::Int8:
    case WeightDtype::Int8Dynamic: {
      const int8_t* row = static_cast<const int8_t*>(w.data) + n * K;
      for (int64_t k = 0; k < K; ++k) out[k] = to_float(row[k]) * w.scale[n];
      break;
    }
  }
}

bool attention_head_avx512(const DecodeAttentionArgs& args, int64_t b, int64_t h, float* scratch) {
#if PREFIXCAP_X86_KERNELS
  if (isa_choice().load() == SkinnyIsa::Avx512 && args.D % 16 == 0 && args.D > 0) {
    attention_head(args, b, h, scratch);
    return true;
  }
#endif
  (void)args, (void)b, (void)h, (void)scratch;
  return false;
}

void gelu_tanh_in_place(float* x, int64_t n) {
#if PREFIXCAP_X86_KERNELS
  if (isa_choice().load() == SkinnyIsa::Avx512) return gelu_tanh_rows(x, n);
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

// ---------------------------------------------------------------------------------------
// the rest of a decode step

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logsumexp(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && k >= 1 && k <= logits.size(1), "topk_logsumexp: logits ", logits.sizes(),
              ", k ", k);
#if PREFIXCAP_X86_KERNELS
  if (isa_choice().load() == SkinnyIsa::Avx512 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
      !wants_grad(logits)) {
    const at::Tensor x = logits.contiguous();
    const int64_t N = x.size(0), V = x.size(1);
    at::Tensor values = at::empty({N, k}, x.options()), ids = at::empty({N, k}, x.options().dtype(at::kLong));
    at::Tensor lse = at::empty({N, 1}, x.options());
    const float* xp = x.data_ptr<float>();
    float *vp = values.data_ptr<float>(), *lp = lse.data_ptr<float>();
    int64_t* ip = ids.data_ptr<int64_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_topk_logsumexp(xp + r * V, V, k, vp + r * k, ip + r * k, lp + r);
    });
    return {values, ids, lse};
  }
#endif
  auto top = logits.topk(k, -1);
  return {std::get<0>(top), std::get<1>(top), at::logsumexp(logits, -1, /*keepdim=*/true)};
}

at::Tensor gelu_tanh(const at::Tensor& x) {
#if PREFIXCAP_X86_KERNELS
  if (isa_choice().load() == SkinnyIsa::Avx512 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
      !wants_grad(x)) {
    at::Tensor y = x.contiguous().clone();
    float* p = y.data_ptr<float>();
    const int64_t n = y.numel();
    at::parallel_for(0, (n + 4095) / 4096, 1, [&](int64_t b0, int64_t b1) {
      gelu_tanh_rows(p + b0 * 4096, std::min(n, b1 * 4096) - b0 * 4096);
    });
    return y;
  }
#endif
  return at::gelu(x, "tanh");
}

}  // namespace prefixcap
