// mapper_bench: forward + backward of each mapper at the anchors' sizes (batch 32), next to one
// GPT-2 124M forward on the same batch (prefix + 20 caption tokens), and beside the anchor
// measured in the same run: the upstream mapping networks (ClipCap's MLP and transformer mapper,
// Prefix-AAC's mapping networks) on PyTorch 2.x (bench/mapper_anchor.py through the PyPI wheel in
// .venv-torch; --python PATH to choose another interpreter, --no-anchor to skip). The
// query-guided mapper is prefixcap's own and has no anchor. Prints one JSON object.
//   build/bench/mapper_bench [--threads N] [--python PATH] [--no-anchor]
#include <cstdio>
#include <string>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/threads.h"
#include "lm/gpt2.h"
#include "mapper/mappers.h"

using namespace prefixcap;
using namespace prefixcap::bench;

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  bool anchor = true;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-torch/bin/python";
  if (int rc = parse_anchor_options(argc, argv, "mapper_bench", &threads.num_threads, &python, &anchor); rc >= 0) return rc;
  ThreadSetup setup = configure_threads(threads);
  const int64_t B = 32;
  torch::manual_seed(0);
  nlohmann::json out;
  out["benchmark"] = "mapper_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  out["batch"] = B;

  struct Case {
    const char* name;
    MapperConfig config;
  };
  std::vector<Case> cases;
  MapperConfig mlp;  // ClipCap COCO: CLIP ViT-B/32 512 -> 10 x 768
  mlp.type = "mlp";
  mlp.input_dim = 512;
  mlp.prefix_length = 10;
  cases.push_back({"clipcap_mlp", mlp});
  MapperConfig tr = mlp;  // ClipCap transformer: RN50x4 640 -> 40 x 768, 8 layers
  tr.type = "transformer";
  tr.input_dim = 640;
  tr.prefix_length = 40;
  tr.clip_length = 40;
  tr.num_layers = 8;
  cases.push_back({"clipcap_transformer", tr});
  MapperConfig aac;  // Prefix-AAC: CNN14 2048 x 15 x 2 + 527 classes -> 26 x 768
  aac.type = "prefix_aac";
  aac.input_dim = 2048;
  cases.push_back({"prefix_aac", aac});
  MapperConfig query = mlp;  // query-guided on ViT-B/32 patch tokens (768 x 50), 4 layers
  query.type = "query_guided";
  query.input_dim = 768;
  query.num_layers = 4;
  query.context_dim = 64;
  cases.push_back({"query_guided", query});

  for (auto& c : cases) {
    auto mapper = make_mapper(c.config);
    mapper->train();
    MapperInput in;
    in.embedding = at::randn({B, c.config.input_dim});
    in.tokens = at::randn({B, 50, c.config.input_dim});
    in.conv_block6 = at::rand({B, c.config.input_dim, 15, 2});
    in.clipwise = at::rand({B, 527});
    if (c.config.context_dim) in.context = at::randn({B, c.config.context_dim});
    auto step = [&] {
      mapper->zero_grad();
      mapper->forward(in).square().mean().backward();
    };
    step();
    double t = best_time(3, step);
    int64_t params = 0;
    for (const auto& p : mapper->parameters()) params += p.numel();
    c.config = mapper->config();  // e.g. Prefix-AAC's prefix = temporal + global lengths
    out["mappers"][c.name] = {{"forward_backward_ms", t * 1e3}, {"parameters", params}, {"prefix_length", c.config.prefix_length}};
  }

  Gpt2Config config;  // GPT-2 124M
  Gpt2Model lm(config);
  lm->freeze();
  for (auto& c : cases) {
    torch::NoGradGuard no_grad;
    Gpt2Input x;
    x.prefix_embeds = at::randn({B, c.config.prefix_length, config.n_embd}) * 0.1;
    x.input_ids = at::randint(0, config.vocab_size, {B, 20});
    x.logits = LogitsMode::All;
    lm->forward(x);
    double t = best_time(2, [&] { lm->forward(x); });
    out["mappers"][c.name]["gpt2_124m_forward_ms"] = t * 1e3;
    out["mappers"][c.name]["mapper_over_gpt2_forward"] = out["mappers"][c.name]["forward_backward_ms"].get<double>() / (t * 1e3);
  }
  out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  if (anchor) {
    const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/mapper_anchor.py",
                                                      "--batch " + std::to_string(B) + " --threads " +
                                                          std::to_string(setup.num_threads),
                                                      setup.num_threads);
    out["anchor"] = py;
    out["anchor"]["what"] = "the upstream mapping networks (bench/mapper_anchor.py), PyTorch 2.x, training mode, same threads";
    if (py.contains("mappers"))
      for (const auto& [name, a] : py["mappers"].items()) {
        if (!out["mappers"].contains(name)) continue;
        auto& m = out["mappers"][name];
        // The same network on both sides, or the ratio means nothing.
        m["parameters_equal_anchor"] = m["parameters"] == a["parameters"];
        m["speedup_over_torch"] = a["forward_backward_ms"].get<double>() / m["forward_backward_ms"].get<double>();
      }
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
