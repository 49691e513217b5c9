// caption-server: a captioner bundle behind HTTP, with dynamic batching across requests.
//   caption-server --model BUNDLE [--host 127.0.0.1] [--port 8080] [options]
//
//   POST /v1/captions   multipart upload (field "file"), JSON {"media": base64, "filename": ...},
//                       or JSON {"path": ...} under an --allow-path root; options as JSON keys or
//                       form fields: beam_size, greedy, max_tokens, num_captions, window, hop,
//                       frames, sample, top_k, top_p, temperature, seed
//   GET  /health        {"status": "ok", ...}
//   GET  /v1/models     the bundle's description
//   GET  /metrics       Prometheus text
// Every error is a JSON object {"error": {"status": N, "message": "..."}}. SIGTERM or SIGINT:
// stop accepting, finish the requests in flight, exit 0.
#include <signal.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <torch/cuda.h>

#include "core/errors.h"
#include "core/threads.h"
#include "encoders/image_preprocess.h"
#include "pipeline/audio_decode.h"
#include "pipeline/caption_service.h"
#include "pipeline/captioner.h"

using namespace prefixcap;
namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// An error that becomes an HTTP response.
struct HttpError : std::runtime_error {
  HttpError(int status, const std::string& message, double retry_after_s = 0)
      : std::runtime_error(message), status(status), retry_after_s(retry_after_s) {}
  int status;
  double retry_after_s;
};

struct Settings {
  double max_duration_s = 1200;   // media longer than this: 413
  double split_over_s = 30;       // media longer than this, without "window": windows of...
  double default_window_s = 10;   // ...this many seconds
  int max_tokens = 256, max_beam = 16, max_frames = 64;
  double timeout_s = 300;
  std::vector<fs::path> allowed_roots;
  std::string api_key;
  fs::path tmp_dir;
  std::string model_name;
};

// ---- request parsing ------------------------------------------------------------------------

std::string base64_decode(const std::string& in) {
  static const auto table = [] {
    std::array<int, 256> t{};
    t.fill(-1);
    const std::string chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < chars.size(); ++i) t[static_cast<unsigned char>(chars[i])] = static_cast<int>(i);
    t['-'] = 62;  // the URL-safe alphabet too
    t['_'] = 63;
    return t;
  }();
  std::string out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  for (unsigned char c : in) {
    if (c == '=') {
      ++pad;
      continue;
    }
    if (c == '\n' || c == '\r' || c == ' ') continue;
    if (pad || table[c] < 0) throw HttpError(400, "\"media\" is not valid base64");
    acc = (acc << 6) | static_cast<uint32_t>(table[c]);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  if (pad > 2 || bits >= 6) throw HttpError(400, "\"media\" is not valid base64 (truncated)");
  return out;
}

struct MediaRequest {
  std::string name;        // shown as "path" in the results
  std::string file;        // on disk
  bool temporary = false;  // an upload written by us
  double window = 0, hop = 0;
  int frames = 8;
  DecodingOptions decoding;
  ~MediaRequest() {
    std::error_code ec;
    if (temporary) fs::remove(file, ec);
  }
};

const std::set<std::string> kOptionKeys = {"beam_size", "greedy", "max_tokens", "num_captions", "window", "hop",
                                           "frames", "sample", "top_k", "top_p", "temperature", "seed"};

template <typename T>
T option_value(const Json& j, const std::string& key) {
  try {
    return j.at(key).get<T>();
  } catch (const Json::exception&) {
    throw HttpError(400, "option \"" + key + "\" has the wrong type");
  }
}

