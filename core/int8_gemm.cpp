#include "core/int8_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "core/x86_kernels.h"

#if PREFIXCAP_X86_KERNELS
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace prefixcap {

namespace {

constexpr int64_t kGroup = 64;     // output rows per packed panel (4 vectors of 16 int32)
constexpr int64_t kTileRows = 6;   // activation rows per register tile (6 x 4 accumulators)
constexpr int64_t kTaskRows = 48;  // activation rows per parallel task
constexpr int64_t kAmxRows = 16;   // activation rows per AMX tile

// How a row of activations is coded in bytes. Signed (any values): p in [-127, 127] stored as
// p + 128, scale amax / 127. NonNegative (inputs known to be >= 0, as after a ReLU): p in
// [0, 255] stored as is, scale amax / 255: twice the resolution, and no offset to subtract.
struct Code {
  float levels, lo, hi;
  int32_t zero;
};
constexpr Code kSigned{127.0f, -127.0f, 127.0f, 128};
constexpr Code kNonNegative{255.0f, 0.0f, 255.0f, 0};

// A row's scale sx = amax / levels into *sx; returns the factor its values are multiplied by.
inline float activation_step(float amax, float* sx, const Code& code) {
  *sx = amax / code.levels;
  return amax > 0 ? code.levels / amax : 0.0f;
}

// One activation as the integer kernels read it: nearbyint(x * inv) within [lo, hi], plus zero.
inline uint8_t quantize_activation(float x, float inv, const Code& code) {
  const float p = std::min(code.hi, std::max(code.lo, std::nearbyint(x * inv)));
  return static_cast<uint8_t>(static_cast<int32_t>(p) + code.zero);
}

// y = float(d - offset) * (sx * scale) + bias: the same float operations in both kernels.
inline float finish(int32_t d, int32_t offset, float sx, float scale, float bias) {
  return std::fma(static_cast<float>(d - offset), sx * scale, bias);
}

PREFIXCAP_CLONES float generic_amax(const float* __restrict x, int64_t K) {
  float amax = 0;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

PREFIXCAP_CLONES void generic_quantize_values(const float* __restrict x, int64_t K, float inv, uint8_t* __restrict q,
                                              const Code& code) {
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_activation(x[k], inv, code);
}

// Rows [m0, m1) x outputs [g * 64, g * 64 + 64) of the product, plain C++ (the compiler
// vectorises the 64 outputs).
PREFIXCAP_CLONES void generic_task(const uint8_t* __restrict xq, const float* __restrict sx, int64_t ldq,
                                   const Int8Matrix& w, float* __restrict y, int64_t g, int64_t m0, int64_t m1, bool relu,
                                   bool offset_free) {
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
    for (int64_t c = 0; c < outputs; ++c) {
      const float v = finish(acc[c], offset_free ? 0 : offset[c], sx[m], scale[c], bias[c]);
      ym[c] = relu ? std::max(v, 0.0f) : v;
    }
  }
}

#if PREFIXCAP_X86_KERNELS
using x86::dpbusd;
// GCC 12 reports its own _mm512_undefined_* (inside the reduce intrinsics) as uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

PREFIXCAP_VNNI float vnni_amax(const float* x, int64_t K) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// generic_quantize_values' arithmetic, 16 values at a time (cvtps_epi32 rounds to nearest even,
// as nearbyint does in the default rounding mode).
PREFIXCAP_VNNI void vnni_quantize_values(const float* x, int64_t K, float inv, uint8_t* q, const Code& code) {
  const __m512 lo = _mm512_set1_ps(code.lo), hi = _mm512_set1_ps(code.hi), vinv = _mm512_set1_ps(inv);
  const __m512i code_of_zero = _mm512_set1_epi32(code.zero);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 p = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(p), code_of_zero)));
  }
  for (; k < K; ++k) q[k] = quantize_activation(x[k], inv, code);
}

