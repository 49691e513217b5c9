// Mapping networks: frozen-encoder features -> a prefix for GPT-2. Each is configured by a
// JSON object ({"type": ..., ...}) and its parameter names equal the original checkpoints'
// (ClipCap's clip_project.*, Prefix-AAC's temporal_/global_mappingnetwork.*).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "core/json_config.h"
#include "lm/gpt2.h"
#include "mapper/transformer.h"

namespace prefixcap {

struct MapperConfig {
  std::string type;              // mlp | transformer | prefix_aac | query_guided
  int64_t input_dim = 512;       // encoder feature width (CLIP projection_dim, CNN14 C6, ...)
  int64_t embed_dim = 768;       // GPT-2 n_embd (the prefix vectors' width)
  int64_t prefix_length = 10;    // prefix vectors produced
  // transformer / query_guided
  int64_t clip_length = 10;      // transformer: tokens the input is projected to
  int64_t num_layers = 8;
  int64_t num_heads = 8;
  double mlp_ratio = 2.0;
  // prefix_aac
  int64_t temporal_prefix_length = 15;
  int64_t global_prefix_length = 11;
  int64_t temporal_num_layers = 2;
  int64_t global_num_layers = 2;
  int64_t classes_num = 527;     // global branch input (CNN14 clipwise output)
  bool relu_after_bn = true;     // Prefix-AAC: true for AudioCaps, false for Clotho
  int64_t max_positions = 5000;  // sinusoidal table length
  // query_guided
  int64_t context_dim = 0;       // optional user/style context vector width (0 = none)
  // deep key/value prefix head (any type): map the prefix to per-layer keys/values
  bool kv_prefix = false;

  static MapperConfig from_json(const Json& j, const std::string& where);
  Json to_json() const;
};

// What a mapper reads; each type uses some of it.
struct MapperInput {
  at::Tensor embedding;     // [B, D] pooled feature (CLIP image_embeds, CNN14 embedding)
  at::Tensor tokens;        // [B, N, D] token features (CLIP patches, CNN14 frames)
  at::Tensor token_mask;    // [B, N] bool, true = real token (optional)
  at::Tensor conv_block6;   // [B, C6, T', F'] CNN14 map (Prefix-AAC temporal branch)
  at::Tensor clipwise;      // [B, classes] CNN14 probabilities (Prefix-AAC global branch)
  at::Tensor context;       // [B, context_dim] (query_guided, optional)
};

class MapperImpl : public torch::nn::Module {
 public:
  explicit MapperImpl(MapperConfig config) : config_(std::move(config)) {}
  // -> prefix embeddings [B, prefix_length, embed_dim]
  virtual at::Tensor forward(const MapperInput& input) = 0;
  const MapperConfig& config() const { return config_; }

 protected:
  MapperConfig config_;
};

// ClipCap MLP: Linear -> Tanh -> Linear to prefix_length * embed_dim ("model.0", "model.2").
class MlpMapperImpl : public MapperImpl {
 public:
  explicit MlpMapperImpl(const MapperConfig& config);
  at::Tensor forward(const MapperInput& input) override;
  torch::nn::Sequential model{nullptr};
};

// ClipCap TransformerMapper: linear projection to clip_length tokens, learned constants,
// transformer, keep the constants' outputs.
class TransformerMapperImpl : public MapperImpl {
 public:
  explicit TransformerMapperImpl(const MapperConfig& config);
  at::Tensor forward(const MapperInput& input) override;
  torch::nn::Linear linear{nullptr};
  at::Tensor prefix_const;  // [prefix_length, embed_dim]
  MapperTransformer transformer{nullptr};
};

// Prefix-AAC temporal branch: Conv2d over the frequency pair, BatchNorm (+ReLU), sinusoidal
// positions, learned constants, transformer, keep the last temporal_prefix_length.
class TemporalMappingNetworkImpl : public torch::nn::Module {
 public:
  explicit TemporalMappingNetworkImpl(const MapperConfig& c, int64_t conv_in_channels);
  at::Tensor forward(const at::Tensor& conv_block6);
  at::Tensor prefix_const;
  MapperTransformer transformer{nullptr};
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn_conv{nullptr};
  struct PosEncoderImpl : torch::nn::Module {
    at::Tensor pe;  // [max_len, 1, D]
  };
  std::shared_ptr<PosEncoderImpl> pos_encoder;

 private:
  bool relu_;
};
TORCH_MODULE(TemporalMappingNetwork);

// Prefix-AAC global branch: clipwise probabilities padded to a multiple of the kernel,
// strided Conv2d into tokens, BatchNorm (+ReLU), learned constants, transformer.
class GlobalMappingNetworkImpl : public torch::nn::Module {
 public:
  explicit GlobalMappingNetworkImpl(const MapperConfig& c);
  at::Tensor forward(const at::Tensor& clipwise);
  at::Tensor prefix_const;
  MapperTransformer transformer{nullptr};
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn_conv{nullptr};

 private:
  bool relu_;
  int64_t padded_;
};
TORCH_MODULE(GlobalMappingNetwork);

class PrefixAacMapperImpl : public MapperImpl {
 public:
  PrefixAacMapperImpl(const MapperConfig& config);
  at::Tensor forward(const MapperInput& input) override;
  TemporalMappingNetwork temporal_mappingnetwork{nullptr};
  GlobalMappingNetwork global_mappingnetwork{nullptr};
};

// Query-guided (user-aware prefix tuning): learned queries, optionally shifted by a projected
// context vector, cross-attend to the projected encoder tokens; one output per query.
class QueryGuidedMapperImpl : public MapperImpl {
 public:
  explicit QueryGuidedMapperImpl(const MapperConfig& config);
  at::Tensor forward(const MapperInput& input) override;
  at::Tensor queries;                  // [prefix_length, embed_dim]
  torch::nn::Linear input_proj{nullptr};
  torch::nn::Linear context_proj{nullptr};  // only with context_dim > 0
  MapperTransformer transformer{nullptr};
};

// Li & Liang deep prefix: each prefix vector -> per-layer keys and values (PEFT layout).
class KvPrefixHeadImpl : public torch::nn::Module {
 public:
  KvPrefixHeadImpl(int64_t embed_dim, const Gpt2Config& lm);
  // prefix [B, P, embed_dim] -> n_layer x {key, value} [B, n_head, P, head_dim]
  std::vector<LayerKv> forward(const at::Tensor& prefix);
  torch::nn::Linear proj{nullptr};

 private:
  Gpt2Config lm_;
};
TORCH_MODULE(KvPrefixHead);

// Builds the mapper a config names; throws ConfigError for unknown types.
std::shared_ptr<MapperImpl> make_mapper(const MapperConfig& config);

}  // namespace prefixcap
