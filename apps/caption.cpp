// caption: media files in, captions out.
//   caption --model BUNDLE [options] INPUT...
// INPUT: files, folders (recursive; media extensions only), globs, @list.txt, - (paths on stdin).
// Exit code: 0 = every input captioned, 2 = some failed (one line each on stderr), 1 = usage or
// model error.
#include <glob.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <torch/cuda.h>

#include "core/threads.h"
#include "pipeline/audio_decode.h"
#include "pipeline/captioner.h"

using namespace prefixcap;
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

// What a folder walk picks up: every audio, video and image extension in common use, including
// image formats prefixcap does not decode (svg, xbm, ...), so that they are reported, not skipped.
const std::set<std::string> kMediaExtensions = {
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aiff", ".aif", ".aifc", ".wma", ".wv", ".ape",
    ".caf", ".au", ".snd", ".amr", ".mka", ".mp2", ".ac3", ".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg",
    ".mpeg", ".ts", ".mts", ".3gp", ".flv", ".wmv", ".ogv", ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif",
    ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".pam", ".exr", ".hdr", ".ras", ".sr", ".jp2", ".j2k", ".svg",
    ".svgz", ".xbm", ".sgi", ".rgb", ".avif", ".heic"};

bool has_media_extension(const fs::path& p) {
  std::string ext = p.extension().string();
  for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return kMediaExtensions.count(ext) > 0;
}

// Expands the command line's inputs into file paths, in order; unknown inputs are kept so
// that they are reported as errors later.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> out;
  auto add_path = [&](const std::string& p) {
    if (fs::is_directory(p)) {
      std::vector<std::string> found;
      for (const auto& e : fs::recursive_directory_iterator(p, fs::directory_options::skip_permission_denied))
        if (e.is_regular_file() && has_media_extension(e.path())) found.push_back(e.path().string());
      std::sort(found.begin(), found.end());
      out.insert(out.end(), found.begin(), found.end());
    } else {
      out.push_back(p);
    }
  };
  auto add_list = [&](std::istream& in) {
    std::string line;
    while (std::getline(in, line)) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line[0] != '#') add_path(line);
    }
  };
  for (const auto& in : inputs) {
    if (in == "-") {
      add_list(std::cin);
    } else if (!in.empty() && in[0] == '@') {
      std::ifstream list(in.substr(1));
      if (!list) throw std::runtime_error("cannot read the list file " + in.substr(1));
      add_list(list);
    } else if (in.find_first_of("*?[") != std::string::npos && !fs::exists(in)) {
      glob_t g{};
      if (glob(in.c_str(), 0, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; ++i) add_path(g.gl_pathv[i]);
      else
        out.push_back(in);  // matches nothing: reported as a missing file
      globfree(&g);
    } else {
      add_path(in);
    }
  }
  return out;
}