// Options from a JSON object (keys as above); every value checked, unknown keys refused.
void apply_options(const Json& j, const Settings& s, const Captioner& captioner, MediaRequest& m) {
  DecodingOptions& o = m.decoding;
  o = captioner.default_decoding();
  bool greedy = false, sample = false;
  int beam = -1, num = 1;
  for (const auto& [key, value] : j.items()) {
    if (!kOptionKeys.count(key)) continue;
    if (key == "beam_size") beam = option_value<int>(j, key);
    if (key == "greedy") greedy = option_value<bool>(j, key);
    if (key == "sample") sample = option_value<bool>(j, key);
    if (key == "max_tokens") o.max_tokens = option_value<int>(j, key);
    if (key == "num_captions") num = option_value<int>(j, key);
    if (key == "window") m.window = option_value<double>(j, key);
    if (key == "hop") m.hop = option_value<double>(j, key);
    if (key == "frames") m.frames = option_value<int>(j, key);
    if (key == "top_k") o.top_k = option_value<int>(j, key);
    if (key == "top_p") o.top_p = option_value<double>(j, key);
    if (key == "temperature") o.temperature = option_value<double>(j, key);
    if (key == "seed") o.seed = option_value<uint64_t>(j, key);
  }
  if (j.contains("beam_size") && (beam < 1 || beam > s.max_beam))
    throw HttpError(400, "beam_size must be 1.." + std::to_string(s.max_beam));
  if (o.max_tokens < 1 || o.max_tokens > s.max_tokens)
    throw HttpError(400, "max_tokens must be 1.." + std::to_string(s.max_tokens));
  if (num < 1 || num > s.max_beam) throw HttpError(400, "num_captions must be 1.." + std::to_string(s.max_beam));
  if (m.frames < 1 || m.frames > s.max_frames) throw HttpError(400, "frames must be 1.." + std::to_string(s.max_frames));
  if (!(m.window >= 0) || !(m.hop >= 0) || !std::isfinite(m.window) || !std::isfinite(m.hop))
    throw HttpError(400, "window and hop must be seconds >= 0");
  if (m.window > 0 && m.window < 0.1) throw HttpError(400, "window must be at least 0.1 s");
  if (m.hop > 0 && m.window == 0) throw HttpError(400, "hop needs a window");
  if (m.hop > 0 && m.hop < 0.1) throw HttpError(400, "hop must be at least 0.1 s");
  if (beam > 0) o.beam_size = beam;
  if (greedy || sample) o.beam_size = 1;
  o.sample = sample;
  o.num_return = num;
  if (o.beam_size > 1 && o.num_return > o.beam_size) o.beam_size = o.num_return;
  try {
    validate(o);
  } catch (const std::exception& e) {
    throw HttpError(400, e.what());
  }
}

// A form field's text as a JSON value: numbers and booleans as such.
Json form_value(const std::string& key, const std::string& text) {
  try {
    Json v = Json::parse(text);
    if (v.is_number() || v.is_boolean()) return v;
  } catch (const Json::exception&) {
  }
  throw HttpError(400, "form field \"" + key + "\" must be a number or true/false, not \"" + text.substr(0, 40) + "\"");
}

std::string write_temporary(const Settings& s, const std::string& bytes) {
  static std::atomic<uint64_t> counter{0};
  const fs::path p = s.tmp_dir / ("upload-" + std::to_string(counter++));
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error("cannot write the upload to " + p.string() + " (disk full?)");
  return p.string();
}

fs::path allowed_path(const Settings& s, const std::string& requested) {
  if (s.allowed_roots.empty()) throw HttpError(403, "\"path\" requests are off (start the server with --allow-path ROOT)");
  std::error_code ec;
  const fs::path p = fs::canonical(requested, ec);  // symlinks resolved: no escaping the roots through one
  if (ec) throw HttpError(404, requested + ": no such file");
  for (const auto& root : s.allowed_roots) {
    auto r = root.begin();
    auto q = p.begin();
    for (; r != root.end() && q != p.end() && *r == *q; ++r, ++q) {
    }
    if (r == root.end()) {
      if (!fs::is_regular_file(p)) throw HttpError(400, requested + ": not a regular file");
      return p;
    }
  }
  throw HttpError(403, requested + ": outside the roots allowed by --allow-path");
}

