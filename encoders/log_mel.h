// Log-mel front end of PANNs (torchlibrosa Spectrogram + LogmelFilterBank): periodic Hann
// window, centred frames with reflect padding, power spectrum, slaney mel filterbank computed
// from the config, 10*log10(max(x, amin)).
// ref: qiuqiangkong/torchlibrosa stft.py (d4e8add); librosa filters.mel (slaney).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "core/json_config.h"

namespace prefixcap {

struct LogMelConfig {
  int64_t sample_rate = 32000;   // Hz
  int64_t window_size = 1024;    // n_fft = window length
  int64_t hop_size = 320;        // samples between frames
  int64_t mel_bins = 64;         // mel filters
  double fmin = 50;              // lowest filter edge, Hz
  double fmax = 14000;           // highest filter edge, Hz
  double amin = 1e-10;           // floor before the log
  double ref = 1.0;              // 10*log10(ref) is subtracted
  double top_db = -1;            // clip to max - top_db (negative = off, as PANNs)

  // Reads sample_rate, window_size (or n_fft), hop_size (or hop_length), mel_bins (or n_mels),
  // fmin, fmax, amin, ref, top_db from a JSON object; checks ranges. fmax above the Nyquist
  // frequency is accepted with a one-line warning (librosa's semantics: empty top filters).
  static LogMelConfig from_json(const Json& j, const std::string& where);
  int64_t frames(int64_t samples) const { return samples / hop_size + 1; }
};

// Periodic Hann window of length n (scipy get_window('hann', n, fftbins=True)).
at::Tensor hann_window_periodic(int64_t n);
// Slaney-scale, slaney-normalised mel filterbank [mel_bins, window_size/2 + 1] (float64),
// librosa.filters.mel(htk=False, norm='slaney'); with fmax above sample_rate/2 (accepted, as
// librosa does) the filters above the Nyquist frequency are all zero.
at::Tensor slaney_mel_filterbank(const LogMelConfig& config);
// Indices of the all-zero filters of that filterbank (librosa warns about them).
std::vector<int64_t> empty_mel_filters(const LogMelConfig& config);

struct LogMelOutput {
  at::Tensor power_spectrogram;  // [B, 1, T, n_fft/2+1]
  at::Tensor mel_power;          // [B, 1, T, mel_bins]
  at::Tensor logmel;             // [B, 1, T, mel_bins] dB
};

// The CUDA kernels' constant tables on one device (window, sparse mel filters): made by
// make_log_mel_device_tables (encoders/feature_cuda.h).
struct LogMelDeviceTables {
  at::Tensor window, first, count, offset, weights;
  bool defined() const { return window.defined(); }
  c10::Device device() const { return window.device(); }
};

class LogMelFrontEndImpl : public torch::nn::Module {
 public:
  explicit LogMelFrontEndImpl(const LogMelConfig& config);
  // waveform [B, N] float -> log-mel [B, 1, T, mel_bins], T = floor(N / hop) + 1. A CUDA
  // waveform goes through the CUDA kernels when they are built in (feature_cuda.h).
  at::Tensor forward(const at::Tensor& waveform);
  // Every intermediate (for tests and debugging).
  LogMelOutput forward_all(const at::Tensor& waveform);
  const LogMelConfig& config() const { return config_; }

 private:
  LogMelConfig config_;
  at::Tensor window_;      // [n_fft]
  at::Tensor mel_basis_;   // [n_fft/2+1, mel_bins] (transposed filterbank)
  LogMelDeviceTables cuda_tables_;  // made on first use on a CUDA device
};
TORCH_MODULE(LogMelFrontEnd);

}  // namespace prefixcap
