#include "encoders/clip_vision.h"

#include <cmath>
#include <filesystem>
#include <stdexcept>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/weights.h"

namespace prefixcap {

ClipVisionConfig ClipVisionConfig::from_json(const Json& root, const std::string& where) {
  const Json& j = root.contains("vision_config") ? root.at("vision_config") : root;
  const std::string w = root.contains("vision_config") ? where + " vision_config" : where;
  ClipVisionConfig c;
  c.hidden_size = json_get_or<int64_t>(j, "hidden_size", c.hidden_size, w);
  c.intermediate_size = json_get_or<int64_t>(j, "intermediate_size", c.intermediate_size, w);
  c.num_hidden_layers = json_get_or<int64_t>(j, "num_hidden_layers", c.num_hidden_layers, w);
  c.num_attention_heads = json_get_or<int64_t>(j, "num_attention_heads", c.num_attention_heads, w);
  c.image_size = json_get_or<int64_t>(j, "image_size", c.image_size, w);
  c.patch_size = json_get_or<int64_t>(j, "patch_size", c.patch_size, w);
  c.num_channels = json_get_or<int64_t>(j, "num_channels", c.num_channels, w);
  c.layer_norm_eps = json_get_or<double>(j, "layer_norm_eps", c.layer_norm_eps, w);
  c.hidden_act = json_get_or<std::string>(j, "hidden_act", c.hidden_act, w);
  c.projection_dim = json_get_or<int64_t>(root, "projection_dim", json_get_or<int64_t>(j, "projection_dim", c.projection_dim, w), where);
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    throw ConfigError(w + ": hidden_act '" + c.hidden_act + "' is not supported (quick_gelu, gelu)");
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0)
    throw ConfigError(w + ": hidden_size must be a positive multiple of num_attention_heads");
  if (c.patch_size <= 0 || c.image_size % c.patch_size != 0)
    throw ConfigError(w + ": image_size (" + std::to_string(c.image_size) + ") must be a multiple of patch_size (" +
                      std::to_string(c.patch_size) + ")");
  if (c.num_hidden_layers <= 0 || c.intermediate_size <= 0 || c.projection_dim <= 0)
    throw ConfigError(w + ": num_hidden_layers, intermediate_size and projection_dim must be positive");
  return c;
}

ClipVisionConfig ClipVisionConfig::from_file(const std::string& path) { return from_json(read_json_file(path), path); }

ClipAttentionImpl::ClipAttentionImpl(const ClipVisionConfig& c) : heads_(c.num_attention_heads) {
  q_proj = register_module("q_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  k_proj = register_module("k_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  v_proj = register_module("v_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  out_proj = register_module("out_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
}

at::Tensor ClipAttentionImpl::forward(const at::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), D = C / heads_;
  auto heads = [&](const at::Tensor& t) { return t.view({B, N, heads_, D}).transpose(1, 2); };  // [B, H, N, D]
  at::Tensor q, k, v;
  if (qkv_int8.defined()) {
    const at::Tensor qkv = int8_linear(x, qkv_int8);  // [B, N, 3C]
    q = qkv.narrow(-1, 0, C), k = qkv.narrow(-1, C, C), v = qkv.narrow(-1, 2 * C, C);
  } else {
    q = q_proj(x), k = k_proj(x), v = v_proj(x);
  }
  at::Tensor probs = at::softmax(at::matmul(heads(q) * (1.0 / std::sqrt(double(D))), heads(k).transpose(-2, -1)), -1);
  at::Tensor context = at::matmul(probs, heads(v)).transpose(1, 2).reshape({B, N, C});
  return out_int8.defined() ? int8_linear(context, out_int8) : out_proj(context);
}

void ClipAttentionImpl::pack_int8(bool on) {
  qkv_int8 = out_int8 = Int8Matrix();
  if (!on) return;
  qkv_int8 = pack_int8_matrix(at::cat({q_proj->weight, k_proj->weight, v_proj->weight}),
                              at::cat({q_proj->bias, k_proj->bias, v_proj->bias}));
  out_int8 = pack_int8_matrix(out_proj->weight, out_proj->bias);
}

ClipMlpImpl::ClipMlpImpl(const ClipVisionConfig& c) : quick_gelu_(c.hidden_act == "quick_gelu") {
  fc1 = register_module("fc1", torch::nn::Linear(c.hidden_size, c.intermediate_size));
  fc2 = register_module("fc2", torch::nn::Linear(c.intermediate_size, c.hidden_size));
}

at::Tensor ClipMlpImpl::forward(const at::Tensor& x) {
  at::Tensor h = fc1_int8.defined() ? int8_linear(x, fc1_int8) : fc1(x);
  h = quick_gelu_ ? h * at::sigmoid(1.702 * h) : at::gelu(h);
  return fc2_int8.defined() ? int8_linear(h, fc2_int8) : fc2(h);
}

void ClipMlpImpl::pack_int8(bool on) {
  fc1_int8 = fc2_int8 = Int8Matrix();
  if (!on) return;
  fc1_int8 = pack_int8_matrix(fc1->weight, fc1->bias);
  fc2_int8 = pack_int8_matrix(fc2->weight, fc2->bias);
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipVisionConfig& c) {
  auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
  self_attn = register_module("self_attn", ClipAttention(c));
  layer_norm1 = register_module("layer_norm1", ln());
  mlp = register_module("mlp", ClipMlp(c));
  layer_norm2 = register_module("layer_norm2", ln());
}

at::Tensor ClipEncoderLayerImpl::forward(const at::Tensor& x) {
  at::Tensor h = x + self_attn(layer_norm1(x));
  return h + mlp(layer_norm2(h));
}

ClipVisionEmbeddingsImpl::ClipVisionEmbeddingsImpl(const ClipVisionConfig& c) {
  class_embedding = register_parameter("class_embedding", at::randn({c.hidden_size}) * 0.02);
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size).bias(false)));
  position_embedding = register_module("position_embedding", torch::nn::Embedding(c.num_patches() + 1, c.hidden_size));
}

