// CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64) with OpenAI's
// module names (conv1..3/bn1..3 stem, layer1..4 Bottlenecks, attnpool), so its parameters are
// the checkpoint's visual.* keys. BatchNorm always in eval mode (running statistics).
// ref: openai/CLIP clip/model.py Bottleneck, AttentionPool2d, ModifiedResNet, build_model (d05afc4).
#pragma once

#include <array>
#include <vector>

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "encoders/clip_image_encoder.h"

namespace prefixcap {

struct ClipResNetConfig {
  std::array<int64_t, 4> layers = {3, 4, 6, 3};  // Bottlenecks per stage (RN50; RN50x4: 4, 6, 10, 6)
  int64_t width = 64;              // stem width; stage i has width * 2^i planes, 4x that out
  int64_t heads = 32;              // attention-pool heads (build_model: width * 32 / 64)
  int64_t image_resolution = 224;  // input size; the grid after layer4 is image_resolution / 32
  int64_t embed_dim = 1024;        // attnpool output = CLIP's joint embedding width (RN50x4: 640)
  double batch_norm_eps = 1e-5;

  int64_t grid() const { return image_resolution / 32; }
  int64_t feature_dim() const { return width * 32; }  // channels after layer4
  // config.json written by prefixcap (model_type "clip_resnet"): layers, width, heads,
  // image_resolution, embed_dim, batch_norm_eps.
  static ClipResNetConfig from_json(const Json& j, const std::string& where);
  // build_model's derivation from OpenAI-named tensors (visual.* or without the prefix).
  static ClipResNetConfig from_weights(const TensorMap& weights, const std::string& source);
  Json to_json() const;
};

class ClipBottleneckImpl : public torch::nn::Module {
 public:
  ClipBottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, double eps);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  std::shared_ptr<torch::nn::Module> downsample;  // "0": 1x1 conv, "1": BatchNorm (after AvgPool2d(stride))
  torch::nn::Conv2d downsample_conv{nullptr};
  torch::nn::BatchNorm2d downsample_bn{nullptr};

 private:
  int64_t stride_;
};
TORCH_MODULE(ClipBottleneck);

class ClipAttentionPoolImpl : public torch::nn::Module {
 public:
  ClipAttentionPoolImpl(int64_t grid, int64_t embed_dim, int64_t heads, int64_t output_dim);
  // x [B, C, H, W] -> [B, output_dim]: one query (the mean token) over [mean, grid tokens].
  at::Tensor forward(const at::Tensor& x);
  at::Tensor positional_embedding;  // [grid^2 + 1, C]
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, c_proj{nullptr};

 private:
  int64_t heads_;
};
TORCH_MODULE(ClipAttentionPool);

struct ClipResNetOutput {
  at::Tensor stem;          // [B, width, R/4, R/4] after the stem's AvgPool2d(2)
  at::Tensor layer4;        // [B, 32 * width, R/32, R/32]
  at::Tensor image_embeds;  // [B, embed_dim]
};

class ClipModifiedResNetImpl : public ClipImageEncoderImpl {
 public:
  explicit ClipModifiedResNetImpl(const ClipResNetConfig& c);
  // last_hidden_state = layer4 as [B, grid^2, 32 * width] tokens (row-major), image_embeds.
  ClipVisionOutput forward(const at::Tensor& pixel_values) override;
  ClipResNetOutput forward_all(const at::Tensor& pixel_values);
  // OpenAI names with or without "visual."; the text tower of a whole CLIP is ignored.
  void load_weights(const TensorMap& weights, const std::string& source) override;
  const ClipResNetConfig& config() const { return config_; }
  int64_t image_size() const override { return config_.image_resolution; }
  int64_t embed_dim() const override { return config_.embed_dim; }
  int64_t token_dim() const override { return config_.feature_dim(); }
  Json config_json() const override { return config_.to_json(); }
  std::string architecture() const override { return "resnet"; }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  std::array<torch::nn::ModuleList, 4> stages;
  std::array<std::vector<ClipBottleneck>, 4> blocks;
  ClipAttentionPool attnpool{nullptr};

 private:
  ClipResNetConfig config_;
};
TORCH_MODULE(ClipModifiedResNet);

}  // namespace prefixcap
