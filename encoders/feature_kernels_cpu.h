// The CUDA feature kernels' algorithms run on the CPU, over the same per-element functions
// (encoders/feature_kernels.h) and in the same decomposition: what the GPU computes, checkable
// where there is no GPU. The fixture runner compares them with the golden data and with the CPU
// port on every fixture case; on a machine with a GPU the `gpu` tests compare the kernels with
// these.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/Tensor.h>

#include "encoders/image_preprocess.h"
#include "encoders/log_mel.h"

namespace prefixcap {

// The mel filterbank in the kernels' sparse form: filter m has weights[offset[m] ..
// offset[m] + count[m]) for bins first[m] .. first[m] + count[m] - 1 (its non-zero span).
struct SparseMelFilters {
  std::vector<int32_t> first, count, offset;
  std::vector<float> weights;
};
SparseMelFilters sparse_mel_filters(const LogMelConfig& config);
// hann_periodic(k, n) for k < n: the kernels' window table.
std::vector<float> hann_window_table(int64_t n);

// Log-mel [B, 1, T, mel_bins] as the kernels compute it: frames gathered with reflect padding and
// the Hann window, rFFT (at::fft_rfft here, cuFFT there), the sparse mel sums of |X|^2, dB, top_db.
at::Tensor log_mel_kernel_math(const at::Tensor& waveform, const LogMelConfig& config);

// CLIP's uint8 crop [3, crop, crop] as the kernels compute it: the horizontal pass only for the
// crop's columns and the input rows the vertical taps of the crop's rows reach, the vertical pass
// only for the crop's rows, gray replicated to RGB.
at::Tensor clip_crop_kernel_math(const Image8& image, const ClipPreprocessConfig& config);
// The same crop normalised to float [3, crop, crop] (the kernels fuse this into the vertical pass).
at::Tensor clip_pixels_kernel_math(const Image8& image, const ClipPreprocessConfig& config);

// Geometry shared by the CPU emulation and the CUDA launcher: the resized size (torchvision's
// Resize rule), the crop offsets, and the resampling coefficients of the columns and rows the crop
// needs. Output column x of the crop comes from resized column left + x.
struct ClipCropPlan {
  int in_w = 0, in_h = 0, resized_w = 0, resized_h = 0, crop = 0;
  int64_t top = 0, left = 0;
  bool resize_w = false, resize_h = false;     // a pass is skipped when the size does not change
  int kx = 0, ky = 0;                          // taps per output column / row
  std::vector<int32_t> x_first, x_count, x_k;  // per crop column: first input column, taps, kx weights
  std::vector<int32_t> y_first, y_count, y_k;  // per crop row: first input row, taps, ky weights
  int row_lo = 0, row_hi = 0;                  // input rows the horizontal pass must produce
};
ClipCropPlan clip_crop_plan(int width, int height, const ClipPreprocessConfig& config);

}  // namespace prefixcap
