// Tiny training runs for the tests: a corpus of distinct WAV clips with captions, a config on
// the fixtures' CNN14 and GPT-2, and the losses a run logged.
#pragma once

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "pipeline/trainer.h"
#include "test_helpers.h"

namespace prefixcap::testing {

// 16-bit mono PCM WAV.
inline void write_wav(const std::string& path, const std::vector<float>& x, int rate) {
  auto u32 = [](uint32_t v) { return std::string{char(v), char(v >> 8), char(v >> 16), char(v >> 24)}; };
  auto u16 = [](uint16_t v) { return std::string{char(v), char(v >> 8)}; };
  std::string data;
  for (float v : x) data += u16(static_cast<uint16_t>(static_cast<int16_t>(std::lround(std::clamp(v, -1.f, 1.f) * 32767))));
  std::string h = "RIFF" + u32(36 + data.size()) + "WAVEfmt " + u32(16) + u16(1) + u16(1) + u32(rate) + u32(rate * 2) + u16(2) +
                  u16(16) + "data" + u32(data.size());
  write_bytes(path, h + data);
}

// Eight clips that differ (tone pitch and rhythm) and eight captions.
inline const std::vector<std::string> kCaptions = {"a dog barks.", "rain falls.",   "a bell rings.", "birds sing.",
                                            "a car passes.", "water flows.", "people talk.", "wind blows."};

inline std::string make_corpus(const TempDir& dir, int items = 8) {
  std::string manifest;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> noise(-1, 1);
  for (int i = 0; i < items; ++i) {
    std::vector<float> x(32000);
    for (size_t t = 0; t < x.size(); ++t)
      x[t] = 0.3f * std::sin(2 * M_PI * 200.0 * (i + 1) * t / 32000.0) * ((t / (800 * (i + 1))) % 2 ? 0.2f : 1.f) + 0.05f * noise(rng);
    const std::string name = "c" + std::to_string(i) + ".wav";
    write_wav(dir.file(name), x, 32000);
    manifest += "{\"media\": \"" + name + "\", \"captions\": [\"" + kCaptions[i % kCaptions.size()] + "\"]}\n";
  }
  write_bytes(dir.file("train.jsonl"), manifest);
  return dir.file("train.jsonl");
}

inline TrainConfig tiny_config(const TempDir& dir, const std::string& out) {
  TrainConfig c;
  c.encoder = fixture_dir("cnn14-tiny");
  c.lm = fixture_dir("gpt2-tiny");
  c.mapper = {{"type", "mlp"}, {"prefix_length", 4}};
  c.data_root = dir.path();
  c.train_split = "train.jsonl";
  c.out = dir.file(out);
  c.batch_size = 8;
  c.lr = 1e-2;
  c.warmup_steps = 10;
  c.caption_end = "none";
  c.progress = false;
  c.log_every = 1;
  return c;
}

inline std::map<int64_t, double> train_losses(const std::string& log) {
  std::map<int64_t, double> out;
  std::ifstream in(log);
  std::string line;
  while (std::getline(in, line)) {
    Json j = Json::parse(line);
    if (j["type"] == "train") out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}



}  // namespace prefixcap::testing
