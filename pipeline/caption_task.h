// Task caption's model (pipeline/train_caption.cpp): the captioner being trained (mapper,
// optional kv head, LM head and encoder), where its features come from (the feature cache or
// the training encoder), and its loss. Internal to the training files.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "pipeline/feature_cache.h"
#include "pipeline/train_common.h"

namespace prefixcap::training {

class CaptionTask {
 public:
  explicit CaptionTask(const TrainConfig& c);

  Captioner& captioner() { return cap_; }
  torch::nn::Module& encoder_module();

  std::vector<at::Tensor> head_params();
  std::vector<at::Tensor> encoder_params();
  // BatchNorm running statistics of the trained modules: rank 0's are every rank's.
  std::vector<at::Tensor> trained_buffers();

  TensorMap state();
  void load_state(const TensorMap& s, const std::string& source);

  // Puts the encoder in the mode of `epoch` (trained in the first encoder_train_epochs).
  void set_epoch(int64_t epoch);
  bool encoder_trains() const { return encoder_trains_; }
  void train_mode(bool on);

  Json encoder_description();

  // The feature cache of the current encoder. In a distributed run each rank writes its own
  // shards and index (`writer` = its rank; -1 = the only writer); merge_cache() makes them one.
  FeatureCache& cache();
  void set_cache_writer(int writer);
  // Reopens the cache (after other writers added to it); call before loader threads start.
  void reload_cache() {
    cache_.reset();
    cache();
  }

  // Decodes one media file for the encoder (thread-safe). While the encoder trains, decoded
  // waveforms are kept in memory (up to decoded_cache_mb) so that later epochs skip decoding.
  Media decode(const std::string& path);

  // Encoder features of decoded media (one forward per run of equal-length waveforms, so
  // that a clip's features never depend on what it was batched with).
  std::vector<TensorMap> encode(const std::vector<Media>& media);

  MapperInput to_mapper_input(const TensorMap& f);

  TensorMap collate(const std::vector<TensorMap>& rows);

  // Features of a batch: from the cache, or through the (training) encoder.
  MapperInput features(const Batch& b);

  // Mean cross-entropy over the batch's caption tokens, and the number of those tokens.
  at::Tensor loss(const Batch& b);
  static int64_t tokens(const Batch& b);

 private:
  void load_parts();

  void load_encoder_folder();

  void load_lm_and_mapper();

  void untie_head();

  MapperInput encode_images_grad(const std::vector<Captioner::VisualInput>& inputs);

  const TrainConfig& c_;
  Captioner cap_;
  Gpt2Model train_lm_{nullptr};  // the LM the loss runs through (cap_.lm, or its bfloat16 copy)
  bool encoder_trains_ = false;
  std::unique_ptr<FeatureCache> cache_;
  std::mutex decoded_mutex_;
  std::map<std::string, std::vector<float>> decoded_;
  size_t decoded_bytes_ = 0;
  int cache_writer_ = -1;
};

// Fills the cache with the missing items of `items` (in a distributed run: this rank's share
// of them, then the ranks' indexes merged); returns the number of items computed here.
int64_t fill_cache(CaptionTask& task, const std::vector<DatasetItem>& items, const TrainConfig& c, Progress& progress,
                   const std::string& what, const Dist& dist);

}  // namespace prefixcap::training
