#include "encoders/cnn14.h"

#include <filesystem>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/weights.h"

namespace prefixcap {

Cnn14Config Cnn14Config::from_json(const Json& j, const std::string& where) {
  Cnn14Config c;
  std::string type = json_get_or<std::string>(j, "model_type", "cnn14", where);
  if (type != "cnn14") throw ConfigError(where + ": model_type '" + type + "' is not cnn14");
  c.front_end = LogMelConfig::from_json(j, where);
  c.channels = json_get_or<std::vector<int64_t>>(j, "channels", c.channels, where);
  c.embedding_dim = json_get_or<int64_t>(j, "embedding_dim", c.channels.empty() ? 0 : c.channels.back(), where);
  c.classes_num = json_get_or<int64_t>(j, "classes_num", c.classes_num, where);
  c.clip_seconds = json_get_or<double>(j, "clip_seconds", 0.0, where);
  c.mel_from_checkpoint = json_get_or<bool>(j, "mel_from_checkpoint", false, where);
  c.max_pool_frames = json_get_or<int64_t>(j, "max_pool_frames", 0, where);
  if (c.channels.size() != 6) throw ConfigError(where + ": 'channels' must list 6 conv block widths");
  for (int64_t ch : c.channels)
    if (ch <= 0) throw ConfigError(where + ": conv block widths must be positive");
  if (c.embedding_dim <= 0 || c.classes_num <= 0) throw ConfigError(where + ": embedding_dim and classes_num must be positive");
  if (!(c.clip_seconds >= 0 && c.clip_seconds <= 24 * 3600))
    throw ConfigError(where + ": clip_seconds must be between 0 (off) and 86400, got " + std::to_string(c.clip_seconds));
  if (c.front_end.mel_bins < 32)
    throw ConfigError(where + ": mel_bins must be at least 32 (five 2x2 poolings over frequency)");
  return c;
}

Cnn14Config Cnn14Config::from_file(const std::string& path) { return from_json(read_json_file(path), path); }

Json Cnn14Config::to_json() const {
  Json j = {{"model_type", "cnn14"},
            {"sample_rate", front_end.sample_rate},
            {"window_size", front_end.window_size},
            {"hop_size", front_end.hop_size},
            {"mel_bins", front_end.mel_bins},
            {"fmin", front_end.fmin},
            {"fmax", front_end.fmax},
            {"classes_num", classes_num},
            {"channels", channels},
            {"embedding_dim", embedding_dim}};
  if (clip_seconds > 0) j["clip_seconds"] = clip_seconds;
  if (mel_from_checkpoint) j["mel_from_checkpoint"] = true;
  if (max_pool_frames > 0) j["max_pool_frames"] = max_pool_frames;
  return j;
}

ConvBlockImpl::ConvBlockImpl(int64_t in_channels, int64_t out_channels) {
  auto conv = [](int64_t in, int64_t out) {
    return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).stride(1).padding(1).bias(false));
  };
  conv1 = register_module("conv1", conv(in_channels, out_channels));
  conv2 = register_module("conv2", conv(out_channels, out_channels));
  bn1 = register_module("bn1", torch::nn::BatchNorm2d(out_channels));
  bn2 = register_module("bn2", torch::nn::BatchNorm2d(out_channels));
}

at::Tensor ConvBlockImpl::forward(const at::Tensor& input, int64_t pool) {
  at::Tensor x = at::relu(bn1(conv1(input)));
  x = at::relu(bn2(conv2(x)));
  return pool > 1 ? at::avg_pool2d(x, {pool, pool}) : x;
}

Cnn14Impl::Cnn14Impl(const Cnn14Config& config) : config_(config) {
  front_end = register_module("front_end", LogMelFrontEnd(config.front_end));
  bn0 = register_module("bn0", torch::nn::BatchNorm2d(config.front_end.mel_bins));
  int64_t in = 1;
  for (size_t i = 0; i < config.channels.size(); ++i) {
    conv_blocks.push_back(register_module("conv_block" + std::to_string(i + 1), ConvBlock(in, config.channels[i])));
    in = config.channels[i];
  }
  fc1 = register_module("fc1", torch::nn::Linear(in, config.embedding_dim));
  fc_audioset = register_module("fc_audioset", torch::nn::Linear(config.embedding_dim, config.classes_num));
}

Cnn14Output Cnn14Impl::forward(const at::Tensor& waveform, bool keep_blocks) {
  return forward_logmel(front_end(waveform), keep_blocks);
}

