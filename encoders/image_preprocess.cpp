#include "encoders/image_preprocess.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/errors.h"
#include "encoders/feature_kernels.h"

namespace prefixcap {

namespace {

uint32_t be16(const uint8_t* p) { return (p[0] << 8) | p[1]; }
uint32_t be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]; }
uint32_t le16(const uint8_t* p) { return p[0] | (p[1] << 8); }
uint32_t le32u(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t(p[3]) << 24); }

// Width and height from the file header, without decoding; false if the format is not known here.
bool probe_dimensions(const std::string& bytes, int64_t* width, int64_t* height) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  if (n >= 24 && std::memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0) {
    *width = be32(p + 16);
    *height = be32(p + 20);
    return true;
  }
  if (n >= 10 && (std::memcmp(p, "GIF87a", 6) == 0 || std::memcmp(p, "GIF89a", 6) == 0)) {
    *width = le16(p + 6);
    *height = le16(p + 8);
    return true;
  }
  if (n >= 26 && p[0] == 'B' && p[1] == 'M') {
    *width = static_cast<int32_t>(le32u(p + 18));
    *height = std::llabs(static_cast<int32_t>(le32u(p + 22)));
    return true;
  }
  if (n >= 30 && std::memcmp(p, "RIFF", 4) == 0 && std::memcmp(p + 8, "WEBP", 4) == 0) {
    if (std::memcmp(p + 12, "VP8X", 4) == 0) {
      *width = 1 + (p[24] | (p[25] << 8) | (p[26] << 16));
      *height = 1 + (p[27] | (p[28] << 8) | (p[29] << 16));
      return true;
    }
    if (std::memcmp(p + 12, "VP8L", 4) == 0 && n >= 25) {
      uint32_t bits = le32u(p + 21);
      *width = 1 + (bits & 0x3FFF);
      *height = 1 + ((bits >> 14) & 0x3FFF);
      return true;
    }
    if (std::memcmp(p + 12, "VP8 ", 4) == 0 && n >= 30) {
      *width = le16(p + 26) & 0x3FFF;
      *height = le16(p + 28) & 0x3FFF;
      return true;
    }
    return false;
  }
  if (n >= 4 && p[0] == 0xFF && p[1] == 0xD8) {  // JPEG: walk the markers to a SOFn
    size_t i = 2;
    while (i + 9 < n) {
      if (p[i] != 0xFF) return false;
      uint8_t marker = p[i + 1];
      if (marker == 0xFF) {
        ++i;
        continue;
      }
      if (marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7) || marker == 0x01) {
        i += 2;
        continue;
      }
      uint32_t len = be16(p + i + 2);
      if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
        *height = be16(p + i + 5);
        *width = be16(p + i + 7);
        return true;
      }
      if (len < 2) return false;
      i += 2 + len;
    }
    return false;
  }
  return false;
}

// ---- Pillow Resample.c, 8 bits per channel (the math in encoders/feature_kernels.h) ----
constexpr int kPrecisionBits = kernels::kPillowPrecisionBits;

struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;    // xmin, count per output pixel
  std::vector<int32_t> kk;    // fixed-point weights, ksize per output pixel
};

Coefficients precompute_coeffs(int in_size, int out_size) {
  Coefficients c;
  c.ksize = kernels::pillow_ksize(in_size, out_size);
  c.bounds.resize(out_size * 2);
  c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> scratch(c.ksize);
  for (int xx = 0; xx < out_size; ++xx)
    kernels::pillow_coefficients(xx, in_size, out_size, c.ksize, &c.bounds[xx * 2], &c.bounds[xx * 2 + 1],
                                 &c.kk[static_cast<size_t>(xx) * c.ksize], scratch.data());
  return c;
}

// Pillow accumulates in 32-bit ints: 255 * sum|k| * 2^22 stays far below 2^31.
inline uint8_t clip8(int32_t in) { return kernels::pillow_clip8(in); }

