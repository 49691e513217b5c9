#include "encoders/clip_image_encoder.h"

#include <filesystem>

#include "core/errors.h"
#include "core/weights.h"
#include "encoders/clip_resnet.h"
#include "encoders/clip_vision.h"

namespace prefixcap {
namespace fs = std::filesystem;

namespace {

// OpenAI's releases (RN50x4.pt, ViT-B-32.pt) carry no config: these names say the architecture
// and the tensors' shapes say the rest.
bool has_openai_names(const TensorMap& weights) {
  return weights.count("visual.layer1.0.conv1.weight") || weights.count("visual.transformer.resblocks.0.attn.in_proj_weight");
}

// Which tower a set of OpenAI-named tensors holds, with its configuration derived from them.
ClipImageEncoder encoder_from_weights(const TensorMap& weights, const std::string& source) {
  if (weights.count("visual.layer1.0.conv1.weight") || weights.count("layer1.0.conv1.weight"))
    return std::make_shared<ClipModifiedResNetImpl>(ClipResNetConfig::from_weights(weights, source));
  if (weights.count("visual.transformer.resblocks.0.attn.in_proj_weight"))
    return std::make_shared<ClipVisionTransformerImpl>(clip_vit_config_from_openai(weights, source));
  throw FileError(source, "not a CLIP image tower: expected OpenAI names (visual.layer1.* for a ResNet, "
                          "visual.transformer.resblocks.* for a ViT) or a folder with config.json");
}

// The tower a config.json describes: a ResNet for model_type clip_resnet, else a ViT.
ClipImageEncoder encoder_from_config(const fs::path& config_path) {
  const Json config = read_json_file(config_path.string());
  if (json_get_or<std::string>(config, "model_type", "", config_path.string()) == "clip_resnet")
    return std::make_shared<ClipModifiedResNetImpl>(ClipResNetConfig::from_json(config, config_path.string()));
  return std::make_shared<ClipVisionTransformerImpl>(ClipVisionConfig::from_json(config, config_path.string()));
}

}  // namespace

ClipImageEncoder load_clip_image_encoder(const std::string& path) {
  if (!fs::exists(path)) throw FileError(path, "does not exist");
  const bool is_dir = fs::is_directory(path);
  const fs::path folder = is_dir ? fs::path(path) : fs::path(path).parent_path();
  fs::path weights_path = path;
  if (is_dir) {
    weights_path.clear();
    for (const char* name : {"model.safetensors", "pytorch_model.bin", "model.pt"})
      if (weights_path.empty() && fs::exists(folder / name)) weights_path = folder / name;
    if (weights_path.empty()) throw FileError(path, "no model.safetensors, pytorch_model.bin or model.pt in the CLIP folder");
  }
  const TensorMap weights = load_weight_file(weights_path.string());
  // A folder's config.json describes its weights; a single file with OpenAI names describes
  // itself (a config.json beside it may belong to something else).
  const fs::path config_path = folder / "config.json";
  const bool use_config = fs::exists(config_path) && (is_dir || !has_openai_names(weights));
  ClipImageEncoder encoder = use_config ? encoder_from_config(config_path) : encoder_from_weights(weights, weights_path.string());
  encoder->load_weights(weights, weights_path.string());
  encoder->freeze();
  return encoder;
}

ClipPreprocessConfig load_clip_preprocess(const std::string& path, const ClipImageEncoderImpl& encoder) {
  const fs::path folder = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
  const fs::path pre = folder / "preprocessor_config.json";
  if (fs::exists(pre)) {
    ClipPreprocessConfig c = ClipPreprocessConfig::from_json(read_json_file(pre.string()), pre.string());
    if (c.crop_size != encoder.image_size())
      throw ConfigError(pre.string() + ": crop_size " + std::to_string(c.crop_size) + " differs from the encoder's input size " +
                        std::to_string(encoder.image_size()));
    return c;
  }
  ClipPreprocessConfig c;
  c.shortest_edge = c.crop_size = encoder.image_size();
  return c;
}

}  // namespace prefixcap