Cnn14Output Cnn14Impl::forward_logmel(const at::Tensor& logmel, bool keep_blocks) {
  TORCH_CHECK(logmel.dim() == 4 && logmel.size(1) == 1 && logmel.size(3) == config_.front_end.mel_bins,
              "CNN14: expected log-mel [B, 1, T, ", config_.front_end.mel_bins, "], got ", logmel.sizes());
  TORCH_CHECK(logmel.size(2) >= 32, "CNN14: ", logmel.size(2), " frames is too short; five 2x2 poolings need >= 32 (",
              32 * config_.front_end.hop_size * 1000 / config_.front_end.sample_rate, " ms of audio)");
  Cnn14Output out;
  out.logmel = logmel;
  at::Tensor x = bn0(logmel.transpose(1, 3)).transpose(1, 3);  // normalise each mel bin
  for (size_t i = 0; i < conv_blocks.size(); ++i) {
    x = conv_blocks[i]->forward(x, i + 1 < conv_blocks.size() ? 2 : 1);
    if (keep_blocks) out.blocks.push_back(x);
  }
  out.conv_block6 = x;                       // [B, C, T', F']
  at::Tensor temporal = x.mean(3);           // [B, C, T']
  out.temporal_features = temporal.transpose(1, 2);
  if (config_.max_pool_frames > 0 && x.size(2) == config_.max_pool_frames)
    temporal = at::max_pool2d(x, {3, 1}, {3, 1}).mean(3);  // ref: Prefix_AAC CNN14.py maxpool_forclothoaudio
  at::Tensor pooled = std::get<0>(temporal.max(2)) + temporal.mean(2);
  out.embedding = at::relu(fc1(pooled));
  out.clipwise_output = at::sigmoid(fc_audioset(out.embedding));
  return out;
}

// The one mapping table between PANNs checkpoints and this module:
//   model.X                                  -> X  (the official {'model': state_dict} layout)
//   spectrogram_extractor.*, logmel_extractor.* -> ignored: the STFT kernels and mel matrix are
//                                                 recomputed from the config (LogMelFrontEnd)
//   front_end.window / mel_basis             -> ours only, never in checkpoints
void Cnn14Impl::load_weights(const TensorMap& weights, const std::string& source) {
  TensorMap renamed;
  for (const auto& [key, tensor] : weights) {
    std::string name = key.rfind("model.", 0) == 0 ? key.substr(6) : key;
    if (renamed.count(name)) throw FileError(source, "tensor '" + name + "' appears twice");
    renamed[name] = tensor;
  }
  //   logmel_extractor.melW [F, M]            -> front_end.mel_basis when mel_from_checkpoint
  if (config_.mel_from_checkpoint) {
    auto it = renamed.find("logmel_extractor.melW");
    if (it == renamed.end()) throw FileError(source, "mel_from_checkpoint is set but there is no logmel_extractor.melW");
    renamed["front_end.mel_basis"] = it->second;
    renamed.erase(it);
  }
  StrictLoadOptions options;
  options.source = source;
  options.ignorable = {"spectrogram_extractor.*", "logmel_extractor.*"};
  options.optional = {"front_end.*"};
  load_state_strict(*this, renamed, options);
}

void Cnn14Impl::freeze() {
  for (auto& p : parameters()) p.set_requires_grad(false);
  eval();
}

Cnn14 load_cnn14(const std::string& path) {
  namespace fs = std::filesystem;
  const bool is_dir = fs::is_directory(path);
  fs::path folder = is_dir ? fs::path(path) : fs::path(path).parent_path();
  fs::path config_path = folder / "config.json";
  if (!fs::exists(config_path)) throw FileError(config_path.string(), "missing (CNN14 config.json)");
  Cnn14Config config = Cnn14Config::from_file(config_path.string());
  fs::path weights = path;
  if (is_dir) {
    weights.clear();
    for (const char* name : {"model.safetensors", "checkpoint.pth"})
      if (fs::exists(folder / name)) {
        weights = folder / name;
        break;
      }
    if (weights.empty()) throw FileError(path, "no model.safetensors or checkpoint.pth in the CNN14 folder");
  }
  Cnn14 model(config);
  model->load_weights(load_weight_file(weights.string()), weights.string());
  model->freeze();
  return model;
}

std::vector<float> fit_clip_length(const std::vector<float>& samples, int sample_rate, double seconds) {
  if (seconds <= 0) return samples;
  const size_t n = static_cast<size_t>(std::llround(seconds * sample_rate));
  std::vector<float> out(samples.begin(), samples.begin() + std::min(n, samples.size()));
  out.resize(n, 0.0f);
  return out;
}

}  // namespace prefixcap
