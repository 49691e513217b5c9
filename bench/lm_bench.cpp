// lm_bench: GPT-2 124M shape (random weights made in memory) decoding speed and memory.
// Prints one JSON object. Options: --threads N, --blas-threads N, --tokens N, --config PATH
// (a Hugging Face config.json to use instead of the 124M shape).
#include <cstdio>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/threads.h"
#include "lm/decoding.h"
#include "lm/gpt2.h"

using namespace prefixcap;
using namespace prefixcap::bench;

namespace {

// Decode steps only: the prompt runs once outside the timed region.
double time_steps(Gpt2ModelImpl& lm, const at::Tensor& prefix, int steps, int repeats) {
  torch::NoGradGuard no_grad;
  return best_time(repeats, [&] {
    KvCache cache;
    Gpt2Input first;
    first.prefix_embeds = prefix;
    first.cache = &cache;
    first.logits = LogitsMode::Last;
    at::Tensor next = lm.forward(first).logits.argmax(-1);
    double t0 = now_seconds();
    for (int i = 0; i < steps; ++i) {
      Gpt2Input step;
      step.input_ids = next.unsqueeze(1);
      step.cache = &cache;
      step.logits = LogitsMode::Last;
      next = lm.forward(step).logits.argmax(-1);
    }
    (void)t0;
  });
}

}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  int tokens = 48;
  std::string config_path;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "lm_bench: %s needs a value\n", a.c_str());
        std::exit(1);
      }
      return argv[++i];
    };
    if (a == "--threads") threads.num_threads = std::stoi(next());
    else if (a == "--blas-threads") threads.blas_threads = std::stoi(next());
    else if (a == "--tokens") tokens = std::stoi(next());
    else if (a == "--config") config_path = next();
    else {
      std::fprintf(stderr, "usage: lm_bench [--threads N] [--blas-threads N] [--tokens N] [--config config.json]\n");
      return a == "--help" ? 0 : 1;
    }
  }
  ThreadSetup setup = configure_threads(threads);
  const double baseline_rss = current_rss_bytes();  // LibTorch and friends, before any model

  // Bandwidth first, while the process is small.
  const double bandwidth = measure_read_bandwidth(setup.num_threads, size_t(256) << 20);

  Gpt2Config config;  // defaults = GPT-2 124M
  if (!config_path.empty()) config = Gpt2Config::from_file(config_path);
  torch::manual_seed(0);
  Gpt2Model lm(config);
  lm->freeze();
  const double rss_after_model = current_rss_bytes();
  double weight_bytes = 0;
  for (const auto& p : lm->parameters()) weight_bytes += p.numel() * p.element_size();
  // Bytes a decode step must read: everything but the unused rows of wpe.
  const double step_bytes = weight_bytes - (config.n_positions - 1) * config.n_embd * 4.0;
  const double floor_tokens_per_s = bandwidth / step_bytes;

  torch::NoGradGuard no_grad;
  const int64_t P = 26;
  at::Tensor prefix1 = at::randn({1, P, config.n_embd}) * 0.1;
  at::Tensor prefix16 = at::randn({16, P, config.n_embd}) * 0.1;

  // (a) greedy batch 1 and (c) batch 16: decode steps after the prefix.
  time_steps(*lm, prefix1, 4, 1);  // warm-up
  double base1 = time_steps(*lm, prefix1, 0, 3);
  double run1 = time_steps(*lm, prefix1, tokens, 3);
  double greedy_step = (run1 - base1) / tokens;
  double base16 = time_steps(*lm, prefix16, 0, 2);
  double run16 = time_steps(*lm, prefix16, tokens, 2);
  double step16 = (run16 - base16) / tokens;

  // (b) beam 5 through the public decoder, no stop token, fixed length.
  DecodingOptions beam;
  beam.beam_size = 5;
  beam.max_tokens = tokens;
  beam.stop_token_ids = {};
  Prompt prompt;
  prompt.prefix_embeds = prefix1;
  DecodingOptions one = beam;
  one.max_tokens = 1;
  double beam_prompt = best_time(2, [&] { generate(*lm, prompt, one); });
  double beam_total = best_time(2, [&] { generate(*lm, prompt, beam); });
  double beam_step = (beam_total - beam_prompt) / (tokens - 1);

  // End to end through generate(): greedy, 20 tokens, prompt included.
  DecodingOptions greedy;
  greedy.max_tokens = 20;
  greedy.stop_token_ids = {};
  double e2e = best_time(2, [&] { generate(*lm, prompt, greedy); });

  nlohmann::json out;
  out["benchmark"] = "lm_bench";
  out["model"] = {{"n_layer", config.n_layer}, {"n_embd", config.n_embd}, {"vocab_size", config.vocab_size},
                  {"parameters", weight_bytes / 4}};
  out["threads"] = {{"torch", setup.num_threads}, {"blas", setup.blas_threads},
                    {"blas_build", setup.blas_mode == 2 ? "openmp" : setup.blas_mode == 1 ? "pthreads" : "other"}};
  out["prefix_length"] = P;
  out["memory_read_bandwidth_GBps"] = bandwidth / 1e9;
  out["weight_bytes_per_step_MB"] = step_bytes / 1e6;
  out["floor_tokens_per_s"] = floor_tokens_per_s;
  out["a_greedy_b1_tokens_per_s"] = 1.0 / greedy_step;
  out["a_fraction_of_floor"] = (1.0 / greedy_step) / floor_tokens_per_s;
  out["b_beam5_step_ms"] = beam_step * 1e3;
  out["b_beam5_step_over_greedy_step"] = beam_step / greedy_step;
  out["c_greedy_b16_tokens_per_s"] = 16.0 / step16;
  out["c_greedy_b16_step_ms"] = step16 * 1e3;
  out["greedy_20_tokens_end_to_end_ms"] = e2e * 1e3;
  out["d_peak_rss_MB"] = peak_rss_bytes() / 1e6;
  out["d_peak_rss_over_weight_bytes"] = peak_rss_bytes() / weight_bytes;
  out["d_baseline_rss_MB"] = baseline_rss / 1e6;
  out["d_rss_after_model_MB"] = rss_after_model / 1e6;
  out["d_peak_rss_above_baseline_over_weight_bytes"] = (peak_rss_bytes() - baseline_rss) / weight_bytes;
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
