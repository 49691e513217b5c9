// Scaled dot-product attention for short sequences with autograd, computed per (batch, head)
// with plain vectorisable loops. LibTorch's CPU bmm runs B*H separate tiny BLAS calls for
// these shapes (46 x 64 per head in training: the calls' overhead, not the arithmetic, is what
// costs); training a mapper through a frozen GPT-2 spends ~15 % of a step there.
#pragma once

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

}  // namespace prefixcap