// Panel g of a packed matrix (64 outputs), as the kernels read it.
struct Panel {
  const int8_t* q;  // [K4][64][4]
  const float *scale, *bias;
  const int32_t* offset;
  int64_t K4, N, outputs;  // outputs: this panel's real ones (64, or fewer in the last)
  float* y;                // the product's first row at this panel's first output (stride N)
  Panel(const Int8Matrix& w, int64_t g, int64_t ldq, float* y_all)
      : q(w.packed.data_ptr<int8_t>() + g * (ldq / 4) * kGroup * 4),
        scale(w.scale.data_ptr<float>() + g * kGroup),
        bias(w.bias.data_ptr<float>() + g * kGroup),
        offset(w.offset.data_ptr<int32_t>() + g * kGroup),
        K4(ldq / 4),
        N(w.rows),
        outputs(std::min(kGroup, w.rows - g * kGroup)),
        y(y_all + g * kGroup) {}
};

// The epilogue of both kernels: rows m .. m + rows - 1, their sums for outputs 16j .. 16j + 15
// given by sums(i, j), to y = float(d - offset) * (sx * scale) + bias (then ReLU).
template <typename Sums>
PREFIXCAP_VNNI inline void store_rows(const Panel& p, const float* sx, int64_t m, int64_t rows, bool relu,
                                      bool offset_free, const Sums& sums) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c0 = 16 * j;
    if (c0 >= p.outputs) break;
    const __mmask16 keep = p.outputs - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (p.outputs - c0)) - 1);
    const __m512i off = offset_free ? _mm512_setzero_si512() : _mm512_loadu_si512(p.offset + c0);
    const __m512 sc = _mm512_loadu_ps(p.scale + c0), b = _mm512_loadu_ps(p.bias + c0);
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums(i, j), off));
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(sx[m + i]), sc);
      const __m512 out = _mm512_fmadd_ps(v, s, b);
      _mm512_mask_storeu_ps(p.y + (m + i) * p.N + c0, keep, relu ? _mm512_max_ps(out, _mm512_setzero_ps()) : out);
    }
  }
}

// MB rows from m x the 64 outputs of panel g: per 4 values of k, 4 vectors of weights (16
// outputs x 4 k each) and MB broadcasts of 4 activation bytes feed 4 x MB vpdpbusd.
template <int MB>
PREFIXCAP_VNNI void vnni_tile(const uint8_t* xq, const float* sx, int64_t ldq, const Panel& p, int64_t m, bool relu,
                              bool offset_free) {
  __m512i acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* xm = xq + m * ldq;
  for (int64_t k4 = 0; k4 < p.K4; ++k4) {
    const int8_t* wk = p.q + k4 * kGroup * 4;
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(wk + 64 * j);
    for (int i = 0; i < MB; ++i) {
      int32_t four;
      std::memcpy(&four, xm + i * ldq + 4 * k4, 4);
      const __m512i xv = _mm512_set1_epi32(four);
      for (int j = 0; j < 4; ++j) acc[i][j] = dpbusd(acc[i][j], xv, wv[j]);
    }
  }
  store_rows(p, sx, m, MB, relu, offset_free, [&](int64_t i, int j) PREFIXCAP_VNNI { return acc[i][j]; });
}

PREFIXCAP_VNNI void vnni_task(const uint8_t* xq, const float* sx, int64_t ldq, const Int8Matrix& w, float* y, int64_t g,
                              int64_t m0, int64_t m1, bool relu, bool offset_free) {
  const Panel p(w, g, ldq, y);
  int64_t m = m0;
  for (; m + kTileRows <= m1; m += kTileRows) vnni_tile<kTileRows>(xq, sx, ldq, p, m, relu, offset_free);
  switch (m1 - m) {
    case 5: vnni_tile<5>(xq, sx, ldq, p, m, relu, offset_free); break;
    case 4: vnni_tile<4>(xq, sx, ldq, p, m, relu, offset_free); break;
    case 3: vnni_tile<3>(xq, sx, ldq, p, m, relu, offset_free); break;
    case 2: vnni_tile<2>(xq, sx, ldq, p, m, relu, offset_free); break;
    case 1: vnni_tile<1>(xq, sx, ldq, p, m, relu, offset_free); break;
    default: break;
  }
}