void ClipVisionEmbeddingsImpl::pack_int8(bool on) {
  patch_int8 = Int8Matrix();
  if (on) patch_int8 = pack_int8_matrix(patch_embedding->weight.flatten(1));  // [C, 3 * p * p]
}

at::Tensor ClipVisionEmbeddingsImpl::forward(const at::Tensor& pixel_values) {
  at::Tensor patches;  // [B, P, C]
  if (patch_int8.defined()) {
    // The stride-p, p x p convolution as a product: each patch's pixels in the weight's order (channel, row, column).
    const int64_t B = pixel_values.size(0), ch = pixel_values.size(1), p = patch_embedding->options.kernel_size()->at(0);
    const int64_t gh = pixel_values.size(2) / p, gw = pixel_values.size(3) / p;
    const at::Tensor rows = pixel_values.reshape({B, ch, gh, p, gw, p}).permute({0, 2, 4, 1, 3, 5}).reshape({B * gh * gw, ch * p * p});
    patches = int8_linear(rows, patch_int8).view({B, gh * gw, -1});
  } else {
    patches = patch_embedding(pixel_values).flatten(2).transpose(1, 2);
  }
  const int64_t B = patches.size(0);
  at::Tensor cls = class_embedding.to(patches.dtype()).view({1, 1, -1}).expand({B, 1, patches.size(2)});
  at::Tensor x = at::cat({cls, patches}, 1);
  TORCH_CHECK(x.size(1) == position_embedding->weight.size(0), "CLIP: image gives ", x.size(1) - 1,
              " patches, the position embedding has ", position_embedding->weight.size(0) - 1);
  return x + position_embedding->weight.unsqueeze(0);
}

ClipVisionTransformerImpl::VisionModelImpl::VisionModelImpl(const ClipVisionConfig& c) {
  auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
  embeddings = register_module("embeddings", ClipVisionEmbeddings(c));
  pre_layrnorm = register_module("pre_layrnorm", ln());  // sic: Hugging Face's spelling
  auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  layers = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.push_back(ClipEncoderLayer(c));
    layers->push_back(layer_list.back());
  }
  post_layernorm = register_module("post_layernorm", ln());
}

ClipVisionTransformerImpl::ClipVisionTransformerImpl(const ClipVisionConfig& c) : config_(c) {
  vision_model = register_module("vision_model", std::make_shared<VisionModelImpl>(c));
  visual_projection =
      register_module("visual_projection", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.projection_dim).bias(false)));
}

ClipVisionOutput ClipVisionTransformerImpl::forward(const at::Tensor& pixel_values) {
  TORCH_CHECK(pixel_values.dim() == 4 && pixel_values.size(1) == config_.num_channels &&
                  pixel_values.size(2) == config_.image_size && pixel_values.size(3) == config_.image_size,
              "CLIP: expected pixel values [B, ", config_.num_channels, ", ", config_.image_size, ", ", config_.image_size,
              "], got ", pixel_values.sizes());
  at::Tensor x = vision_model->pre_layrnorm(vision_model->embeddings(pixel_values));
  for (auto& layer : vision_model->layer_list) x = layer(x);
  ClipVisionOutput out;
  out.last_hidden_state = x;
  out.pooled_output = vision_model->post_layernorm(x.select(1, 0));
  out.image_embeds = visual_projection(out.pooled_output);
  return out;
}

