// PANNs CNN14 audio encoder, configured by config.json, with PANNs' checkpoint key names.
// ref: qiuqiangkong/audioset_tagging_cnn pytorch/models.py Cnn14, ConvBlock (d2f4b8c).
#pragma once

#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "core/json_config.h"
#include "core/tensor_map.h"
#include "encoders/log_mel.h"

namespace prefixcap {

struct Cnn14Config {
  LogMelConfig front_end;                                    // sample_rate, window_size, hop_size, ...
  std::vector<int64_t> channels = {64, 128, 256, 512, 1024, 2048};  // conv_block1..6 widths
  int64_t embedding_dim = 2048;                              // fc1 width
  int64_t classes_num = 527;                                 // AudioSet classes
  double clip_seconds = 0;                                   // pad or cut every clip to this (0 = keep)
  bool mel_from_checkpoint = false;  // use the checkpoint's logmel_extractor.melW (Prefix-AAC's
                                     // 16 kHz model: its melW is Cnn14_16k's, fmax 8000)
  int64_t max_pool_frames = 0;       // Prefix-AAC quirk: when conv_block6 has exactly this many
                                     // frames (46 = 30 s), max-pool time 3:1 on the global path

  // From a config.json (model_type "cnn14"); PANNs defaults for absent keys.
  static Cnn14Config from_json(const Json& j, const std::string& where);
  static Cnn14Config from_file(const std::string& path);
  Json to_json() const;
};

class ConvBlockImpl : public torch::nn::Module {
 public:
  ConvBlockImpl(int64_t in_channels, int64_t out_channels);
  at::Tensor forward(const at::Tensor& x, int64_t pool);  // conv-bn-relu x2, avg pool pool x pool
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
};
TORCH_MODULE(ConvBlock);

struct Cnn14Output {
  at::Tensor clipwise_output;     // [B, classes] sigmoid probabilities
  at::Tensor embedding;           // [B, embedding_dim]
  at::Tensor conv_block6;         // [B, C6, T', F'] (Prefix-AAC's temporal branch input)
  at::Tensor temporal_features;   // [B, T', C6] = mean over frequency of conv_block6
  at::Tensor logmel;              // [B, 1, T, mel_bins] (before bn0)
  std::vector<at::Tensor> blocks; // conv_block1..6 outputs, when asked for
};

class Cnn14Impl : public torch::nn::Module {
 public:
  explicit Cnn14Impl(const Cnn14Config& config);
  // waveform [B, N] at config.front_end.sample_rate (zero-padded rows are fine).
  Cnn14Output forward(const at::Tensor& waveform, bool keep_blocks = false);
  // From log-mel [B, 1, T, mel_bins] (skips the front end).
  Cnn14Output forward_logmel(const at::Tensor& logmel, bool keep_blocks = false);

  // Loads PANNs state dicts (safetensors or {'model': state_dict} checkpoints).
  void load_weights(const TensorMap& weights, const std::string& source);
  void freeze();
  const Cnn14Config& config() const { return config_; }

  LogMelFrontEnd front_end{nullptr};
  torch::nn::BatchNorm2d bn0{nullptr};
  std::vector<ConvBlock> conv_blocks;  // registered as conv_block1..6
  torch::nn::Linear fc1{nullptr}, fc_audioset{nullptr};

 private:
  Cnn14Config config_;
};
TORCH_MODULE(Cnn14);

// Loads config.json + weights (model.safetensors, else checkpoint.pth / *.pth) from a folder,
// or an explicit weight file next to config.json. Frozen, eval mode.
Cnn14 load_cnn14(const std::string& path);

// Pads with zeros or cuts a mono waveform to exactly `seconds` (Prefix-AAC: 10 s AudioCaps,
// 30 s Clotho); seconds <= 0 returns it unchanged.
std::vector<float> fit_clip_length(const std::vector<float>& samples, int sample_rate, double seconds);

}  // namespace prefixcap