// The AMX kernel. A pass multiplies 16 * RB rows (RB = 1 or 2) by 32 outputs over all of k: per
// 64 values of k, RB A tiles (16 rows x 64 bytes of k each, tmm4/5) and two B tiles (16 groups of
// 4 k x 16 outputs, tmm6/7) feed 2 * RB tdpbusd into the sums C (tmm0-3, 16 x 16 int32 each);
// two passes cover a panel's 64 outputs. The packed panel's 256-byte rows (64 outputs x 4 k) are
// B tiles as they lie: outputs 16j..16j+15 are bytes 64j..64j+63 of each, read with a stride of
// 256. (With one A and four B tiles per step the B loads, from L2, held the tiles back.) Needs
// ldq % 64 == 0. The sums go to c ([row][64] int32) and are finished with vnni_tile's epilogue
// (so the same bits).
template <int RB>
PREFIXCAP_AMX void amx_tile(const uint8_t* a, int64_t lda, const int8_t* panel, int64_t K4, int32_t* c) {
  const uint8_t* a1 = a + 16 * lda;
  for (int half = 0; half < 2; ++half) {
    const int8_t* b = panel + 128 * half;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (RB == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t k4 = 0; k4 < K4; k4 += 16) {
      const int8_t* bk = b + k4 * kGroup * 4;
      _tile_loadd(4, a + 4 * k4, lda);
      _tile_loadd(6, bk, kGroup * 4);
      _tile_dpbusd(0, 4, 6);
      _tile_loadd(7, bk + 64, kGroup * 4);
      _tile_dpbusd(1, 4, 7);
      if constexpr (RB == 2) {
        _tile_loadd(5, a1 + 4 * k4, lda);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
    }
    int32_t* ch = c + 32 * half;  // rows 0-15 (then 16-31), outputs 32 * half + (0..31)
    _tile_stored(0, ch, kGroup * 4);
    _tile_stored(1, ch + 16, kGroup * 4);
    if constexpr (RB == 2) {
      _tile_stored(2, ch + 16 * kGroup, kGroup * 4);
      _tile_stored(3, ch + 16 * kGroup + 16, kGroup * 4);
    }
  }
}

PREFIXCAP_AMX void amx_task(const uint8_t* xq, const float* sx, int64_t ldq, const Int8Matrix& w, float* y, int64_t g,
                            int64_t m0, int64_t m1, bool relu, bool offset_free) {
  const Panel p(w, g, ldq, y);
  alignas(64) int32_t c[2 * kAmxRows * kGroup];
  auto sums = [&](int64_t i, int j) PREFIXCAP_AMX { return _mm512_load_si512(c + i * kGroup + 16 * j); };
  int64_t m = m0;
  x86::load_full_tiles();
  for (; m + 2 * kAmxRows <= m1; m += 2 * kAmxRows) {
    amx_tile<2>(xq + m * ldq, ldq, p.q, p.K4, c);
    store_rows(p, sx, m, 2 * kAmxRows, relu, offset_free, sums);
  }
  if (m + kAmxRows <= m1) {
    amx_tile<1>(xq + m * ldq, ldq, p.q, p.K4, c);
    store_rows(p, sx, m, kAmxRows, relu, offset_free, sums);
    m += kAmxRows;
  }
  _tile_release();
  if (m < m1) vnni_task(xq, sx, ldq, w, y, g, m, m1, relu, offset_free);  // the last rows (< 16)
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

float amax_of(const float* x, int64_t K, bool vnni) {
#if PREFIXCAP_X86_KERNELS
  if (vnni) return vnni_amax(x, K);
#endif
  (void)vnni;
  return generic_amax(x, K);
}

void quantize_values(const float* x, int64_t K, float inv, uint8_t* q, bool vnni, const Code& code = kSigned) {
#if PREFIXCAP_X86_KERNELS
  if (vnni) return vnni_quantize_values(x, K, inv, q, code);
#endif
  (void)vnni;
  generic_quantize_values(x, K, inv, q, code);
}

bool detect_vnni() {
#if PREFIXCAP_X86_KERNELS
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// AMX-TILE and AMX-INT8 (CPUID leaf 7), VNNI for the epilogues, and Linux's permission to use
// the tile registers (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile instruction
// faults). Asked once per process.
bool detect_amx() {
#if PREFIXCAP_X86_KERNELS && defined(__linux__)
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!detect_vnni() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return has;
#else
  return false;
#endif
}

Int8GemmIsa detected_isa() {
  return detect_amx() ? Int8GemmIsa::Amx : detect_vnni() ? Int8GemmIsa::Vnni : Int8GemmIsa::Generic;
}

std::atomic<Int8GemmIsa>& isa_choice() {
  static std::atomic<Int8GemmIsa> choice{detected_isa()};
  return choice;
}

void check_cpu_float(const at::Tensor& t, int64_t dim, const char* what) {
  if (!t.defined() || t.dim() != dim || !t.device().is_cpu() || !at::isFloatingType(t.scalar_type()))
    throw std::invalid_argument(std::string("int8 product: the ") + what + " must be a " + std::to_string(dim) +
                                "-d floating-point CPU tensor");
}

// Whether `isa` multiplies rows of ldq bytes with AMX tiles: rows padded to a multiple of 64
// bytes (the published models' shapes: 9 x 64 k channels, 768, 3072); others go to the VNNI
// kernel, which gives the same bits.
bool uses_amx(Int8GemmIsa isa, int64_t ldq) { return isa == Int8GemmIsa::Amx && ldq % 64 == 0; }

// offset_free: the rows are coded NonNegative (no 128 to take out).
void run_task(const uint8_t* xq, const float* sx, int64_t ldq, const Int8Matrix& w, float* y, int64_t g, int64_t m0,
              int64_t m1, bool relu, bool offset_free, Int8GemmIsa isa) {
#if PREFIXCAP_X86_KERNELS
  if (uses_amx(isa, ldq)) return amx_task(xq, sx, ldq, w, y, g, m0, m1, relu, offset_free);
  if (isa != Int8GemmIsa::Generic) return vnni_task(xq, sx, ldq, w, y, g, m0, m1, relu, offset_free);
#endif
  (void)isa;
  generic_task(xq, sx, ldq, w, y, g, m0, m1, relu, offset_free);
}

// The AVX-512 quantiser goes with the VNNI and AMX kernels.
bool avx512_quantiser() { return int8_gemm_isa() != Int8GemmIsa::Generic; }

// y [M, N] = the product of M quantised rows (stride padded_cols) and w, split over LibTorch's
// threads: rows in chunks of at most kTaskRows, as even as whole tiles allow (50 rows: 30 + 20,
// not 48 + 2; with AMX tiles of 16, 32 + 18), times the panels of 64 outputs, rows-chunk major
// (a thread's consecutive tasks reuse its chunk of activations).
void multiply_rows(const uint8_t* xq, const float* sx, int64_t M, const Int8Matrix& w, float* y, bool relu,
                   bool offset_free) {
  if (M == 0) return;
  const Int8GemmIsa isa = int8_gemm_isa();
  const int64_t ldq = w.padded_cols(), groups = w.packed.size(0), chunks = (M + kTaskRows - 1) / kTaskRows;
  const int64_t tile = uses_amx(isa, ldq) ? kAmxRows : kTileRows;
  const int64_t chunk_rows = ((M + chunks - 1) / chunks + tile - 1) / tile * tile;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t % groups, m0 = (t / groups) * chunk_rows, m1 = std::min(M, m0 + chunk_rows);
      if (m0 < m1) run_task(xq, sx, ldq, w, y, g, m0, m1, relu, offset_free, isa);
    }
  });
}

