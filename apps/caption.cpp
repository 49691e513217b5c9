// caption: media files in, captions out.
//   caption --model BUNDLE [options] INPUT...
//   caption --model BUNDLE --stream [options] SOURCE      (live: stdin "-", a URL, a device)
// INPUT: files, folders (recursive; media extensions only), globs, @list.txt, - (paths on stdin).
// Many files over several processes: --shard I/N takes the I-th of N contiguous blocks of the
// inputs (so the shards' outputs, concatenated in shard order, are in input order); under
// torchrun, mpirun or srun (RANK/WORLD_SIZE, ...) each rank takes its block and rank 0 writes
// every rank's results, in input order.
// Exit code: 0 = every input captioned (a stream: ended or interrupted by SIGINT/SIGTERM),
// 2 = some failed (one line each on stderr; a stream: broke off), 1 = usage or model error.
#include <glob.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <torch/cuda.h>

#include "core/threads.h"
#include "pipeline/audio_decode.h"
#include "pipeline/captioner.h"
#include "pipeline/distributed.h"
#include "pipeline/stream_captioner.h"

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

// --stream's signals: SIGINT/SIGTERM are blocked in every thread and taken by one waiting
// thread, which sets the stop flag the reader checks and pokes the reading thread with SIGUSR1
// (whose handler does nothing) so that a blocking read returns. A second signal exits at once.
std::atomic<bool> g_stop{false};
void on_poke(int) {}

void start_signal_thread(pthread_t reader) {
  std::thread([reader] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    int sig = 0;
    sigwait(&set, &sig);
    g_stop = true;
    std::fprintf(stderr, "caption: %s: finishing the current window\n", sig == SIGINT ? "interrupted" : "terminated");
    for (int i = 0; i < 100000; ++i) {  // until the process exits; a poke may land before the read blocks
      pthread_kill(reader, SIGUSR1);
      timespec wait{0, 50'000'000};
      sigset_t again = set;
      siginfo_t info;
      if (sigtimedwait(&again, &info, &wait) > 0) _exit(130);
    }
  }).detach();
}

void block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  struct sigaction poke {};
  poke.sa_handler = on_poke;  // no SA_RESTART: the read returns EINTR
  sigaction(SIGUSR1, &poke, nullptr);
}

