// CUDA launchers of the feature kernels (feature_kernels.cu), over raw device pointers and a
// stream, so that neither side needs the other's headers: nvcc never compiles LibTorch, and the
// LibTorch wrapper (encoders/feature_cuda.cpp) owns every allocation. The per-element math is
// encoders/feature_kernels.h, shared with the CPU (feature_kernels_cpu.cpp emulates these
// launches). Every launcher checks the launch and throws std::runtime_error naming the kernel.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace prefixcap::cuda {

using Stream = CUstream_st*;  // cudaStream_t

// ---- log-mel ----------------------------------------------------------------------------
// frames[(b*T + t)*n_fft + j] = wave[b][reflect(t*hop + j)] * window[j]   (wave [B, N])
void frame_window(const float* wave, int64_t B, int64_t N, int64_t T, int64_t hop, int64_t n_fft, const float* window,
                  float* frames, Stream stream);
// out[row*M + m] = power_to_db(sum over filter m's bins of |spec[row][k]|^2 * w)   (spec [rows, F, 2])
// One block per frame: the frame's spectrum is read once into shared memory.
void mel_db(const float* spec, int64_t rows, int64_t F, int64_t M, const int32_t* first, const int32_t* count,
            const int32_t* offset, const float* weights, float amin, float ref_db, float* out, Stream stream);
// In place, per clip of `per_clip` values: max(v, peak - top_db). One block per clip.
void top_db_clip(float* values, int64_t B, int64_t per_clip, float top_db, Stream stream);

// ---- CLIP preprocessing (one image; plans from clip_crop_plan) ----------------------------
// mid[(r*crop + x)*C + c] = horizontal Pillow pass of input row row_lo + r at crop column x.
void clip_horizontal(const uint8_t* image, int width, int channels, int row_lo, int rows, int crop, int kx,
                     const int32_t* x_first, const int32_t* x_count, const int32_t* x_k, uint8_t* mid, Stream stream);
struct Normalization {
  float mean[3];
  float std[3];
};
// out[c][y][x] (float, [3, crop, crop]) = CLIP-normalised vertical pass of mid at crop row y;
// positions outside the image are the normalised zero padding; gray images fill all three.
void clip_vertical_normalize(const uint8_t* mid, int channels, int row_lo, int crop, int ky, const int32_t* y_first,
                             const int32_t* y_count, const int32_t* y_k, const int32_t* x_count, Normalization norm,
                             float* out, Stream stream);

}  // namespace prefixcap::cuda