Image8 resample_horizontal(const Image8& in, int out_width) {
  Coefficients c = precompute_coeffs(in.width, out_width);
  Image8 out{out_width, in.height, in.channels, std::vector<uint8_t>(static_cast<size_t>(out_width) * in.height * in.channels)};
  const int C = in.channels;
  at::parallel_for(0, in.height, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      const uint8_t* row = in.pixels.data() + static_cast<size_t>(y) * in.width * C;
      uint8_t* dst = out.pixels.data() + static_cast<size_t>(y) * out_width * C;
      for (int xx = 0; xx < out_width; ++xx) {
        const int xmin = c.bounds[xx * 2], count = c.bounds[xx * 2 + 1];
        const int32_t* k = &c.kk[static_cast<size_t>(xx) * c.ksize];
        const uint8_t* src = row + xmin * C;
        if (C == 3) {
          int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
          for (int x = 0; x < count; ++x) {
            s0 += src[3 * x] * k[x];
            s1 += src[3 * x + 1] * k[x];
            s2 += src[3 * x + 2] * k[x];
          }
          dst[3 * xx] = clip8(s0);
          dst[3 * xx + 1] = clip8(s1);
          dst[3 * xx + 2] = clip8(s2);
        } else {
          for (int ch = 0; ch < C; ++ch) {
            int32_t ss = 1 << (kPrecisionBits - 1);
            for (int x = 0; x < count; ++x) ss += src[x * C + ch] * k[x];
            dst[xx * C + ch] = clip8(ss);
          }
        }
      }
    }
  });
  return out;
}

Image8 resample_vertical(const Image8& in, int out_height) {
  Coefficients c = precompute_coeffs(in.height, out_height);
  const size_t stride = static_cast<size_t>(in.width) * in.channels;
  Image8 out{in.width, out_height, in.channels, std::vector<uint8_t>(stride * out_height)};
  at::parallel_for(0, out_height, 16, [&](int64_t y0, int64_t y1) {
    std::vector<int32_t> acc(stride);
    for (int64_t yy = y0; yy < y1; ++yy) {
      const int ymin = c.bounds[yy * 2], count = c.bounds[yy * 2 + 1];
      const int32_t* k = &c.kk[static_cast<size_t>(yy) * c.ksize];
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      for (int y = 0; y < count; ++y) {  // row by row: contiguous, vectorisable
        const uint8_t* src = in.pixels.data() + (y + ymin) * stride;
        const int32_t w = k[y];
        for (size_t i = 0; i < stride; ++i) acc[i] += src[i] * w;
      }
      uint8_t* dst = out.pixels.data() + yy * stride;
      for (size_t i = 0; i < stride; ++i) dst[i] = clip8(acc[i]);
    }
  });
  return out;
}


}  // namespace

Image8 resize_bicubic_pillow(const Image8& in, int out_width, int out_height) {
  if (out_width <= 0 || out_height <= 0) throw std::invalid_argument("resize: target size must be positive");
  Image8 cur = in;
  if (out_width != in.width) cur = resample_horizontal(cur, out_width);
  if (out_height != in.height) cur = resample_vertical(cur, out_height);
  return cur;
}

std::string image_format_of(const unsigned char* h, size_t n) {
  auto starts = [&](const char* sig, size_t len, size_t at = 0) { return n >= at + len && std::memcmp(h + at, sig, len) == 0; };
  if (starts("\x89PNG", 4)) return "png";
  if (n >= 3 && h[0] == 0xFF && h[1] == 0xD8 && h[2] == 0xFF) return "jpeg";
  if (starts("GIF8", 4)) return "gif";
  if (starts("BM", 2)) return "bmp";
  if (starts("RIFF", 4) && starts("WEBP", 4, 8)) return "webp";
  if (starts("II*\0", 4) || starts("MM\0*", 4)) return "tiff";
  if (n >= 3 && h[0] == 'P' && h[1] >= '1' && h[1] <= '7' && (h[2] == '\n' || h[2] == ' ' || h[2] == '\r' || h[2] == '\t'))
    return "ppm";  // PBM / PGM / PPM / PAM
  if (starts("\x76\x2f\x31\x01", 4)) return "exr";
  if (starts("\x59\xa6\x6a\x95", 4)) return "ras";  // Sun raster
  if (starts("#?RADIANCE", 10) || starts("#?RGBE", 6)) return "hdr";
  if (starts("\0\0\0\x0cjP  ", 8) || starts("\xff\x4f\xff\x51", 4)) return "jpeg2000";
  if (starts("\x01\xda", 2)) return "sgi";
  if (starts("#define ", 8)) return "xbm";
  // SVG: XML text whose first element is <svg (after an optional declaration, comments, BOM).
  const std::string text(reinterpret_cast<const char*>(h), n);
  const size_t lt = text.find('<');
  if (lt != std::string::npos && text.find_first_not_of(" \t\r\n\xef\xbb\xbf") == lt &&
      (text.find("<svg", lt) != std::string::npos || text.find("<!DOCTYPE svg", lt) != std::string::npos))
    return "svg";
  return "";
}

