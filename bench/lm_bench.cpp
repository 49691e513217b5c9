// lm_bench: GPT-2 124M shape (random weights made in memory) decoding speed, memory and
// accuracy per weight type (--lm-dtype float32 / bfloat16 / int8 / int8-dynamic), beside the anchor measured
// in the same run: Hugging Face `generate` with its KV cache (bench/lm_bench.py, PyTorch from
// the PyPI wheel in .venv-torch; --python PATH to choose another interpreter, --no-anchor to skip).
//
// Figures per dtype: batch-1 greedy tokens/s and its fraction of the bandwidth floor (measured
// read bandwidth / weight bytes a step reads), a beam-5 step over a greedy step, batch-16 greedy,
// the same steps with the fused decode step turned off (Gpt2ModelImpl::set_fused_decoding), and
// against float32 on the same weights: the first step's largest logit error (in units of
// the logits' standard deviation) and the agreement of greedy captions from 8 random prefixes.
//   build/bench/lm_bench [--threads N] [--tokens N] [--dtypes float32,bfloat16,int8,int8-dynamic]
//                        [--isa generic|avx512] [--config config.json] [--python PATH] [--no-anchor]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

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
    for (int i = 0; i < steps; ++i) {
      Gpt2Input step;
      step.input_ids = next.unsqueeze(1);
      step.cache = &cache;
      step.logits = LogitsMode::Last;
      next = lm.forward(step).logits.argmax(-1);
    }
  });
}

std::vector<std::vector<int64_t>> greedy_ids(Gpt2ModelImpl& lm, const at::Tensor& prefixes, int tokens) {
  DecodingOptions greedy;
  greedy.max_tokens = tokens;
  greedy.stop_token_ids = {};
  Prompt prompt;
  prompt.prefix_embeds = prefixes;
  std::vector<std::vector<int64_t>> out;
  for (auto& list : generate(lm, prompt, greedy)) out.push_back(list.at(0).ids);
  return out;
}

// The weight products of one batch-1 step alone (every block's four matrices and the head), to
// tell the kernels' speed from the rest of a step.
double time_matmuls_only(Gpt2ModelImpl& lm, int repeats) {
  torch::NoGradGuard no_grad;
  const int64_t C = lm.config().n_embd;
  const at::Tensor x = at::randn({1, C}), wide = at::randn({1, lm.config().mlp_width()});
  return best_time(repeats, [&] {
    for (int64_t i = 0; i < lm.config().n_layer; ++i) {
      auto* block = lm.h[i]->as<Gpt2BlockImpl>();
      block->attn->c_attn(x);
      block->attn->c_proj(x);
      block->mlp->c_fc(x);
      block->mlp->c_proj(wide);
    }
    lm.head(x);
  });
}

