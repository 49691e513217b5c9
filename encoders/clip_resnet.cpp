#include "encoders/clip_resnet.h"

#include <cmath>
#include <set>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/weights.h"

namespace prefixcap {

ClipResNetConfig ClipResNetConfig::from_json(const Json& j, const std::string& where) {
  ClipResNetConfig c;
  if (j.contains("layers")) {
    auto layers = json_get<std::vector<int64_t>>(j, "layers", where);
    if (layers.size() != 4) throw ConfigError(where + ": layers must list 4 stage depths, got " + std::to_string(layers.size()));
    for (int i = 0; i < 4; ++i) c.layers[i] = layers[i];
  }
  c.width = json_get_or<int64_t>(j, "width", c.width, where);
  c.heads = json_get_or<int64_t>(j, "heads", c.width * 32 / 64, where);
  c.image_resolution = json_get_or<int64_t>(j, "image_resolution", c.image_resolution, where);
  c.embed_dim = json_get_or<int64_t>(j, "embed_dim", c.embed_dim, where);
  c.batch_norm_eps = json_get_or<double>(j, "batch_norm_eps", c.batch_norm_eps, where);
  for (int64_t n : c.layers)
    if (n <= 0) throw ConfigError(where + ": every stage needs at least one Bottleneck");
  if (c.width <= 0 || c.width % 2 != 0) throw ConfigError(where + ": width must be a positive even number");
  if (c.heads <= 0 || c.feature_dim() % c.heads != 0)
    throw ConfigError(where + ": heads (" + std::to_string(c.heads) + ") must divide 32 * width (" +
                      std::to_string(c.feature_dim()) + ")");
  if (c.image_resolution < 32 || c.image_resolution % 32 != 0)
    throw ConfigError(where + ": image_resolution must be a positive multiple of 32, got " + std::to_string(c.image_resolution));
  if (c.embed_dim <= 0 || !(c.batch_norm_eps > 0)) throw ConfigError(where + ": embed_dim and batch_norm_eps must be positive");
  return c;
}

Json ClipResNetConfig::to_json() const {
  return {{"model_type", "clip_resnet"}, {"layers", std::vector<int64_t>(layers.begin(), layers.end())},
          {"width", width}, {"heads", heads}, {"image_resolution", image_resolution}, {"embed_dim", embed_dim},
          {"batch_norm_eps", batch_norm_eps}};
}

ClipResNetConfig ClipResNetConfig::from_weights(const TensorMap& weights, const std::string& source) {
  const std::string prefix = weights.count("visual.layer1.0.conv1.weight") ? "visual." : "";
  auto need = [&](const std::string& key) -> const at::Tensor& {
    auto it = weights.find(prefix + key);
    if (it == weights.end()) throw FileError(source, "not a CLIP ResNet: tensor '" + prefix + key + "' is missing");
    return it->second;
  };
  ClipResNetConfig c;
  for (int stage = 0; stage < 4; ++stage) {
    const std::string p = prefix + "layer" + std::to_string(stage + 1) + ".";
    std::set<std::string> indices;
    for (auto it = weights.lower_bound(p); it != weights.end() && it->first.rfind(p, 0) == 0; ++it)
      indices.insert(it->first.substr(p.size(), it->first.find('.', p.size()) - p.size()));
    c.layers[stage] = static_cast<int64_t>(indices.size());
  }
  c.width = need("layer1.0.conv1.weight").size(0);
  const int64_t tokens = need("attnpool.positional_embedding").size(0);
  c.image_resolution = 32 * std::llround(std::sqrt(static_cast<double>(tokens - 1)));
  c.embed_dim = need("attnpool.c_proj.weight").size(0);
  c.heads = c.width * 32 / 64;
  return from_json(c.to_json(), source);
}

namespace {
torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, kernel).stride(stride).padding(kernel / 2).bias(false));
}
torch::nn::BatchNorm2d batch_norm(int64_t channels, double eps) {
  return torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(channels).eps(eps));
}
// BatchNorm with its running statistics, whatever the module's mode: CLIP's towers are frozen.
at::Tensor frozen_bn(const torch::nn::BatchNorm2d& bn, const at::Tensor& x) {
  return at::batch_norm(x, bn->weight, bn->bias, bn->running_mean, bn->running_var, /*training=*/false, /*momentum=*/0.0,
                        bn->options.eps(), /*cudnn_enabled=*/true);
}
at::Tensor avg_pool(const at::Tensor& x, int64_t k) { return k > 1 ? at::avg_pool2d(x, {k, k}, {k, k}) : x; }
}  // namespace

