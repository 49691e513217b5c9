// serve_bench: load on caption-server over loopback. N clients send requests back to back for a
// fixed time — short clips, some long recordings (captioned in windows), some malformed requests
// — against a server that batches (--max-batch B) and, as the anchor in the same run, against the
// same server captioning one clip or window at a time (--max-batch 1). Prints one JSON object:
// throughput, latency percentiles of the short requests, status counts, the server's mean batch
// size and peak RSS, and the batching gain.
//   serve_bench [--model BUNDLE] [--clients 8] [--seconds 20] [--max-batch 16] [--threads 2]
#include <sndfile.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "core/threads.h"
#include "bench/bench_bundle.h"
#include "bench/bench_util.h"
#include "tests/test_process.h"

using namespace prefixcap;
using namespace prefixcap::bench;
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

std::string wav(const fs::path& dir, const std::string& name, double seconds, int rate, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.15f);
  std::vector<float> x(static_cast<size_t>(seconds * rate));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::max(-1.0f, std::min(1.0f, n(rng) * std::sin(0.0005f * i * (1 + seed % 7))));
  const std::string path = (dir / name).string();
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  if (!f) throw std::runtime_error("cannot write " + path);
  sf_writef_float(f, x.data(), static_cast<sf_count_t>(x.size()));
  sf_close(f);
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

struct Load {
  int clients = 8;
  double seconds = 20;
  double long_fraction = 0.1, malformed_fraction = 0.15;
  std::vector<std::string> shorts, longs;
};

