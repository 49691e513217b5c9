#include "encoders/feature_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include <ATen/ATen.h>

#include "encoders/feature_kernels_cpu.h"

#if PREFIXCAP_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "encoders/cuda/feature_cuda.h"
#endif

namespace prefixcap {

#if PREFIXCAP_CUDA_KERNELS

bool feature_kernels_compiled() { return true; }

namespace {
at::Tensor to_device(const std::vector<int32_t>& v, const c10::Device& device) {
  return at::tensor(v.empty() ? std::vector<int32_t>{0} : v, at::kInt).to(device);
}
cuda::Stream current_stream(const c10::Device& device) {
  return reinterpret_cast<cuda::Stream>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
}
}  // namespace

LogMelDeviceTables make_log_mel_device_tables(const LogMelConfig& config, const c10::Device& device) {
  if (!device.is_cuda()) throw std::invalid_argument("log-mel tables: not a CUDA device");
  const SparseMelFilters mel = sparse_mel_filters(config);
  const std::vector<float> window = hann_window_table(config.window_size);
  LogMelDeviceTables t;
  t.window = at::tensor(window, at::kFloat).to(device);
  t.first = to_device(mel.first, device);
  t.count = to_device(mel.count, device);
  t.offset = to_device(mel.offset, device);
  t.weights = at::tensor(mel.weights.empty() ? std::vector<float>{0.0f} : mel.weights, at::kFloat).to(device);
  return t;
}

at::Tensor log_mel_cuda(const at::Tensor& waveform, const LogMelConfig& c, const LogMelDeviceTables& tables) {
  TORCH_CHECK(waveform.dim() == 2 && waveform.is_cuda(), "log_mel_cuda: expected a CUDA waveform [B, N], got ",
              waveform.sizes(), " on ", waveform.device());
  TORCH_CHECK(tables.defined() && tables.device() == waveform.device(), "log_mel_cuda: tables on another device");
  const c10::cuda::CUDAGuard guard(waveform.device());
  const at::Tensor wave = waveform.to(at::kFloat).contiguous();
  const int64_t B = wave.size(0), N = wave.size(1), n_fft = c.window_size, hop = c.hop_size;
  TORCH_CHECK(N > n_fft / 2, "log-mel: audio of ", N, " samples is too short; at least ", n_fft / 2 + 1, " are needed");
  const int64_t T = N / hop + 1, F = n_fft / 2 + 1, M = c.mel_bins;
  const cuda::Stream stream = current_stream(waveform.device());
  at::Tensor frames = at::empty({B, T, n_fft}, wave.options());
  cuda::frame_window(wave.data_ptr<float>(), B, N, T, hop, n_fft, tables.window.data_ptr<float>(), frames.data_ptr<float>(),
                     stream);
  const at::Tensor spec = at::view_as_real(at::fft_rfft(frames)).contiguous();  // cuFFT, same stream
  at::Tensor out = at::empty({B, 1, T, M}, wave.options());
  const float ref_db = c.ref == 1.0 ? 0.0f : static_cast<float>(10.0 * std::log10(std::max(c.amin, c.ref)));
  cuda::mel_db(spec.data_ptr<float>(), B * T, F, M, tables.first.data_ptr<int32_t>(), tables.count.data_ptr<int32_t>(),
               tables.offset.data_ptr<int32_t>(), tables.weights.data_ptr<float>(), static_cast<float>(c.amin), ref_db,
               out.data_ptr<float>(), stream);
  if (c.top_db >= 0) cuda::top_db_clip(out.data_ptr<float>(), B, T * M, static_cast<float>(c.top_db), stream);
  return out;
}

at::Tensor clip_pixels_cuda(const std::vector<const Image8*>& images, const ClipPreprocessConfig& config,
                            const c10::Device& device) {
  TORCH_CHECK(device.is_cuda(), "clip_pixels_cuda: not a CUDA device: ", device);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t crop = config.crop_size;
  at::Tensor out = at::empty({static_cast<int64_t>(images.size()), 3, crop, crop}, at::TensorOptions(at::kFloat).device(device));
  if (images.empty()) return out;
  // Every image's pixels and plan tables in one pinned buffer each, copied once.
  std::vector<ClipCropPlan> plans;
  std::vector<int64_t> pixel_at, table_at, mid_at;
  int64_t pixel_bytes = 0, table_ints = 0, mid_bytes = 0;
  for (const Image8* im : images) {
    TORCH_CHECK(im->channels == 1 || im->channels == 3, "clip_pixels_cuda: expected gray or RGB images");
    plans.push_back(clip_crop_plan(im->width, im->height, config));
    const ClipCropPlan& p = plans.back();
    pixel_at.push_back(pixel_bytes);
    pixel_bytes += static_cast<int64_t>(im->pixels.size());
    table_at.push_back(table_ints);
    table_ints += static_cast<int64_t>(p.x_first.size() + p.x_count.size() + p.x_k.size() + p.y_first.size() +
                                       p.y_count.size() + p.y_k.size());
    mid_at.push_back(mid_bytes);
    mid_bytes += static_cast<int64_t>(p.row_hi - p.row_lo) * p.crop * im->channels;
  }
  at::Tensor host_pixels = at::empty({std::max<int64_t>(pixel_bytes, 1)}, at::TensorOptions(at::kByte).pinned_memory(true));
  at::Tensor host_tables = at::empty({std::max<int64_t>(table_ints, 1)}, at::TensorOptions(at::kInt).pinned_memory(true));
  uint8_t* hp = host_pixels.data_ptr<uint8_t>();
  int32_t* ht = host_tables.data_ptr<int32_t>();
  for (size_t i = 0; i < images.size(); ++i) {
    std::memcpy(hp + pixel_at[i], images[i]->pixels.data(), images[i]->pixels.size());
    int32_t* t = ht + table_at[i];
    for (const auto* v : {&plans[i].x_first, &plans[i].x_count, &plans[i].x_k, &plans[i].y_first, &plans[i].y_count,
                          &plans[i].y_k}) {
      std::memcpy(t, v->data(), v->size() * sizeof(int32_t));
      t += v->size();
    }
  }
  const at::Tensor pixels = host_pixels.to(device, /*non_blocking=*/true);
  const at::Tensor tables = host_tables.to(device, /*non_blocking=*/true);
  at::Tensor mid = at::empty({std::max<int64_t>(mid_bytes, 1)}, at::TensorOptions(at::kByte).device(device));
  cuda::Normalization norm{};
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = static_cast<float>(config.mean.at(c));
    norm.std[c] = static_cast<float>(config.std.at(c));
  }
  const cuda::Stream stream = current_stream(device);
  for (size_t i = 0; i < images.size(); ++i) {
    const ClipCropPlan& p = plans[i];
    const int32_t* t = tables.data_ptr<int32_t>() + table_at[i];
    const int32_t *x_first = t, *x_count = x_first + p.x_first.size(), *x_k = x_count + p.x_count.size();
    const int32_t *y_first = x_k + p.x_k.size(), *y_count = y_first + p.y_first.size(), *y_k = y_count + p.y_count.size();
    uint8_t* m = mid.data_ptr<uint8_t>() + mid_at[i];
    cuda::clip_horizontal(pixels.data_ptr<uint8_t>() + pixel_at[i], images[i]->width, images[i]->channels, p.row_lo,
                          p.row_hi - p.row_lo, p.crop, p.kx, x_first, x_count, x_k, m, stream);
    cuda::clip_vertical_normalize(m, images[i]->channels, p.row_lo, p.crop, p.ky, y_first, y_count, y_k, x_count, norm,
                                  out[static_cast<int64_t>(i)].data_ptr<float>(), stream);
  }
  return out;
}

#else  // no CUDA kernels in this build

bool feature_kernels_compiled() { return false; }

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("this prefixcap was built without CUDA (LibTorch without CUDA): the CUDA feature kernels are "
                           "not available");
}
}  // namespace

LogMelDeviceTables make_log_mel_device_tables(const LogMelConfig&, const c10::Device&) { no_cuda(); }
at::Tensor log_mel_cuda(const at::Tensor&, const LogMelConfig&, const LogMelDeviceTables&) { no_cuda(); }
at::Tensor clip_pixels_cuda(const std::vector<const Image8*>&, const ClipPreprocessConfig&, const c10::Device&) { no_cuda(); }

#endif

at::Tensor clip_pixel_batch(const std::vector<const Image8*>& images, const ClipPreprocessConfig& config,
                            const c10::Device& device) {
  if (device.is_cuda() && feature_kernels_compiled()) return clip_pixels_cuda(images, config, device);
  std::vector<at::Tensor> pixels;
  for (const Image8* im : images) pixels.push_back(clip_pixel_values(*im, config));
  return at::stack(pixels).to(device);
}

}  // namespace prefixcap