void parse_request(const httplib::Request& req, const Settings& s, const Captioner& captioner, MediaRequest& m) {
  const std::string type = req.get_header_value("Content-Type");
  if (req.is_multipart_form_data()) {
    if (!req.has_file("file")) throw HttpError(400, "multipart upload without a \"file\" field");
    Json options = Json::object();
    for (const auto& [key, field] : req.files) {
      if (key == "file") continue;
      if (!kOptionKeys.count(key)) throw HttpError(400, "unknown form field \"" + key + "\"");
      options[key] = form_value(key, field.content);
    }
    const auto file = req.get_file_value("file");
    if (file.content.empty()) throw HttpError(400, "the uploaded file is empty");
    m.name = file.filename.empty() ? "upload" : file.filename;
    apply_options(options, s, captioner, m);
    m.file = write_temporary(s, file.content);
    m.temporary = true;
    return;
  }
  if (type.rfind("application/json", 0) != 0)
    throw HttpError(415, "send multipart/form-data (field \"file\") or application/json, not \"" + type + "\"");
  Json j;
  try {
    j = Json::parse(req.body);
  } catch (const Json::exception& e) {
    throw HttpError(400, std::string("the body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw HttpError(400, "the body must be a JSON object");
  for (const auto& [key, value] : j.items())
    if (!kOptionKeys.count(key) && key != "media" && key != "path" && key != "filename")
      throw HttpError(400, "unknown key \"" + key + "\"");
  if (j.contains("media") == j.contains("path")) throw HttpError(400, "give one of \"media\" (base64) or \"path\"");
  apply_options(j, s, captioner, m);
  if (j.contains("media")) {
    if (!j["media"].is_string()) throw HttpError(400, "\"media\" must be a base64 string");
    const std::string bytes = base64_decode(j["media"].get<std::string>());
    if (bytes.empty()) throw HttpError(400, "\"media\" is empty");
    m.name = j.contains("filename") && j["filename"].is_string() ? j["filename"].get<std::string>() : "upload";
    m.file = write_temporary(s, bytes);
    m.temporary = true;
  } else {
    if (!j["path"].is_string()) throw HttpError(400, "\"path\" must be a string");
    m.name = j["path"].get<std::string>();
    m.file = allowed_path(s, m.name).string();
  }
}

// ---- media to units ------------------------------------------------------------------------

struct Decoded {
  Modality modality = Modality::Audio;
  std::vector<ServiceUnit> units;
  double media_s = 0;
  bool windowed = false;
};

Decoded decode_media(Captioner& captioner, const MediaRequest& m, const Settings& s) {
  Decoded d;
  try {
    d.modality = detect_modality(m.file);
    if (captioner.encoder_kind() == "cnn14") {
      if (d.modality == Modality::Image) throw HttpError(415, m.name + " is an image; this captioner is for audio");
      AudioReader reader(m.file, {captioner.sample_rate()});
      if (reader.info().duration_s > s.max_duration_s + 0.5)
        throw HttpError(413, m.name + " lasts " + std::to_string(reader.info().duration_s) + " s; the limit is " +
                                 std::to_string(s.max_duration_s) + " s");
      const double rate = reader.output_rate();
      const std::string too_long = m.name + " is longer than the limit of " + std::to_string(s.max_duration_s) + " s";
      double window = m.window, hop = m.hop > 0 ? m.hop : m.window;
      // Windows are cut by stream_windows, as caption --window cuts them, holding one window at a time.
      auto cut_windows = [&](AudioReader& r) {
        d.windowed = true;
        stream_windows(r, window, hop, [&](double start, double end, std::vector<float>&& samples) {
          if (end > s.max_duration_s + 1.0 / rate) throw HttpError(413, too_long);
          d.media_s = end;
          if (samples.empty()) return;
          ServiceUnit u;
          u.waveform = std::move(samples);
          u.start_s = start;
          u.end_s = end;
          d.units.push_back(std::move(u));
        });
      };
      if (window == 0 && reader.info().duration_s > s.split_over_s) window = hop = s.default_window_s;  // long media
      if (window > 0) {
        cut_windows(reader);
      } else {
        const auto limit = static_cast<size_t>(s.max_duration_s * rate) + 1;
        std::vector<float> all;
        while (reader.read(all, 1 << 16) > 0)
          if (all.size() > limit) throw HttpError(413, too_long);
        if (all.empty()) throw HttpError(422, m.name + ": no audio samples decoded");
        d.media_s = static_cast<double>(all.size()) / rate;
        if (d.media_s > s.split_over_s) {  // long, though the container did not say so: decode again, in windows
          window = hop = s.default_window_s;
          AudioReader again(m.file, {captioner.sample_rate()});
          cut_windows(again);
        } else {
          ServiceUnit u;
          u.waveform = std::move(all);
          d.units.push_back(std::move(u));
        }
      }
    } else if (captioner.encoder_kind() == "clip") {
      if (d.modality == Modality::Audio) throw HttpError(415, m.name + " is audio; this captioner is for images and video");
      if (m.window > 0) throw HttpError(400, "window is for audio captioners");
      ServiceUnit u;
      u.visual = captioner.load_visual(m.file, d.modality, m.frames);
      d.units.push_back(std::move(u));
    } else {
      throw HttpError(500, "the bundle has no encoder: it cannot caption media");
    }
  } catch (const FileError& e) {
    std::string message = e.what();
    if (m.temporary) {  // the client never saw our temporary name: show theirs
      const auto at = message.find(m.file);
      if (at != std::string::npos) message.replace(at, m.file.size(), m.name);
    }
    throw HttpError(422, message);
  }
  return d;
}

// ---- metrics --------------------------------------------------------------------------------

class Metrics {
 public:
  void count(const std::string& route, int status) {
    std::lock_guard<std::mutex> lock(mu_);
    ++requests_[{route, status}];
  }
  void observe(double seconds, double media_s, bool short_media) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& h = short_media ? short_ : long_;
    h.observe(seconds);
    media_seconds_ += media_s;
  }
  std::string text(const ServiceStats& st, int64_t in_flight) {
    std::lock_guard<std::mutex> lock(mu_);
    std::ostringstream o;
    o.precision(10);
    o << "# HELP prefixcap_http_requests_total HTTP requests by route and status.\n"
         "# TYPE prefixcap_http_requests_total counter\n";
    for (const auto& [k, n] : requests_)
      o << "prefixcap_http_requests_total{route=\"" << k.first << "\",status=\"" << k.second << "\"} " << n << "\n";
    o << "# HELP prefixcap_caption_request_seconds Latency of successful caption requests (short: media <= 30 s).\n"
         "# TYPE prefixcap_caption_request_seconds histogram\n";
    short_.write(o, "short");
    long_.write(o, "long");
    o << "# HELP prefixcap_queue_depth Clips and windows waiting for a batch.\n# TYPE prefixcap_queue_depth gauge\n"
      << "prefixcap_queue_depth " << st.queued_units << "\n";
    o << "# HELP prefixcap_requests_in_flight Caption requests being handled.\n# TYPE prefixcap_requests_in_flight gauge\n"
      << "prefixcap_requests_in_flight " << in_flight << "\n";
    o << "# HELP prefixcap_batch_size Clips and windows per batch.\n# TYPE prefixcap_batch_size histogram\n";
    int64_t cumulative = 0, sum = 0;
    for (size_t n = 1; n < st.batch_sizes.size(); ++n) {
      cumulative += st.batch_sizes[n];
      sum += static_cast<int64_t>(n) * st.batch_sizes[n];
      o << "prefixcap_batch_size_bucket{le=\"" << n << "\"} " << cumulative << "\n";
    }
    o << "prefixcap_batch_size_bucket{le=\"+Inf\"} " << cumulative << "\nprefixcap_batch_size_sum " << sum
      << "\nprefixcap_batch_size_count " << cumulative << "\n";
    o << "# HELP prefixcap_media_seconds_total Seconds of audio captioned.\n# TYPE prefixcap_media_seconds_total counter\n"
      << "prefixcap_media_seconds_total " << media_seconds_ << "\n";
    o << "# HELP prefixcap_captioner_busy_seconds_total Time spent captioning.\n# TYPE prefixcap_captioner_busy_seconds_total counter\n"
      << "prefixcap_captioner_busy_seconds_total " << st.busy_s << "\n";
    return o.str();
  }

 private:
  struct Histogram {
    std::vector<double> bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
    std::vector<int64_t> counts = std::vector<int64_t>(16, 0);
    double sum = 0;
    int64_t n = 0;
    void observe(double v) {
      size_t i = 0;
      while (i < bounds.size() && v > bounds[i]) ++i;
      ++counts[i];
      sum += v;
      ++n;
    }
    void write(std::ostream& o, const char* media) const {
      int64_t cumulative = 0;
      for (size_t i = 0; i < bounds.size(); ++i) {
        cumulative += counts[i];
        o << "prefixcap_caption_request_seconds_bucket{media=\"" << media << "\",le=\"" << bounds[i] << "\"} " << cumulative << "\n";
      }
      o << "prefixcap_caption_request_seconds_bucket{media=\"" << media << "\",le=\"+Inf\"} " << n << "\n"
        << "prefixcap_caption_request_seconds_sum{media=\"" << media << "\"} " << sum << "\n"
        << "prefixcap_caption_request_seconds_count{media=\"" << media << "\"} " << n << "\n";
    }
  };
  std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  Histogram short_, long_;
  double media_seconds_ = 0;
};

// ---- connections ------------------------------------------------------------------------------

// At most `workers` connections are served at once and `waiting` more wait for a worker; a
// connection beyond those is answered 503 by an overflow thread (at most 16 at a time; beyond
// that, accepting pauses until one is free, and new connections wait in the kernel's backlog).
thread_local bool t_overflow = false;

class BoundedPool : public httplib::TaskQueue {
 public:
  BoundedPool(size_t workers, size_t waiting) : waiting_limit_(waiting) {
    for (size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  void enqueue(std::function<void()> fn) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (jobs_.size() < waiting_limit_) {
      jobs_.push_back(std::move(fn));
      lock.unlock();
      cv_.notify_one();
      return;
    }
    overflow_cv_.wait(lock, [&] { return overflow_ < 16; });
    ++overflow_;
    lock.unlock();
    std::thread([this, fn = std::move(fn)] {
      t_overflow = true;
      fn();
      std::lock_guard<std::mutex> guard(mu_);
      --overflow_;
      overflow_cv_.notify_all();
    }).detach();
  }
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    std::unique_lock<std::mutex> lock(mu_);
    overflow_cv_.wait(lock, [&] { return overflow_ == 0; });
  }

 private:
  void work() {
    while (true) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        fn = std::move(jobs_.front());
        jobs_.pop_front();
      }
      fn();
    }
  }
  size_t waiting_limit_;
  std::mutex mu_;
  std::condition_variable cv_, overflow_cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  int overflow_ = 0;
  bool stopping_ = false;
};

