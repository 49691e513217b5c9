#include "encoders/feature_kernels_cpu.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <ATen/ATen.h>

#include "encoders/feature_kernels.h"

namespace prefixcap {

using namespace kernels;

std::vector<float> hann_window_table(int64_t n) {
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) w[static_cast<size_t>(k)] = hann_periodic(k, n);
  return w;
}

SparseMelFilters sparse_mel_filters(const LogMelConfig& config) {
  const at::Tensor fb = slaney_mel_filterbank(config).to(at::kFloat).contiguous();  // [M, F]
  const int64_t M = fb.size(0), F = fb.size(1);
  const float* w = fb.data_ptr<float>();
  SparseMelFilters s;
  for (int64_t m = 0; m < M; ++m) {
    int64_t lo = 0, hi = -1;
    for (int64_t k = 0; k < F; ++k)
      if (w[m * F + k] != 0.0f) {
        if (hi < 0) lo = k;
        hi = k;
      }
    s.first.push_back(static_cast<int32_t>(hi < 0 ? 0 : lo));
    s.count.push_back(static_cast<int32_t>(hi < 0 ? 0 : hi - lo + 1));
    s.offset.push_back(static_cast<int32_t>(s.weights.size()));
    for (int64_t k = lo; k <= hi; ++k) s.weights.push_back(w[m * F + k]);
  }
  return s;
}

at::Tensor log_mel_kernel_math(const at::Tensor& waveform, const LogMelConfig& c) {
  if (waveform.dim() != 2) throw std::invalid_argument("log-mel: expected a waveform [B, N]");
  const at::Tensor wave = waveform.to(at::kFloat).contiguous();
  const int64_t B = wave.size(0), N = wave.size(1), n_fft = c.window_size, hop = c.hop_size;
  if (N <= n_fft / 2) throw std::invalid_argument("log-mel: audio too short for reflect padding");
  const int64_t T = N / hop + 1, F = n_fft / 2 + 1, M = c.mel_bins;
  // Kernel 1: framing + window.
  at::Tensor frames = at::empty({B, T, n_fft}, at::kFloat);
  const float* x = wave.data_ptr<float>();
  float* fr = frames.data_ptr<float>();
  const std::vector<float> window = hann_window_table(n_fft);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < n_fft; ++j)
        fr[(b * T + t) * n_fft + j] = framed_sample(x + b * N, N, t, j, hop, n_fft, window.data());
  // rFFT.
  const at::Tensor spec = at::view_as_real(at::fft_rfft(frames)).contiguous();  // [B, T, F, 2]
  // Kernel 2: sparse mel sums of |X|^2, dB.
  const SparseMelFilters mel = sparse_mel_filters(c);
  const float ref_db = c.ref == 1.0 ? 0.0f : static_cast<float>(10.0 * std::log10(std::max(c.amin, c.ref)));
  at::Tensor out = at::empty({B, 1, T, M}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float* s = spec.data_ptr<float>();
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t m = 0; m < M; ++m)
      o[r * M + m] = power_to_db(mel_energy(s + r * F * 2, mel.weights.data() + mel.offset[m], mel.first[m], mel.count[m]),
                                 static_cast<float>(c.amin), ref_db);
  // Kernel 3 (top_db only): per-clip peak, then the floor.
  if (c.top_db >= 0)
    for (int64_t b = 0; b < B; ++b) {
      float* clip = o + b * T * M;
      const float peak = *std::max_element(clip, clip + T * M);
      for (int64_t i = 0; i < T * M; ++i) clip[i] = clip_top_db(clip[i], peak, static_cast<float>(c.top_db));
    }
  return out;
}

