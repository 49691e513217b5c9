// caption_bench: files/s captioning 200 short clips with a small bundle (the prefix-aac-tiny
// fixture imported here, or --model BUNDLE), batched vs one by one, and the time of the
// evaluation metrics on 10,000 items. Prints one JSON object.
#include <sndfile.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_bundle.h"
#include "bench/bench_util.h"
#include "core/threads.h"
#include "metrics/evaluate.h"
#include "pipeline/audio_decode.h"

using namespace prefixcap;
using namespace prefixcap::bench;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-ref/bin/python";
  bool anchor = true;
  std::string model, fixtures = std::string(PREFIXCAP_SOURCE_DIR) + "/../shared/fixtures";
  int clips = 200, batch = 16;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) model = argv[++i];
    else if (a == "--fixtures" && i + 1 < argc) fixtures = argv[++i];
    else if (a == "--clips" && i + 1 < argc) clips = std::stoi(argv[++i]);
    else if (a == "--python" && i + 1 < argc) python = argv[++i];
    else if (a == "--no-anchor") anchor = false;
    else {
      std::fprintf(stderr, "usage: caption_bench [--model BUNDLE | --fixtures DIR] [--clips N] [--python PATH] [--no-anchor]\n");
      return a == "--help" ? 0 : 1;
    }
  }
  ThreadSetup setup = configure_threads();
  const fs::path dir = fs::temp_directory_path() / ("prefixcap-caption-bench-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  nlohmann::json out;
  out["benchmark"] = "caption_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  try {
    if (model.empty()) {
      model = import_fixture_aac_bundle(fixtures, (dir / "bundle").string());
      out["bundle"] = "prefix-aac-tiny (imported)";
    } else {
      out["bundle"] = model;
    }
    Captioner captioner = Captioner::load(model);
    const int rate = captioner.sample_rate();
    if (rate <= 0) throw std::runtime_error("caption_bench needs an audio bundle");
    // 2 s clips of 44.1 kHz stereo FLAC: decoding and resampling are part of the work.
    std::vector<std::string> paths;
    std::mt19937 rng(7);
    std::normal_distribution<float> noise(0.0f, 0.1f);
    for (int c = 0; c < clips; ++c) {
      SF_INFO info{};
      info.samplerate = 44100;
      info.channels = 2;
      info.format = SF_FORMAT_FLAC | SF_FORMAT_PCM_16;
      std::string p = (dir / ("clip" + std::to_string(c) + ".flac")).string();
      SNDFILE* f = sf_open(p.c_str(), SFM_WRITE, &info);
      std::vector<float> s(2 * 88200);
      for (size_t i = 0; i < s.size(); ++i) s[i] = noise(rng) * std::sin(i * (0.001 + 0.0001 * c));
      sf_writef_float(f, s.data(), 88200);
      sf_close(f);
      paths.push_back(p);
    }
    DecodingOptions options = captioner.default_decoding();
    double t0 = now_seconds();
    for (size_t i = 0; i < paths.size(); i += batch) {
      std::vector<std::string> part(paths.begin() + i, paths.begin() + std::min(paths.size(), i + batch));
      captioner.caption_files(part, options);
    }
    double batched = now_seconds() - t0;
    t0 = now_seconds();
    for (const auto& p : paths) captioner.caption_files({p}, options);
    double single = now_seconds() - t0;
    out["clips"] = clips;
    out["files_per_s_batched"] = clips / batched;
    out["files_per_s_one_by_one"] = clips / single;
    out["batched_speedup_over_one_by_one"] = single / batched;  // the anchor: the same files, one call each
    out["batch_size"] = batch;
    // Decoding alone, to show how much of a file's time is pipeline overhead.
    t0 = now_seconds();
    for (const auto& p : paths) decode_audio(p, {rate});
    out["decode_resample_ms_per_file"] = (now_seconds() - t0) * 1e3 / clips;
  } catch (const std::exception& e) {
    out["captioning_error"] = e.what();
  }
  // Metrics on 10,000 items of 5 references (the size of a large evaluation split).
  {
    std::mt19937 rng(11);
    const std::vector<std::string> words = {"a", "dog", "barks", "while", "cars", "pass", "by", "rain", "falls", "on",
                                            "the", "roof", "birds", "chirp", "in", "distance", "man", "speaks", "loudly", "water"};
    auto sentence = [&] {
      std::string s;
      int n = 6 + rng() % 8;
      for (int i = 0; i < n; ++i) s += (i ? " " : "") + words[rng() % words.size()];
      return s;
    };
    std::vector<CaptionItem> items;
    for (int i = 0; i < 10000; ++i) {
      CaptionItem it;
      it.id = std::to_string(i);
      for (int r = 0; r < 5; ++r) it.references.push_back(sentence());
      it.candidate = sentence();
      items.push_back(std::move(it));
    }
    double t0 = now_seconds();
    EvalReport report = evaluate(items, EvalOptions{});
    out["eval_10000_items_s"] = now_seconds() - t0;
    out["eval_metrics"] = {"BLEU-1..4", "ROUGE-L", "CIDEr-D", "tokenization"};
    if (anchor) {
      nlohmann::json list = nlohmann::json::array();
      for (const auto& it : items) list.push_back({{"id", it.id}, {"references", it.references}, {"candidate", it.candidate}});
      const fs::path file = dir / "items.json";
      std::ofstream(file) << list.dump();
      const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/eval_anchor.py",
                                                        file.string(), 1);
      out["eval_anchor"] = py;
      out["eval_anchor"]["what"] = "pycocoevalcap (bench/eval_anchor.py, .venv-ref): PTBTokenizer (Java) + Bleu(4), Rouge, Cider";
      if (py.contains("total_s")) {
        out["eval_speedup_over_pycocoevalcap"] = py["total_s"].get<double>() / out["eval_10000_items_s"].get<double>();
        double worst = 0;  // both sides' corpus scores: the same work, or the ratio means nothing
        for (const auto& [name, value] : py["corpus"].items()) {
          if (!report.corpus.count(name)) {
            worst = std::numeric_limits<double>::infinity();  // a metric prefixcap did not report
            continue;
          }
          worst = std::max(worst, std::abs(report.corpus.at(name) - value.get<double>()));
        }
        out["eval_largest_corpus_score_difference"] = worst;
      }
    }
  }
  fs::remove_all(dir);
  std::printf("%s\n", out.dump(2).c_str());
  return out.contains("captioning_error") ? 1 : 0;
}
