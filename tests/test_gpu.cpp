// GPU tests (label gpu): the CUDA feature kernels against the CPU on a machine with a GPU, and
// the models on the GPU against the CPU (GPT-2 on the gpt2-tiny fixture). Each test is skipped, saying why, where there is no GPU or
// the build has no CUDA (every CPU-side equality of the kernels' math is in test_audio,
// test_image and the fixture runner, which also compares the GPU when there is one).
#include <gtest/gtest.h>

#include <random>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/types.h>

#include "encoders/cnn14.h"
#include "encoders/feature_cuda.h"
#include "encoders/feature_kernels_cpu.h"
#include "encoders/log_mel.h"
#include "lm/decoding.h"
#include "lm/gpt2.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;

#define REQUIRE_GPU()                                                                                   \
  if (!feature_kernels_compiled()) GTEST_SKIP() << "built without CUDA (LibTorch without CUDA)";        \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device on this machine"

TEST(Gpu, LogMelKernelsEqualTheCpuFrontEnd) {
  REQUIRE_GPU();
  at::manual_seed(1);
  for (const Json& j : {Json::object(), Json{{"sample_rate", 16000}, {"window_size", 512}, {"hop_size", 160}, {"fmax", 8000}},
                        Json{{"top_db", 80.0}, {"ref", 2.0}}}) {
    const LogMelConfig c = LogMelConfig::from_json(j, "config");
    LogMelFrontEnd cpu(c), gpu(c);
    gpu->to(at::kCUDA);
    const at::Tensor wave = at::randn({4, 10 * c.sample_rate + 33}) * 0.1;
    const at::Tensor want = cpu->forward(wave);
    const at::Tensor got = gpu->forward(wave.to(at::kCUDA)).cpu();
    ASSERT_EQ(got.sizes(), want.sizes());
    EXPECT_LT((got - want).abs().max().item<double>(), 1e-3) << j.dump();
    // The torch-ops path on the GPU (what the kernels replace) agrees too.
    EXPECT_LT((gpu->forward_all(wave.to(at::kCUDA)).logmel.cpu() - want).abs().max().item<double>(), 1e-3) << j.dump();
  }
}

TEST(Gpu, ClipPreprocessingKernelsAreBitExact) {
  REQUIRE_GPU();
  std::mt19937 rng(2);
  std::vector<Image8> images;
  for (auto [w, h, c] : {std::tuple{640, 480, 3}, {480, 640, 1}, {1, 1, 3}, {3, 500, 3}, {224, 224, 3}, {1920, 1080, 3}}) {
    Image8 im{w, h, c, std::vector<uint8_t>(static_cast<size_t>(w) * h * c)};
    for (auto& p : im.pixels) p = static_cast<uint8_t>(rng() & 255);
    images.push_back(std::move(im));
  }
  for (const int64_t size : {224, 288}) {
    ClipPreprocessConfig config;
    config.shortest_edge = config.crop_size = size;
    std::vector<const Image8*> batch;
    for (const auto& im : images) batch.push_back(&im);
    const at::Tensor got = clip_pixels_cuda(batch, config, at::Device(at::kCUDA, 0)).cpu();
    for (size_t i = 0; i < images.size(); ++i)
      EXPECT_TRUE(got[static_cast<int64_t>(i)].equal(clip_pixel_values(images[i], config))) << "image " << i << ", size " << size;
  }
}

TEST(Gpu, Cnn14OnTheGpuEqualsTheCpu) {
  REQUIRE_GPU();
  torch::NoGradGuard no_grad;
  at::manual_seed(3);
  Cnn14Config ec;
  ec.channels = {16, 32, 64, 128, 256, 512};
  ec.embedding_dim = 512;
  Cnn14 cnn(ec);
  cnn->eval();
  const at::Tensor wave = at::randn({2, 32000 * 3}) * 0.1;
  const at::Tensor want = cnn->forward(wave).embedding;
  cnn->to(at::kCUDA);  // the log-mel front end now runs the CUDA kernels
  EXPECT_LT((cnn->forward(wave.to(at::kCUDA)).embedding.cpu() - want).abs().max().item<double>(), 1e-3);
}

TEST(Gpu, Gpt2ForwardAndBeamMatchTheCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  Gpt2Model cpu = load_gpt2(fixture_dir("gpt2-tiny"));
  Gpt2Model gpu = load_gpt2(fixture_dir("gpt2-tiny"));
  gpu->to(torch::kCUDA);
  torch::NoGradGuard no_grad;
  at::Tensor prefix = at::randn({2, 5, cpu->config().n_embd});
  Gpt2Input in;
  in.prefix_embeds = prefix;
  in.input_ids = torch::tensor({{1, 2, 3}, {4, 5, 6}}, torch::kLong);
  at::Tensor expected = cpu->forward(in).logits;
  in.prefix_embeds = prefix.cuda();
  in.input_ids = in.input_ids.cuda();
  EXPECT_TRUE(at::allclose(gpu->forward(in).logits.cpu(), expected, 1e-3, 1e-3));
  DecodingOptions o;
  o.beam_size = 3;
  o.max_tokens = 8;
  Prompt p_cpu, p_gpu;
  p_cpu.prefix_embeds = prefix;
  p_gpu.prefix_embeds = prefix.cuda();
  EXPECT_EQ(generate(*cpu, p_cpu, o)[0][0].ids, generate(*gpu, p_gpu, o)[0][0].ids);
}