ClipBottleneckImpl::ClipBottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, double eps) : stride_(stride) {
  conv1 = register_module("conv1", conv(inplanes, planes, 1));
  bn1 = register_module("bn1", batch_norm(planes, eps));
  conv2 = register_module("conv2", conv(planes, planes, 3));
  bn2 = register_module("bn2", batch_norm(planes, eps));
  conv3 = register_module("conv3", conv(planes, planes * 4, 1));
  bn3 = register_module("bn3", batch_norm(planes * 4, eps));
  if (stride > 1 || inplanes != planes * 4) {
    // nn.Sequential(OrderedDict([("-1", AvgPool2d(stride)), ("0", conv), ("1", bn)])): only 0, 1 hold tensors.
    downsample = register_module("downsample", std::make_shared<torch::nn::Module>());
    downsample_conv = downsample->register_module("0", conv(inplanes, planes * 4, 1));
    downsample_bn = downsample->register_module("1", batch_norm(planes * 4, eps));
  }
}

at::Tensor ClipBottleneckImpl::forward(const at::Tensor& x) {
  at::Tensor out = at::relu(frozen_bn(bn1, conv1(x)));
  out = at::relu(frozen_bn(bn2, conv2(out)));
  out = avg_pool(out, stride_);  // anti-aliased stride: pool after the 3x3 conv
  out = frozen_bn(bn3, conv3(out));
  at::Tensor identity = downsample ? frozen_bn(downsample_bn, downsample_conv(avg_pool(x, stride_))) : x;
  return at::relu(out + identity);
}

ClipAttentionPoolImpl::ClipAttentionPoolImpl(int64_t grid, int64_t embed_dim, int64_t heads, int64_t output_dim)
    : heads_(heads) {
  positional_embedding = register_parameter("positional_embedding", at::zeros({grid * grid + 1, embed_dim}));
  k_proj = register_module("k_proj", torch::nn::Linear(embed_dim, embed_dim));
  q_proj = register_module("q_proj", torch::nn::Linear(embed_dim, embed_dim));
  v_proj = register_module("v_proj", torch::nn::Linear(embed_dim, embed_dim));
  c_proj = register_module("c_proj", torch::nn::Linear(embed_dim, output_dim));
}

at::Tensor ClipAttentionPoolImpl::forward(const at::Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), D = C / heads_;
  at::Tensor tokens = x.flatten(2).transpose(1, 2);                       // [B, HW, C]
  tokens = at::cat({tokens.mean(1, /*keepdim=*/true), tokens}, 1);        // [B, HW + 1, C]
  TORCH_CHECK(tokens.size(1) == positional_embedding.size(0), "CLIP attention pool: ", tokens.size(1) - 1,
              " grid positions, the weights have ", positional_embedding.size(0) - 1);
  tokens = tokens + positional_embedding.unsqueeze(0);
  const int64_t N = tokens.size(1);
  at::Tensor q = q_proj(tokens.narrow(1, 0, 1)).view({B, 1, heads_, D}).transpose(1, 2) * (1.0 / std::sqrt(double(D)));
  at::Tensor k = k_proj(tokens).view({B, N, heads_, D}).transpose(1, 2);  // [B, H, N, D]
  at::Tensor v = v_proj(tokens).view({B, N, heads_, D}).transpose(1, 2);
  at::Tensor probs = at::softmax(at::matmul(q, k.transpose(-2, -1)), -1);  // [B, H, 1, N]
  return c_proj(at::matmul(probs, v).transpose(1, 2).reshape({B, C}));
}

