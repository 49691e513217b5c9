#include "encoders/log_mel.h"

#include <cmath>
#include <cstdio>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>

#include "core/log.h"
#include "encoders/feature_cuda.h"

namespace prefixcap {

LogMelConfig LogMelConfig::from_json(const Json& j, const std::string& where) {
  LogMelConfig c;
  auto pick = [&](const char* a, const char* b, int64_t fallback) {
    if (j.contains(a)) return json_get<int64_t>(j, a, where);
    if (j.contains(b)) return json_get<int64_t>(j, b, where);
    return fallback;
  };
  c.sample_rate = json_get_or<int64_t>(j, "sample_rate", c.sample_rate, where);
  c.window_size = pick("window_size", "n_fft", c.window_size);
  c.hop_size = pick("hop_size", "hop_length", c.hop_size);
  c.mel_bins = pick("mel_bins", "n_mels", c.mel_bins);
  c.fmin = json_get_or<double>(j, "fmin", c.fmin, where);
  c.fmax = json_get_or<double>(j, "fmax", c.fmax, where);
  c.amin = json_get_or<double>(j, "amin", c.amin, where);
  c.ref = json_get_or<double>(j, "ref", c.ref, where);
  c.top_db = json_get_or<double>(j, "top_db", c.top_db, where);
  if (j.contains("win_length") && json_get<int64_t>(j, "win_length", where) != c.window_size)
    throw ConfigError(where + ": win_length different from n_fft is not supported");
  if (c.sample_rate <= 0 || c.window_size < 2 || c.hop_size <= 0 || c.mel_bins <= 0)
    throw ConfigError(where + ": sample_rate, window_size, hop_size and mel_bins must be positive");
  // Bounds far beyond any audio front end, so that a config cannot ask for gigabytes of filterbank.
  if (c.sample_rate > 768000 || c.window_size > 65536 || c.hop_size > 65536 || c.mel_bins > 1024)
    throw ConfigError(where + ": expected sample_rate <= 768000, window_size and hop_size <= 65536, mel_bins <= 1024; got " +
                      std::to_string(c.sample_rate) + ", " + std::to_string(c.window_size) + ", " + std::to_string(c.hop_size) +
                      ", " + std::to_string(c.mel_bins));
  if (!std::isfinite(c.fmin) || !std::isfinite(c.fmax) || !std::isfinite(c.amin) || !std::isfinite(c.ref) || !std::isfinite(c.top_db))
    throw ConfigError(where + ": fmin, fmax, amin, ref and top_db must be finite numbers");
  if (!(c.fmin >= 0 && c.fmin < c.fmax && c.fmin < c.sample_rate / 2.0))
    throw ConfigError(where + ": expected 0 <= fmin < fmax and fmin < sample_rate/2, got fmin " + std::to_string(c.fmin) +
                      ", fmax " + std::to_string(c.fmax) + ", sample_rate " + std::to_string(c.sample_rate));
  if (!(c.amin > 0) || !(c.ref > 0)) throw ConfigError(where + ": amin and ref must be positive");
  if (c.fmax > c.sample_rate / 2.0) {
    // librosa (and so torchlibrosa / PANNs) accept it: the filters whose band lies above the
    // Nyquist frequency are all zero. Prefix-AAC's Cnn14(16000, fmax=14000) is such a config.
    const std::vector<int64_t> empty = empty_mel_filters(c);
    std::string which;
    if (!empty.empty()) which = "; mel filters " + std::to_string(empty.front()) + ".." + std::to_string(empty.back()) + " are empty";
    char fmax[32];
    std::snprintf(fmax, sizeof fmax, "%g", c.fmax);
    log_warning(where + ": fmax " + fmax + " Hz is above the Nyquist frequency " + std::to_string(c.sample_rate / 2) + " Hz" + which +
                " (librosa's semantics)");
  }
  return c;
}

at::Tensor hann_window_periodic(int64_t n) {
  at::Tensor k = at::arange(n, at::kDouble);
  return 0.5 - 0.5 * at::cos(2 * M_PI * k / static_cast<double>(n));
}

namespace {
double hz_to_mel_slaney(double f) {
  const double f_sp = 200.0 / 3, min_log_hz = 1000.0, min_log_mel = min_log_hz / f_sp, logstep = std::log(6.4) / 27.0;
  return f < min_log_hz ? f / f_sp : min_log_mel + std::log(f / min_log_hz) / logstep;
}
double mel_to_hz_slaney(double m) {
  const double f_sp = 200.0 / 3, min_log_hz = 1000.0, min_log_mel = min_log_hz / f_sp, logstep = std::log(6.4) / 27.0;
  return m < min_log_mel ? m * f_sp : min_log_hz * std::exp(logstep * (m - min_log_mel));
}
}  // namespace

at::Tensor slaney_mel_filterbank(const LogMelConfig& c) {
  const int64_t bins = c.window_size / 2 + 1;
  const int64_t M = c.mel_bins;
  std::vector<double> mel_hz(M + 2);
  const double lo = hz_to_mel_slaney(c.fmin), hi = hz_to_mel_slaney(c.fmax);
  for (int64_t i = 0; i < M + 2; ++i) mel_hz[i] = mel_to_hz_slaney(lo + (hi - lo) * i / (M + 1));
  at::Tensor fb = at::zeros({M, bins}, at::kDouble);
  auto a = fb.accessor<double, 2>();
  for (int64_t m = 0; m < M; ++m) {
    const double left = mel_hz[m], center = mel_hz[m + 1], right = mel_hz[m + 2];
    const double norm = 2.0 / (right - left);
    for (int64_t k = 0; k < bins; ++k) {
      const double f = static_cast<double>(k) * c.sample_rate / c.window_size;
      const double lower = (f - left) / (center - left), upper = (right - f) / (right - center);
      a[m][k] = std::max(0.0, std::min(lower, upper)) * norm;
    }
  }
  return fb;
}

std::vector<int64_t> empty_mel_filters(const LogMelConfig& config) {
  at::Tensor peak = std::get<0>(slaney_mel_filterbank(config).max(1));
  std::vector<int64_t> out;
  for (int64_t m = 0; m < peak.size(0); ++m)
    if (peak[m].item<double>() <= 0) out.push_back(m);
  return out;
}

LogMelFrontEndImpl::LogMelFrontEndImpl(const LogMelConfig& config) : config_(config) {
  window_ = register_buffer("window", hann_window_periodic(config.window_size).to(at::kFloat));
  mel_basis_ = register_buffer("mel_basis", slaney_mel_filterbank(config).t().contiguous().to(at::kFloat));
}

namespace {
// |X|^2 of a complex spectrum [B, T, F] as [B, 1, T, F]. For contiguous complex float (the CPU
// path) one parallel pass over the bins: the same arithmetic as re*re + im*im on the real view,
// several times faster than the elementwise ops over its strided halves.
at::Tensor power_of(const at::Tensor& spec) {
  if (spec.device().is_cpu() && spec.scalar_type() == at::kComplexFloat && spec.is_contiguous()) {
    at::Tensor power = at::empty({spec.size(0), 1, spec.size(1), spec.size(2)}, spec.options().dtype(at::kFloat));
    const auto* in = spec.data_ptr<c10::complex<float>>();
    float* out = power.data_ptr<float>();
    at::parallel_for(0, spec.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float re = in[i].real(), im = in[i].imag();
        out[i] = re * re + im * im;
      }
    });
    return power;
  }
  at::Tensor parts = at::view_as_real(spec);  // [B, T, F, 2]
  return (parts.select(-1, 0).square() + parts.select(-1, 1).square()).unsqueeze(1);
}
}  // namespace