bool image_format_supported(const std::string& format) {
  return !format.empty() && format != "svg" && format != "xbm" && format != "sgi";
}

Image8 decode_image_bytes(const std::string& bytes, const std::string& name, const ImageDecodeOptions& options) {
  if (bytes.empty()) throw FileError(name, "empty file");
  {
    const std::string format = image_format_of(reinterpret_cast<const unsigned char*>(bytes.data()), std::min<size_t>(bytes.size(), 512));
    if (!format.empty() && !image_format_supported(format))
      throw FileError(name, "is a " + format + " image, a format prefixcap does not decode (convert it to PNG first)");
  }
  int64_t w = 0, h = 0;
  if (probe_dimensions(bytes, &w, &h)) {
    if (w <= 0 || h <= 0) throw FileError(name, "image header gives a zero size (" + std::to_string(w) + "x" + std::to_string(h) + ")");
    if (w > options.max_pixels / h)  // (w * h could overflow: both come from the file)
      throw FileError(name, "image of " + std::to_string(w) + "x" + std::to_string(h) + " pixels exceeds the limit of " +
                                std::to_string(options.max_pixels) + " pixels (decompression bomb?)");
  }
  // libjpeg returns the decoded part of a cut-off JPEG with only a warning: require the end marker.
  if (bytes.size() >= 2 && static_cast<uint8_t>(bytes[0]) == 0xFF && static_cast<uint8_t>(bytes[1]) == 0xD8) {
    size_t end = bytes.size();
    while (end > 2 && (bytes[end - 1] == '\0' || bytes[end - 1] == '\n' || bytes[end - 1] == '\r')) --end;
    if (end < 4 || static_cast<uint8_t>(bytes[end - 2]) != 0xFF || static_cast<uint8_t>(bytes[end - 1]) != 0xD9)
      throw FileError(name, "truncated JPEG (no end-of-image marker)");
  }
  int flags = cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR;
  if (!options.apply_exif_orientation) flags |= cv::IMREAD_IGNORE_ORIENTATION;
  cv::Mat mat;
  try {
    std::vector<uchar> buffer(bytes.begin(), bytes.end());
    mat = cv::imdecode(buffer, flags);
  } catch (const cv::Exception& e) {
    throw FileError(name, std::string("cannot decode the image: ") + e.what());
  }
  if (mat.empty()) throw FileError(name, "not a decodable image (corrupt, truncated or not an image)");
  if (static_cast<int64_t>(mat.cols) * mat.rows > options.max_pixels)
    throw FileError(name, "image exceeds the limit of " + std::to_string(options.max_pixels) + " pixels");
  if (mat.depth() == CV_16U) mat.convertTo(mat, CV_8U, 1.0 / 257.0);
  else if (mat.depth() == CV_32F || mat.depth() == CV_64F) mat.convertTo(mat, CV_8U, 255.0);
  else if (mat.depth() != CV_8U) mat.convertTo(mat, CV_8U);
  Image8 out;
  if (mat.channels() == 1) {
    out.channels = 1;
  } else {
    cv::Mat rgb;
    cv::cvtColor(mat, rgb, mat.channels() == 4 ? cv::COLOR_BGRA2RGB : cv::COLOR_BGR2RGB);
    mat = rgb;
    out.channels = 3;
  }
  out.width = mat.cols;
  out.height = mat.rows;
  out.pixels.resize(static_cast<size_t>(out.width) * out.height * out.channels);
  for (int y = 0; y < out.height; ++y)
    std::memcpy(out.pixels.data() + static_cast<size_t>(y) * out.width * out.channels, mat.ptr(y),
                static_cast<size_t>(out.width) * out.channels);
  return out;
}

Image8 decode_image(const std::string& path, const ImageDecodeOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return decode_image_bytes(buffer.str(), path, options);
}