// The 3x3 patches of a float tensor [B, C, H, W], read channels-last.
struct Patches {
  at::Tensor xc, pixel_amax;
  const float* x = nullptr;     // [B, H, W, C]
  const float* amax = nullptr;  // [B, H, W]: each pixel's largest |value|
  int64_t B = 0, C = 0, H = 0, W = 0;

  explicit Patches(const at::Tensor& input) {
    check_cpu_float(input, 4, "input of the convolution");
    xc = input.detach().to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
    x = xc.data_ptr<float>();
    B = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
    pixel_amax = at::empty({B, H, W}, at::kFloat);
    float* pa = pixel_amax.data_ptr<float>();
    const bool vnni = avx512_quantiser();
    at::parallel_for(0, B * H * W, 256, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) pa[p] = amax_of(x + p * C, C, vnni);
    });
    amax = pa;
  }

  // Rows [m0, m1) (position m = (b * H + h) * W + w) into q (stride ldq) and sx, from index 0.
  // A patch's largest |value| is the largest of its pixels' (the zero padding adds nothing).
  void quantize(int64_t m0, int64_t m1, int64_t ldq, uint8_t* q, float* sx, bool vnni, const Code& code) const {
    for (int64_t m = m0; m < m1; ++m, q += ldq, ++sx) {
      const int64_t b = m / (H * W), h = m / W % H, w = m % W;
      float patch_amax = 0;
      for (int64_t hh = std::max<int64_t>(0, h - 1); hh <= std::min(H - 1, h + 1); ++hh)
        for (int64_t ww = std::max<int64_t>(0, w - 1); ww <= std::min(W - 1, w + 1); ++ww)
          patch_amax = std::max(patch_amax, amax[(b * H + hh) * W + ww]);
      const float inv = activation_step(patch_amax, sx, code);
      uint8_t* out = q;
      for (int64_t dh = -1; dh <= 1; ++dh)
        for (int64_t dw = -1; dw <= 1; ++dw, out += C) {
          const int64_t hh = h + dh, ww = w + dw;
          if (hh < 0 || hh >= H || ww < 0 || ww >= W) std::memset(out, code.zero, static_cast<size_t>(C));
          else quantize_values(x + ((b * H + hh) * W + ww) * C, C, inv, out, vnni, code);
        }
      std::memset(out, code.zero, static_cast<size_t>(ldq - 9 * C));
    }
  }
};

}  // namespace