LogMelOutput LogMelFrontEndImpl::forward_all(const at::Tensor& waveform) {
  TORCH_CHECK(waveform.dim() == 2, "log-mel: expected a waveform [B, N], got ", waveform.sizes());
  const int64_t pad = config_.window_size / 2;
  TORCH_CHECK(waveform.size(1) > pad, "log-mel: audio of ", waveform.size(1), " samples is too short; at least ",
              pad + 1, " samples (", (pad + 1) * 1000 / config_.sample_rate, " ms) are needed");
  at::Tensor x = waveform.to(window_.dtype());
  // Reflect padding without repeating the edge sample (torch 'reflect').
  at::Tensor padded = at::reflection_pad1d(x.unsqueeze(1), {pad, pad}).squeeze(1);  // [B, N + n_fft]
  // Frames t*hop .. t*hop + n_fft of the padded signal, windowed, real FFT: [B, T, F].
  // (unfold + rfft: the same numbers as at::stft, about 2x faster here, already time-major)
  at::Tensor frames = padded.unfold(/*dimension=*/1, config_.window_size, config_.hop_size) * window_;
  LogMelOutput out;
  out.power_spectrogram = power_of(at::fft_rfft(frames));                // [B, 1, T, F]
  out.mel_power = at::matmul(out.power_spectrogram, mel_basis_);                                       // [B, 1, T, M]
  out.logmel = 10.0 * at::log10(at::clamp_min(out.mel_power, config_.amin));
  if (config_.ref != 1.0) out.logmel = out.logmel - 10.0 * std::log10(std::max(config_.amin, config_.ref));
  if (config_.top_db >= 0) {
    at::Tensor peak = std::get<0>(out.logmel.flatten(1).max(1)).view({-1, 1, 1, 1});
    out.logmel = at::max(out.logmel, peak - config_.top_db);
  }
  return out;
}

at::Tensor LogMelFrontEndImpl::forward(const at::Tensor& waveform) {
  if (waveform.is_cuda() && feature_kernels_compiled()) {
    if (!cuda_tables_.defined() || cuda_tables_.device() != waveform.device())
      cuda_tables_ = make_log_mel_device_tables(config_, waveform.device());
    return log_mel_cuda(waveform, config_, cuda_tables_);
  }
  return forward_all(waveform).logmel;
}

}  // namespace prefixcap
