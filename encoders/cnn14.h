// PANNs CNN14 audio encoder, configured by config.json, with PANNs' checkpoint key names.
// ref: qiuqiangkong/audioset_tagging_cnn pytorch/models.py Cnn14, ConvBlock (d2f4b8c).
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "core/int8_gemm.h"
#include "core/json_config.h"
#include "core/tensor_map.h"
#include "core/weight_dtype.h"
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

// How CNN14 computes its convolutions in eval mode. Every mode but Reference first folds each
// BatchNorm into the conv before it (weight * gamma / sqrt(var + eps), bias = beta - mean * that
// scale; computed once, again only when a weight changes or moves) and applies ReLU in place.
//   Reference     conv, BatchNorm and ReLU as three operations, as PANNs writes them (training
//                 mode always runs this way)
//   Nchw          folded conv through at::conv2d on NCHW tensors
//   ChannelsLast  folded conv through at::conv2d on channels-last tensors (oneDNN)
//   Gemm          im2col + one matrix product per clip through BLAS
//   Auto          (default) on the CPU, per layer: Gemm for the first conv (one input channel)
//                 and the layers with few positions (batch x time x frequency <= 512: blocks 5-6
//                 of one 10 s clip), ChannelsLast for the early wide layers, Nchw for the rest;
//                 Nchw on a GPU
enum class Cnn14ConvPath { Auto, Reference, Nchw, ChannelsLast, Gemm };
Cnn14ConvPath parse_cnn14_conv_path(const std::string& name);  // throws std::invalid_argument
const char* cnn14_conv_path_name(Cnn14ConvPath path);

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
  void set_conv_path(Cnn14ConvPath path) { conv_path_ = path; }
  Cnn14ConvPath conv_path() const { return conv_path_; }
  // `--encoder-dtype`: Float32, or Int8Dynamic: in eval mode on the CPU, every folded 3x3 conv
  // after the first (which has one input channel) runs as a W8A8 integer product
  // (core/int8_gemm.h: each 3x3 patch quantised per output position to 0..255, as its inputs
  // come out of a ReLU, weights per output channel), channels-last between them; the front end, bn0, the first conv, pooling and fc1
  // stay float32. Other types throw std::invalid_argument, as does Int8Dynamic off the CPU.
  void set_compute_dtype(WeightDtype dtype);
  WeightDtype compute_dtype() const { return compute_dtype_; }

  LogMelFrontEnd front_end{nullptr};
  torch::nn::BatchNorm2d bn0{nullptr};
  std::vector<ConvBlock> conv_blocks;  // registered as conv_block1..6
  torch::nn::Linear fc1{nullptr}, fc_audioset{nullptr};

 private:
  struct FoldedConv {
    at::Tensor weight, bias;  // [O, I, 3, 3] with the BatchNorm folded in, [O]
    Int8Matrix int8;          // Int8Dynamic (I > 1): weight as [O, 3 * 3 * I] (kernel row, column, channel) + bias
  };
  // The folded convs (2 per block), rebuilt when any source tensor changed (storage, device,
  // dtype or in-place version); safe to call from several threads.
  std::vector<FoldedConv> folded_convs();
  at::Tensor run_blocks_folded(at::Tensor x, const std::vector<FoldedConv>& convs, std::vector<at::Tensor>* blocks);

  Cnn14Config config_;
  Cnn14ConvPath conv_path_ = Cnn14ConvPath::Auto;
  WeightDtype compute_dtype_ = WeightDtype::Float32;
  std::mutex fold_mutex_;
  std::vector<FoldedConv> folded_;
  std::vector<std::pair<const void*, int64_t>> folded_from_;  // (data pointer, version) of each source
};
TORCH_MODULE(Cnn14);

// Loads config.json + weights (model.safetensors, else checkpoint.pth / *.pth) from a folder,
// or an explicit weight file next to config.json. Frozen, eval mode.
Cnn14 load_cnn14(const std::string& path);

// Pads with zeros or cuts a mono waveform to exactly `seconds` (Prefix-AAC: 10 s AudioCaps,
// 30 s Clotho); seconds <= 0 returns it unchanged.
std::vector<float> fit_clip_length(const std::vector<float>& samples, int sample_rate, double seconds);

}  // namespace prefixcap
