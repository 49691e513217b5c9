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

}  // namespace prefixcap
