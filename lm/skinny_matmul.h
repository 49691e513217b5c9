// Matrix products with few rows (decoding: 1 row per sequence, a handful of beams). BLAS gemm
// packs the whole weight matrix before multiplying, which for a few rows costs more than the
// product; these kernels stream each weight once, at memory speed, split over LibTorch's
// threads. Used in inference only (no autograd), float32 CPU tensors, up to kMaxSkinnyRows rows.
#pragma once

#include <ATen/Tensor.h>

namespace prefixcap {

constexpr int64_t kMaxSkinnyRows = 8;  // above this, BLAS gemm is as fast

// True when the kernels below apply: CPU float32, contiguous, no gradient needed, rows <= max.
bool skinny_applicable(const at::Tensor& x, const at::Tensor& weight);

// y = x @ w^T (+ bias) with w stored [N, K] (Linear / embedding layout). x [M, K] -> [M, N].
at::Tensor skinny_matmul_nk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias = {});

}  // namespace prefixcap