void send_error(httplib::Response& res, int status, const std::string& message, double retry_after_s = 0) {
  res.status = status;
  if (retry_after_s > 0) res.set_header("Retry-After", std::to_string(static_cast<int64_t>(std::ceil(retry_after_s))));
  res.set_content(json_dump(Json{{"error", {{"status", status}, {"message", message}}}}), "application/json");
}

std::string route_of(const httplib::Request& req) {
  static const std::set<std::string> known = {"/health", "/v1/models", "/v1/captions", "/metrics"};
  return known.count(req.path) ? req.path : "other";
}

}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  CLI::App app{"Serve a prefixcap captioner bundle over HTTP, batching concurrent requests"};
  std::string model, host = "127.0.0.1", device = "cpu", lm_dtype = "float32", encoder_dtype = "float32", tmp;
  int port = 8080, threads = 0, connections = 32, max_batch = 16;
  double batch_wait_ms = 5, max_body_mb = 64, read_timeout = 30;
  int64_t max_queue = 1024;
  bool access_log = false;
  std::vector<std::string> allow;
  Settings s;
  app.add_option("-m,--model", model, "captioner bundle folder (captioner.json)")->required()->check(CLI::ExistingDirectory);
  app.add_option("--host", host, "address to bind (0.0.0.0: every interface)")->capture_default_str();
  app.add_option("--port", port, "port (0: any free port; the chosen one is printed)")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--threads", threads, "CPU threads for captioning (0 = all cores)")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--lm-dtype", lm_dtype,
                 "GPT-2 weights for CPU decoding: float32, bfloat16, int8 (weight-only, per-row scales) or "
                 "int8-dynamic (activations quantised per row too)")
      ->capture_default_str()->check(CLI::IsMember({"float32", "bfloat16", "int8", "int8-dynamic"}));
  app.add_option("--encoder-dtype", encoder_dtype,
                 "encoder arithmetic on the CPU: float32, or int8-dynamic (CNN14's convolutions and the CLIP ViT's "
                 "linear layers as int8 products, activations quantised per row at run time: about 3x float32 with "
                 "AVX-512 VNNI, 4-5x with AMX; embeddings within cosine 0.999 of float32's in the tests; not the CLIP "
                 "ResNet)")
      ->capture_default_str()->check(CLI::IsMember({"float32", "int8-dynamic"}));
  app.add_option("--max-batch", max_batch, "clips, windows or images per batch (1 = no batching)")->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("--batch-wait-ms", batch_wait_ms, "how long a batch waits for more requests")->capture_default_str()->check(CLI::Range(0.0, 1000.0));
  app.add_option("--max-queue", max_queue, "clips and windows waiting, at most (then 429)")->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--max-connections", connections, "connections served at once (as many wait; beyond: 503)")->capture_default_str()->check(CLI::Range(1, 1024));
  app.add_option("--max-body-mb", max_body_mb, "largest request body (then 413)")->capture_default_str()->check(CLI::Range(0.001, 4096.0));
  app.add_option("--max-duration", s.max_duration_s, "longest media in seconds (then 413)")->capture_default_str()->check(CLI::Range(1.0, 86400.0));
  app.add_option("--split-over", s.split_over_s, "media longer than this without a window are captioned in windows")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--default-window", s.default_window_s, "the window (and hop) used then, in seconds")->capture_default_str()->check(CLI::Range(0.1, 3600.0));
  app.add_option("--timeout", s.timeout_s, "seconds a request may wait for its captions (then 504)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--read-timeout", read_timeout, "seconds a client may take to send its request")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--allow-path", allow, "serve {\"path\": ...} requests for files under this folder (repeatable)")->check(CLI::ExistingDirectory);
  app.add_option("--api-key", s.api_key, "require 'Authorization: Bearer KEY' (default: $PREFIXCAP_API_KEY, else none)");
  app.add_option("--tmp-dir", tmp, "where uploads are written while they are decoded (default: $TMPDIR)");
  app.add_flag("--access-log", access_log, "one line per request on stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;
  }
  if (s.api_key.empty())
    if (const char* k = std::getenv("PREFIXCAP_API_KEY")) s.api_key = k;

  // SIGINT/SIGTERM go to one waiting thread (blocked everywhere else, set before any thread starts).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<Captioner> captioner;
  try {
    configure_threads({threads, 0});
    captioner = std::make_unique<Captioner>(Captioner::load(model));
    if (device == "cuda") {
      if (!torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device is available to this LibTorch build");
      captioner->to(at::Device(at::kCUDA));
    }
    captioner->set_lm_dtype(parse_weight_dtype(lm_dtype));
    captioner->set_encoder_dtype(parse_weight_dtype(encoder_dtype));
    if (captioner->encoder_kind() == "none") throw std::runtime_error("the bundle has no encoder: it cannot caption media");
    for (const auto& root : allow) s.allowed_roots.push_back(fs::canonical(root));
    const fs::path base = tmp.empty() ? fs::temp_directory_path() : fs::path(tmp);
    std::string tmpl = (base / "prefixcap-server-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("cannot create a temporary folder under " + base.string());
    s.tmp_dir = tmpl;
    s.model_name = fs::path(model).lexically_normal().filename().string();
    if (s.model_name.empty()) s.model_name = fs::canonical(model).filename().string();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption-server: %s\n", e.what());
    return 1;
  }
  struct RemoveTmp {
    fs::path dir;
    ~RemoveTmp() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } remove_tmp{s.tmp_dir};

  Metrics metrics;
  std::atomic<int64_t> in_flight{0};
  std::atomic<bool> shutting_down{false};
  auto service = std::make_unique<CaptionService>(*captioner, ServiceOptions{max_batch, batch_wait_ms, max_queue});
  httplib::Server server;
  server.new_task_queue = [connections] { return new BoundedPool(connections, connections); };
  server.set_payload_max_length(static_cast<size_t>(max_body_mb * 1024 * 1024));
  server.set_read_timeout(static_cast<time_t>(read_timeout), 0);
  server.set_keep_alive_max_count(100);

  server.set_pre_routing_handler([&](const httplib::Request& req, httplib::Response& res) {
    if (t_overflow) {
      res.set_header("Connection", "close");
      send_error(res, 503, "too many connections; try again", 1);
      return httplib::Server::HandlerResponse::Handled;
    }
    if (!s.api_key.empty() && req.path != "/health") {
      const std::string auth = req.get_header_value("Authorization");
      const std::string key = req.get_header_value("X-API-Key");
      if (auth != "Bearer " + s.api_key && key != s.api_key) {
        res.set_header("WWW-Authenticate", "Bearer");
        send_error(res, 401, "missing or wrong API key (Authorization: Bearer KEY)");
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  server.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;  // ours already
    std::string message = res.status == 404 ? "no such route: " + req.method + " " + req.path
                          : res.status == 413 ? "the request body is larger than the server accepts (--max-body-mb)"
                          : res.status == 400 ? "malformed HTTP request"
                          : res.status == 405 ? "method not allowed"
                                              : "HTTP error " + std::to_string(res.status);
    send_error(res, res.status, message);
    return httplib::Server::HandlerResponse::Handled;
  }));
  server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string message = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      message = std::string("internal error: ") + e.what();
    } catch (...) {
    }
    send_error(res, 500, message);
  });
  server.set_logger([&](const httplib::Request& req, const httplib::Response& res) {
    metrics.count(route_of(req), res.status);
    if (access_log) std::fprintf(stderr, "%s %s %d %zu\n", req.method.c_str(), req.path.c_str(), res.status, res.body.size());
  });

  server.Get("/health", [&](const httplib::Request&, httplib::Response& res) {
    const auto st = service->stats();
    res.set_content(json_dump(Json{{"status", shutting_down ? "draining" : "ok"},
                                   {"queue_depth", st.queued_units},
                                   {"requests_in_flight", in_flight.load()}}),
                    "application/json");
  });
  server.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
    const DecodingOptions d = captioner->default_decoding();
    Json m = {{"id", s.model_name},
              {"encoder", captioner->encoder_kind()},
              {"modalities", captioner->encoder_kind() == "cnn14" ? Json::array({"audio", "video"}) : Json::array({"image", "video"})},
              {"decoding", {{"beam_size", d.beam_size}, {"max_tokens", d.max_tokens}}},
              {"stop", captioner->stop_strings},
              {"source", captioner->source},
              {"limits",
               {{"max_duration_s", s.max_duration_s},
                {"split_over_s", s.split_over_s},
                {"default_window_s", s.default_window_s},
                {"max_body_bytes", static_cast<int64_t>(max_body_mb * 1024 * 1024)},
                {"max_batch", max_batch},
                {"max_queue", max_queue}}}};
    if (captioner->encoder_kind() == "cnn14") m["sample_rate"] = captioner->sample_rate();
    res.set_content(json_dump(Json{{"models", Json::array({m})}}), "application/json");
  });
  server.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics.text(service->stats(), in_flight.load()), "text/plain; version=0.0.4");
  });
  server.Post("/v1/captions", [&](const httplib::Request& req, httplib::Response& res) {
    const auto t0 = Clock::now();
    auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    ++in_flight;
    struct Leave {
      std::atomic<int64_t>& n;
      ~Leave() { --n; }
    } leave{in_flight};
    try {
      if (shutting_down) throw HttpError(503, "the server is shutting down", 5);
      MediaRequest m;
      parse_request(req, s, *captioner, m);
      Decoded d = decode_media(*captioner, m, s);
      const auto t_decoded = Clock::now();
      std::vector<std::pair<double, double>> spans;
      for (const auto& u : d.units) spans.emplace_back(u.start_s, u.end_s);
      std::shared_ptr<CaptionService::Request> ticket;
      try {
        ticket = service->submit(std::move(d.units), m.decoding);
      } catch (const QueueFull& e) {
        throw HttpError(429, e.what(), e.retry_after_s);
      } catch (const std::length_error& e) {
        throw HttpError(413, std::string(e.what()) + "; use a longer window or split the media");
      } catch (const std::runtime_error& e) {
        throw HttpError(503, e.what(), 5);
      }
      if (!service->wait(ticket, std::chrono::duration<double>(s.timeout_s))) {
        service->cancel(ticket);
        throw HttpError(504, "no captions within " + std::to_string(s.timeout_s) + " s (--timeout)");
      }
      std::vector<std::vector<Caption>> captions;
      try {
        captions = service->results(ticket);
      } catch (const std::exception& e) {
        throw HttpError(500, std::string("captioning failed: ") + e.what());
      }
      Json results = Json::array();
      for (size_t i = 0; i < captions.size(); ++i) {
        results.push_back(caption_record(m.name, d.modality, captions[i], d.windowed ? spans[i].first : -1, spans[i].second));
      }
      const auto t_end = Clock::now();
      res.set_content(json_dump(Json{{"model", s.model_name},
                                     {"results", results},
                                     {"timings",
                                      {{"decode_ms", ms(t0, t_decoded)},
                                       {"queue_ms", service->queue_ms(ticket)},
                                       {"total_ms", ms(t0, t_end)}}}}),
                      "application/json");
      metrics.observe(ms(t0, t_end) / 1000.0, d.media_s, d.media_s <= 30);
    } catch (const HttpError& e) {
      send_error(res, e.status, e.what(), e.retry_after_s);
    }
  });

  int bound = port;
  if (port == 0) {
    bound = server.bind_to_any_port(host);
    if (bound < 0) {
      std::fprintf(stderr, "caption-server: cannot bind %s\n", host.c_str());
      return 1;
    }
  } else if (!server.bind_to_port(host, port)) {
    std::fprintf(stderr, "caption-server: cannot bind %s:%d (in use? another --port?)\n", host.c_str(), port);
    return 1;
  }
  std::thread([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::fprintf(stderr, "caption-server: %s: finishing the requests in flight\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    shutting_down = true;
    service->drain();
    server.stop();
  }).detach();
  std::printf("caption-server: listening on http://%s:%d (model %s, %s encoder, max batch %d)\n", host.c_str(), bound,
              s.model_name.c_str(), captioner->encoder_kind().c_str(), max_batch);
  std::fflush(stdout);
  const bool ok = server.listen_after_bind();  // returns once stopped and every connection is done
  service.reset();                             // every queued unit is captioned by now
  std::fprintf(stderr, "caption-server: stopped\n");
  return ok || shutting_down ? 0 : 1;
}
