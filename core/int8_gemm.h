// Integer matrix products for frozen layers with many rows (the encoders: a ViT's tokens, a
// CNN's positions), W8A8 with the quantisation of WeightDtype::Int8Dynamic (lm/skinny_matmul.h):
//   weights, per output row n:   scale[n] = max_k |w[n, k]| / 127,  q[n, k] = round(w[n, k] / scale[n]);
//   activations, per row m:      sx[m] = max_k |x[m, k]| / 127,     p[m, k] = round(x[m, k] * 127 / max_k |x[m, k]|)
//                                (ties to even, within +-127; a zero row gives sx = 0, p = 0);
//   y[m, n] = sx[m] * scale[n] * sum_k p[m, k] q[n, k] + bias[n], the sum exact in int32.
// The weights are laid out for AVX-512 VNNI's vpdpbusd with the activations broadcast (64 output
// rows x 4 consecutive k per 256 bytes), so a tile of 6 rows x 64 outputs accumulates in 24
// registers with no reductions; activations are stored as p + 128 (unsigned) and
// 128 * sum_k q[n, k] is subtracted at the end. A plain C++ kernel computes the same integers and
// the same float epilogue (same bits) on processors without VNNI. On processors with AMX-INT8 the
// same packed panels are multiplied with tdpbusd in passes of 32 (or 16) rows x 32 outputs, where
// rows are a multiple of 64 bytes; the sums are exact integers either way, so all three give the
// same bits.
#pragma once

#include <cstdint>

#include <ATen/Tensor.h>

namespace prefixcap {

// AVX-512 F, BW and VNNI, as the processor reports them.
bool cpu_has_avx512vnni();
// AMX-TILE and AMX-INT8 as the processor reports them, with AVX-512 VNNI, and the operating
// system's permission to use the tiles (asked for once; Linux only).
bool cpu_has_amx_int8();

// The instruction set int8_matmul uses: the best the processor has (detected_int8_gemm_isa),
// unless forced (tests, benchmarks; forcing one the processor lacks throws std::invalid_argument).
enum class Int8GemmIsa { Generic, Vnni, Amx };
Int8GemmIsa int8_gemm_isa();
Int8GemmIsa detected_int8_gemm_isa();
const char* int8_gemm_isa_name(Int8GemmIsa isa);  // "generic", "avx512-vnni", "amx"
void force_int8_gemm_isa(Int8GemmIsa isa);

// Quantises M rows of K floats (row stride ldx) to p + 128 in q (row stride ldq >= K; bytes
// K..ldq-1 of each row are set to 128, the code of 0) and their scales sx[M]. `vnni` picks the
// AVX-512 loop (the same bits as the plain one).
void quantize_activation_rows(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq, float* sx,
                              bool vnni);

// A frozen [N, K] weight matrix (and bias) packed for int8_matmul.
struct Int8Matrix {
  at::Tensor packed;  // int8 [groups = ceil(N / 64), ceil(K / 4), 64, 4]; padding 0
  at::Tensor scale;   // float32 [groups * 64]; padding 0
  at::Tensor offset;  // int32 [groups * 64]: 128 * sum_k q[n, k]
  at::Tensor bias;    // float32 [groups * 64] (zeros when the layer has none)
  int64_t rows = 0, cols = 0;  // N, K

  bool defined() const { return packed.defined(); }
  int64_t padded_cols() const { return (cols + 3) / 4 * 4; }
  // The weights as the product sees them, float32 [N, K]: q * scale.
  at::Tensor dequantize() const;
};

// Packs a float [N, K] CPU weight and an optional [N] bias (copied; the originals are left as
// they were). Throws std::invalid_argument on other shapes, devices or types.
Int8Matrix pack_int8_matrix(const at::Tensor& weight, const at::Tensor& bias = {});

// Activations quantised once for one or more products: q uint8 [M, padded K], scale float [M].
struct Int8Rows {
  at::Tensor q, scale;
  // false: p in [-127, 127] stored as p + 128, scale = max |x| / 127 (any values).
  // true: the values are >= 0 (after a ReLU), p = round(x * 255 / max x) in [0, 255] stored as
  // is, scale = max x / 255: twice the resolution; negative values would be clamped to 0.
  bool nonnegative = false;
};
Int8Rows quantize_rows(const at::Tensor& x);  // float32 CPU [M, K]
// The 3x3, stride-1, zero-padded patches of x [B, C, H, W] (any memory format), one row per
// output position (b, h, w), each row's values in the order (kernel row, kernel column, channel)
// and quantised as quantize_rows would quantise it: a 3x3 convolution with weight [O, C, 3, 3] is
// then int8_matmul with pack_int8_matrix(weight.permute({0, 2, 3, 1}).reshape({O, 9 * C})),
// giving [B * H * W, O] (channels-last order). Built without the float im2col matrix.
Int8Rows quantize_patches_3x3(const at::Tensor& x, bool nonnegative = false);

// A 3x3, stride-1, zero-padded convolution of x [B, C, H, W] with a weight packed as above
// (pack_int8_matrix(weight.permute({0, 2, 3, 1}).reshape({O, 9 * C}), bias)), optionally followed
// by ReLU: int8_matmul(quantize_patches_3x3(x, nonnegative_input), w) without the patch matrix
// (each task quantises the 48 patches it multiplies). Returns [B, O, H, W] float32, channels-last
// in memory.
at::Tensor int8_conv3x3(const at::Tensor& x, const Int8Matrix& w, bool relu, bool nonnegative_input = false);

// y [M, N] float32 = the product above, split over LibTorch's threads in tasks of up to 48 rows x
// 64 outputs.
at::Tensor int8_matmul(const Int8Rows& x, const Int8Matrix& w);
// x float32 [..., K] -> [..., N]: quantise the rows, then int8_matmul.
at::Tensor int8_linear(const at::Tensor& x, const Int8Matrix& w);

}  // namespace prefixcap
