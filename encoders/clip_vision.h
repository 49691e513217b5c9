// CLIP vision transformer (ViT-B/32, B/16, L/14, L/14-336 shapes) with Hugging Face module
// names (vision_model.*, visual_projection); OpenAI / open_clip checkpoints (visual.*) load
// through the mapping table in clip_vision.cpp.
// ref: huggingface/transformers modeling_clip.py CLIPVisionTransformer; openai/CLIP model.py.
#pragma once

#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "core/int8_gemm.h"
#include "core/json_config.h"
#include "core/tensor_map.h"
#include "encoders/clip_image_encoder.h"

namespace prefixcap {

struct ClipVisionConfig {
  int64_t hidden_size = 768;         // width
  int64_t intermediate_size = 3072;  // MLP width
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  int64_t num_channels = 3;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  int64_t projection_dim = 512;           // visual_projection output

  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  // From a Hugging Face CLIP config.json (CLIPConfig with vision_config, or CLIPVisionConfig).
  static ClipVisionConfig from_json(const Json& j, const std::string& where);
  static ClipVisionConfig from_file(const std::string& path);
};

class ClipAttentionImpl : public torch::nn::Module {
 public:
  explicit ClipAttentionImpl(const ClipVisionConfig& c);
  at::Tensor forward(const at::Tensor& x);  // [B, N, C]
  // Int8Dynamic: q, k and v as one [3C, C] integer product, out_proj as another; empty: float.
  void pack_int8(bool on);
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  Int8Matrix qkv_int8, out_int8;

 private:
  int64_t heads_;
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  explicit ClipMlpImpl(const ClipVisionConfig& c);
  at::Tensor forward(const at::Tensor& x);
  void pack_int8(bool on);
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  Int8Matrix fc1_int8, fc2_int8;

 private:
  bool quick_gelu_;
};
TORCH_MODULE(ClipMlp);

class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderLayerImpl(const ClipVisionConfig& c);
  at::Tensor forward(const at::Tensor& x);
  ClipAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

class ClipVisionEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit ClipVisionEmbeddingsImpl(const ClipVisionConfig& c);
  at::Tensor forward(const at::Tensor& pixel_values);  // [B, 3, H, W] -> [B, 1 + patches, C]
  void pack_int8(bool on);  // the patch embedding as a [C, 3 * patch^2] integer product
  at::Tensor class_embedding;                          // [C]
  torch::nn::Conv2d patch_embedding{nullptr};
  Int8Matrix patch_int8;
  torch::nn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(ClipVisionEmbeddings);

class ClipVisionTransformerImpl : public ClipImageEncoderImpl {
 public:
  explicit ClipVisionTransformerImpl(const ClipVisionConfig& c);
  // last_hidden_state [B, 1 + patches, C] (before post_layernorm), pooled_output, image_embeds.
  ClipVisionOutput forward(const at::Tensor& pixel_values) override;
  void load_weights(const TensorMap& weights, const std::string& source) override;
  const ClipVisionConfig& config() const { return config_; }
  int64_t image_size() const override { return config_.image_size; }
  int64_t embed_dim() const override { return config_.projection_dim; }
  int64_t token_dim() const override { return config_.hidden_size; }
  Json config_json() const override;
  std::string architecture() const override { return "vit"; }
  // Int8Dynamic packs every linear layer and the patch embedding (visual_projection, one row per
  // image, stays float32); a reload repacks them.
  void set_compute_dtype(WeightDtype dtype) override;

  // vision_model.{embeddings, pre_layrnorm, encoder.layers, post_layernorm}
  struct VisionModelImpl : torch::nn::Module {
    explicit VisionModelImpl(const ClipVisionConfig& c);
    ClipVisionEmbeddings embeddings{nullptr};
    torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
    torch::nn::ModuleList layers{nullptr};
    std::vector<ClipEncoderLayer> layer_list;
  };
  std::shared_ptr<VisionModelImpl> vision_model;
  torch::nn::Linear visual_projection{nullptr};

 private:
  ClipVisionConfig config_;
};
TORCH_MODULE(ClipVisionTransformer);

// Maps OpenAI CLIP / open_clip names (visual.*) to Hugging Face names; HF names pass through.
TensorMap clip_openai_to_hf(const TensorMap& weights, const ClipVisionConfig& config);

// config.json + model.safetensors (or the given weight file). Frozen, eval mode.
ClipVisionTransformer load_clip_vision(const std::string& path);

// openai/CLIP build_model's derivation for a ViT state dict with OpenAI names (visual.conv1,
// visual.transformer.resblocks.*, visual.proj): width, layers, patch, resolution, heads = width/64.
ClipVisionConfig clip_vit_config_from_openai(const TensorMap& weights, const std::string& source);

}  // namespace prefixcap
