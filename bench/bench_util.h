// Shared bits of the benchmark programs: timing, peak RSS, memory bandwidth, JSON output.
#pragma once

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace prefixcap::bench {

// The CPU's model name from /proc/cpuinfo ("unknown" elsewhere): every speed figure names it.
inline std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// A shell command's standard output (for the Python anchors).
inline std::string run_capture(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

// Runs a Python anchor script (bench/NAME.py ARGS) with `threads` OpenMP/MKL threads and parses
// the JSON object it prints last. Returns {"error": ..., "output": ...} when that fails.
template <typename Json>
Json run_python_anchor(const std::string& python, const std::string& script, const std::string& args, int threads) {
  const std::string cmd = "OMP_NUM_THREADS=" + std::to_string(threads) + " MKL_NUM_THREADS=" + std::to_string(threads) +
                          " " + python + " -W ignore " + script + " " + args + " 2>&1";
  const std::string text = run_capture(cmd);
  try {
    const size_t last = text.rfind("\n{");
    return Json::parse(text.substr(last == std::string::npos ? 0 : last + 1));
  } catch (const std::exception& e) {
    return Json{{"error", "could not run " + cmd + ": " + e.what()}, {"output", text.substr(0, 4000)}};
  }
}

// "a,b,c" -> {"a", "b", "c"}; empty items are kept (so that the caller's parser refuses them).
inline std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  for (size_t start = 0; start <= list.size();) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    items.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  return items;
}

inline double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// Best (smallest) wall time of `repeats` runs of fn, in seconds.
inline double best_time(int repeats, const std::function<void()>& fn) {
  double best = 1e300;
  for (int i = 0; i < repeats; ++i) {
    double t0 = now_seconds();
    fn();
    best = std::min(best, now_seconds() - t0);
  }
  return best;
}

// Peak resident set size of this process, bytes.
inline double peak_rss_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2,fma", "default")))
#endif
inline double sum_floats(const float* data, size_t begin, size_t end) {
  float acc[16] = {0};
  size_t i = begin;
  for (; i + 16 <= end; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += data[i + k];
  double s = 0;
  for (float a : acc) s += a;
  return s;
}

// Parses a benchmark's only option, --threads N. Returns -1 to go on, else the exit code
// (0 after --help, 1 on a bad argument) after printing the usage line.
inline int parse_threads_only(int argc, char** argv, const char* name, int* threads) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      *threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--threads N]\n", name);
      return a == "--help" ? 0 : 1;
    }
  }
  return -1;
}

// Parses the options of a benchmark whose only other input is its Python anchor: --threads N,
// --python PATH (the anchor's interpreter), --no-anchor. Returns -1 to go on, else the exit code
// (0 after --help, 1 on a bad argument) after printing the usage line.
inline int parse_anchor_options(int argc, char** argv, const char* name, int* threads, std::string* python, bool* anchor) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) *threads = std::atoi(argv[++i]);
    else if (a == "--python" && i + 1 < argc) *python = argv[++i];
    else if (a == "--no-anchor") *anchor = false;
    else {
      std::fprintf(stderr, "usage: %s [--threads N] [--python PATH] [--no-anchor]\n", name);
      return a == "--help" ? 0 : 1;
    }
  }
  return -1;
}

// Current resident set size, bytes (/proc/self/statm).
inline double current_rss_bytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<double>(resident) * 4096.0;
}

// Read bandwidth (bytes/s): `threads` threads sum disjoint parts of a buffer larger than the
// caches; best of several passes. The buffer is freed before returning.
inline double measure_read_bandwidth(int threads, size_t bytes = size_t(512) << 20) {
  const size_t n = bytes / sizeof(float);
  std::vector<float> data(n, 1.0f);
  std::vector<double> sums(threads);
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    double t0 = now_seconds();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        sums[t] = sum_floats(data.data(), n * t / threads, n * (t + 1) / threads);
      });
    }
    for (auto& th : pool) th.join();
    double dt = now_seconds() - t0;
    best = std::max(best, static_cast<double>(bytes) / dt);
  }
  double total = 0;
  for (double s : sums) total += s;
  if (total < 0) std::printf("#");  // keep the sums alive
  return best;
}

}  // namespace prefixcap::bench
