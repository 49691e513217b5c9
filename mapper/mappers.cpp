#include "mapper/mappers.h"

#include <cmath>

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>

#include "core/errors.h"
#include "lm/skinny_matmul.h"

namespace prefixcap {

MapperConfig MapperConfig::from_json(const Json& j, const std::string& where) {
  MapperConfig c;
  json_check_keys(j,
                  {"type", "input_dim", "embed_dim", "prefix_length", "clip_length", "num_layers", "num_heads", "mlp_ratio",
                   "temporal_prefix_length", "global_prefix_length", "temporal_num_layers", "global_num_layers",
                   "classes_num", "relu_after_bn", "max_positions", "context_dim", "kv_prefix"},
                  where);
  c.type = json_get<std::string>(j, "type", where);
  c.input_dim = json_get_or<int64_t>(j, "input_dim", c.input_dim, where);
  c.embed_dim = json_get_or<int64_t>(j, "embed_dim", c.embed_dim, where);
  c.prefix_length = json_get_or<int64_t>(j, "prefix_length", c.prefix_length, where);
  c.clip_length = json_get_or<int64_t>(j, "clip_length", c.prefix_length, where);
  c.num_layers = json_get_or<int64_t>(j, "num_layers", c.num_layers, where);
  c.num_heads = json_get_or<int64_t>(j, "num_heads", c.num_heads, where);
  c.mlp_ratio = json_get_or<double>(j, "mlp_ratio", c.mlp_ratio, where);
  c.temporal_prefix_length = json_get_or<int64_t>(j, "temporal_prefix_length", c.temporal_prefix_length, where);
  c.global_prefix_length = json_get_or<int64_t>(j, "global_prefix_length", c.global_prefix_length, where);
  c.temporal_num_layers = json_get_or<int64_t>(j, "temporal_num_layers", c.temporal_num_layers, where);
  c.global_num_layers = json_get_or<int64_t>(j, "global_num_layers", c.global_num_layers, where);
  c.classes_num = json_get_or<int64_t>(j, "classes_num", c.classes_num, where);
  c.relu_after_bn = json_get_or<bool>(j, "relu_after_bn", c.relu_after_bn, where);
  c.max_positions = json_get_or<int64_t>(j, "max_positions", c.max_positions, where);
  c.context_dim = json_get_or<int64_t>(j, "context_dim", c.context_dim, where);
  c.kv_prefix = json_get_or<bool>(j, "kv_prefix", c.kv_prefix, where);
  const std::vector<std::string> types = {"mlp", "transformer", "prefix_aac", "query_guided"};
  if (std::find(types.begin(), types.end(), c.type) == types.end())
    throw ConfigError(where + ": unknown mapper type '" + c.type + "' (mlp, transformer, prefix_aac, query_guided)");
  if (c.type == "prefix_aac") c.prefix_length = c.temporal_prefix_length + c.global_prefix_length;
  for (auto [v, name] : {std::pair{c.input_dim, "input_dim"}, {c.embed_dim, "embed_dim"}, {c.prefix_length, "prefix_length"},
                         {c.num_heads, "num_heads"}})
    if (v <= 0) throw ConfigError(where + ": '" + name + "' must be positive");
  if (c.embed_dim % c.num_heads != 0) throw ConfigError(where + ": embed_dim must be a multiple of num_heads");
  return c;
}

Json MapperConfig::to_json() const {
  Json j = {{"type", type}, {"input_dim", input_dim}, {"embed_dim", embed_dim}, {"prefix_length", prefix_length}};
  if (type == "transformer" || type == "query_guided")
    j.update({{"clip_length", clip_length}, {"num_layers", num_layers}, {"num_heads", num_heads}, {"mlp_ratio", mlp_ratio}});
  if (type == "prefix_aac")
    j.update({{"temporal_prefix_length", temporal_prefix_length}, {"global_prefix_length", global_prefix_length},
              {"temporal_num_layers", temporal_num_layers}, {"global_num_layers", global_num_layers},
              {"num_heads", num_heads}, {"mlp_ratio", mlp_ratio}, {"classes_num", classes_num},
              {"relu_after_bn", relu_after_bn}, {"max_positions", max_positions}});
  if (type == "query_guided") j["context_dim"] = context_dim;
  if (kv_prefix) j["kv_prefix"] = true;
  return j;
}

namespace {
at::Tensor require(const at::Tensor& t, const char* what, const char* mapper) {
  TORCH_CHECK(t.defined(), mapper, " mapper needs ", what);
  return t;
}
}  // namespace

// ---- ClipCap MLP ------------------------------------------------------------------------

MlpMapperImpl::MlpMapperImpl(const MapperConfig& c) : MapperImpl(c) {
  const int64_t out = c.embed_dim * c.prefix_length;
  model = register_module("model", torch::nn::Sequential(torch::nn::Linear(c.input_dim, out / 2), torch::nn::Tanh(),
                                                         torch::nn::Linear(out / 2, out)));
}

at::Tensor MlpMapperImpl::forward(const MapperInput& in) {
  at::Tensor x = require(in.embedding, "a pooled embedding [B, D]", "mlp");
  auto& first = *model->ptr<torch::nn::LinearImpl>(0);
  auto& second = *model->ptr<torch::nn::LinearImpl>(2);
  // Captioning a few inputs: 31.5 M weights (ClipCap COCO) for a handful of rows, where BLAS
  // gemm packs each matrix before multiplying; the skinny kernel streams it once (inference only,
  // same products up to float rounding).
  if (skinny_applicable(x, first.weight) && skinny_applicable(x, second.weight)) {
    const at::Tensor hidden = skinny_matmul_nk(x, first.weight, first.bias).tanh_();
    return skinny_matmul_nk(hidden, second.weight, second.bias).view({x.size(0), config_.prefix_length, config_.embed_dim});
  }
  return model->forward(x).view({x.size(0), config_.prefix_length, config_.embed_dim});
}

// ---- ClipCap TransformerMapper ------------------------------------------------------------

TransformerMapperImpl::TransformerMapperImpl(const MapperConfig& c) : MapperImpl(c) {
  linear = register_module("linear", torch::nn::Linear(c.input_dim, c.clip_length * c.embed_dim));
  prefix_const = register_parameter("prefix_const", at::randn({c.prefix_length, c.embed_dim}));
  transformer = register_module("transformer", MapperTransformer(c.embed_dim, c.num_heads, c.num_layers, c.mlp_ratio));
}

at::Tensor TransformerMapperImpl::forward(const MapperInput& in) {
  at::Tensor x = require(in.embedding, "a pooled embedding [B, D]", "transformer");
  const int64_t B = x.size(0);
  at::Tensor projected = linear(x).view({B, config_.clip_length, config_.embed_dim});
  at::Tensor tokens = at::cat({projected, prefix_const.unsqueeze(0).expand({B, -1, -1})}, 1);
  return transformer(tokens).narrow(1, config_.clip_length, config_.prefix_length);
}

// ---- Prefix-AAC -------------------------------------------------------------------------
// ref: Prefix_AAC_ICASSP2023 AAC_Prefix/AAC_Prefix.py MappingNetwork_forTemporalFeature,
// MappingNetwork_forGlobalFeature, PositionalEncoding.

TemporalMappingNetworkImpl::TemporalMappingNetworkImpl(const MapperConfig& c, int64_t conv_in_channels)
    : relu_(c.relu_after_bn) {
  prefix_const = register_parameter("prefix_const", at::randn({c.temporal_prefix_length, c.embed_dim}) * 0.1);
  transformer = register_module("transformer", MapperTransformer(c.embed_dim, c.num_heads, c.temporal_num_layers, c.mlp_ratio));
  conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(conv_in_channels, c.embed_dim, {1, 2})));
  bn_conv = register_module("bn_conv", torch::nn::BatchNorm2d(c.embed_dim));
  pos_encoder = register_module("pos_encoder", std::make_shared<PosEncoderImpl>());
  // Sinusoidal table computed in float32 like PyTorch's tutorial code (checkpoints store it too).
  at::Tensor position = at::arange(c.max_positions, at::kFloat).unsqueeze(1);
  at::Tensor div = at::exp(at::arange(0, c.embed_dim, 2, at::kFloat) * (-std::log(10000.0) / c.embed_dim));
  at::Tensor pe = at::zeros({c.max_positions, 1, c.embed_dim});
  pe.select(1, 0).slice(1, 0, c.embed_dim, 2).copy_(at::sin(position * div));
  pe.select(1, 0).slice(1, 1, c.embed_dim, 2).copy_(at::cos(position * div).narrow(1, 0, c.embed_dim / 2));
  pos_encoder->pe = pos_encoder->register_buffer("pe", pe);
}

