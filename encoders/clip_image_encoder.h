// What the captioner needs of a CLIP image tower, whichever architecture it has: the vision
// transformer (clip_vision.h) or the ModifiedResNet (clip_resnet.h). One loader picks the
// architecture from the config or, for OpenAI's bare files (RN50x4.pt, ViT-B-32.pt), from the
// weights themselves, as openai/CLIP's build_model does.
#pragma once

#include <memory>
#include <string>

#include <torch/nn/module.h>

#include "core/json_config.h"
#include "core/tensor_map.h"
#include "core/weight_dtype.h"
#include "encoders/image_preprocess.h"

namespace prefixcap {

struct ClipVisionOutput {
  at::Tensor last_hidden_state;  // [B, N, token_dim]: ViT tokens before post_layernorm; ResNet: layer4 grid, row-major
  at::Tensor pooled_output;      // [B, C]: ViT post_layernorm(class token); undefined for ResNets
  at::Tensor image_embeds;       // [B, embed_dim] (not L2-normalised, as ClipCap uses it)
};

class ClipImageEncoderImpl : public torch::nn::Module {
 public:
  // pixel_values [B, 3, image_size, image_size], normalised as CLIP's preprocessing does.
  virtual ClipVisionOutput forward(const at::Tensor& pixel_values) = 0;
  virtual int64_t image_size() const = 0;  // input resolution (preprocessing resizes and crops to it)
  virtual int64_t embed_dim() const = 0;   // width of image_embeds (CLIP's joint space: 512 for ViT-B/32, 640 for RN50x4)
  virtual int64_t token_dim() const = 0;   // width of last_hidden_state
  virtual Json config_json() const = 0;    // the config.json a bundle stores next to the weights
  virtual std::string architecture() const = 0;  // "vit" | "resnet"
  // Weights with OpenAI names (visual.*, whole CLIP state dicts and TorchScript archives too)
  // or the model's own; strict, naming every problem.
  virtual void load_weights(const TensorMap& weights, const std::string& source) = 0;
  void freeze();
  // `--encoder-dtype`: Float32 (the weights as loaded) or Int8Dynamic, where the encoder has it
  // (the ViT: its linear layers and patch embedding as W8A8 integer products, core/int8_gemm.h,
  // CPU only). Anything else throws std::invalid_argument naming what the encoder takes.
  virtual void set_compute_dtype(WeightDtype dtype);
  WeightDtype compute_dtype() const { return compute_dtype_; }

 protected:
  WeightDtype compute_dtype_ = WeightDtype::Float32;
};
using ClipImageEncoder = std::shared_ptr<ClipImageEncoderImpl>;

// A folder (config.json with model_type clip / clip_vision_model / clip_resnet, plus
// model.safetensors, pytorch_model.bin or model.pt), or one OpenAI weight file (a TorchScript
// archive such as RN50x4.pt, or a state dict) whose configuration is derived from its tensors.
// Frozen, eval mode. Throws FileError / ConfigError naming the file.
ClipImageEncoder load_clip_image_encoder(const std::string& path);

// The preprocessing that goes with it: the folder's preprocessor_config.json when there is one,
// else openai/CLIP's _transform at the encoder's resolution (resize + crop to image_size).
ClipPreprocessConfig load_clip_preprocess(const std::string& path, const ClipImageEncoderImpl& encoder);

}  // namespace prefixcap
