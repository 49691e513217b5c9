// audio_bench: full-size CNN14 (random weights, 32 kHz, 10 s clips) for each conv path
// (encoders/cnn14.h) with its agreement with the reference path, beside the anchor measured in
// the same run: the same network in PyTorch 2.x (bench/encoder_anchor.py through the PyPI wheel
// in .venv-torch) as float32 eager, float32 channels-last and bfloat16 autocast; also with
// --encoder-dtype int8-dynamic ("paths"."int8-dynamic": integer convolutions). Then the log-mel
// front end (beside the anchor's torch.stft front end), and decode + resample to 32 kHz of 60 s
// MP3 and FLAC files written here, beside librosa.load on the same files (the originals' data
// preparation; librosa in .venv-torch) with the largest sample difference. Prints one JSON object.
// Options: --threads N, --skip-cnn (front end and decoding only), --conv-paths auto,reference,...,
// --bfloat16 (also CNN14 in bfloat16 after the float32 front end), --python PATH (the anchor's
// interpreter), --no-anchor.
#include <sndfile.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/int8_gemm.h"
#include "core/threads.h"
#include "encoders/cnn14.h"
#include "pipeline/audio_decode.h"

using namespace prefixcap;
using namespace prefixcap::bench;

namespace {
// 60 s of stereo 44.1 kHz "foley": noise bursts and tones (content does not matter for speed).
std::string write_test_file(const std::string& path, int format) {
  SF_INFO info{};
  info.samplerate = 44100;
  info.channels = 2;
  info.format = format;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  if (!f) throw std::runtime_error("cannot write " + path + ": " + sf_strerror(nullptr));
  std::vector<float> block(44100 * 2);
  uint32_t state = 12345;
  for (int s = 0; s < 60; ++s) {
    for (int i = 0; i < 44100; ++i) {
      state = state * 1664525u + 1013904223u;
      float noise = ((state >> 8) / 16777216.0f - 0.5f) * 0.2f;
      float tone = 0.3f * std::sin(2 * M_PI * (220 + 20 * s) * i / 44100.0);
      block[2 * i] = noise + tone;
      block[2 * i + 1] = noise - tone;
    }
    sf_writef_float(f, block.data(), 44100);
  }
  sf_close(f);
  return path;
}
}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  bool skip_cnn = false, anchor = true, bfloat16 = false;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-torch/bin/python";
  std::vector<Cnn14ConvPath> paths = {Cnn14ConvPath::Auto, Cnn14ConvPath::Reference};
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--threads" && i + 1 < argc) threads.num_threads = std::stoi(argv[++i]);
      else if (a == "--skip-cnn") skip_cnn = true;
      else if (a == "--no-anchor") anchor = false;
      else if (a == "--bfloat16") bfloat16 = true;
      else if (a == "--python" && i + 1 < argc) python = argv[++i];
      else if (a == "--conv-paths" && i + 1 < argc) {
        paths.clear();
        for (const std::string& name : split_list(argv[++i])) paths.push_back(parse_cnn14_conv_path(name));
      } else {
        std::fprintf(stderr, "usage: audio_bench [--threads N] [--skip-cnn] [--conv-paths auto,reference,nchw,channels-last,gemm]\n"
                             "                   [--bfloat16] [--python PATH] [--no-anchor]\n");
        return a == "--help" ? 0 : 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "audio_bench: %s\n", e.what());
    return 1;
  }
  ThreadSetup setup = configure_threads(threads);
  nlohmann::json out;
  out["benchmark"] = "audio_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  torch::NoGradGuard no_grad;

  Cnn14Config config;  // PANNs defaults: 32 kHz, window 1024, hop 320, 64 mel bins, 64..2048 channels
  const int64_t clip = 10 * config.front_end.sample_rate;
  {
    LogMelFrontEnd front_end(config.front_end);
    at::Tensor minute = at::randn({1, 60 * config.front_end.sample_rate}) * 0.1;
    front_end(minute);
    double t = best_time(5, [&] { front_end(minute); });
    out["logmel_x_realtime"] = 60.0 / t;
    if (anchor) {
      const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/encoder_anchor.py",
                                                        "--models logmel --threads " + std::to_string(setup.num_threads),
                                                        setup.num_threads);
      out["logmel_anchor"] = py;
      out["logmel_anchor"]["what"] = "CNN14's front end in PyTorch 2.x (torch.stft + mel matrix + log), same threads";
      if (py.contains("logmel"))
        out["logmel_speedup_over_torch"] = out["logmel_x_realtime"].get<double>() / py["logmel"]["x_realtime"].get<double>();
    }
  }
  if (!skip_cnn) {
    torch::manual_seed(0);
    Cnn14 model(config);
    model->freeze();
    at::Tensor one = at::randn({1, clip}) * 0.1, eight = at::randn({8, clip}) * 0.1;
    model->set_conv_path(Cnn14ConvPath::Reference);
    const at::Tensor reference = model->forward(eight).embedding;
    nlohmann::json cnn;
    cnn["clip_seconds"] = 10;
    // Times the model as it is set and compares its embeddings with the reference path's.
    auto measure = [&](nlohmann::json& d) {
      const at::Tensor embedding = model->forward(eight).embedding;  // also the warm-up
      d["ms_per_clip_batch1"] = best_time(3, [&] { model->forward(one); }) * 1e3;
      d["ms_per_clip_batch8"] = best_time(2, [&] { model->forward(eight); }) * 1e3 / 8;
      d["embedding_max_abs_diff_over_max_abs_vs_reference"] =
          (embedding - reference).abs().max().item<double>() / reference.abs().max().item<double>();
      d["embedding_min_cosine_vs_reference"] = at::cosine_similarity(embedding, reference, 1).min().item<double>();
    };
    for (Cnn14ConvPath path : paths) {
      model->set_conv_path(path);
      measure(cnn["paths"][cnn14_conv_path_name(path)]);
    }
    // --encoder-dtype int8-dynamic (Auto's paths for the first conv): integer convolutions.
    model->set_conv_path(Cnn14ConvPath::Auto);
    model->set_compute_dtype(WeightDtype::Int8Dynamic);
    cnn["paths"]["int8-dynamic"]["kernel"] = int8_gemm_isa_name(int8_gemm_isa());
    measure(cnn["paths"]["int8-dynamic"]);
    model->set_compute_dtype(WeightDtype::Float32);
    // bfloat16 weights and activations after the float32 front end (Auto's paths; oneDNN's bf16
    // kernels): speed and agreement on this CPU, for the question whether a bf16 encoder pays.
    if (bfloat16) {
      model->set_conv_path(Cnn14ConvPath::Reference);
      const at::Tensor logmel1 = model->front_end(one), logmel8 = model->front_end(eight);
      nlohmann::json& d = cnn["bfloat16_after_front_end"];
      try {
        model->to(at::kBFloat16);
        model->set_conv_path(Cnn14ConvPath::Auto);
        const at::Tensor l1 = logmel1.to(at::kBFloat16), l8 = logmel8.to(at::kBFloat16);
        const at::Tensor embedding = model->forward_logmel(l8).embedding.to(at::kFloat);
        d["ms_per_clip_batch1"] = best_time(3, [&] { model->forward_logmel(l1); }) * 1e3;
        d["ms_per_clip_batch8"] = best_time(2, [&] { model->forward_logmel(l8); }) * 1e3 / 8;
        d["embedding_min_cosine_vs_reference"] = at::cosine_similarity(embedding, reference, 1).min().item<double>();
      } catch (const std::exception& e) {
        d["error"] = std::string(e.what()).substr(0, 300);
      }
      model->to(at::kFloat);
    }
    const nlohmann::json& first = cnn["paths"][cnn14_conv_path_name(paths.front())];
    out["cnn14_ms_per_clip_batch1"] = first["ms_per_clip_batch1"];  // the first path's (bench/torch_configs.sh)
    out["cnn14_ms_per_clip_batch8"] = first["ms_per_clip_batch8"];
    if (anchor) {
      const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/encoder_anchor.py",
                                                        "--models cnn14 --threads " + std::to_string(setup.num_threads),
                                                        setup.num_threads);
      cnn["anchor"] = py;
      cnn["anchor"]["what"] = "the same CNN14 in PyTorch 2.x (bench/encoder_anchor.py), inference mode, same threads";
      if (py.contains("cnn14")) {
        nlohmann::json ratios;  // anchor time / ours: above 1 means faster than the anchor
        for (const auto& [name, d] : cnn["paths"].items())
          for (const auto& [setting, a] : py["cnn14"].items())
            for (const char* b : {"batch1", "batch8"}) {
              const std::string key = std::string("ms_per_clip_") + b;
              ratios[name + "_" + b + "_speedup_over_torch_" + setting] = a[key].get<double>() / d[key].get<double>();
            }
        cnn["speedups"] = ratios;
      }
    }
    out["cnn14"] = cnn;
    out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  }
  std::string dir = (std::filesystem::temp_directory_path() / ("prefixcap-audio-bench-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  try {
    // Each file: ours (libsndfile/FFmpeg + libsoxr VHQ) as a multiple of real time; the anchor
    // decodes the same files with librosa.load(sr=32000) as PANNs' and Prefix-AAC's data
    // preparation does, and its VHQ waveform is compared sample by sample with ours.
    std::vector<std::pair<std::string, std::string>> files;  // (label, path)
    files.emplace_back("flac", write_test_file(dir + "/minute.flac", SF_FORMAT_FLAC | SF_FORMAT_PCM_16));
    try {
      files.emplace_back("mp3", write_test_file(dir + "/minute.mp3", SF_FORMAT_MPEG | SF_FORMAT_MPEG_LAYER_III));
    } catch (const std::exception& e) {
      out["decode_resample_mp3_60s_x_realtime"] = nullptr;
      out["mp3_note"] = e.what();
    }
    std::map<std::string, std::vector<float>> ours;
    std::string paths_arg;
    for (const auto& [label, path] : files) {
      ours[label] = decode_audio(path, {32000}).samples;
      const double t = best_time(3, [&] { decode_audio(path, {32000}); });
      out["decode_resample_" + label + "_60s_x_realtime"] = 60.0 / t;
      paths_arg += (paths_arg.empty() ? "" : ",") + path;
    }
    if (anchor) {
      const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/encoder_anchor.py",
                                                        "--models decode --audio " + paths_arg + " --dump " + dir +
                                                            " --threads " + std::to_string(setup.num_threads),
                                                        setup.num_threads);
      nlohmann::json& a = out["decode_anchor"];
      a = py;
      a["what"] = "librosa.load(path, sr=32000, mono=True) on the same files: its default resampler (soxr_hq) and soxr_vhq (ours)";
      for (const auto& [label, path] : files) {
        const std::string name = std::filesystem::path(path).filename().string();
        if (!py.contains("decode") || !py["decode"].contains(name)) continue;
        const nlohmann::json& d = py["decode"][name];
        for (const char* q : {"soxr_hq", "soxr_vhq"})
          out["decode_resample_" + label + "_speedup_over_librosa_" + q] =
              out["decode_resample_" + label + "_60s_x_realtime"].get<double>() / d[std::string(q) + "_x_realtime"].get<double>();
        // Agreement with librosa's VHQ waveform (written by the anchor as raw float32).
        std::vector<float> theirs;
        if (FILE* f = std::fopen((path + ".f32").c_str(), "rb")) {
          float buf[4096];
          for (size_t n; (n = std::fread(buf, sizeof(float), 4096, f)) > 0;) theirs.insert(theirs.end(), buf, buf + n);
          std::fclose(f);
        }
        const std::vector<float>& mine = ours[label];
        nlohmann::json& agree = out["decode_resample_" + label + "_vs_librosa_vhq"];
        agree["samples_ours"] = mine.size();
        agree["samples_librosa"] = theirs.size();
        if (theirs.size() != mine.size()) {  // a missing dump or another length: no difference to report
          agree["max_abs_diff"] = nullptr;
          continue;
        }
        double max_diff = 0, peak = 0;
        for (size_t i = 0; i < mine.size(); ++i) {
          max_diff = std::max(max_diff, double(std::fabs(mine[i] - theirs[i])));
          peak = std::max(peak, double(std::fabs(theirs[i])));
        }
        agree["max_abs_diff"] = max_diff;
        agree["librosa_peak_abs"] = peak;
      }
    }
  } catch (...) {
    std::filesystem::remove_all(dir);
    throw;
  }
  std::filesystem::remove_all(dir);
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
