// fense_bench: FENSE over a corpus with models of the published shapes (random weights):
// prefixcap's FenseScorer against its anchor measured in the same run, aac-metrics' fense()
// (sentence-transformers + transformers on Debian's PyTorch 1.13, same thread count, same BLAS).
// bench/fense_bench.py makes the models (Sentence-BERT of paraphrase-TinyBERT-L6-v2's shape,
// echecker of bert-base-uncased's shape, in fense's checkpoint format) and the corpus, and times
// the anchor; then the same files are scored here. Prints one JSON object.
//
//   build/bench/fense_bench [--items N] [--refs R] [--threads T] [--python PATH]
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "core/json_config.h"
#include "core/threads.h"
#include "lm/fense.h"

using namespace prefixcap;
using Json = nlohmann::json;
namespace fs = std::filesystem;


int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  int items = 100, refs = 5, threads = 2;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-ref/bin/python";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "fense_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--items") items = std::stoi(next());
    else if (a == "--refs") refs = std::stoi(next());
    else if (a == "--threads") threads = std::stoi(next());
    else if (a == "--python") python = next();
    else {
      std::printf("usage: fense_bench [--items N] [--refs R] [--threads T] [--python PATH]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  const ThreadSetup setup = configure_threads({threads, 0});
  const fs::path dir = fs::temp_directory_path() / ("fense_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  Json out = {{"cpu", bench::cpu_model_name()}, {"threads", setup.num_threads}, {"items", items}, {"refs_per_item", refs},
              {"models", "Sentence-BERT hidden 768 x 6 layers (paraphrase-TinyBERT-L6-v2 shape, 128 tokens, mean pooling); "
                         "echecker bert-base-uncased shape (768 x 12 layers, 6 outputs); random weights"}};

  const std::string script = (fs::path(PREFIXCAP_SOURCE_DIR) / "bench" / "fense_bench.py").string();
  const std::string cmd = "OMP_NUM_THREADS=" + std::to_string(setup.num_threads) + " " + python + " " + script +
                          " --dir " + dir.string() + " --items " + std::to_string(items) + " --refs " +
                          std::to_string(refs) + " --threads " + std::to_string(setup.num_threads) + " 2>" +
                          (dir / "python.log").string();
  std::fprintf(stderr, "fense_bench: making the models and timing aac-metrics (a few minutes)\n");
  const std::string text = bench::run_capture(cmd);
  Json anchor;
  try {
    anchor = Json::parse(text);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fense_bench: the anchor failed (%s):\n%s\n", cmd.c_str(), text.c_str());
    return 1;
  }

  const Json corpus = read_json_file((dir / "items.json").string());
  std::vector<std::string> candidates;
  std::vector<std::vector<std::string>> references;
  for (const Json& it : corpus) {
    candidates.push_back(it.at("candidate").get<std::string>());
    references.push_back(it.at("references").get<std::vector<std::string>>());
  }
  const double t0 = bench::now_seconds();
  FenseScorer scorer((dir / "sbert").string(), (dir / "echecker.ckpt").string(), (dir / "echecker-bert").string());
  const double load_s = bench::now_seconds() - t0;
  FenseScores scores;
  const double secs = bench::best_time(2, [&] { scores = scorer.score(candidates, references); });

  out["prefixcap"] = {{"seconds", secs}, {"load_seconds", load_s}, {"fense", scores.corpus_fense},
                      {"sentences_per_s", static_cast<double>(items * (refs + 1)) / secs},
                      {"peak_rss_mb", bench::peak_rss_bytes() / 1e6}};
  out["aac_metrics"] = anchor;
  out["speedup"] = anchor["seconds"].get<double>() / secs;
  out["same_fense"] = std::fabs(anchor["fense"].get<double>() - scores.corpus_fense) < 1e-4;
  std::printf("%s\n", out.dump(2).c_str());
  fs::remove_all(dir);
  return 0;
}