bool cpu_has_avx512vnni() { return detect_vnni(); }

Int8GemmIsa int8_gemm_isa() { return isa_choice().load(); }

bool cpu_has_amx_int8() { return detect_amx(); }

Int8GemmIsa detected_int8_gemm_isa() { return detected_isa(); }

const char* int8_gemm_isa_name(Int8GemmIsa isa) {
  switch (isa) {
    case Int8GemmIsa::Amx: return "amx";
    case Int8GemmIsa::Vnni: return "avx512-vnni";
    case Int8GemmIsa::Generic: break;
  }
  return "generic";
}

void force_int8_gemm_isa(Int8GemmIsa isa) {
  if (isa == Int8GemmIsa::Vnni && !detect_vnni())
    throw std::invalid_argument("the VNNI int8 kernel needs a processor with AVX-512 VNNI; this one has none");
  if (isa == Int8GemmIsa::Amx && !detect_amx())
    throw std::invalid_argument("the AMX int8 kernel needs a processor with AMX-INT8 (and the kernel's permission to use it)");
  isa_choice().store(isa);
}

void quantize_activation_rows(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq, float* sx,
                              bool vnni) {
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* qm = q + m * ldq;
    const float inv = activation_step(amax_of(x + m * ldx, K, vnni), sx + m, kSigned);
    quantize_values(x + m * ldx, K, inv, qm, vnni);
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
  const bool vnni = avx512_quantiser();
  const float* xp = xf.data_ptr<float>();
  uint8_t* qp = r.q.data_ptr<uint8_t>();
  float* sp = r.scale.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    quantize_activation_rows(xp + m0 * K, m1 - m0, K, K, qp + m0 * ldq, ldq, sp + m0, vnni);
  });
  return r;
}