ClipPreprocessConfig ClipPreprocessConfig::from_json(const Json& j, const std::string& where) {
  ClipPreprocessConfig c;
  auto edge = [&](const char* key, const char* sub, int64_t fallback) -> int64_t {
    if (!j.contains(key)) return fallback;
    const Json& v = j.at(key);
    if (v.is_number_integer()) return json_get<int64_t>(j, key, where);
    if (v.is_object() && v.contains(sub)) return json_get<int64_t>(v, sub, where + " " + key);
    if (v.is_object() && v.contains("height")) {
      int64_t hh = json_get<int64_t>(v, "height", where), ww = json_get<int64_t>(v, "width", where);
      if (hh != ww) throw ConfigError(where + ": non-square " + key + " is not supported");
      return hh;
    }
    throw ConfigError(where + ": key '" + key + "' has an unsupported form: " + json_dump(v));
  };
  c.shortest_edge = edge("size", "shortest_edge", c.shortest_edge);
  c.crop_size = edge("crop_size", "height", c.crop_size);
  c.mean = json_get_or<std::vector<double>>(j, "image_mean", c.mean, where);
  c.std = json_get_or<std::vector<double>>(j, "image_std", c.std, where);
  c.resample = json_get_or<int>(j, "resample", c.resample, where);
  if (c.resample != 3) throw ConfigError(where + ": resample " + std::to_string(c.resample) + " is not supported (3 = bicubic)");
  if (c.mean.size() != 3 || c.std.size() != 3) throw ConfigError(where + ": image_mean and image_std need 3 values");
  for (double s : c.std)
    if (!(s > 0)) throw ConfigError(where + ": image_std values must be positive");
  if (c.shortest_edge <= 0 || c.crop_size <= 0) throw ConfigError(where + ": size and crop_size must be positive");
  if (json_get_or<bool>(j, "do_center_crop", true, where) == false || json_get_or<bool>(j, "do_resize", true, where) == false)
    throw ConfigError(where + ": do_resize/do_center_crop false is not supported");
  return c;
}

at::Tensor clip_crop_u8(const Image8& image, const ClipPreprocessConfig& config) {
  if (image.width <= 0 || image.height <= 0) throw std::invalid_argument("image has zero size");
  // torchvision Resize(int): the shorter side becomes `size`, the longer int(size * long / short).
  const int64_t s = config.shortest_edge;
  int64_t new_w, new_h;
  if (image.width <= image.height) {
    new_w = s;
    new_h = static_cast<int64_t>(static_cast<double>(s) * image.height / image.width);
  } else {
    new_h = s;
    new_w = static_cast<int64_t>(static_cast<double>(s) * image.width / image.height);
  }
  Image8 resized = resize_bicubic_pillow(image, static_cast<int>(new_w), static_cast<int>(new_h));
  // torchvision CenterCrop: top = int(round((h - crop) / 2.0)); pads with zeros if smaller.
  const int64_t crop = config.crop_size;
  const int64_t top = kernels::center_crop_offset(new_h, crop), left = kernels::center_crop_offset(new_w, crop);
  at::Tensor out = at::zeros({3, crop, crop}, at::kByte);
  auto a = out.accessor<uint8_t, 3>();
  for (int64_t y = 0; y < crop; ++y) {
    const int64_t sy = y + top;
    if (sy < 0 || sy >= new_h) continue;
    for (int64_t x = 0; x < crop; ++x) {
      const int64_t sx = x + left;
      if (sx < 0 || sx >= new_w) continue;
      for (int c = 0; c < 3; ++c)
        a[c][y][x] = resized.at(static_cast<int>(sy), static_cast<int>(sx), resized.channels == 1 ? 0 : c);
    }
  }
  return out;
}

at::Tensor clip_normalize(const at::Tensor& crop_u8, const ClipPreprocessConfig& config) {
  at::Tensor mean = at::tensor(config.mean, at::kDouble).to(at::kFloat).view({3, 1, 1});
  at::Tensor std = at::tensor(config.std, at::kDouble).to(at::kFloat).view({3, 1, 1});
  // As torchvision: ToTensor (/255 in float32), then (x - mean) / std in float32.
  return (crop_u8.to(at::kFloat).div(255.0f) - mean) / std;
}

at::Tensor clip_pixel_values(const Image8& image, const ClipPreprocessConfig& config) {
  return clip_normalize(clip_crop_u8(image, config), config);
}

}  // namespace prefixcap
