#include "mapper/transformer.h"

#include <cmath>

#include <ATen/ATen.h>

namespace prefixcap {

MapperAttentionImpl::MapperAttentionImpl(int64_t dim_self, int64_t dim_ref, int64_t num_heads) : heads_(num_heads) {
  TORCH_CHECK(dim_self % num_heads == 0, "mapper attention: width ", dim_self, " is not a multiple of ", num_heads, " heads");
  to_queries = register_module("to_queries", torch::nn::Linear(torch::nn::LinearOptions(dim_self, dim_self).bias(false)));
  to_keys_values =
      register_module("to_keys_values", torch::nn::Linear(torch::nn::LinearOptions(dim_ref, 2 * dim_self).bias(false)));
  project = register_module("project", torch::nn::Linear(dim_self, dim_self));
}

at::Tensor MapperAttentionImpl::forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& key_mask) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = y.size(1), D = C / heads_;
  at::Tensor q = to_queries(x).view({B, N, heads_, D}).transpose(1, 2);          // [B, H, N, D]
  at::Tensor kv = to_keys_values(y).view({B, M, 2, heads_, D});
  at::Tensor k = kv.select(2, 0).transpose(1, 2), v = kv.select(2, 1).transpose(1, 2);  // [B, H, M, D]
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * std::pow(double(D), -0.5);  // [B, H, N, M]
  if (key_mask.defined())
    scores = scores.masked_fill(key_mask.logical_not().view({B, 1, 1, M}), -std::numeric_limits<float>::infinity());
  at::Tensor out = at::matmul(at::softmax(scores, -1), v).transpose(1, 2).reshape({B, N, C});
  return project(out);
}

MapperMlpImpl::MapperMlpImpl(int64_t dim, int64_t hidden) {
  fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
  fc2 = register_module("fc2", torch::nn::Linear(hidden, dim));
}

MapperTransformerLayerImpl::MapperTransformerLayerImpl(int64_t dim_self, int64_t dim_ref, int64_t num_heads,
                                                       double mlp_ratio) {
  norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_self})));
  attn = register_module("attn", MapperAttention(dim_self, dim_ref, num_heads));
  norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim_self})));
  mlp = register_module("mlp", MapperMlp(dim_self, static_cast<int64_t>(dim_self * mlp_ratio)));
}

at::Tensor MapperTransformerLayerImpl::forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& key_mask) {
  at::Tensor normed = norm1(x);
  at::Tensor h = x + attn(normed, y.defined() ? y : normed, key_mask);
  return h + mlp(norm2(h));
}

MapperTransformerImpl::MapperTransformerImpl(int64_t dim, int64_t num_heads, int64_t num_layers, double mlp_ratio,
                                             int64_t dim_ref) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    layer_list_.push_back(MapperTransformerLayer(dim, dim_ref > 0 ? dim_ref : dim, num_heads, mlp_ratio));
    layers->push_back(layer_list_.back());
  }
}

at::Tensor MapperTransformerImpl::forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& key_mask) {
  at::Tensor h = x;
  for (auto& layer : layer_list_) h = layer(h, y, key_mask);
  return h;
}

}  // namespace prefixcap
