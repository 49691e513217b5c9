// GPU checks: skipped at run time where LibTorch has no CUDA device (CI, this machine).
#include <gtest/gtest.h>

#include <torch/cuda.h>
#include <torch/types.h>

#include "lm/decoding.h"
#include "lm/gpt2.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;

TEST(Gpu, Gpt2ForwardAndBeamMatchTheCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
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
