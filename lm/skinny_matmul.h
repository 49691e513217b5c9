// Matrix products with few rows (decoding: 1 row per sequence, a handful of beams). BLAS gemm
// packs the whole weight matrix before multiplying, which for a few rows costs more than the
// product; these kernels stream each weight once, at memory speed, split over LibTorch's
// threads. Used in inference only (no autograd), float32 activations on the CPU.
//
// Weights may also be kept in a compact type (PackedWeight: bfloat16, or int8 with one scale
// per output row); the kernels then convert each weight as they read it (fused
// dequantise-multiply), so a decode step reads 2 or 1 bytes per weight instead of 4. With
// Int8Dynamic the activations are quantised too (per row, at run time) and the products are
// integer dot products (AVX-512 VNNI where the processor has it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>

#include <ATen/Tensor.h>

#include "core/int8_gemm.h"
#include "core/weight_dtype.h"

namespace prefixcap {

constexpr int64_t kMaxSkinnyRows = 8;        // float32 weights: above this, BLAS gemm is as fast
constexpr int64_t kMaxPackedFusedRows = 64;  // packed weights: above this, dequantise + BLAS

// The instruction sets the kernels come in. Generic is plain C++ (vectorised by the compiler
// for AVX2 or the x86-64 baseline); Avx512 uses AVX-512F intrinsics with register blocking
// (4 weight rows x up to 6 input rows per pass), needs K % 16 == 0, and is chosen at run time when
// the processor has AVX-512F.
enum class SkinnyIsa { Generic, Avx512 };
SkinnyIsa skinny_isa();
const char* skinny_isa_name(SkinnyIsa isa);
// For tests and benchmarks: use `isa` from now on (Avx512 on a processor without it throws).
void force_skinny_isa(SkinnyIsa isa);
bool cpu_has_avx512f();
// AVX-512 VNNI and BW (the Int8Dynamic kernel's vpdpbusd and byte masks): cpu_has_avx512vnni(),
// core/int8_gemm.h.

// True when the float32 kernel applies: CPU float32, contiguous, no gradient needed, rows <= max.
bool skinny_applicable(const at::Tensor& x, const at::Tensor& weight);

// y = x @ w^T (+ bias) with w stored [N, K] (Linear / embedding layout). x [M, K] -> [M, N].
at::Tensor skinny_matmul_nk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = {});

// The storage type of frozen inference weights (`--lm-dtype`): WeightDtype, core/weight_dtype.h.

// A frozen [N, K] weight matrix in a compact type, for inference:
//   BFloat16: each weight rounded to the nearest bfloat16 (ties to even);
//   Int8: symmetric per output row, w[n, k] ~ q[n, k] * scale[n], scale[n] = max_k |w[n, k]| / 127,
//         q = round(w / scale) (so |w - q * scale| <= scale / 2 for every weight);
//   Int8Dynamic: the same q and scale, and row_sum[n] = sum_k q[n, k]. A product then quantises
//         each row of x the same way (sx[m] = max_k |x[m, k]| / 127,
//         p[m, k] = round(x[m, k] * (127 / max_k |x[m, k]|)), ties to even) and computes
//         y[m, n] = sx[m] * scale[n] * sum_k p[m, k] q[n, k] + bias[n], the sum exactly in
//         integers (p is stored as p + 128, unsigned, for vpdpbusd; row_sum removes the 128).
struct PackedWeight {
  WeightDtype dtype = WeightDtype::Float32;
  at::Tensor data;     // [N, K] contiguous CPU: float32 | bfloat16 | int8
  at::Tensor scale;    // [N] float32, int8 types only
  at::Tensor row_sum;  // [N] int32, Int8Dynamic only

  bool defined() const { return data.defined(); }
  int64_t rows() const { return data.size(0); }
  int64_t cols() const { return data.size(1); }
  size_t bytes() const;
  // The weights as float32 [N, K] (what the fused kernels multiply by).
  at::Tensor dequantize() const;
  // Rows `index` (any shape of int64 ids) as float32 [..., K]: an embedding lookup.
  at::Tensor lookup_rows(const at::Tensor& index) const;
};

