// Image signature probing, decoding (with the pixel limit) and CLIP's Pillow-exact preprocessing.
#include <ATen/ATen.h>

#include "core/errors.h"
#include "encoders/image_preprocess.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)prefixcap::image_format_of(data, size);
  try {
    prefixcap::ImageDecodeOptions options;
    options.max_pixels = 4'000'000;
    prefixcap::Image8 image = prefixcap::decode_image_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz", options);
    prefixcap::ClipPreprocessConfig config;
    config.shortest_edge = config.crop_size = 32;
    (void)prefixcap::clip_pixel_values(image, config);
  } catch (const prefixcap::FileError&) {
  }
  return 0;
}
