// Scaled dot-product attention for short sequences with autograd, computed per (batch, head)
// with plain vectorisable loops. LibTorch's CPU bmm runs B*H separate tiny BLAS calls for
// these shapes (46 x 64 per head in training: the calls' overhead, not the arithmetic, is what
// costs); training a mapper through a frozen GPT-2 spends ~15 % of a step there.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/Tensor.h>

namespace prefixcap {

// Whether short_attention handles these inputs (float32 CPU, q [B, H, T, D], k/v [B, H, S, D],
// S and D small).
bool short_attention_applicable(const at::Tensor& q, const at::Tensor& k);

// softmax(q k^T * scale + bias) v: q [B, H, T, D], k and v [B, H, S, D], bias additive and
// broadcastable to [B, 1, T, S] (or undefined). Gradients flow to q, k and v (not to bias).
at::Tensor short_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                           double scale);

// Decoding: one query per sequence. softmax(q k^T * scale + bias) v for q [B, H, 1, D] and k, v
// [B, H, S, D] whose last dimension is contiguous (views of a KV cache are fine), bias additive
// [B or 1, 1, 1, S] (or undefined) -> [B, H, D]. Inference only (no autograd), float32 CPU: one
// pass per (batch, head) instead of the six tensor operations (and [B, H, S, D] temporary) of
// the broadcast form.
// row_index (int64 [B, S], optional): sequence b's key and value at position s are in row
// row_index[b, s] of k and v (KvCache::row_index: beams reordered without copying).
bool decode_attention_applicable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            double scale, const at::Tensor& row_index = {});

// decode_attention on raw pointers, for a fused decode step: heads bh0..bh1 (bh = b * H + h) of
// y [B, H, D] on the calling thread; `scratch` is resized to S. Strides are in floats; keys and
// values have a contiguous last dimension.
struct DecodeAttentionArgs {
  const float* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  const float *k = nullptr, *v = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  const int64_t* row_index = nullptr;  // [B, S] or null
  const float* bias = nullptr;         // [bias_rows, S] or null; bias_rows 1 or B
  int64_t bias_rows = 0;
  int64_t B = 0, H = 0, S = 0, D = 0;
  float scale = 1.f;
  float* y = nullptr;
};
void decode_attention_heads(const DecodeAttentionArgs& args, int64_t bh0, int64_t bh1, std::vector<float>& scratch);

}  // namespace prefixcap
