// The per-element math of the feature extractors, written once for the CPU and for CUDA
// (`__host__ __device__` under nvcc): the log-mel front end's framing, window, power, sparse mel
// projection and dB conversion, and Pillow's fixed-point bicubic resampling, centre crop and CLIP
// normalisation. encoders/cuda/*.cu launch kernels over these functions; feature_kernels_cpu.cpp
// runs the same functions in CPU loops so that the tests prove them equal to the CPU port
// (log_mel.cpp, image_preprocess.cpp) on every fixture case. No LibTorch here.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PREFIXCAP_HD __host__ __device__
#else
#define PREFIXCAP_HD
#endif

namespace prefixcap::kernels {

// ---- log-mel --------------------------------------------------------------------------

// Index into a signal of length n after torch's 'reflect' padding by pad on both sides (the
// edge sample is not repeated): padded index p maps to the source sample returned. Needs n > pad.
PREFIXCAP_HD inline int64_t reflect_index(int64_t p, int64_t pad, int64_t n) {
  int64_t i = p - pad;
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}

// Periodic Hann window value k of n, computed in double and rounded to float, as the CPU path
// builds its window buffer (scipy get_window('hann', n, fftbins=True)).
PREFIXCAP_HD inline float hann_periodic(int64_t k, int64_t n) {
  return static_cast<float>(0.5 - 0.5 * cos(2.0 * 3.14159265358979323846 * static_cast<double>(k) / static_cast<double>(n)));
}

// Windowed sample j of frame t (centred frames: frame t starts at padded index t * hop);
// window[j] = hann_periodic(j, n_fft), tabulated once.
PREFIXCAP_HD inline float framed_sample(const float* wave, int64_t n, int64_t t, int64_t j, int64_t hop, int64_t n_fft,
                                        const float* window) {
  return wave[reflect_index(t * hop + j, n_fft / 2, n)] * window[j];
}

// |X|^2 of one rFFT bin.
PREFIXCAP_HD inline float power(float re, float im) { return re * re + im * im; }

// One mel filter applied to one frame's spectrum: the filter's non-zero weights cover bins
// first .. first + count - 1. Summed in bin order in float.
PREFIXCAP_HD inline float mel_energy(const float* re_im /* interleaved [F][2] */, const float* weights, int64_t first,
                                     int64_t count) {
  float acc = 0.0f;
  for (int64_t k = 0; k < count; ++k) {
    const float* bin = re_im + 2 * (first + k);
    acc += power(bin[0], bin[1]) * weights[k];
  }
  return acc;
}

// 10 * log10(max(x, amin)) - ref_db, in float as the CPU path computes it.
PREFIXCAP_HD inline float power_to_db(float x, float amin, float ref_db) {
  return 10.0f * log10f(x > amin ? x : amin) - ref_db;
}

// top_db clipping against the clip's peak (top_db < 0: off, as PANNs).
PREFIXCAP_HD inline float clip_top_db(float db, float peak, float top_db) {
  if (top_db < 0) return db;
  const float floor_db = peak - top_db;
  return db > floor_db ? db : floor_db;
}

// ---- Pillow bicubic resampling (Resample.c, 8 bits per channel) --------------------------

constexpr int kPillowPrecisionBits = 32 - 8 - 2;

PREFIXCAP_HD inline double pillow_bicubic(double x) {
  const double a = -0.5;
  if (x < 0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Coefficients per output pixel: at most this many taps (ceil(support) * 2 + 1).
PREFIXCAP_HD inline int pillow_ksize(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  return static_cast<int>(ceil(2.0 * filterscale)) * 2 + 1;
}

// Output pixel xx's first input pixel (*xmin), tap count (*count) and fixed-point weights
// kk[0 .. ksize) (zero past count): Pillow's precompute_coeffs for one output pixel. `scratch`
// holds ksize doubles.
PREFIXCAP_HD inline void pillow_coefficients(int xx, int in_size, int out_size, int ksize, int* xmin_out, int* count_out,
                                             int32_t* kk, double* scratch) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const double center = (xx + 0.5) * scale;
  const double ss = 1.0 / filterscale;
  int xmin = static_cast<int>(center - support + 0.5);
  if (xmin < 0) xmin = 0;
  int xmax = static_cast<int>(center + support + 0.5);
  if (xmax > in_size) xmax = in_size;
  xmax -= xmin;
  double ww = 0.0;
  for (int x = 0; x < xmax; ++x) {
    const double w = pillow_bicubic((x + xmin - center + 0.5) * ss);
    scratch[x] = w;
    ww += w;
  }
  for (int x = 0; x < ksize; ++x) {
    const double v = x < xmax ? (ww != 0.0 ? scratch[x] / ww : scratch[x]) : 0.0;
    kk[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPillowPrecisionBits))
                  : static_cast<int32_t>(0.5 + v * (1 << kPillowPrecisionBits));
  }
  *xmin_out = xmin;
  *count_out = xmax;
}

// Pillow's clip8: the 32-bit accumulator back to uint8.
PREFIXCAP_HD inline uint8_t pillow_clip8(int32_t acc) {
  if (acc >= (1 << kPillowPrecisionBits << 8)) return 255;
  if (acc <= 0) return 0;
  return static_cast<uint8_t>(acc >> kPillowPrecisionBits);
}

// One output sample of a resampling pass: `count` taps of `src` spaced `stride` bytes apart.
PREFIXCAP_HD inline uint8_t pillow_resample(const uint8_t* src, int64_t stride, int count, const int32_t* kk) {
  int32_t acc = 1 << (kPillowPrecisionBits - 1);
  for (int i = 0; i < count; ++i) acc += static_cast<int32_t>(src[i * stride]) * kk[i];
  return pillow_clip8(acc);
}

// torchvision CenterCrop offset: int(round((size - crop) / 2.0)), Python's round half to even.
PREFIXCAP_HD inline int64_t center_crop_offset(int64_t size, int64_t crop) {
  return static_cast<int64_t>(rint((size - crop) / 2.0));
}

// ToTensor then Normalize, in float32: (v / 255 - mean) / std.
PREFIXCAP_HD inline float clip_normalize_value(uint8_t v, float mean, float std) {
  return (static_cast<float>(v) / 255.0f - mean) / std;
}

}  // namespace prefixcap::kernels
