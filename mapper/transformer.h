// The small transformer ClipCap's TransformerMapper and Prefix-AAC's mapping networks share:
// pre-norm layers, attention with bias-free query and key/value projections (keys and values
// interleaved per head as [.., 2, heads, head_dim]), ReLU MLP. Names equal the checkpoints'.
// ref: CLIP_prefix_caption train.py MultiHeadAttention / TransformerLayer / Transformer (1ad805a).
#pragma once

#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

namespace prefixcap {

class MapperAttentionImpl : public torch::nn::Module {
 public:
  MapperAttentionImpl(int64_t dim_self, int64_t dim_ref, int64_t num_heads);
  // x [B, N, C] attends to y [B, M, dim_ref] (y = x for self-attention); key_mask [B, M] bool
  // (true = attend) or undefined.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& key_mask = {});
  torch::nn::Linear to_queries{nullptr}, to_keys_values{nullptr}, project{nullptr};

 private:
  int64_t heads_;
};
TORCH_MODULE(MapperAttention);

class MapperMlpImpl : public torch::nn::Module {
 public:
  MapperMlpImpl(int64_t dim, int64_t hidden);
  at::Tensor forward(const at::Tensor& x) { return fc2(at::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MapperMlp);

class MapperTransformerLayerImpl : public torch::nn::Module {
 public:
  MapperTransformerLayerImpl(int64_t dim_self, int64_t dim_ref, int64_t num_heads, double mlp_ratio);
  // Self-attention when y is undefined, cross-attention to y otherwise.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& y = {}, const at::Tensor& key_mask = {});
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  MapperAttention attn{nullptr};
  MapperMlp mlp{nullptr};
};
TORCH_MODULE(MapperTransformerLayer);

class MapperTransformerImpl : public torch::nn::Module {
 public:
  MapperTransformerImpl(int64_t dim, int64_t num_heads, int64_t num_layers, double mlp_ratio = 2.0,
                        int64_t dim_ref = 0);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& y = {}, const at::Tensor& key_mask = {});
  torch::nn::ModuleList layers{nullptr};

 private:
  std::vector<MapperTransformerLayer> layer_list_;
};
TORCH_MODULE(MapperTransformer);

}  // namespace prefixcap