at::Tensor TemporalMappingNetworkImpl::forward(const at::Tensor& feature) {
  TORCH_CHECK(feature.dim() == 4 && feature.size(3) == 2, "Prefix-AAC temporal branch: expected conv_block6 [B, C, T', 2], got ",
              feature.sizes());
  at::Tensor x = bn_conv(conv(feature));  // [B, D, T', 1]
  if (relu_) x = at::relu(x);
  x = x.squeeze(3).permute({0, 2, 1});     // [B, T', D]
  const int64_t T = x.size(1);
  TORCH_CHECK(T <= pos_encoder->pe.size(0), "Prefix-AAC temporal branch: ", T, " frames exceed the position table");
  x = x + pos_encoder->pe.narrow(0, 0, T).squeeze(1).unsqueeze(0);
  at::Tensor tokens = at::cat({x, prefix_const.unsqueeze(0).expand({x.size(0), -1, -1})}, 1);
  return transformer(tokens).narrow(1, T, prefix_const.size(0));
}

GlobalMappingNetworkImpl::GlobalMappingNetworkImpl(const MapperConfig& c) : relu_(c.relu_after_bn) {
  // The authors pad 527 classes with one zero to 528 = 11 * 48: kernel = padded / tokens.
  const int64_t tokens = c.global_prefix_length;
  const int64_t kernel = (c.classes_num + tokens - 1) / tokens;
  padded_ = kernel * tokens;
  prefix_const = register_parameter("prefix_const", at::randn({tokens, c.embed_dim}) * 0.1);
  transformer = register_module("transformer", MapperTransformer(c.embed_dim, c.num_heads, c.global_num_layers, c.mlp_ratio));
  conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, c.embed_dim, {1, kernel}).stride({1, kernel})));
  bn_conv = register_module("bn_conv", torch::nn::BatchNorm2d(c.embed_dim));
}