Int8Rows quantize_patches_3x3(const at::Tensor& x, bool nonnegative) {
  const Patches p(x);
  const Code& code = nonnegative ? kNonNegative : kSigned;
  const int64_t M = p.B * p.H * p.W, ldq = (9 * p.C + 3) / 4 * 4;
  Int8Rows r;
  r.q = at::empty({M, ldq}, at::kByte);
  r.scale = at::empty({M}, at::kFloat);
  const bool vnni = avx512_quantiser();
  uint8_t* qp = r.q.data_ptr<uint8_t>();
  float* sp = r.scale.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) { p.quantize(m0, m1, ldq, qp + m0 * ldq, sp + m0, vnni, code); });
  r.nonnegative = nonnegative;
  return r;
}

at::Tensor int8_matmul(const Int8Rows& x, const Int8Matrix& w) {
  if (!w.defined()) throw std::invalid_argument("int8 product: the weight is not packed");
  if (!x.q.defined() || x.q.dim() != 2 || x.q.scalar_type() != at::kByte || x.q.size(1) != w.padded_cols() ||
      !x.scale.defined() || x.scale.numel() != x.q.size(0))
    throw std::invalid_argument("int8 product: activations quantised for " +
                                std::to_string(x.q.defined() ? x.q.size(-1) : 0) + " columns, the weight has " +
                                std::to_string(w.cols) + " (" + std::to_string(w.padded_cols()) + " padded)");
  at::Tensor y = at::empty({x.q.size(0), w.rows}, at::kFloat);
  multiply_rows(x.q.data_ptr<uint8_t>(), x.scale.data_ptr<float>(), x.q.size(0), w, y.data_ptr<float>(), false,
                x.nonnegative);
  return y;
}

at::Tensor int8_conv3x3(const at::Tensor& x, const Int8Matrix& w, bool relu, bool nonnegative_input) {
  if (!w.defined()) throw std::invalid_argument("int8 convolution: the weight is not packed");
  const Patches p(x);
  if (9 * p.C != w.cols)
    throw std::invalid_argument("int8 convolution: " + std::to_string(p.C) + " input channels, the weight takes " +
                                std::to_string(w.cols) + " values per position (9 per channel)");
  const int64_t M = p.B * p.H * p.W, N = w.rows, ldq = w.padded_cols();
  at::Tensor y = at::empty({p.B, p.H, p.W, N}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const Int8GemmIsa isa = int8_gemm_isa();
  const bool vnni = avx512_quantiser();
  const Code& code = nonnegative_input ? kNonNegative : kSigned;
  const int64_t chunks = (M + kTaskRows - 1) / kTaskRows;
  if (chunks >= 4 * at::get_num_threads()) {
    // Many positions: each task quantises its 48 patches into a buffer of its own and multiplies
    // them by every output at once, while they are in L1 (no [positions, 9C] matrix in memory).
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      thread_local std::vector<uint8_t> q;
      thread_local std::vector<float> sx;
      q.resize(static_cast<size_t>(kTaskRows * ldq));
      sx.resize(kTaskRows);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t m0 = c * kTaskRows, rows = std::min(kTaskRows, M - m0);
        p.quantize(m0, m0 + rows, ldq, q.data(), sx.data(), vnni, code);
        for (int64_t g = 0; g < w.packed.size(0); ++g)
          run_task(q.data(), sx.data(), ldq, w, yp + m0 * N, g, 0, rows, relu, nonnegative_input, isa);
      }
    });
  } else {
    // Few positions (the late layers of one clip): quantise them all, then split the product over
    // outputs as well as rows.
    std::vector<uint8_t> q(static_cast<size_t>(M * ldq));
    std::vector<float> sx(static_cast<size_t>(M));
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      p.quantize(m0, m1, ldq, q.data() + m0 * ldq, sx.data() + m0, vnni, code);
    });
    multiply_rows(q.data(), sx.data(), M, w, yp, relu, nonnegative_input);
  }
  return y.permute({0, 3, 1, 2});  // [B, N, H, W], channels-last in memory
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
