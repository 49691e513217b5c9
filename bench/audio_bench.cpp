// audio_bench: full-size CNN14 (random weights, 32 kHz, 10 s clips), the log-mel front end,
// and decode + resample of 60 s MP3 and FLAC files written here. Prints one JSON object.
// Options: --threads N, --skip-cnn (front end and decoding only).
#include <sndfile.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
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
  bool skip_cnn = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads.num_threads = std::stoi(argv[++i]);
    else if (a == "--skip-cnn") skip_cnn = true;
    else {
      std::fprintf(stderr, "usage: audio_bench [--threads N] [--skip-cnn]\n");
      return a == "--help" ? 0 : 1;
    }
  }
  ThreadSetup setup = configure_threads(threads);
  nlohmann::json out;
  out["benchmark"] = "audio_bench";
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
  }
  if (!skip_cnn) {
    torch::manual_seed(0);
    Cnn14 model(config);
    model->freeze();
    at::Tensor one = at::randn({1, clip}) * 0.1, eight = at::randn({8, clip}) * 0.1;
    model->forward(one);
    double t1 = best_time(3, [&] { model->forward(one); });
    double t8 = best_time(2, [&] { model->forward(eight); });
    out["cnn14_ms_per_clip_batch1"] = t1 * 1e3;
    out["cnn14_ms_per_clip_batch8"] = t8 * 1e3 / 8;
    out["cnn14_clip_seconds"] = 10;
    out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  }
  std::string dir = (std::filesystem::temp_directory_path() / ("prefixcap-audio-bench-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  try {
    const std::string flac = write_test_file(dir + "/minute.flac", SF_FORMAT_FLAC | SF_FORMAT_PCM_16);
    double t = best_time(3, [&] { decode_audio(flac, {32000}); });
    out["decode_resample_flac_60s_x_realtime"] = 60.0 / t;
    try {
      const std::string mp3 = write_test_file(dir + "/minute.mp3", SF_FORMAT_MPEG | SF_FORMAT_MPEG_LAYER_III);
      t = best_time(3, [&] { decode_audio(mp3, {32000}); });
      out["decode_resample_mp3_60s_x_realtime"] = 60.0 / t;
    } catch (const std::exception& e) {
      out["decode_resample_mp3_60s_x_realtime"] = nullptr;
      out["mp3_note"] = e.what();
    }
  } catch (...) {
    std::filesystem::remove_all(dir);
    throw;
  }
  std::filesystem::remove_all(dir);
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