// Packs a float32 [N, K] matrix (copied; the original is left as it was).
PackedWeight pack_weight(const at::Tensor& weight, WeightDtype dtype);

// y = x @ w^T (+ bias), x float32 [M, K] -> [M, N] float32. Fused kernels up to
// kMaxPackedFusedRows rows; above, the weight is dequantised a block at a time and BLAS
// multiplies (Int8Dynamic: its integer kernel at any number of rows).
at::Tensor packed_linear(const at::Tensor& x, const PackedWeight& w, const at::Tensor& bias = {});

// For a decode step fused into few calls (Gpt2ModelImpl's fused step): a weight matrix as raw
// pointers (valid while its tensors live) and the kernels above on raw rows.
struct WeightRows {
  WeightDtype dtype = WeightDtype::Float32;
  const void* data = nullptr;     // [rows, cols]: float | bfloat16 bits (uint16_t) | int8_t
  const float* scale = nullptr;   // int8 types: [rows]
  const int32_t* row_sum = nullptr;  // Int8Dynamic: [rows]
  int64_t rows = 0, cols = 0;
};
WeightRows weight_rows(const PackedWeight& w);
WeightRows weight_rows(const at::Tensor& w);  // contiguous float32 CPU [N, K]; throws otherwise
// The most rows fused_rows_product takes for weights of this type.
int64_t fused_rows_limit(WeightDtype dtype);

// y [M, N] = x [M, K] @ w^T (+ bias) with the packed_linear / skinny_matmul_nk kernels (so the
// same numbers), M from 1 to fused_rows_limit(w.dtype), split over LibTorch's threads in blocks
// of outputs; `epilogue(n0, n1)`, if given, runs on the thread that computed outputs [n0, n1) of
// every row, right after it (an activation, while they are in cache).
void fused_rows_product(const float* x, const WeightRows& w, const float* bias, float* y, int64_t M,
                        const std::function<void(int64_t, int64_t)>& epilogue = nullptr);
// The k largest values of each row of x [M, K] @ w^T (no bias), with their ids, and each row's
// logsumexp, without the [M, N] matrix (a decode step's header: 320 rows x 50257 logits are
// 64 MB): fused_rows_product on blocks of 2048 outputs, each reduced while in cache. values and
// ids [M, k] are topk_logsumexp's of the full product (descending, earlier id first among
// equals); lse [M] equals its logsumexp to float rounding (summed block by block, rescaled).
void fused_rows_topk_logsumexp(const float* x, const WeightRows& w, int64_t M, int64_t k, float* values, int64_t* ids,
                               float* lse);
// Row n of the matrix as float32 (an embedding lookup; as PackedWeight::lookup_rows).
void weight_row(const WeightRows& w, int64_t n, float* out);
// gelu_new on n floats in place, on the calling thread (gelu_tanh's arithmetic when its AVX-512
// kernel is in use).
void gelu_tanh_in_place(float* x, int64_t n);
// decode_attention's AVX-512 kernel for head (b, h) (lm/short_attention.h); false, doing
// nothing, when the kernels are not AVX-512 or the head size is not a multiple of 16.
struct DecodeAttentionArgs;
bool attention_head_avx512(const DecodeAttentionArgs& args, int64_t b, int64_t h, float* scratch);

// The rest of a decode step's arithmetic that LibTorch spends more on than the weights need.
// Both have an AVX-512 kernel (SkinnyIsa::Avx512) and otherwise call LibTorch.

// Per row of logits [N, V] (float32): the k largest values with their indices (descending;
// among equal values the AVX-512 kernel keeps index order, LibTorch's topk any) and logsumexp. Returns {values [N, k], indices [N, k] int64,
// logsumexp [N, 1]}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logsumexp(const at::Tensor& logits, int64_t k);

// GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), as at::gelu(x, "tanh").
at::Tensor gelu_tanh(const at::Tensor& x);

}  // namespace prefixcap