ClipCropPlan clip_crop_plan(int width, int height, const ClipPreprocessConfig& config) {
  if (width <= 0 || height <= 0) throw std::invalid_argument("image has zero size");
  ClipCropPlan p;
  p.in_w = width;
  p.in_h = height;
  // torchvision Resize(int): the shorter side becomes `size`, the longer int(size * long / short).
  const int64_t s = config.shortest_edge;
  if (width <= height) {
    p.resized_w = static_cast<int>(s);
    p.resized_h = static_cast<int>(static_cast<double>(s) * height / width);
  } else {
    p.resized_h = static_cast<int>(s);
    p.resized_w = static_cast<int>(static_cast<double>(s) * width / height);
  }
  p.crop = static_cast<int>(config.crop_size);
  p.top = center_crop_offset(p.resized_h, p.crop);
  p.left = center_crop_offset(p.resized_w, p.crop);
  p.resize_w = p.resized_w != width;
  p.resize_h = p.resized_h != height;
  // One axis: per crop position, the resampling taps of its resized pixel (a pass Pillow skips is
  // one tap of weight 1.0, which reproduces the input exactly); count -1 = outside the image.
  auto axis = [&](int in_size, int out_size, bool resize, int64_t offset, int* ksize, std::vector<int32_t>& first,
                  std::vector<int32_t>& count, std::vector<int32_t>& k) {
    *ksize = resize ? pillow_ksize(in_size, out_size) : 1;
    std::vector<double> scratch(static_cast<size_t>(*ksize));
    first.assign(p.crop, 0);
    count.assign(p.crop, -1);
    k.assign(static_cast<size_t>(p.crop) * *ksize, 0);
    for (int i = 0; i < p.crop; ++i) {
      const int64_t src = offset + i;
      if (src < 0 || src >= out_size) continue;
      if (resize) {
        int f = 0, n = 0;
        pillow_coefficients(static_cast<int>(src), in_size, out_size, *ksize, &f, &n, &k[static_cast<size_t>(i) * *ksize],
                            scratch.data());
        first[i] = f;
        count[i] = n;
      } else {
        first[i] = static_cast<int32_t>(src);
        count[i] = 1;
        k[static_cast<size_t>(i)] = 1 << kPillowPrecisionBits;
      }
    }
  };
  axis(width, p.resized_w, p.resize_w, p.left, &p.kx, p.x_first, p.x_count, p.x_k);
  axis(height, p.resized_h, p.resize_h, p.top, &p.ky, p.y_first, p.y_count, p.y_k);
  p.row_lo = height;
  p.row_hi = 0;
  for (int i = 0; i < p.crop; ++i)
    if (p.y_count[i] > 0) {
      p.row_lo = std::min(p.row_lo, p.y_first[i]);
      p.row_hi = std::max(p.row_hi, p.y_first[i] + p.y_count[i]);
    }
  if (p.row_hi < p.row_lo) p.row_lo = p.row_hi = 0;
  return p;
}

namespace {
// The two passes over the plan; `emit(c, y, x, value)` receives every crop pixel inside the image.
template <typename Emit>
void run_crop_passes(const Image8& image, const ClipCropPlan& p, Emit emit) {
  const int C = image.channels, crop = p.crop, rows = p.row_hi - p.row_lo;
  // Horizontal pass: rows row_lo .. row_hi, crop columns only. [rows][crop][C]
  std::vector<uint8_t> mid(static_cast<size_t>(std::max(rows, 0)) * crop * C, 0);
  for (int r = 0; r < rows; ++r)
    for (int x = 0; x < crop; ++x) {
      if (p.x_count[x] < 0) continue;
      const uint8_t* row = image.pixels.data() + (static_cast<size_t>(p.row_lo + r) * image.width + p.x_first[x]) * C;
      for (int c = 0; c < C; ++c)
        mid[(static_cast<size_t>(r) * crop + x) * C + c] =
            pillow_resample(row + c, C, p.x_count[x], &p.x_k[static_cast<size_t>(x) * p.kx]);
    }
  // Vertical pass: crop rows only.
  for (int y = 0; y < crop; ++y) {
    if (p.y_count[y] < 0) continue;
    for (int x = 0; x < crop; ++x) {
      if (p.x_count[x] < 0) continue;
      for (int c = 0; c < C; ++c) {
        const uint8_t* col = mid.data() + (static_cast<size_t>(p.y_first[y] - p.row_lo) * crop + x) * C + c;
        const uint8_t v = pillow_resample(col, static_cast<int64_t>(crop) * C, p.y_count[y], &p.y_k[static_cast<size_t>(y) * p.ky]);
        if (C == 1) {
          for (int rgb = 0; rgb < 3; ++rgb) emit(rgb, y, x, v);
        } else {
          emit(c, y, x, v);
        }
      }
    }
  }
}
}  // namespace

at::Tensor clip_crop_kernel_math(const Image8& image, const ClipPreprocessConfig& config) {
  if (image.channels != 1 && image.channels != 3) throw std::invalid_argument("expected a gray or RGB image");
  const ClipCropPlan p = clip_crop_plan(image.width, image.height, config);
  at::Tensor out = at::zeros({3, p.crop, p.crop}, at::kByte);
  auto a = out.accessor<uint8_t, 3>();
  run_crop_passes(image, p, [&](int c, int y, int x, uint8_t v) { a[c][y][x] = v; });
  return out;
}

at::Tensor clip_pixels_kernel_math(const Image8& image, const ClipPreprocessConfig& config) {
  if (image.channels != 1 && image.channels != 3) throw std::invalid_argument("expected a gray or RGB image");
  const ClipCropPlan p = clip_crop_plan(image.width, image.height, config);
  float mean[3], std[3];
  for (int c = 0; c < 3; ++c) {
    mean[c] = static_cast<float>(config.mean.at(c));
    std[c] = static_cast<float>(config.std.at(c));
  }
  at::Tensor out = at::empty({3, p.crop, p.crop}, at::kFloat);
  auto a = out.accessor<float, 3>();
  for (int c = 0; c < 3; ++c)  // outside the image: the zero padding, normalised
    for (int y = 0; y < p.crop; ++y)
      for (int x = 0; x < p.crop; ++x) a[c][y][x] = clip_normalize_value(0, mean[c], std[c]);
  run_crop_passes(image, p, [&](int c, int y, int x, uint8_t v) { a[c][y][x] = clip_normalize_value(v, mean[c], std[c]); });
  return out;
}

}  // namespace prefixcap
