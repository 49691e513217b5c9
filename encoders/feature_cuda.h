// The CUDA feature kernels behind LibTorch tensors: log-mel for a batch of clips and CLIP
// preprocessing for a batch of decoded images, on the device's current stream. Built when
// LibTorch has CUDA (PREFIXCAP_WITH_CUDA); elsewhere every entry point throws, and
// feature_kernels_compiled() says false. The CPU emulation of the same kernels is
// feature_kernels_cpu.h.
#pragma once

#include <vector>

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include "encoders/image_preprocess.h"
#include "encoders/log_mel.h"

namespace prefixcap {

bool feature_kernels_compiled();

// The log-mel kernels' constant tables (LogMelDeviceTables, log_mel.h) on one CUDA device.
LogMelDeviceTables make_log_mel_device_tables(const LogMelConfig& config, const c10::Device& device);

// waveform [B, N] on a CUDA device -> log-mel [B, 1, T, mel_bins] float32 on it (the kernels:
// frame + window, cuFFT rFFT, sparse mel + dB in one pass over each frame, top_db).
at::Tensor log_mel_cuda(const at::Tensor& waveform, const LogMelConfig& config, const LogMelDeviceTables& tables);

// Decoded images -> CLIP pixel values [B, 3, crop, crop] float32 on `device`: the pixels are
// copied once through pinned memory, then per image a horizontal Pillow pass over the crop's
// columns and a vertical pass fused with the crop and the normalisation.
at::Tensor clip_pixels_cuda(const std::vector<const Image8*>& images, const ClipPreprocessConfig& config,
                            const c10::Device& device);

// CLIP pixel values of a batch on `device`: through clip_pixels_cuda when the device is CUDA and
// the kernels are built in, else on the CPU (clip_pixel_values) and copied there. Same values.
at::Tensor clip_pixel_batch(const std::vector<const Image8*>& images, const ClipPreprocessConfig& config,
                            const c10::Device& device);

}  // namespace prefixcap
