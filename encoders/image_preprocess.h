// Image decoding (OpenCV) and CLIP preprocessing that gives the pixels CLIP saw in training:
// a port of Pillow's separable bicubic resampling (Resample.c: support widened by the
// downscale factor, a = -0.5, fixed-point coefficients, rounding to uint8 between the passes),
// torchvision's Resize size rule, CenterCrop with Python's round-half-to-even, /255, mean/std.
// ref: python-pillow/Pillow src/libImaging/Resample.c (9.4); openai/CLIP clip/clip.py _transform.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/Tensor.h>

#include "core/json_config.h"

namespace prefixcap {

// 8-bit image, rows of width * channels bytes (channels 1 = gray, 3 = RGB).
struct Image8 {
  int width = 0;
  int height = 0;
  int channels = 0;
  std::vector<uint8_t> pixels;
  uint8_t at(int y, int x, int c) const { return pixels[(static_cast<size_t>(y) * width + x) * channels + c]; }
};

struct ImageDecodeOptions {
  int64_t max_pixels = 100'000'000;  // refuse larger images before decoding (decompression bombs)
  bool apply_exif_orientation = true;  // rotate/flip per EXIF (Pillow's Image.open does not)
};

// The image format a file's first bytes announce ("png", "jpeg", "svg", "ppm", "exr", ...), or ""
// when they announce no image format. Formats OpenCV cannot decode (svg, xbm, sgi) are
// recognised too, so that they are reported as unsupported images, not mistaken for audio.
std::string image_format_of(const unsigned char* head, size_t size);
// Whether image_format_of's format is one decode_image reads.
bool image_format_supported(const std::string& format);

// Decodes JPEG, PNG, WebP, BMP, TIFF, ... (detected from the content) to 8-bit gray or RGB:
// gray stays one channel (CLIP resamples it as one band), alpha is dropped, 16-bit is scaled
// to 8-bit. Throws FileError naming the file and the problem.
Image8 decode_image(const std::string& path, const ImageDecodeOptions& options = {});
Image8 decode_image_bytes(const std::string& bytes, const std::string& name, const ImageDecodeOptions& options = {});

// Pillow Image.resize(size, BICUBIC) on 8-bit data, exactly (horizontal pass, then vertical).
Image8 resize_bicubic_pillow(const Image8& in, int out_width, int out_height);

struct ClipPreprocessConfig {
  int64_t shortest_edge = 224;   // Resize: the shorter side becomes this
  int64_t crop_size = 224;       // CenterCrop size (square)
  std::vector<double> mean = {0.48145466, 0.4578275, 0.40821073};
  std::vector<double> std = {0.26862954, 0.26130258, 0.27577711};
  int resample = 3;              // PIL code; only 3 (BICUBIC) is supported

  // From Hugging Face preprocessor_config.json ("size" int or {"shortest_edge"}, "crop_size"
  // int or {"height","width"}, image_mean, image_std, resample).
  static ClipPreprocessConfig from_json(const Json& j, const std::string& where);
};

// Resize + centre crop (+ gray -> RGB): the uint8 image CLIP normalises, [3, crop, crop] CHW.
at::Tensor clip_crop_u8(const Image8& image, const ClipPreprocessConfig& config);
// Normalised pixel values [3, crop, crop] float32.
at::Tensor clip_pixel_values(const Image8& image, const ClipPreprocessConfig& config);
// Normalises a crop_u8 tensor [3, H, W] (or [B, 3, H, W]).
at::Tensor clip_normalize(const at::Tensor& crop_u8, const ClipPreprocessConfig& config);

}  // namespace prefixcap