at::Tensor GlobalMappingNetworkImpl::forward(const at::Tensor& clipwise) {
  TORCH_CHECK(clipwise.dim() == 2 && clipwise.size(1) <= padded_, "Prefix-AAC global branch: expected [B, <= ", padded_,
              "] class probabilities, got ", clipwise.sizes());
  at::Tensor x = at::constant_pad_nd(clipwise, {0, padded_ - clipwise.size(1)}).view({clipwise.size(0), 1, 1, padded_});
  x = bn_conv(conv(x));  // [B, D, 1, tokens]
  if (relu_) x = at::relu(x);
  x = x.squeeze(2).permute({0, 2, 1});  // [B, tokens, D]
  at::Tensor tokens = at::cat({x, prefix_const.unsqueeze(0).expand({x.size(0), -1, -1})}, 1);
  return transformer(tokens).narrow(1, x.size(1), prefix_const.size(0));
}

PrefixAacMapperImpl::PrefixAacMapperImpl(const MapperConfig& c) : MapperImpl(c) {
  config_.prefix_length = c.temporal_prefix_length + c.global_prefix_length;
  temporal_mappingnetwork = register_module("temporal_mappingnetwork", TemporalMappingNetwork(c, c.input_dim));
  global_mappingnetwork = register_module("global_mappingnetwork", GlobalMappingNetwork(c));
}

at::Tensor PrefixAacMapperImpl::forward(const MapperInput& in) {
  at::Tensor temporal = temporal_mappingnetwork(require(in.conv_block6, "CNN14's conv_block6 map", "prefix_aac"));
  at::Tensor global = global_mappingnetwork(require(in.clipwise, "CNN14's clipwise output", "prefix_aac"));
  return at::cat({temporal, global}, 1);
}

// ---- Query-guided -----------------------------------------------------------------------

QueryGuidedMapperImpl::QueryGuidedMapperImpl(const MapperConfig& c) : MapperImpl(c) {
  queries = register_parameter("queries", at::randn({c.prefix_length, c.embed_dim}) * 0.02);
  input_proj = register_module("input_proj", torch::nn::Linear(c.input_dim, c.embed_dim));
  if (c.context_dim > 0) context_proj = register_module("context_proj", torch::nn::Linear(c.context_dim, c.embed_dim));
  transformer = register_module("transformer", MapperTransformer(c.embed_dim, c.num_heads, c.num_layers, c.mlp_ratio));
}

at::Tensor QueryGuidedMapperImpl::forward(const MapperInput& in) {
  at::Tensor tokens = in.tokens.defined() ? in.tokens : require(in.embedding, "encoder tokens", "query_guided").unsqueeze(1);
  const int64_t B = tokens.size(0);
  at::Tensor memory = input_proj(tokens);  // [B, N, D]
  at::Tensor q = queries.unsqueeze(0).expand({B, -1, -1});
  if (context_proj) {
    TORCH_CHECK(in.context.defined(), "query_guided mapper was configured with a context vector; none was given");
    q = q + context_proj(in.context).unsqueeze(1);
  }
  // Cross-attention: every layer's queries read the encoder tokens (masked where padded).
  return transformer(q, memory, in.token_mask);
}

// ---- Deep key/value prefix head ---------------------------------------------------------

KvPrefixHeadImpl::KvPrefixHeadImpl(int64_t embed_dim, const Gpt2Config& lm) : lm_(lm) {
  proj = register_module("proj", torch::nn::Linear(embed_dim, lm.n_layer * 2 * lm.n_embd));
}

std::vector<LayerKv> KvPrefixHeadImpl::forward(const at::Tensor& prefix) {
  const int64_t B = prefix.size(0), P = prefix.size(1);
  at::Tensor x = proj(prefix).view({B, P, 2 * lm_.n_layer, lm_.n_head, lm_.head_dim()}).permute({2, 0, 3, 1, 4});
  std::vector<LayerKv> out;
  for (int64_t l = 0; l < lm_.n_layer; ++l) out.push_back({x[2 * l], x[2 * l + 1]});
  return out;
}

std::shared_ptr<MapperImpl> make_mapper(const MapperConfig& config) {
  if (config.type == "mlp") return std::make_shared<MlpMapperImpl>(config);
  if (config.type == "transformer") return std::make_shared<TransformerMapperImpl>(config);
  if (config.type == "prefix_aac") return std::make_shared<PrefixAacMapperImpl>(config);
  if (config.type == "query_guided") return std::make_shared<QueryGuidedMapperImpl>(config);
  throw ConfigError("unknown mapper type '" + config.type + "'");
}

}  // namespace prefixcap
