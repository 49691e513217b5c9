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

Cnn14ConvPath parse_cnn14_conv_path(const std::string& name) {
  for (auto p : {Cnn14ConvPath::Auto, Cnn14ConvPath::Reference, Cnn14ConvPath::Nchw, Cnn14ConvPath::ChannelsLast,
                 Cnn14ConvPath::Gemm})
    if (name == cnn14_conv_path_name(p)) return p;
  throw std::invalid_argument("unknown CNN14 conv path '" + name + "' (auto, reference, nchw, channels-last, gemm)");
}

const char* cnn14_conv_path_name(Cnn14ConvPath path) {
  switch (path) {
    case Cnn14ConvPath::Auto: return "auto";
    case Cnn14ConvPath::Reference: return "reference";
    case Cnn14ConvPath::Nchw: return "nchw";
    case Cnn14ConvPath::ChannelsLast: return "channels-last";
    case Cnn14ConvPath::Gemm: return "gemm";
  }
  return "?";
}

namespace {
// --encoder-dtype int8-dynamic packs the convs with at least this many input channels (every conv
// of the published CNN14 but the first): narrower ones are cheap in float32, and their short sums
// (9 x channels terms) are where 8-bit noise weighs most (docs/encoders.md).
constexpr int64_t kInt8MinInputChannels = 64;
}  // namespace

std::vector<Cnn14Impl::FoldedConv> Cnn14Impl::folded_convs() {
  std::vector<std::pair<const void*, int64_t>> sources;
  for (const auto& block : conv_blocks)
    for (const at::Tensor& t : {block->conv1->weight, block->bn1->weight, block->bn1->bias, block->bn1->running_mean,
                                block->bn1->running_var, block->conv2->weight, block->bn2->weight, block->bn2->bias,
                                block->bn2->running_mean, block->bn2->running_var})
      sources.emplace_back(t.data_ptr(), t.is_inference() ? -1 : t._version());  // inference tensors have no version
  std::lock_guard<std::mutex> lock(fold_mutex_);
  if (sources == folded_from_) return folded_;
  at::NoGradGuard no_grad;
  std::vector<FoldedConv> convs;
  auto fold = [&](const torch::nn::Conv2d& conv, const torch::nn::BatchNorm2d& bn) {
    // BatchNorm in eval mode: y = (x - mean) / sqrt(var + eps) * gamma + beta, per output channel.
    at::Tensor scale = bn->weight / at::sqrt(bn->running_var + bn->options.eps());
    FoldedConv f;
    f.weight = (conv->weight * scale.view({-1, 1, 1, 1})).contiguous();
    f.bias = (bn->bias - bn->running_mean * scale).contiguous();
    if (compute_dtype_ == WeightDtype::Int8Dynamic && f.weight.size(1) >= kInt8MinInputChannels)
      f.int8 = pack_int8_matrix(f.weight.permute({0, 2, 3, 1}).reshape({f.weight.size(0), -1}), f.bias);
    convs.push_back(std::move(f));
  };
  for (const auto& block : conv_blocks) {
    fold(block->conv1, block->bn1);
    fold(block->conv2, block->bn2);
  }
  folded_ = convs;
  folded_from_ = std::move(sources);
  return convs;
}

void Cnn14Impl::set_compute_dtype(WeightDtype dtype) {
  if (dtype != WeightDtype::Float32 && dtype != WeightDtype::Int8Dynamic)
    throw std::invalid_argument(std::string("CNN14 computes in float32 or int8-dynamic, not ") + weight_dtype_name(dtype));
  if (dtype == WeightDtype::Int8Dynamic && !fc1->weight.device().is_cpu())
    throw std::invalid_argument("CNN14's int8-dynamic convolutions run on the CPU; the encoder is on " +
                                fc1->weight.device().str());
  std::lock_guard<std::mutex> lock(fold_mutex_);
  compute_dtype_ = dtype;
  folded_from_.clear();  // fold (and pack) again on the next forward
}

namespace {
// Cnn14ConvPath::Auto's choice per layer on the CPU, from per-layer timings of both LibTorch
// builds (docs/encoders.md): GEMM for the single-channel first conv and for layers with at most
// 512 output positions (batch x time x frequency), where a convolution kernel has too few rows
// per weight it reads; channels-last (oneDNN) for the early, wide layers (<= 128 input
// channels); NCHW for the rest.
constexpr int64_t kGemmMaxPositions = 512;
constexpr int64_t kChannelsLastMaxInputChannels = 128;

// 3x3 convolution, stride 1, padding 1, through im2col and BLAS. One product per clip,
// [O, I*9] x [I*9, H*W], lands in NCHW directly; with several clips and few positions, one
// product over all of them, [B*H*W, I*9] x [I*9, O], keeps the weight read once.
at::Tensor conv3x3_gemm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3), out_channels = weight.size(0);
  const at::Tensor columns = at::im2col(x, {3, 3}, {1, 1}, {1, 1}, {1, 1});  // [B, I*9, H*W]
  const at::Tensor w = weight.reshape({out_channels, -1});
  if (batch > 1 && batch * height * width <= kGemmMaxPositions) {
    const at::Tensor rows = columns.transpose(1, 2).reshape({batch * height * width, -1});
    return at::addmm(bias, rows, w.t()).view({batch, height, width, out_channels}).permute({0, 3, 1, 2}).contiguous();
  }
  at::Tensor out = at::empty({batch, out_channels, height * width}, x.options());
  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor ob = out.select(0, b);
    at::addmm_out(ob, bias.unsqueeze(1), w, columns.select(0, b));
  }
  return out.view({batch, out_channels, height, width});
}

