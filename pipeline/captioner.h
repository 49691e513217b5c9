// A trained captioner as one self-describing folder, and the API that turns media into
// captions with it.
//
// BUNDLE/captioner.json (paths relative to BUNDLE):
//   {"format": "prefixcap-captioner", "version": 1,
//    "encoder": {"kind": "cnn14" | "clip" | "none", "path": "encoder"},   // clip: ViT or ResNet
//    "mapper":  {"config": {...MapperConfig...}, "weights": "mapper.safetensors"},
//    "lm":      {"path": "lm", "tokenizer": "lm"},
//    "prefix":  {"normalize": false},            // ClipCap: divide the embedding by its L2 norm
//    "decoding": {"beam_size": 5, "max_tokens": 20, "stop": ["."]},
//    "source": "..."}                            // where the weights came from (informative)
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/json_config.h"
#include "encoders/clip_image_encoder.h"
#include "encoders/cnn14.h"
#include "encoders/image_preprocess.h"
#include "lm/decoding.h"
#include "lm/gpt2.h"
#include "lm/tokenizer.h"
#include "mapper/mappers.h"
#include "pipeline/video_decode.h"

namespace prefixcap {

enum class Modality { Audio, Image, Video };
const char* modality_name(Modality m);
// Detected from the file's content (image signatures, then FFmpeg/libsndfile probing).
Modality detect_modality(const std::string& path);

struct Caption {
  std::string text;
  std::vector<int64_t> ids;
  double score = 0;
};

// The record `caption -f jsonl` prints and caption-server returns for one clip or window:
// path, modality, caption and score of the best, alternatives (the others, best first), and
// start/end when start_s >= 0.
Json caption_record(const std::string& path, Modality modality, const std::vector<Caption>& captions,
                    double start_s = -1, double end_s = -1);

class Captioner {
 public:
  // Loads BUNDLE/captioner.json and everything it names; throws FileError / ConfigError naming
  // the file (and tensor) at fault.
  static Captioner load(const std::string& bundle_dir);
  // Writes the bundle (captioner.json, mapper weights, LM folder, encoder folder).
  void save(const std::string& bundle_dir) const;

  // Prefix [B, P, n_embd] from encoder features: mapper(mapper_input(features)).
  at::Tensor prefix(const MapperInput& features);
  // What the mapper sees: the features on this captioner's device, the embedding divided by
  // its L2 norm when the bundle says so (ClipCap's normalize_prefix).
  MapperInput mapper_input(const MapperInput& features) const;
  // Features of mono waveforms at the encoder's rate (CNN14 bundles), padded into one batch.
  MapperInput encode_waveforms(const std::vector<std::vector<float>>& waveforms);
  // Features of images (CLIP bundles).
  MapperInput encode_images(const std::vector<Image8>& images);

  // One visual input of a CLIP bundle: a decoded image, or a video already reduced to the mean
  // of its sampled frames' features.
  struct VisualInput {
    Image8 image;
    at::Tensor embedding, tokens;  // set for video
  };
  // Decodes an image, or samples and encodes `video_frames` frames of a video, as
  // `modality` (from detect_modality) says; throws FileError for audio or unreadable files.
  VisualInput load_visual(const std::string& path, Modality modality, int video_frames = 8);
  // A video's visual input from its sampled frames: the mean of their CLIP features.
  VisualInput visual_from_frames(const std::vector<VideoFrame>& frames);
  // Features of a batch of visual inputs: every image goes through CLIP in one batch.
  MapperInput encode_visual(const std::vector<VisualInput>& inputs);
  // Captions (best first, options.num_return of them) per input row.
  std::vector<std::vector<Caption>> caption(const MapperInput& features, const DecodingOptions& options);
  // Captions of mono waveforms (CNN14 bundles). Clips are encoded and decoded together only
  // with clips of the same length (after the bundle's clip_seconds): zero padding would change
  // a shorter clip's features, so a caption never depends on what it was batched with.
  // The length a clip of `samples` samples has inside the encoder (clip_seconds pads or cuts).
  size_t fitted_length(size_t samples) const;
  std::vector<std::vector<Caption>> caption_waveforms(const std::vector<std::vector<float>>& waveforms,
                                                      const DecodingOptions& options);
  // Media files in, captions out (batched); throws for the first unreadable file.
  std::vector<std::vector<Caption>> caption_files(const std::vector<std::string>& paths, const DecodingOptions& options);

  // Moves every model to `device` (e.g. CUDA); inputs are moved there as they arrive. A CPU
  // captioner whose LM is packed (set_lm_dtype) stays on the CPU: moving it throws.
  void to(const at::Device& device);
  // `--lm-dtype`: the frozen GPT-2's weights kept as bfloat16 or int8 (int8-dynamic: int8 activations too) for faster CPU decoding
  // (Gpt2ModelImpl::pack_weights; float32 leaves them as they are). CPU only; the captioner can
  // then no longer be saved.
  void set_lm_dtype(WeightDtype dtype);
  // `--encoder-dtype`: float32, or int8-dynamic where the encoder has it (CNN14 and the CLIP ViT;
  // Cnn14Impl / ClipImageEncoderImpl::set_compute_dtype). CPU only; throws std::invalid_argument
  // otherwise.
  void set_encoder_dtype(WeightDtype dtype);
  at::Device device() const { return device_; }

  DecodingOptions default_decoding() const { return decoding_; }
  // Stop strings -> token ids the way ClipCap does it (first token of encode(stop)).
  std::vector<int64_t> stop_ids(const std::vector<std::string>& stops) const;
  std::string encoder_kind() const { return encoder_kind_; }
  int sample_rate() const;

  // Parts, public so that importers and training can assemble a captioner.
  std::string encoder_kind_ = "none";  // cnn14 | clip | none
  Cnn14 cnn14{nullptr};
  ClipImageEncoder clip;  // a CLIP ViT or ResNet
  ClipPreprocessConfig clip_preprocess;
  std::shared_ptr<MapperImpl> mapper;
  KvPrefixHead kv_head{nullptr};
  Gpt2Model lm{nullptr};
  std::shared_ptr<Gpt2Tokenizer> tokenizer;
  bool normalize_prefix = false;
  DecodingOptions decoding_;
  std::vector<std::string> stop_strings = {"."};
  std::string source;

 private:
  at::Device device_ = at::kCPU;
};

}  // namespace prefixcap