// The one mapping table between OpenAI CLIP names and ours (= Hugging Face's):
//   visual.class_embedding               -> vision_model.embeddings.class_embedding
//   visual.conv1.weight                  -> vision_model.embeddings.patch_embedding.weight
//   visual.positional_embedding          -> vision_model.embeddings.position_embedding.weight
//   visual.ln_pre.*                      -> vision_model.pre_layrnorm.*
//   visual.transformer.resblocks.i.attn.in_proj_{weight,bias} rows [0:C|C:2C|2C:3C]
//                                        -> vision_model.encoder.layers.i.self_attn.{q,k,v}_proj.*
//   ...attn.out_proj.* / ln_1 / mlp.c_fc / mlp.c_proj / ln_2
//                                        -> self_attn.out_proj / layer_norm1 / mlp.fc1 / mlp.fc2 / layer_norm2
//   visual.ln_post.*                     -> vision_model.post_layernorm.*
//   visual.proj [C, P]                   -> visual_projection.weight [P, C] (transposed)
// Ignored when loading: text tower (text_model.*, transformer.*, token_embedding, ...),
// logit_scale, text_projection, position_ids buffers.
TensorMap clip_openai_to_hf(const TensorMap& weights, const ClipVisionConfig& config) {
  TensorMap out;
  const int64_t C = config.hidden_size;
  const std::string layer_prefix = "visual.transformer.resblocks.";
  const std::vector<std::pair<std::string, std::string>> block_names = {
      {"attn.out_proj.", "self_attn.out_proj."}, {"ln_1.", "layer_norm1."}, {"mlp.c_fc.", "mlp.fc1."},
      {"mlp.c_proj.", "mlp.fc2."},               {"ln_2.", "layer_norm2."}};
  for (const auto& [key, t] : weights) {
    if (key.rfind("visual.", 0) != 0) {
      out[key] = t;
      continue;
    }
    if (key == "visual.class_embedding") out["vision_model.embeddings.class_embedding"] = t;
    else if (key == "visual.conv1.weight") out["vision_model.embeddings.patch_embedding.weight"] = t;
    else if (key == "visual.positional_embedding") out["vision_model.embeddings.position_embedding.weight"] = t;
    else if (key.rfind("visual.ln_pre.", 0) == 0) out["vision_model.pre_layrnorm." + key.substr(14)] = t;
    else if (key.rfind("visual.ln_post.", 0) == 0) out["vision_model.post_layernorm." + key.substr(15)] = t;
    else if (key == "visual.proj") out["visual_projection.weight"] = t.t().contiguous();
    else if (key.rfind(layer_prefix, 0) == 0) {
      std::string rest = key.substr(layer_prefix.size());
      std::string index = rest.substr(0, rest.find('.'));
      std::string name = rest.substr(index.size() + 1);
      std::string hf = "vision_model.encoder.layers." + index + ".";
      if (name == "attn.in_proj_weight" || name == "attn.in_proj_bias") {
        if (t.size(0) != 3 * C) {
          out[key] = t;  // wrong shape: left under its own name so strict loading reports it
          continue;
        }
        const std::string suffix = name == "attn.in_proj_weight" ? "weight" : "bias";
        const char* qkv[] = {"q_proj", "k_proj", "v_proj"};
        for (int i = 0; i < 3; ++i) out[hf + "self_attn." + qkv[i] + "." + suffix] = t.narrow(0, i * C, C).contiguous();
        continue;
      }
      bool mapped = false;
      for (const auto& [from, to] : block_names)
        if (name.rfind(from, 0) == 0) {
          out[hf + to + name.substr(from.size())] = t;
          mapped = true;
        }
      if (!mapped) out[key] = t;
    } else {
      out[key] = t;
    }
  }
  return out;
}

void ClipVisionTransformerImpl::load_weights(const TensorMap& weights, const std::string& source) {
  StrictLoadOptions options;
  options.source = source;
  options.ignorable = {"text_model.*", "text_projection.*", "logit_scale", "vision_model.embeddings.position_ids",
                       "transformer.*", "token_embedding.*", "positional_embedding", "ln_final.*", "text_projection",
                       "input_resolution", "context_length", "vocab_size", "visual.attnpool.*"};
  load_state_strict(*this, clip_openai_to_hf(weights, config_), options);
  if (compute_dtype_ != WeightDtype::Float32) set_compute_dtype(compute_dtype_);  // repack the new weights
}

