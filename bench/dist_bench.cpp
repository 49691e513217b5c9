// dist_bench: data-parallel training on this machine, through caption-train itself.
// The Prefix-AAC training step at full size (GPT-2 124M shape frozen, the Prefix-AAC mapper on
// 2048-channel CNN14 features from the feature cache, 20-token captions), run as
//   (a) one process, 2 threads, batch 8               (the anchor)
//   (b) --nproc 2, 1 thread each, batch 4 per rank    (the same global batch of 8), all-reduce
//       started during backward (dist_overlap, the default)
//   (c) as (b) with the all-reduce after backward     (the overlap gain is (b) / (c))
//   (d) --nproc 2, batch 8 per rank                   (global batch 16)
// The four run in turn, --repeats rounds (default 2), each case keeping its best round. Each
// prints samples/s and steps/s over the steps after the first, the gradient bytes one
// step all-reduces (train_log's grad_bytes_per_step, in grad_buckets buckets) and the bytes
// this rank handed to collectives per step (comm_bytes_per_step: also the token counts, the loss
// and BatchNorm's running statistics). Options: --steps N (default 12), --lm-layers L (default 12),
// --clips N (default 64), --train BIN (default the caption-train next to this build).
// Prints one JSON object.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "core/json_config.h"
#include "core/safetensors.h"
#include "core/threads.h"
#include "core/weights.h"
#include "encoders/cnn14.h"
#include "lm/gpt2.h"

using namespace prefixcap;
using namespace prefixcap::bench;
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

// A 16-bit mono WAV of `seconds` at 32 kHz: a tone and noise that differ by seed.
void write_wav(const std::string& path, double seconds, uint32_t seed) {
  const int rate = 32000, n = static_cast<int>(seconds * rate);
  std::string data(static_cast<size_t>(n) * 2, '\0');
  uint32_t state = seed;
  for (int i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    const double v = 0.3 * std::sin(2 * M_PI * (200 + 37 * (seed % 11)) * i / rate) + ((state >> 8) / 16777216.0 - 0.5) * 0.1;
    const int16_t s = static_cast<int16_t>(std::lround(v * 32767));
    data[2 * i] = static_cast<char>(s & 0xff);
    data[2 * i + 1] = static_cast<char>((s >> 8) & 0xff);
  }
  auto u32 = [](uint32_t v) { return std::string{char(v), char(v >> 8), char(v >> 16), char(v >> 24)}; };
  auto u16 = [](uint16_t v) { return std::string{char(v), char(v >> 8)}; };
  std::ofstream(path, std::ios::binary) << "RIFF" << u32(36 + data.size()) << "WAVEfmt " << u32(16) << u16(1) << u16(1) << u32(rate)
                                        << u32(rate * 2) << u16(2) << u16(16) << "data" << u32(data.size()) << data;
}

struct RunFigures {
  double samples_per_s = 0, steps_per_s = 0, comm_bytes_per_step = 0, grad_bytes_per_step = 0, grad_buckets = 0;
  double last_loss = 0;
};

RunFigures figures_of(const std::string& log, int64_t global_batch) {
  std::ifstream in(log);
  std::string line;
  std::vector<Json> steps;
  while (std::getline(in, line)) {
    Json j = Json::parse(line);
    if (j["type"] == "train") steps.push_back(j);
  }
  if (steps.size() < 3) throw std::runtime_error(log + ": fewer than 3 steps logged");
  RunFigures f;
  const double span = steps.back()["elapsed_s"].get<double>() - steps.front()["elapsed_s"].get<double>();
  const double n = static_cast<double>(steps.size() - 1);
  f.steps_per_s = n / span;
  f.samples_per_s = n * static_cast<double>(global_batch) / span;
  f.comm_bytes_per_step = steps.back().value("comm_bytes_per_step", 0.0);
  f.grad_bytes_per_step = steps.back().value("grad_bytes_per_step", 0.0);
  f.grad_buckets = steps.back().value("grad_buckets", 0.0);
  f.last_loss = steps.back()["loss"].get<double>();
  return f;
}