ClipModifiedResNetImpl::ClipModifiedResNetImpl(const ClipResNetConfig& c) : config_(c) {
  const double eps = c.batch_norm_eps;
  conv1 = register_module("conv1", conv(3, c.width / 2, 3, /*stride=*/2));
  bn1 = register_module("bn1", batch_norm(c.width / 2, eps));
  conv2 = register_module("conv2", conv(c.width / 2, c.width / 2, 3));
  bn2 = register_module("bn2", batch_norm(c.width / 2, eps));
  conv3 = register_module("conv3", conv(c.width / 2, c.width, 3));
  bn3 = register_module("bn3", batch_norm(c.width, eps));
  int64_t inplanes = c.width;
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t planes = c.width << stage;
    stages[stage] = register_module("layer" + std::to_string(stage + 1), torch::nn::ModuleList());
    for (int64_t i = 0; i < c.layers[stage]; ++i) {
      blocks[stage].push_back(ClipBottleneck(inplanes, planes, i == 0 && stage > 0 ? 2 : 1, eps));
      stages[stage]->push_back(blocks[stage].back());
      inplanes = planes * 4;
    }
  }
  attnpool = register_module("attnpool", ClipAttentionPool(c.grid(), c.feature_dim(), c.heads, c.embed_dim));
}

ClipResNetOutput ClipModifiedResNetImpl::forward_all(const at::Tensor& pixel_values) {
  const int64_t R = config_.image_resolution;
  TORCH_CHECK(pixel_values.dim() == 4 && pixel_values.size(1) == 3 && pixel_values.size(2) == R && pixel_values.size(3) == R,
              "CLIP ResNet: expected pixel values [B, 3, ", R, ", ", R, "], got ", pixel_values.sizes());
  ClipResNetOutput out;
  at::Tensor x = pixel_values.to(conv1->weight.dtype());
  x = at::relu(frozen_bn(bn1, conv1(x)));
  x = at::relu(frozen_bn(bn2, conv2(x)));
  x = at::relu(frozen_bn(bn3, conv3(x)));
  out.stem = avg_pool(x, 2);
  x = out.stem;
  for (auto& stage : blocks)
    for (auto& block : stage) x = block(x);
  out.layer4 = x;
  out.image_embeds = attnpool(x);
  return out;
}

ClipVisionOutput ClipModifiedResNetImpl::forward(const at::Tensor& pixel_values) {
  ClipResNetOutput r = forward_all(pixel_values);
  ClipVisionOutput out;
  out.last_hidden_state = r.layer4.flatten(2).transpose(1, 2);  // [B, grid^2, C]
  out.image_embeds = r.image_embeds;
  return out;
}

void ClipModifiedResNetImpl::load_weights(const TensorMap& weights, const std::string& source) {
  // The one mapping: OpenAI's "visual." prefix off; everything outside the image tower (text
  // transformer, token_embedding, ln_final, text_projection, logit_scale, TorchScript
  // constants such as input_resolution) is not ours.
  TensorMap own;
  const bool prefixed = weights.count("visual.conv1.weight") > 0;
  for (const auto& [key, t] : weights) {
    if (prefixed) {
      if (key.rfind("visual.", 0) == 0) own[key.substr(7)] = t;
    } else {
      own[key] = t;
    }
  }
  StrictLoadOptions options;
  options.source = source;
  if (!prefixed)  // a whole CLIP without the prefix is not a thing; an image-tower file may carry these
    options.ignorable = {"input_resolution", "context_length", "vocab_size"};
  load_state_strict(*this, own, options);
}

}  // namespace prefixcap
