// gpu_bench: the GPU figures of scripts/device_check.sh, each beside its anchor measured in the
// same run: the log-mel kernels against the same computation in LibTorch ops on the same GPU;
// CLIP preprocessing on the GPU (including the host-to-device copy) against the CPU port; CNN14,
// ViT-B/32 and GPT-2 124M (random weights, the published shapes) on the GPU. Prints one JSON
// object; exits 2 with {"error": ...} where there is no GPU.
//
//   build/bench/gpu_bench [--quick]
#include <cstdio>
#include <random>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/threads.h"
#include "encoders/clip_vision.h"
#include "encoders/cnn14.h"
#include "encoders/feature_cuda.h"
#include "encoders/image_preprocess.h"
#include "encoders/log_mel.h"
#include "lm/decoding.h"
#include "lm/gpt2.h"

using namespace prefixcap;
using prefixcap::bench::best_time;
using Json = nlohmann::json;

namespace {
// Best wall time of fn on the GPU: synchronised before and after.
double gpu_time(int repeats, const std::function<void()>& fn) {
  fn();  // warm-up (plans, allocator, kernels' first load)
  torch::cuda::synchronize();
  return best_time(repeats, [&] {
    fn();
    torch::cuda::synchronize();
  });
}
}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  Json out = {{"benchmark", "gpu_bench"}, {"cpu", bench::cpu_model_name()}};
  if (!feature_kernels_compiled() || !at::hasCUDA()) {
    out["error"] = feature_kernels_compiled() ? "no CUDA device on this machine" : "built without CUDA";
    std::printf("%s\n", out.dump(2).c_str());
    return 2;
  }
  const ThreadSetup threads = configure_threads({});
  out["cpu_threads"] = threads.num_threads;
  out["cuda_devices"] = torch::cuda::device_count();
  const at::Device gpu(at::kCUDA, 0);
  torch::NoGradGuard no_grad;
  const int repeats = quick ? 3 : 10;

  // ---- log-mel: 32 clips x 10 s at 32 kHz, kernels vs the same math in LibTorch ops.
  {
    LogMelFrontEnd front_end(LogMelConfig{});
    front_end->to(gpu);
    const at::Tensor wave = (at::randn({32, 320000}) * 0.1).to(gpu);
    const double kernels = gpu_time(repeats, [&] { front_end->forward(wave); });
    const double ops = gpu_time(repeats, [&] { front_end->forward_all(wave); });
    const double diff = (front_end->forward(wave) - front_end->forward_all(wave).logmel).abs().max().item<double>();
    out["log_mel"] = {{"batch", "32 clips x 10 s, 32 kHz"}, {"kernels_ms", kernels * 1e3}, {"torch_ops_ms", ops * 1e3},
                      {"speedup", ops / kernels}, {"max_abs_diff_db", diff},
                      {"realtime_factor", 320.0 / kernels}};
  }
  // ---- CLIP preprocessing: 64 decoded 640x480 images -> [64, 3, 224, 224] on the GPU.
  {
    std::mt19937 rng(0);
    std::vector<Image8> images(64, Image8{640, 480, 3, std::vector<uint8_t>(640 * 480 * 3)});
    for (auto& im : images)
      for (auto& p : im.pixels) p = static_cast<uint8_t>(rng() & 255);
    std::vector<const Image8*> batch;
    for (const auto& im : images) batch.push_back(&im);
    ClipPreprocessConfig config;
    const double on_gpu = gpu_time(repeats, [&] { clip_pixels_cuda(batch, config, gpu); });
    const double on_cpu = best_time(quick ? 1 : 3, [&] {
      for (const auto& im : images) clip_pixel_values(im, config);
    });
    const bool exact = clip_pixels_cuda(batch, config, gpu).cpu()[5].equal(clip_pixel_values(images[5], config));
    out["clip_preprocess"] = {{"batch", "64 images 640x480 RGB"}, {"gpu_ms", on_gpu * 1e3}, {"cpu_port_ms", on_cpu * 1e3},
                              {"speedup", on_cpu / on_gpu}, {"bit_exact_sample", exact}};
  }
  // ---- CNN14 (PANNs shape), batch 16 x 10 s.
  {
    Cnn14 cnn(Cnn14Config{});
    cnn->eval();
    cnn->to(gpu);
    const at::Tensor wave = (at::randn({16, 320000}) * 0.1).to(gpu);
    const double t = gpu_time(repeats, [&] { cnn->forward(wave); });
    out["cnn14"] = {{"batch", 16}, {"ms", t * 1e3}, {"clips_per_s", 16.0 / t}};
  }
  // ---- ViT-B/32, batch 64.
  {
    ClipVisionConfig config;
    config.projection_dim = 512;
    ClipVisionTransformer vit(config);
    vit->freeze();
    vit->to(gpu);
    const at::Tensor pixels = at::randn({64, 3, 224, 224}).to(gpu);
    const double t = gpu_time(repeats, [&] { vit->forward(pixels); });
    out["vit_b32"] = {{"batch", 64}, {"ms", t * 1e3}, {"images_per_s", 64.0 / t}};
  }
  // ---- GPT-2 124M: greedy batch 1 and beam 5, 20 tokens after a 26-vector prefix.
  {
    Gpt2Model lm(Gpt2Config{});
    lm->freeze();
    lm->to(gpu);
    Prompt prompt;
    prompt.prefix_embeds = (at::randn({1, 26, 768}) * 0.1).to(gpu);
    DecodingOptions greedy;
    greedy.max_tokens = 20;
    greedy.stop_token_ids = {};
    DecodingOptions beam = greedy;
    beam.beam_size = 5;
    const double g = gpu_time(repeats, [&] { generate(*lm, prompt, greedy); });
    const double b = gpu_time(repeats, [&] { generate(*lm, prompt, beam); });
    out["gpt2_124m"] = {{"greedy_tokens_per_s", 20.0 / g}, {"beam5_tokens_per_s", 20.0 / b}, {"beam5_over_greedy", b / g}};
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
