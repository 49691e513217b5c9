// Every configuration reader on the same JSON: GPT-2, CNN14 (+ log-mel), CLIP ViT and ResNet,
// CLIP preprocessing, mappers, training, and a bundle's captioner.json (in a folder of its own,
// read until the first file it names is missing). Only ConfigError / FileError may escape.
#include <cstdlib>
#include <string>

#include "core/errors.h"
#include "core/json_config.h"
#include "encoders/clip_resnet.h"
#include "encoders/clip_vision.h"
#include "encoders/cnn14.h"
#include "encoders/image_preprocess.h"
#include "encoders/log_mel.h"
#include "lm/gpt2.h"
#include "mapper/mappers.h"
#include "pipeline/captioner.h"
#include "pipeline/trainer.h"

namespace {
template <typename Fn>
void guarded(Fn fn) {
  try {
    fn();
  } catch (const prefixcap::ConfigError&) {
  } catch (const prefixcap::FileError&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace prefixcap;
  const Json j = Json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  guarded([&] { Gpt2Config::from_json(j, "fuzz"); });
  guarded([&] { Cnn14Config::from_json(j, "fuzz"); });
  guarded([&] { LogMelConfig::from_json(j, "fuzz"); });
  guarded([&] { ClipVisionConfig::from_json(j, "fuzz"); });
  guarded([&] { ClipResNetConfig::from_json(j, "fuzz"); });
  guarded([&] { ClipPreprocessConfig::from_json(j, "fuzz"); });
  guarded([&] { MapperConfig::from_json(j, "fuzz"); });
  guarded([&] { TrainConfig::from_json(j, "fuzz").validate(); });
  static const std::string bundle = [] {
    char tmpl[] = "/tmp/prefixcap-fuzz-bundle-XXXXXX";
    return std::string(mkdtemp(tmpl));
  }();
  write_file_atomic(bundle + "/captioner.json", std::string(reinterpret_cast<const char*>(data), size));
  guarded([&] { Captioner::load(bundle); });
  return 0;
}