int run(int argc, char** argv) {
  int64_t steps = 12, lm_layers = 12, clips = 64, repeats = 2;
  std::string train_bin = (fs::path(argv[0]).parent_path().parent_path() / "apps" / "caption-train").string();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps") steps = std::stoll(value());
    else if (a == "--lm-layers") lm_layers = std::stoll(value());
    else if (a == "--clips") clips = std::stoll(value());
    else if (a == "--repeats") repeats = std::stoll(value());
    else if (a == "--train") train_bin = value();
    else if (a == "--help") {
      std::printf("usage: dist_bench [--steps N] [--lm-layers L] [--clips N] [--repeats R] [--train BIN]\n");
      return 0;
    } else {
      std::fprintf(stderr, "dist_bench: unknown option %s\n", a.c_str());
      return 1;
    }
  }
  if (!fs::exists(train_bin)) throw std::runtime_error(train_bin + " not found (pass --train)");
  configure_threads({1, 0});
  const fs::path tmp = fs::temp_directory_path() / ("prefixcap-dist-bench-" + std::to_string(::getpid()));
  fs::create_directories(tmp);

  // Models: GPT-2 124M shape (random), the fixture tokenizer; a CNN14 whose last block has the
  // real 2048 channels (earlier blocks narrow: the encoder runs once, for the cache).
  torch::manual_seed(0);
  Gpt2Config gc;
  gc.n_layer = lm_layers;
  Gpt2Model lm(gc);
  lm->init_weights();
  fs::create_directories(tmp / "lm");
  write_json_file((tmp / "lm" / "config.json").string(), gc.to_json());
  save_safetensors((tmp / "lm" / "model.safetensors").string(), lm->hf_state_dict(), {{"format", "pt"}});
  const fs::path fixtures = fs::path(PREFIXCAP_SOURCE_DIR) / ".." / "shared" / "fixtures" / "gpt2-tiny";
  for (const char* f : {"vocab.json", "merges.txt"}) fs::copy_file(fixtures / f, tmp / "lm" / f);
  Cnn14Config ec;
  ec.channels = {16, 32, 64, 128, 256, 2048};
  ec.embedding_dim = 2048;
  ec.clip_seconds = 10;
  Cnn14 enc(ec);
  fs::create_directories(tmp / "enc");
  std::ofstream(tmp / "enc" / "config.json") << ec.to_json().dump();
  save_safetensors((tmp / "enc" / "model.safetensors").string(), module_tensors(*enc, "", "front_end."));
  const char* words[] = {"a", "dog", "barks", "while", "rain", "falls", "on", "the", "roof", "and", "cars", "pass", "by"};
  std::string manifest;
  for (int64_t i = 0; i < clips; ++i) {
    const std::string p = (tmp / ("clip" + std::to_string(i) + ".wav")).string();
    write_wav(p, 10.0, static_cast<uint32_t>(i + 1));
    std::string caption;
    for (int w = 0; w < 14 + i % 6; ++w) caption += std::string(w ? " " : "") + words[(i * 7 + w * 3) % 13];
    manifest += "{\"media\": \"" + p + "\", \"captions\": [\"" + caption + "\"]}\n";
  }
  std::ofstream(tmp / "train.jsonl") << manifest;
  Json base = {{"encoder", (tmp / "enc").string()},
               {"lm", (tmp / "lm").string()},
               {"mapper", {{"type", "prefix_aac"}}},
               {"train_split", (tmp / "train.jsonl").string()},
               {"cache_dir", (tmp / "cache").string()},
               {"max_caption_tokens", 20},
               {"max_steps", steps},
               {"epochs", 100},
               {"log_every", 1},
               {"progress", false},
               {"workers", 1}};
  auto config = [&](const std::string& name, int64_t batch, int64_t threads, bool overlap) {
    Json c = base;
    c["batch_size"] = batch;
    c["num_threads"] = threads;
    c["dist_overlap"] = overlap;
    c["out"] = (tmp / name).string();
    const std::string path = (tmp / (name + ".json")).string();
    write_json_file(path, c);
    return path;
  };
  auto shell = [&](const std::string& cmd) {
    const std::string full = cmd + " 2>" + (tmp / "err.txt").string();
    if (std::system(full.c_str()) != 0) {
      std::ifstream err(tmp / "err.txt");
      throw std::runtime_error(cmd + " failed:\n" + std::string(std::istreambuf_iterator<char>(err), {}));
    }
  };
  shell(train_bin + " --config " + config("cache", 8, 2, true) + " --build-cache");

  // The cases run in turn, `repeats` rounds; each keeps its best round (this machine is shared:
  // a neighbour's load lowers a round, never raises it).
  struct Case {
    const char* name;
    int nproc;
    int64_t batch, threads;
    bool overlap;
  };
  const std::vector<Case> cases = {Case{"1 process, batch 8, 2 threads", 1, 8, 2, true}, Case{"2 ranks x batch 4, overlap", 2, 4, 1, true},
                                   Case{"2 ranks x batch 4, all-reduce after backward", 2, 4, 1, false},
                                   Case{"2 ranks x batch 8, overlap", 2, 8, 1, true}};
  std::map<std::string, RunFigures> got;
  std::map<std::string, std::vector<double>> rounds;
  int serial = 0;
  for (int64_t round = 0; round < repeats; ++round)
    for (const Case& k : cases) {
      const std::string name = "run" + std::to_string(serial++);
      const std::string cfg = config(name, k.batch, k.threads, k.overlap);
      shell(train_bin + " --config " + cfg + (k.nproc > 1 ? " --nproc " + std::to_string(k.nproc) : ""));
      RunFigures f = figures_of((tmp / name / "train_log.jsonl").string(), k.batch * k.nproc);
      rounds[k.name].push_back(f.samples_per_s);
      if (!got.count(k.name) || f.samples_per_s > got[k.name].samples_per_s) got[k.name] = f;
    }
  Json runs = Json::array();
  for (const Case& k : cases) {
    const RunFigures& f = got[k.name];
    runs.push_back({{"run", k.name}, {"samples_per_s", f.samples_per_s}, {"samples_per_s_rounds", rounds[k.name]},
                    {"steps_per_s", f.steps_per_s}, {"comm_bytes_per_step", f.comm_bytes_per_step},
                    {"grad_bytes_per_step", f.grad_bytes_per_step}, {"grad_buckets", f.grad_buckets}, {"last_loss", f.last_loss}});
  }
  const auto& one = got["1 process, batch 8, 2 threads"];
  const auto& overlap = got["2 ranks x batch 4, overlap"];
  const auto& after = got["2 ranks x batch 4, all-reduce after backward"];
  const auto& wide = got["2 ranks x batch 8, overlap"];
  Json out = {{"benchmark", "dist_bench"},
              {"cpu", cpu_model_name()},
              {"cores", std::thread::hardware_concurrency()},
              {"model", "prefix_aac mapper + GPT-2 shape (" + std::to_string(lm_layers) + " layers, frozen), cached CNN14 features"},
              {"steps_measured", steps - 1},
              {"rounds", repeats},
              {"runs", runs},
              {"ratios",
               {{"2 ranks vs 1 process, same global batch (samples/s)", overlap.samples_per_s / one.samples_per_s},
                {"2 ranks x 8 vs 1 process x 8 (samples/s)", wide.samples_per_s / one.samples_per_s},
                {"overlap gain: during vs after backward (steps/s)", overlap.steps_per_s / after.steps_per_s}}}};
  std::error_code rm_error;
  fs::remove_all(tmp, rm_error);
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dist_bench: %s\n", e.what());
    return 1;
  }
}