void print_caption(std::ostream& out, const std::string& format, const Json& fields) {
  const std::string path = fields.value("path", fields.value("stream", ""));
  const bool windowed = fields.contains("start");
  if (format == "text") {
    out << path;
    if (windowed) out << " [" << fields["start"].get<double>() << "-" << fields["end"].get<double>() << "]";
    out << "\t" << fields["caption"].get<std::string>() << "\n";
  } else if (format == "csv") {
    out << csv_field(path) << "," << fields["modality"].get<std::string>() << ","
        << (windowed ? std::to_string(fields["start"].get<double>()) : "") << ","
        << (windowed ? std::to_string(fields["end"].get<double>()) : "") << "," << csv_field(fields["caption"].get<std::string>())
        << "," << fields["score"].get<double>() << "\n";
  } else {
    out << json_dump(fields) << "\n";
  }
}


}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  CLI::App app{"Caption audio, image and video files with a prefixcap captioner bundle"};
  std::string model, format = "text", output, device = "cpu", lm_dtype = "float32", encoder_dtype = "float32";
  std::vector<std::string> inputs, stops;
  int batch_size = 8, threads = 0, beam = -1, top_k = 0, max_tokens = -1, num_captions = 1, frames = 8;
  double top_p = 1.0, temperature = 1.0, window = 0, hop = 0;
  uint64_t seed = 0;
  bool greedy = false, sample = false, no_progress = false, stream = false;
  std::string raw_format, input_format, overrun;
  int raw_rate = 0, raw_channels = 0, max_pending = 4;
  double io_timeout = 30;
  std::string shard;
  int dist_timeout = 3600;
  app.add_option("-m,--model", model, "captioner bundle folder (captioner.json)")->required()->check(CLI::ExistingDirectory);
  app.add_option("inputs", inputs, "files, folders, globs, @list.txt, or - for paths on stdin")->required();
  app.add_option("-b,--batch-size", batch_size, "inputs captioned together")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--lm-dtype", lm_dtype,
                 "GPT-2 weights for CPU decoding: float32, bfloat16, int8 (weight-only, per-row scales) or "
                 "int8-dynamic (activations quantised per row too; integer products; fastest for beams and batches)")
      ->capture_default_str()->check(CLI::IsMember({"float32", "bfloat16", "int8", "int8-dynamic"}));
  app.add_option("--encoder-dtype", encoder_dtype,
                 "encoder arithmetic on the CPU: float32, or int8-dynamic (CNN14's convolutions and the CLIP ViT's "
                 "linear layers as int8 products, activations quantised per row at run time: about 3x float32 with "
                 "AVX-512 VNNI, 4-5x with AMX; embeddings within cosine 0.999 of float32's in the tests; not the CLIP "
                 "ResNet)")
      ->capture_default_str()->check(CLI::IsMember({"float32", "int8-dynamic"}));
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
  app.add_option("--window", window, "caption windows of this many seconds (long audio; video with an image bundle)")->capture_default_str();
  app.add_option("--hop", hop, "seconds between windows (default: --window)")->capture_default_str();
  app.add_option("--frames", frames, "video frames sampled per clip or stream window (image bundles)")->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("-f,--format", format, "text, jsonl or csv")->capture_default_str()->check(CLI::IsMember({"text", "jsonl", "csv"}));
  app.add_option("-o,--output", output, "write here instead of stdout");
  app.add_flag("--no-progress", no_progress, "no progress bar on stderr");
  app.add_option("--shard", shard, "I/N: caption only the I-th (0-based) of N contiguous blocks of the inputs");
  app.add_option("--dist-timeout", dist_timeout, "under a launcher: seconds rank 0 waits for the other ranks' results")
      ->capture_default_str()->check(CLI::PositiveNumber);
  auto* stream_group = app.add_option_group("streaming", "caption --stream SOURCE: live input, captioned window by window");
  stream_group->add_flag("--stream", stream, "SOURCE is a stream: - (stdin), a URL (http, rtsp, udp, ...), or a capture device");
  stream_group->add_option("--raw", raw_format, "raw PCM on the stream: s16le, f32le, ... (with --rate and --channels)");
  stream_group->add_option("--rate", raw_rate, "raw PCM sample rate (Hz)")->check(CLI::PositiveNumber);
  stream_group->add_option("--channels", raw_channels, "raw PCM channel count")->check(CLI::Range(1, 64));
  stream_group->add_option("--input-format", input_format, "FFmpeg input format or capture device (mpegts, alsa, pulse, ...)");
  stream_group->add_option("--max-pending", max_pending, "complete windows waiting for the captioner, at most")->capture_default_str()->check(CLI::PositiveNumber);
  stream_group->add_option("--overrun", overrun, "when captioning falls behind: block (wait; default for stdin and files) or drop (the oldest waiting window; default for URLs and devices)")
      ->check(CLI::IsMember({"block", "drop"}));
  stream_group->add_option("--io-timeout", io_timeout, "seconds a network read may stall before the stream fails (0 = forever)")->capture_default_str();
  try {
    app.parse(argc, argv);
    if (!stream && (!raw_format.empty() || !input_format.empty() || raw_rate || raw_channels || !overrun.empty()))
      throw CLI::ValidationError("--raw, --input-format, --rate, --channels and --overrun are for --stream");
    if (stream && inputs.size() != 1) throw CLI::ValidationError("--stream takes one SOURCE (-, a URL or a device)");
    if (!raw_format.empty() && !input_format.empty()) throw CLI::ValidationError("--raw and --input-format: give one");
    if (!raw_format.empty() && !is_raw_pcm_format(raw_format))
      throw CLI::ValidationError("--raw: not a raw PCM format: " + raw_format + " (s16le, s16be, s32le, f32le, f64le, u8, alaw, mulaw, ...)");
    if (!raw_format.empty() && (raw_rate <= 0 || raw_channels <= 0))
      throw CLI::ValidationError("--raw needs --rate and --channels");
    if (raw_format.empty() && (raw_rate || raw_channels)) throw CLI::ValidationError("--rate and --channels are for --raw");
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;  // --help: 0; any usage error: 1
  }
  if (stream) block_stop_signals();  // before any thread starts, so every thread inherits it

  std::unique_ptr<Captioner> captioner;
  DecodingOptions options;
  std::vector<std::string> paths;
  std::ofstream file_out;
  // Sharding: explicit (--shard), or one rank of a launcher's (results merged on rank 0).
  int shard_index = 0, shard_count = 1;
  std::unique_ptr<Communicator> comm;
  size_t total_inputs = 0;
  try {
    if (!shard.empty()) {
      int used = 0;
      if (std::sscanf(shard.c_str(), "%d/%d%n", &shard_index, &shard_count, &used) != 2 || used != static_cast<int>(shard.size()) ||
          shard_count < 1 || shard_index < 0 || shard_index >= shard_count)
        throw std::runtime_error("--shard must be I/N with 0 <= I < N, not '" + shard + "'");
      if (stream) throw std::runtime_error("--shard is for files, not --stream");
    } else if (!stream) {
      const DistEnv env = DistEnv::from_environment();
      if (env.distributed()) {
        shard_index = env.rank;
        shard_count = env.world_size;
        comm = Communicator::create(env, "gloo", std::chrono::seconds(dist_timeout));
        if (threads == 0) threads = env.threads_per_rank();
      }
    }
    configure_threads({threads, 0});
    captioner = std::make_unique<Captioner>(Captioner::load(model));
    if (device == "cuda") {
      if (!torch::cuda::is_available())
        throw std::runtime_error("--device cuda: no CUDA device is available to this LibTorch build");
      captioner->to(at::Device(at::kCUDA));
    }
    captioner->set_lm_dtype(parse_weight_dtype(lm_dtype));
    captioner->set_encoder_dtype(parse_weight_dtype(encoder_dtype));
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
    if (!stream) paths = expand_inputs(inputs);
    total_inputs = paths.size();
    if (shard_count > 1) {
      const Span mine = rank_span(static_cast<int64_t>(paths.size()), shard_index, shard_count);
      paths = std::vector<std::string>(paths.begin() + mine.lo, paths.begin() + mine.hi);
    }
    if (!output.empty() && (!comm || comm->rank() == 0)) {
      file_out.open(output, std::ios::trunc);
      if (!file_out) throw std::runtime_error("cannot write " + output);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption: %s\n", e.what());
    return 1;
  }
  // A rank of a launcher writes into memory; rank 0 writes every rank's text in rank order.
  std::ostringstream rank_out;
  std::ostream& out = comm ? static_cast<std::ostream&>(rank_out) : output.empty() ? static_cast<std::ostream&>(std::cout) : file_out;
  if (stream && app.get_option("--format")->count() == 0) format = "jsonl";  // one line per window
  if (format == "csv" && shard_index == 0) out << "path,modality,start,end,caption,score\n";

  if (stream) {
    const bool audio = captioner->encoder_kind() == "cnn14";
    if (!audio && captioner->encoder_kind() != "clip") {
      std::fprintf(stderr, "caption: --stream needs a bundle with an encoder (this one has '%s')\n", captioner->encoder_kind().c_str());
      return 1;
    }
    if (!audio && !raw_format.empty()) {
      std::fprintf(stderr, "caption: --raw is audio; an image bundle captions a stream's video frames\n");
      return 1;
    }
    StreamInput source;
    source.url = inputs[0];
    source.format = raw_format.empty() ? input_format : raw_format;
    source.sample_rate = raw_rate;
    source.channels = raw_channels;
    source.io_timeout_s = io_timeout;
    source.stop = &g_stop;
    StreamOptions so;
    so.window_s = window > 0 ? window : 10.0;
    so.hop_s = hop > 0 ? hop : so.window_s;
    so.max_pending = max_pending;
    so.batch_size = batch_size;
    const bool pipe_or_file = source.url == "-" || source.url.rfind("file:", 0) == 0 ||
                              (source.url.find("://") == std::string::npos && fs::exists(source.url) && input_format.empty());
    so.overrun = overrun.empty() ? (pipe_or_file ? OverrunPolicy::Block : OverrunPolicy::Drop) : parse_overrun_policy(overrun);
    start_signal_thread(pthread_self());
    const std::string name = source.url;
    try {
      auto print_window = [&](const StreamWindow& w) {
        Json j = caption_record(name, audio ? Modality::Audio : Modality::Video, w.captions, w.start_s, w.end_s);
        j.erase("path");  // a stream is named by "stream"
        j["stream"] = name;
        j["latency_ms"] = w.latency_ms;
        j["dropped"] = w.dropped_so_far;
        print_caption(out, format, j);
        out.flush();
      };
      StreamSummary summary;
      if (audio) {
        AudioReader reader(source, {captioner->sample_rate()});
        summary = caption_stream(*captioner, reader, options, so, print_window);
      } else {
        // Image bundles: --frames frames of each window, as a video file's are sampled.
        auto produce = [&](const std::function<void(StreamChunk&&)>& emit) {
          stream_video_windows(source, so.window_s, so.hop_s, frames, [&](double start, double end, std::vector<VideoFrame>&& f) {
            StreamChunk c;
            c.start_s = start;
            c.end_s = end;
            c.frames = std::move(f);
            emit(std::move(c));
          });
        };
        summary = caption_stream(*captioner, produce, options, so, print_window);
      }
      std::fprintf(stderr, "caption: stream %s: %lld windows captioned, %lld dropped, %.1f s of %s in %.1f s\n",
                   g_stop ? "interrupted" : "ended", static_cast<long long>(summary.windows),
                   static_cast<long long>(summary.dropped), summary.stream_s, audio ? "audio" : "video", summary.wall_s);
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "caption: %s\n", e.what());
      return 2;
    }
  }
  const bool progress = !no_progress && isatty(STDERR_FILENO) && (!comm || comm->rank() == 0);
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
      if (good.empty()) {
      } else if (captioner->encoder_kind() == "cnn14") {
        std::vector<std::vector<float>> waves;
        for (auto* it : good) waves.push_back(std::move(it->waveform));
        results = captioner->caption_waveforms(waves, options);
      } else {
        std::vector<Captioner::VisualInput> visuals;
        for (auto* it : good) visuals.push_back(std::move(it->visual));
        results = captioner->caption(captioner->encode_visual(visuals), options);
      }
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
      Json j = caption_record(it.path, it.modality, results[i], it.start, it.end);
      j["timings"] = {{"decode_ms", it.decode_ms}, {"caption_ms", batch_ms}};
      print_caption(out, format, j);
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
      } else if (captioner->encoder_kind() == "clip" && window > 0 && m == Modality::Video) {
        // Windows of a video: --frames frames each, picked as a stream's windows are.
        StreamInput file;
        file.url = path;
        stream_video_windows(file, window, hop, frames, [&](double start, double end, std::vector<VideoFrame>&& f) {
          Item it{path, m, start, end};
          it.visual = captioner->visual_from_frames(f);
          it.decode_ms = ms_since(t0);
          batch.push_back(std::move(it));
          if (static_cast<int>(batch.size()) >= batch_size) flush();
          t0 = std::chrono::steady_clock::now();
        });
      } else if (captioner->encoder_kind() == "clip") {
        if (window > 0 && m == Modality::Image) throw FileError(path, "is an image; --window is for audio and video");
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
  if (total_inputs == 0) {
    std::fprintf(stderr, "caption: no input files\n");
    return 1;
  }
  if (comm) {
    try {
      const auto texts = comm->allgather_bytes(rank_out.str());
      at::Tensor failed = at::full({1}, static_cast<int64_t>(failures), at::kLong);
      comm->allreduce_sum(failed);
      if (comm->rank() == 0) {
        std::ostream& merged = output.empty() ? static_cast<std::ostream&>(std::cout) : file_out;
        for (const auto& t : texts) merged << t;
        merged.flush();
      }
      failures = static_cast<int>(failed.item<int64_t>());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "caption: %s\n", e.what());
      return 2;
    }
  }
  return failures ? 2 : 0;
}