Json run_load(const std::string& server_bin, const std::string& bundle, int max_batch, int threads, const Load& load,
              const fs::path& dir) {
  const std::string out = (dir / ("server-" + std::to_string(max_batch) + ".out")).string();
  const std::string err = (dir / ("server-" + std::to_string(max_batch) + ".err")).string();
  testing::Child server({server_bin, "-m", bundle, "--port", "0", "--threads", std::to_string(threads), "--max-batch",
                         std::to_string(max_batch), "--max-connections", std::to_string(load.clients + 2)},
                        out, err);
  const int port = testing::listening_port(server, out, 120);
  if (port == 0) throw std::runtime_error("caption-server did not start (see " + err + ")");

  std::mutex mu;
  std::vector<double> short_latency, long_latency;
  int64_t ok = 0, valid_not_ok = 0, malformed_4xx = 0, malformed_other = 0, server_5xx = 0, no_response = 0;
  const double t_end = now_seconds() + load.seconds;
  const double t_start = now_seconds();
  std::vector<std::thread> clients;
  for (int c = 0; c < load.clients; ++c) {
    clients.emplace_back([&, c] {
      std::mt19937 rng(1000 + c);
      std::uniform_real_distribution<double> u(0, 1);
      httplib::Client client("127.0.0.1", port);
      client.set_read_timeout(300, 0);
      int sent = 0;
      while (now_seconds() < t_end) {
        const double r = u(rng);
        const bool malformed = r < load.malformed_fraction;
        const bool is_long = !malformed && r < load.malformed_fraction + load.long_fraction;
        httplib::Result res = [&] {
          if (malformed) {
            switch (sent++ % 4) {
              case 0: return client.Post("/v1/captions", "{broken", "application/json");
              case 1: return client.Post("/v1/captions", R"({"media": "!!!"})", "application/json");
              case 2: return client.Post("/v1/captions", httplib::MultipartFormDataItems{{"file", "not audio at all", "x.wav", ""}});
              default: return client.Post("/v1/captions", R"({"media": "AAAA", "beam_size": -3})", "application/json");
            }
          }
          const auto& pool = is_long ? load.longs : load.shorts;
          const std::string& media = pool[rng() % pool.size()];
          return client.Post("/v1/captions", httplib::MultipartFormDataItems{{"file", media, "clip.wav", "audio/wav"}});
        }();
        std::lock_guard<std::mutex> lock(mu);
        if (!res) {
          ++no_response;
          continue;
        }
        if (res->status >= 500) ++server_5xx;
        if (malformed) {
          if (res->status >= 400 && res->status < 500) ++malformed_4xx;
          else ++malformed_other;
        } else if (res->status == 200) {
          ++ok;
          const Json j = Json::parse(res->body);
          const double ms = j["timings"]["total_ms"].get<double>();
          (is_long ? long_latency : short_latency).push_back(ms);
        } else {
          ++valid_not_ok;
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  const double wall = now_seconds() - t_start;

  httplib::Client probe("127.0.0.1", port);
  auto metrics = probe.Get("/metrics");
  double batches = 0, units = 0;
  if (metrics) {
    std::istringstream in(metrics->body);
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("prefixcap_batch_size_count ", 0) == 0) batches = std::stod(line.substr(27));
      if (line.rfind("prefixcap_batch_size_sum ", 0) == 0) units = std::stod(line.substr(25));
    }
  }
  const long peak_kib = server.status_kib("VmHWM");
  server.signal(SIGTERM);
  const int rc = server.wait(120);

  Json r;
  r["max_batch"] = max_batch;
  r["requests_ok"] = ok;
  r["requests_per_s"] = static_cast<double>(ok) / wall;
  r["short_latency_ms"] = {{"p50", percentile(short_latency, 0.5)},
                           {"p95", percentile(short_latency, 0.95)},
                           {"p99", percentile(short_latency, 0.99)},
                           {"n", short_latency.size()}};
  r["long_latency_ms"] = {{"p50", percentile(long_latency, 0.5)}, {"n", long_latency.size()}};
  r["valid_not_200"] = valid_not_ok;
  r["malformed_4xx"] = malformed_4xx;
  r["malformed_not_4xx"] = malformed_other;
  r["server_5xx"] = server_5xx;
  r["no_response"] = no_response;
  r["mean_batch_size"] = batches > 0 ? units / batches : 0.0;
  r["units_captioned"] = units;
  r["server_peak_rss_mib"] = static_cast<double>(peak_kib) / 1024.0;
  r["server_exit_code_after_sigterm"] = rc;
  r["crashed"] = rc != 0;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  std::string model, fixtures = "../shared/fixtures", server_bin = PREFIXCAP_SERVER_BIN;
  int max_batch = 16, threads = 2;
  Load load;
  double short_s = 2, long_s = 60;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--model") model = next();
    else if (a == "--fixtures") fixtures = next();
    else if (a == "--server") server_bin = next();
    else if (a == "--clients") load.clients = std::stoi(next());
    else if (a == "--seconds") load.seconds = std::stod(next());
    else if (a == "--max-batch") max_batch = std::stoi(next());
    else if (a == "--threads") threads = std::stoi(next());
    else if (a == "--short-seconds") short_s = std::stod(next());
    else if (a == "--long-seconds") long_s = std::stod(next());
    else {
      std::fprintf(stderr,
                   "usage: serve_bench [--model BUNDLE | --fixtures DIR] [--server BIN] [--clients N] [--seconds T]\n"
                   "                   [--max-batch B] [--threads N] [--short-seconds S] [--long-seconds S]\n");
      return a == "--help" ? 0 : 1;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  const fs::path dir = fs::temp_directory_path() / ("prefixcap-serve-bench-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  Json out;
  out["benchmark"] = "serve_bench";
  out["cpu"] = prefixcap::bench::cpu_model_name();
  out["server_threads"] = threads;
  out["clients"] = load.clients;
  out["seconds"] = load.seconds;
  int rc = 0;
  try {
    if (model.empty()) {
      model = import_fixture_aac_bundle(fixtures, (dir / "bundle").string());
      out["bundle"] = "prefix-aac-tiny (imported)";
    } else {
      out["bundle"] = model;
    }
    const int rate = 16000;
    for (int i = 0; i < 8; ++i) load.shorts.push_back(wav(dir, "s" + std::to_string(i) + ".wav", short_s, rate, i));
    for (int i = 0; i < 2; ++i) load.longs.push_back(wav(dir, "l" + std::to_string(i) + ".wav", long_s, rate, 100 + i));
    out["mix"] = {{"short_media_s", short_s},
                  {"long_media_s", long_s},
                  {"long_fraction", load.long_fraction},
                  {"malformed_fraction", load.malformed_fraction}};
    Json batched = run_load(server_bin, model, max_batch, threads, load, dir);
    Json single = run_load(server_bin, model, 1, threads, load, dir);
    out["batched"] = batched;
    out["one_at_a_time"] = single;
    out["throughput_gain"] = batched["requests_per_s"].get<double>() / std::max(1e-9, single["requests_per_s"].get<double>());
    out["short_p50_gain"] = single["short_latency_ms"]["p50"].get<double>() / std::max(1e-9, batched["short_latency_ms"]["p50"].get<double>());
    out["short_p99_gain"] = single["short_latency_ms"]["p99"].get<double>() / std::max(1e-9, batched["short_latency_ms"]["p99"].get<double>());
  } catch (const std::exception& e) {
    out["error"] = e.what();
    rc = 1;
  }
  fs::remove_all(dir);
  std::printf("%s\n", out.dump(2).c_str());
  return rc;
}