void ClipImageEncoderImpl::set_compute_dtype(WeightDtype dtype) {
  if (dtype != WeightDtype::Float32)
    throw std::invalid_argument(std::string("the CLIP ") + architecture() + " encoder computes in float32 only, not " +
                                weight_dtype_name(dtype));
  compute_dtype_ = dtype;
}

void ClipVisionTransformerImpl::set_compute_dtype(WeightDtype dtype) {
  if (dtype != WeightDtype::Float32 && dtype != WeightDtype::Int8Dynamic)
    throw std::invalid_argument(std::string("the CLIP ViT computes in float32 or int8-dynamic, not ") +
                                weight_dtype_name(dtype));
  const bool on = dtype == WeightDtype::Int8Dynamic;
  if (on && !visual_projection->weight.device().is_cpu())
    throw std::invalid_argument("the CLIP ViT's int8-dynamic products run on the CPU; the encoder is on " +
                                visual_projection->weight.device().str());
  torch::NoGradGuard no_grad;
  vision_model->embeddings->pack_int8(on);
  for (auto& layer : vision_model->layer_list) {
    layer->self_attn->pack_int8(on);
    layer->mlp->pack_int8(on);
  }
  compute_dtype_ = dtype;
}

void ClipImageEncoderImpl::freeze() {
  for (auto& p : parameters()) p.set_requires_grad(false);
  eval();
}

Json ClipVisionTransformerImpl::config_json() const {
  const auto& c = config_;
  Json vc = {{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
             {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
             {"image_size", c.image_size}, {"patch_size", c.patch_size}, {"num_channels", c.num_channels},
             {"layer_norm_eps", c.layer_norm_eps}, {"hidden_act", c.hidden_act}};
  return {{"model_type", "clip"}, {"projection_dim", c.projection_dim}, {"vision_config", vc}};
}

ClipVisionConfig clip_vit_config_from_openai(const TensorMap& w, const std::string& source) {
  auto need = [&](const std::string& key) -> const at::Tensor& {
    auto it = w.find(key);
    if (it == w.end()) throw FileError(source, "not an OpenAI CLIP ViT: tensor '" + key + "' is missing");
    return it->second;
  };
  ClipVisionConfig c;
  const at::Tensor& conv1 = need("visual.conv1.weight");            // [width, 3, patch, patch]
  const at::Tensor& positions = need("visual.positional_embedding");  // [grid^2 + 1, width]
  const at::Tensor& proj = need("visual.proj");                       // [width, embed_dim]
  if (conv1.dim() != 4 || positions.dim() != 2 || proj.dim() != 2)
    throw FileError(source, "OpenAI CLIP ViT tensors have unexpected ranks");
  c.hidden_size = conv1.size(0);
  c.patch_size = conv1.size(-1);
  const int64_t grid = std::llround(std::sqrt(static_cast<double>(positions.size(0) - 1)));
  c.image_size = grid * c.patch_size;
  c.num_hidden_layers = 0;
  const std::string suffix = ".attn.in_proj_weight";
  for (const auto& [key, t] : w)
    if (key.rfind("visual.transformer.resblocks.", 0) == 0 && key.size() > suffix.size() &&
        key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0)
      ++c.num_hidden_layers;
  c.num_attention_heads = std::max<int64_t>(1, c.hidden_size / 64);
  c.intermediate_size = 4 * c.hidden_size;
  c.projection_dim = proj.size(1);
  c.hidden_act = "quick_gelu";
  c.layer_norm_eps = 1e-5;
  if (c.num_hidden_layers == 0) throw FileError(source, "OpenAI CLIP ViT without transformer blocks");
  return c;
}

ClipVisionTransformer load_clip_vision(const std::string& path) {
  namespace fs = std::filesystem;
  const bool is_dir = fs::is_directory(path);
  fs::path folder = is_dir ? fs::path(path) : fs::path(path).parent_path();
  fs::path config_path = folder / "config.json";
  if (!fs::exists(config_path)) throw FileError(config_path.string(), "missing (CLIP config.json)");
  ClipVisionTransformer model(ClipVisionConfig::from_file(config_path.string()));
  fs::path weights = is_dir ? folder / "model.safetensors" : fs::path(path);
  if (is_dir && !fs::exists(weights)) weights = folder / "pytorch_model.bin";
  if (!fs::exists(weights)) throw FileError(path, "no model.safetensors or pytorch_model.bin in the CLIP folder");
  model->load_weights(load_weight_file(weights.string()), weights.string());
  model->freeze();
  return model;
}

}  // namespace prefixcap