at::Tensor first_logits(Gpt2ModelImpl& lm, const at::Tensor& prefix) {
  torch::NoGradGuard no_grad;
  Gpt2Input in;
  in.prefix_embeds = prefix;
  in.logits = LogitsMode::Last;
  return lm.forward(in).logits;
}

}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  int tokens = 48;
  std::string config_path, dtypes_arg = "float32,bfloat16,int8,int8-dynamic", isa_arg;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-torch/bin/python";
  bool anchor = true;
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
    else if (a == "--dtypes") dtypes_arg = next();
    else if (a == "--isa") isa_arg = next();
    else if (a == "--python") python = next();
    else if (a == "--no-anchor") anchor = false;
    else {
      std::fprintf(stderr,
                   "usage: lm_bench [--threads N] [--blas-threads N] [--tokens N] [--dtypes float32,bfloat16,int8,int8-dynamic]\n"
                   "                [--isa generic|avx512] [--config config.json] [--python PATH] [--no-anchor]\n");
      return a == "--help" ? 0 : 1;
    }
  }
  if (tokens < 2) {
    std::fprintf(stderr, "lm_bench: --tokens must be at least 2\n");
    return 1;
  }
  std::vector<WeightDtype> dtypes;
  try {
    std::stringstream list(dtypes_arg);
    for (std::string name; std::getline(list, name, ',');) dtypes.push_back(parse_weight_dtype(name));
    if (isa_arg == "generic") force_skinny_isa(SkinnyIsa::Generic);
    else if (isa_arg == "avx512") force_skinny_isa(SkinnyIsa::Avx512);
    else if (!isa_arg.empty()) throw std::invalid_argument("--isa: generic or avx512, not '" + isa_arg + "'");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lm_bench: %s\n", e.what());
    return 1;
  }
  ThreadSetup setup = configure_threads(threads);
  const double baseline_rss = current_rss_bytes();  // LibTorch and friends, before any model

  // Bandwidth first, while the process is small, and again before each dtype: the best of these
  // (other tenants' load lowers single readings on a shared machine; a low reading would flatter
  // every fraction of the floor).
  double bandwidth = measure_read_bandwidth(setup.num_threads, size_t(256) << 20);

  Gpt2Config config;  // defaults = GPT-2 124M
  if (!config_path.empty()) config = Gpt2Config::from_file(config_path);
  torch::NoGradGuard no_grad;
  const int64_t P = 26;
  torch::manual_seed(1);
  const at::Tensor prefix1 = at::randn({1, P, config.n_embd}) * 0.1;
  const at::Tensor prefix16 = at::randn({16, P, config.n_embd}) * 0.1;
  const at::Tensor prefix8 = at::randn({8, P, config.n_embd}) * 0.1;  // accuracy
  const int agreement_tokens = 24;

  nlohmann::json out;
  out["benchmark"] = "lm_bench";
  out["cpu"] = cpu_model_name();
  out["model"] = {{"n_layer", config.n_layer}, {"n_embd", config.n_embd}, {"vocab_size", config.vocab_size}};
  out["threads"] = {{"torch", setup.num_threads}, {"blas", setup.blas_threads},
                    {"blas_build", setup.blas_mode == 2 ? "openmp" : setup.blas_mode == 1 ? "pthreads" : "other"}};
  out["kernels"] = skinny_isa_name(skinny_isa());
  out["int8_dynamic_kernel"] = skinny_isa() != SkinnyIsa::Avx512 || !cpu_has_avx512vnni() ? "generic"
                               : int8_gemm_isa() == Int8GemmIsa::Amx ? "avx512-vnni (amx from 16 rows)"
                                                                     : "avx512-vnni";
  out["prefix_length"] = P;
  out["tokens"] = tokens;

  std::vector<std::vector<int64_t>> reference_ids;  // float32's greedy captions
  at::Tensor reference_logits;
  std::vector<std::vector<int64_t>> reference_beams;  // float32's beam-5 best captions
  auto beam_ids = [&](Gpt2ModelImpl& lm) {
    DecodingOptions beam5;
    beam5.beam_size = 5;
    beam5.max_tokens = agreement_tokens;
    beam5.stop_token_ids = {};
    std::vector<std::vector<int64_t>> out;
    for (int64_t i = 0; i < prefix8.size(0); ++i) {
      Prompt one;
      one.prefix_embeds = prefix8.narrow(0, i, 1);
      out.push_back(generate(lm, one, beam5)[0].at(0).ids);
    }
    return out;
  };
  std::vector<nlohmann::json> per_dtype;
  for (WeightDtype dtype : dtypes) {
    bandwidth = std::max(bandwidth, measure_read_bandwidth(setup.num_threads, size_t(256) << 20));
    torch::manual_seed(0);  // the same weights for every dtype
    Gpt2Model lm(config);
    lm->freeze();
    if (reference_ids.empty() && dtype != WeightDtype::Float32) {  // float32 not asked for: still the reference
      reference_ids = greedy_ids(*lm, prefix8, agreement_tokens);
      reference_logits = first_logits(*lm, prefix8);
      reference_beams = beam_ids(*lm);
    }
    lm->pack_weights(dtype);
    const double rss_model = current_rss_bytes();
    const double step_bytes = lm->decode_weight_bytes();

    time_steps(*lm, prefix1, 4, 1);  // warm-up
    const double base1 = time_steps(*lm, prefix1, 0, 3);
    // Fused and unfused (every operation through LibTorch: set_fused_decoding(false)) steps
    // alternate, best of three each, so that this VM's drifting speed does not favour either.
    double greedy_step = 1e30, greedy_step_unfused = 1e30;
    for (int round = 0; round < 3; ++round) {
      lm->set_fused_decoding(true);
      greedy_step = std::min(greedy_step, (time_steps(*lm, prefix1, tokens, 1) - base1) / tokens);
      lm->set_fused_decoding(false);
      greedy_step_unfused = std::min(greedy_step_unfused, (time_steps(*lm, prefix1, tokens, 1) - base1) / tokens);
    }
    lm->set_fused_decoding(true);
    time_matmuls_only(*lm, 2);
    const double matmuls = time_matmuls_only(*lm, 10);
    const double base16 = time_steps(*lm, prefix16, 0, 2);
    const double step16 = (time_steps(*lm, prefix16, tokens, 2) - base16) / tokens;

    // Beam 5 through the public decoder, no stop token, fixed length.
    DecodingOptions beam;
    beam.beam_size = 5;
    beam.max_tokens = tokens;
    beam.stop_token_ids = {};
    Prompt prompt;
    prompt.prefix_embeds = prefix1;
    DecodingOptions one = beam;
    one.max_tokens = 1;
    const double beam_prompt = best_time(2, [&] { generate(*lm, prompt, one); });
    double beam_step = 1e30, beam_step_unfused = 1e30;
    for (int round = 0; round < 2; ++round) {
      lm->set_fused_decoding(true);
      beam_step = std::min(beam_step, (best_time(1, [&] { generate(*lm, prompt, beam); }) - beam_prompt) / (tokens - 1));
      lm->set_fused_decoding(false);
      beam_step_unfused =
          std::min(beam_step_unfused, (best_time(1, [&] { generate(*lm, prompt, beam); }) - beam_prompt) / (tokens - 1));
    }
    lm->set_fused_decoding(true);

    nlohmann::json d;
    d["weight_MB_read_per_step"] = step_bytes / 1e6;
    d["greedy_b1_tokens_per_s"] = 1.0 / greedy_step;
    d["greedy_b1_step_ms"] = greedy_step * 1e3;
    d["weight_products_only_ms"] = matmuls * 1e3;
    d["beam5_step_ms"] = beam_step * 1e3;
    d["beam5_step_over_greedy_step"] = beam_step / greedy_step;
    d["unfused_greedy_b1_step_ms"] = greedy_step_unfused * 1e3;
    d["unfused_beam5_step_ms"] = beam_step_unfused * 1e3;
    d["fused_step_speedup_greedy_b1"] = greedy_step_unfused / greedy_step;
    d["fused_step_speedup_beam5"] = beam_step_unfused / beam_step;
    d["greedy_b16_tokens_per_s"] = 16.0 / step16;
    d["rss_with_model_MB"] = rss_model / 1e6;

    // Accuracy against float32 on the same weights.
    const auto ids = greedy_ids(*lm, prefix8, agreement_tokens);
    const at::Tensor logits = first_logits(*lm, prefix8);
    const auto beams = beam_ids(*lm);
    if (reference_ids.empty()) {
      reference_ids = ids;
      reference_logits = logits;
      reference_beams = beams;
    }
    int beams_identical = 0;
    for (size_t i = 0; i < beams.size(); ++i) beams_identical += beams[i] == reference_beams[i];
    int identical = 0;
    double agreed_before_divergence = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      size_t same = 0;
      while (same < ids[i].size() && same < reference_ids[i].size() && ids[i][same] == reference_ids[i][same]) ++same;
      identical += same == ids[i].size() && ids[i].size() == reference_ids[i].size();
      agreed_before_divergence += double(same) / double(reference_ids[i].size());
    }
    d["vs_float32"] = {
        {"first_step_logits_max_abs_error_over_std",
         (logits - reference_logits).abs().max().item<double>() / reference_logits.std().item<double>()},
        {"first_step_argmax_equal", logits.argmax(-1).equal(reference_logits.argmax(-1))},
        {"greedy_captions_identical", std::to_string(identical) + " of " + std::to_string(ids.size())},
        {"greedy_tokens_before_first_divergence_fraction", agreed_before_divergence / double(ids.size())},
        {"beam5_best_captions_identical", std::to_string(beams_identical) + " of " + std::to_string(beams.size())},
        {"caption_tokens", agreement_tokens}};
    d["name"] = weight_dtype_name(dtype);
    per_dtype.push_back(d);
    std::fprintf(stderr, "lm_bench: %s %.1f tokens/s, beam-5 step %.2fx greedy\n", weight_dtype_name(dtype),
                 1.0 / greedy_step, beam_step / greedy_step);
  }
  // Fractions of the floor with the fastest read of memory seen in the run: the plain sum above,
  // or the float32 weight products (494 MB, far beyond the caches), which read faster than it.
  out["memory_read_bandwidth_sum_GBps"] = bandwidth / 1e9;
  for (const auto& d : per_dtype)
    if (d["name"] == "float32")
      bandwidth = std::max(bandwidth, d["weight_MB_read_per_step"].get<double>() * 1e6 /
                                          (d["weight_products_only_ms"].get<double>() / 1e3));
  out["memory_read_bandwidth_GBps"] = bandwidth / 1e9;
  for (auto& d : per_dtype) {
    const double step_bytes = d["weight_MB_read_per_step"].get<double>() * 1e6;
    d["floor_tokens_per_s"] = bandwidth / step_bytes;
    d["greedy_b1_fraction_of_floor"] = d["greedy_b1_tokens_per_s"].get<double>() / (bandwidth / step_bytes);
    d["weight_products_fraction_of_floor"] = (step_bytes / bandwidth) / (d["weight_products_only_ms"].get<double>() / 1e3);
    const std::string name = d["name"];
    d.erase("name");
    out["dtypes"][name] = d;
  }
  out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  out["baseline_rss_MB"] = baseline_rss / 1e6;

  if (anchor) {
    const auto hf = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/lm_bench.py",
                                                      "--threads " + std::to_string(setup.num_threads) + " --tokens " +
                                                          std::to_string(tokens),
                                                      setup.num_threads);
    out["anchor"] = hf;
    if (!hf.contains("error")) {
      out["anchor"]["what"] = "Hugging Face generate with KV cache (bench/lm_bench.py), same shape, same threads";
      try {
        nlohmann::json ratios;
        for (auto& [name, d] : out["dtypes"].items()) {
          const std::string same = hf.contains(name) ? name : "float32";  // int8: against float32
          ratios[name + "_greedy_over_hf_" + same] =
              d["greedy_b1_tokens_per_s"].get<double>() / hf.at(same).at("greedy_tokens_per_s").get<double>();
          ratios[name + "_beam5_step_speedup_over_hf_" + same] =
              hf.at(same).at("beam5_step_ms").get<double>() / d["beam5_step_ms"].get<double>();
        }
        out["ratios"] = ratios;
      } catch (const std::exception& e) {
        out["anchor"]["error"] = std::string("unexpected anchor output: ") + e.what();
      }
    }
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
