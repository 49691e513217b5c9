// The feature kernels: grid-stride loops (no grid dimension limits), one thread per output
// element, the element math from encoders/feature_kernels.h.
#include "encoders/cuda/feature_cuda.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "encoders/feature_kernels.h"

namespace prefixcap::cuda {

namespace {

using namespace prefixcap::kernels;

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel ") + kernel + ": " + cudaGetErrorString(e));
}

int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride beyond this
}

__global__ void frame_window_kernel(const float* wave, int64_t N, int64_t T, int64_t hop, int64_t n_fft,
                                    const float* window, float* frames, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % n_fft, row = i / n_fft, b = row / T, t = row % T;
    frames[i] = framed_sample(wave + b * N, N, t, j, hop, n_fft, window);
  }
}

__global__ void mel_db_kernel(const float* spec, int64_t F, int64_t M, const int32_t* first, const int32_t* count,
                              const int32_t* offset, const float* weights, float amin, float ref_db, float* out) {
  extern __shared__ float frame[];  // [F][2]
  const int64_t row = blockIdx.x;
  const float* src = spec + row * F * 2;
  for (int64_t k = threadIdx.x; k < 2 * F; k += blockDim.x) frame[k] = src[k];
  __syncthreads();
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x)
    out[row * M + m] = power_to_db(mel_energy(frame, weights + offset[m], first[m], count[m]), amin, ref_db);
}

__global__ void top_db_kernel(float* values, int64_t per_clip, float top_db) {
  __shared__ float peak[256];
  float* clip = values + blockIdx.x * per_clip;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < per_clip; i += blockDim.x) m = fmaxf(m, clip[i]);
  peak[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) peak[threadIdx.x] = fmaxf(peak[threadIdx.x], peak[threadIdx.x + s]);
    __syncthreads();
  }
  const float p = peak[0];
  for (int64_t i = threadIdx.x; i < per_clip; i += blockDim.x) clip[i] = clip_top_db(clip[i], p, top_db);
}

__global__ void clip_horizontal_kernel(const uint8_t* image, int width, int C, int row_lo, int crop, int kx,
                                       const int32_t* x_first, const int32_t* x_count, const int32_t* x_k, uint8_t* mid,
                                       int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const int x = static_cast<int>((i / C) % crop);
    const int64_t r = i / (static_cast<int64_t>(C) * crop);
    if (x_count[x] < 0) {
      mid[i] = 0;
      continue;
    }
    const uint8_t* src = image + ((row_lo + r) * width + x_first[x]) * C + c;
    mid[i] = pillow_resample(src, C, x_count[x], x_k + static_cast<int64_t>(x) * kx);
  }
}

__global__ void clip_vertical_kernel(const uint8_t* mid, int C, int row_lo, int crop, int ky, const int32_t* y_first,
                                     const int32_t* y_count, const int32_t* y_k, const int32_t* x_count,
                                     Normalization norm, float* out, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int x = static_cast<int>(i % crop);
    const int y = static_cast<int>((i / crop) % crop);
    const int c = static_cast<int>(i / (static_cast<int64_t>(crop) * crop));
    uint8_t v = 0;
    if (y_count[y] >= 0 && x_count[x] >= 0) {
      const int ch = C == 1 ? 0 : c;
      const uint8_t* src = mid + (static_cast<int64_t>(y_first[y] - row_lo) * crop + x) * C + ch;
      v = pillow_resample(src, static_cast<int64_t>(crop) * C, y_count[y], y_k + static_cast<int64_t>(y) * ky);
    }
    out[i] = clip_normalize_value(v, norm.mean[c], norm.std[c]);
  }
}

}  // namespace

void frame_window(const float* wave, int64_t B, int64_t N, int64_t T, int64_t hop, int64_t n_fft, const float* window,
                  float* frames, Stream stream) {
  const int64_t total = B * T * n_fft;
  frame_window_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(wave, N, T, hop, n_fft, window, frames, total);
  check_launch("frame_window");
}

void mel_db(const float* spec, int64_t rows, int64_t F, int64_t M, const int32_t* first, const int32_t* count,
            const int32_t* offset, const float* weights, float amin, float ref_db, float* out, Stream stream) {
  if (rows == 0) return;
  const size_t shared = static_cast<size_t>(F) * 2 * sizeof(float);
  if (shared > 48 * 1024) throw std::runtime_error("mel_db: n_fft too large for the shared-memory kernel");
  mel_db_kernel<<<static_cast<unsigned>(rows), 128, shared, stream>>>(spec, F, M, first, count, offset, weights, amin,
                                                                     ref_db, out);
  check_launch("mel_db");
}

void top_db_clip(float* values, int64_t B, int64_t per_clip, float top_db, Stream stream) {
  if (B == 0) return;
  top_db_kernel<<<static_cast<unsigned>(B), 256, 0, stream>>>(values, per_clip, top_db);
  check_launch("top_db");
}

void clip_horizontal(const uint8_t* image, int width, int channels, int row_lo, int rows, int crop, int kx,
                     const int32_t* x_first, const int32_t* x_count, const int32_t* x_k, uint8_t* mid, Stream stream) {
  const int64_t total = static_cast<int64_t>(rows) * crop * channels;
  if (total == 0) return;
  clip_horizontal_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(image, width, channels, row_lo, crop, kx, x_first,
                                                                      x_count, x_k, mid, total);
  check_launch("clip_horizontal");
}

void clip_vertical_normalize(const uint8_t* mid, int channels, int row_lo, int crop, int ky, const int32_t* y_first,
                             const int32_t* y_count, const int32_t* y_k, const int32_t* x_count, Normalization norm,
                             float* out, Stream stream) {
  const int64_t total = 3LL * crop * crop;
  clip_vertical_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(mid, channels, row_lo, crop, ky, y_first, y_count, y_k,
                                                                    x_count, norm, out, total);
  check_launch("clip_vertical_normalize");
}

}  // namespace prefixcap::cuda