Cnn14ConvPath auto_conv_path(const at::Tensor& x) {
  if (!x.is_cpu()) return Cnn14ConvPath::Nchw;
  const int64_t positions = x.size(0) * x.size(2) * x.size(3);
  if (x.size(1) == 1 || positions <= kGemmMaxPositions) return Cnn14ConvPath::Gemm;
  return x.size(1) <= kChannelsLastMaxInputChannels ? Cnn14ConvPath::ChannelsLast : Cnn14ConvPath::Nchw;
}
}  // namespace

at::Tensor Cnn14Impl::run_blocks_folded(at::Tensor x, const std::vector<FoldedConv>& convs, std::vector<at::Tensor>* blocks) {
  auto run_block = [&](size_t i, at::Tensor h) {
    for (int k = 0; k < 2; ++k) {
      const FoldedConv& f = convs[2 * i + k];
      if (f.int8.defined() && h.is_cpu()) {  // --encoder-dtype int8-dynamic (channels-last out)
        h = int8_conv3x3(h, f.int8, /*relu=*/true, /*nonnegative_input=*/true);  // after a ReLU (and pooling)
        continue;
      }
      const Cnn14ConvPath path = conv_path_ == Cnn14ConvPath::Auto ? auto_conv_path(h) : conv_path_;
      if (path == Cnn14ConvPath::Gemm && h.is_cpu()) {
        h = conv3x3_gemm(h, f.weight, f.bias);
      } else {
        const auto format = path == Cnn14ConvPath::ChannelsLast ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
        h = at::conv2d(h.contiguous(format), f.weight.contiguous(format), f.bias, {1, 1}, {1, 1});
      }
      h.relu_();
    }
    return i + 1 < conv_blocks.size() ? at::avg_pool2d(h, {2, 2}) : h;
  };
  size_t i = 0;
  // With integer convolutions the early blocks are cheap enough that moving their activations
  // (16 MB per 10 s clip after block 1) costs as much as the arithmetic: a batch runs them clip
  // by clip, so that each clip's stay in cache, and is batched from the first block whose input
  // has at most kClipByClipPositions positions per clip (block 4 of 10 s clips).
  constexpr int64_t kClipByClipPositions = 4096;
  if (x.size(0) > 1 && x.is_cpu() && convs.back().int8.defined()) {
    std::vector<at::Tensor> clips = x.split(1);
    for (; i < conv_blocks.size() && clips.front().size(2) * clips.front().size(3) > kClipByClipPositions; ++i) {
      for (at::Tensor& clip : clips) clip = run_block(i, clip);
      if (blocks) blocks->push_back(at::cat(clips).contiguous());
    }
    x = at::cat(clips);
  }
  for (; i < conv_blocks.size(); ++i) {
    x = run_block(i, x);
    if (blocks) blocks->push_back(x.contiguous());
  }
  return x.contiguous();
}

Cnn14Output Cnn14Impl::forward_logmel(const at::Tensor& logmel, bool keep_blocks) {
  TORCH_CHECK(logmel.dim() == 4 && logmel.size(1) == 1 && logmel.size(3) == config_.front_end.mel_bins,
              "CNN14: expected log-mel [B, 1, T, ", config_.front_end.mel_bins, "], got ", logmel.sizes());
  TORCH_CHECK(logmel.size(2) >= 32, "CNN14: ", logmel.size(2), " frames is too short; five 2x2 poolings need >= 32 (",
              32 * config_.front_end.hop_size * 1000 / config_.front_end.sample_rate, " ms of audio)");
  Cnn14Output out;
  out.logmel = logmel;
  at::Tensor x = bn0(logmel.transpose(1, 3)).transpose(1, 3);  // normalise each mel bin
  // The folded form has no gradient to the BatchNorm parameters: anything that trains them runs
  // the reference form (training mode, or eval mode with gradients wanted).
  const bool wants_grad = at::GradMode::is_enabled() && conv_blocks.front()->conv1->weight.requires_grad();
  if (is_training() || wants_grad || conv_path_ == Cnn14ConvPath::Reference) {
    for (size_t i = 0; i < conv_blocks.size(); ++i) {
      x = conv_blocks[i]->forward(x, i + 1 < conv_blocks.size() ? 2 : 1);
      if (keep_blocks) out.blocks.push_back(x);
    }
  } else {
    x = run_blocks_folded(x, folded_convs(), keep_blocks ? &out.blocks : nullptr);
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