struct Item {
  std::string path;
  Modality modality = Modality::Audio;
  double start = -1, end = -1;  // window times (seconds), -1 = whole file
  std::vector<float> waveform;     // audio bundles
  Captioner::VisualInput visual;   // image bundles
  double decode_ms = 0;
  std::string error;             // set: this input failed; printed in its place
};

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Caption audio, image and video files with a prefixcap captioner bundle"};
  std::string model, format = "text", output, device = "cpu";
  std::vector<std::string> inputs, stops;
  int batch_size = 8, threads = 0, beam = -1, top_k = 0, max_tokens = -1, num_captions = 1, frames = 8;
  double top_p = 1.0, temperature = 1.0, window = 0, hop = 0;
  uint64_t seed = 0;
  bool greedy = false, sample = false, no_progress = false;
  app.add_option("-m,--model", model, "captioner bundle folder (captioner.json)")->required()->check(CLI::ExistingDirectory);
  app.add_option("inputs", inputs, "files, folders, globs, @list.txt, or - for paths on stdin")->required();
  app.add_option("-b,--batch-size", batch_size, "inputs captioned together")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--beam", beam, "beam size (default: the bundle's)")->check(CLI::PositiveNumber);
  app.add_flag("--greedy", greedy, "greedy decoding (beam 1)");
  app.add_flag("--sample", sample, "sample tokens (with --top-k / --top-p / --temperature / --seed)");
  app.add_option("--top-k", top_k, "sampling: keep the k most likely tokens (0 = all)")->capture_default_str();
  app.add_option("--top-p", top_p, "sampling: nucleus mass")->capture_default_str();
  app.add_option("--temperature", temperature, "divide logits by this")->capture_default_str();
  app.add_option("--seed", seed, "sampling seed")->capture_default_str();
  app.add_option("--max-tokens", max_tokens, "most tokens per caption (default: the bundle's)")->check(CLI::PositiveNumber);
  app.add_option("--stop", stops, "stop strings (default: the bundle's, e.g. '.')");
  app.add_option("-k,--num-captions", num_captions, "captions per input (k-best)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--window", window, "caption windows of this many seconds (long audio)")->capture_default_str();
  app.add_option("--hop", hop, "seconds between windows (default: --window)")->capture_default_str();
  app.add_option("--frames", frames, "video frames sampled per clip (image bundles)")->capture_default_str();
  app.add_option("-f,--format", format, "text, jsonl or csv")->capture_default_str()->check(CLI::IsMember({"text", "jsonl", "csv"}));
  app.add_option("-o,--output", output, "write here instead of stdout");
  app.add_flag("--no-progress", no_progress, "no progress bar on stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;  // --help: 0; any usage error: 1
  }

  std::unique_ptr<Captioner> captioner;
  DecodingOptions options;
  std::vector<std::string> paths;
  std::ofstream file_out;
  try {
    configure_threads({threads, 0});
    captioner = std::make_unique<Captioner>(Captioner::load(model));
    if (device == "cuda") {
      if (!torch::cuda::is_available())
        throw std::runtime_error("--device cuda: no CUDA device is available to this LibTorch build");
      captioner->to(at::Device(at::kCUDA));
    }
    options = captioner->default_decoding();
    if (greedy) options.beam_size = 1;
    if (beam > 0) options.beam_size = beam;
    if (sample) options.beam_size = 1;
    options.sample = sample;
    options.top_k = top_k;
    options.top_p = top_p;
    options.temperature = temperature;
    options.seed = seed;
    if (max_tokens > 0) options.max_tokens = max_tokens;
    if (!stops.empty()) options.stop_token_ids = captioner->stop_ids(stops);
    options.num_return = num_captions;
    if (options.beam_size > 1 && options.num_return > options.beam_size) options.beam_size = options.num_return;
    validate(options);
    if (hop <= 0) hop = window;
    paths = expand_inputs(inputs);
    if (!output.empty()) {
      file_out.open(output, std::ios::trunc);
      if (!file_out) throw std::runtime_error("cannot write " + output);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption: %s\n", e.what());
    return 1;
  }
  std::ostream& out = output.empty() ? std::cout : file_out;
  if (format == "csv") out << "path,modality,start,end,caption,score\n";
  const bool progress = !no_progress && isatty(STDERR_FILENO);
  int failures = 0;
  size_t done = 0;

  std::vector<Item> batch;  // in input order, failed inputs included
  auto report_error = [&](const std::string& path, const std::string& message) {
    ++failures;
    std::fprintf(stderr, "caption: %s\n", message.c_str());
    Item failed;
    failed.path = path;
    failed.error = message;
    batch.push_back(std::move(failed));
  };
  auto print_error = [&](const Item& it) {
    if (format == "jsonl") out << json_dump(Json{{"path", it.path}, {"error", it.error}}) << "\n";
  };
  auto flush = [&] {
    if (batch.empty()) return;
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::vector<Caption>> results;
    std::vector<Item*> good;
    for (auto& it : batch)
      if (it.error.empty()) good.push_back(&it);
    try {
      MapperInput features;
      if (good.empty()) {
      } else if (captioner->encoder_kind() == "cnn14") {
        std::vector<std::vector<float>> waves;
        for (auto* it : good) waves.push_back(std::move(it->waveform));
        features = captioner->encode_waveforms(waves);
      } else {
        std::vector<Captioner::VisualInput> visuals;
        for (auto* it : good) visuals.push_back(std::move(it->visual));
        features = captioner->encode_visual(visuals);
      }
      if (!good.empty()) results = captioner->caption(features, options);
    } catch (const std::exception& e) {
      for (auto* it : good) {
        ++failures;
        it->error = it->path + ": " + e.what();
        std::fprintf(stderr, "caption: %s\n", it->error.c_str());
      }
      results.clear();
    }
    const double batch_ms = good.empty() ? 0.0 : ms_since(t0) / good.size();
    size_t next_result = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      const Item& it = batch[b];
      if (!it.error.empty()) {
        print_error(it);
        continue;
      }
      const size_t i = next_result++;
      const Caption& best = results[i][0];
      if (format == "text") {
        out << it.path;
        if (it.start >= 0) out << " [" << it.start << "-" << it.end << "]";
        out << "\t" << best.text << "\n";
      } else if (format == "csv") {
        out << csv_field(it.path) << "," << modality_name(it.modality) << "," << (it.start >= 0 ? std::to_string(it.start) : "")
            << "," << (it.end >= 0 ? std::to_string(it.end) : "") << "," << csv_field(best.text) << "," << best.score << "\n";
      } else {
        Json j = {{"path", it.path}, {"modality", modality_name(it.modality)}, {"caption", best.text}, {"score", best.score}};
        if (it.start >= 0) {
          j["start"] = it.start;
          j["end"] = it.end;
        }
        Json alternatives = Json::array();
        for (size_t k = 1; k < results[i].size(); ++k)
          alternatives.push_back({{"caption", results[i][k].text}, {"score", results[i][k].score}});
        j["alternatives"] = alternatives;
        j["timings"] = {{"decode_ms", it.decode_ms}, {"caption_ms", batch_ms}};
        out << json_dump(j) << "\n";
      }
    }
    out.flush();
    batch.clear();
  };

  for (const auto& path : paths) {
    auto t0 = std::chrono::steady_clock::now();
    try {
      if (!fs::exists(path)) throw FileError(path, "no such file");
      if (fs::is_directory(path)) throw FileError(path, "is a folder");
      Modality m = detect_modality(path);
      if (captioner->encoder_kind() == "cnn14") {
        // Audio bundles caption the sound of any file (video files: their audio track).
        if (m == Modality::Image) throw FileError(path, "is an image; this captioner is for audio");
        if (window > 0) {
          // Windows stream through the decoder: memory stays flat however long the recording.
          AudioReader reader(path, {captioner->sample_rate()});
          stream_windows(reader, window, hop, [&](double start, double end, std::vector<float>&& samples) {
            Item it{path, m, start, end};
            it.waveform = std::move(samples);
            it.decode_ms = ms_since(t0);
            batch.push_back(std::move(it));
            if (static_cast<int>(batch.size()) >= batch_size) flush();
            t0 = std::chrono::steady_clock::now();
          });
        } else {
          Waveform w = decode_audio(path, {captioner->sample_rate()});
          Item it{path, m};
          it.waveform = std::move(w.samples);
          it.decode_ms = ms_since(t0);
          batch.push_back(std::move(it));
        }
      } else if (captioner->encoder_kind() == "clip") {
        Item it{path, m};
        it.visual = captioner->load_visual(path, m, frames);
        it.decode_ms = ms_since(t0);
        batch.push_back(std::move(it));
      } else {
        throw std::runtime_error("the bundle has no encoder: it cannot caption media files");
      }
    } catch (const FileError& e) {
      report_error(path, e.what());
    } catch (const std::exception& e) {
      report_error(path, path + ": " + e.what());
    }
    if (static_cast<int>(batch.size()) >= batch_size) flush();
    ++done;
    if (progress) std::fprintf(stderr, "\r[%zu/%zu] %d failed", done, paths.size(), failures);
  }
  flush();
  if (progress) std::fprintf(stderr, "\n");
  if (paths.empty()) {
    std::fprintf(stderr, "caption: no input files\n");
    return 1;
  }
  return failures ? 2 : 0;
}
