#include "core/threads.h"

#include <dlfcn.h>
#include <sched.h>

#include <cstdlib>
#include <string>
#include <thread>

#include <ATen/Parallel.h>

#include "core/errors.h"

namespace prefixcap {

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

namespace {
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  try {
    size_t used = 0;
    int n = std::stoi(v, &used);
    if (used != std::string(v).size() || n < 0) throw std::invalid_argument(v);
    return n;
  } catch (const std::exception&) {
    throw ConfigError(std::string("$") + name + " must be a non-negative integer, got '" + v + "'");
  }
}

// OpenBLAS is reached through LibTorch's BLAS dependency; look its setter up at run time so
// the build does not depend on which BLAS Debian's alternatives point at.
int set_blas_threads(int n) {
  using SetFn = void (*)(int);
  auto fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (!fn) return -1;
  fn(n);
  return n;
}
}  // namespace

ThreadSetup configure_threads(const ThreadOptions& options) {
  ThreadSetup setup;
  setup.num_threads = options.num_threads > 0 ? options.num_threads
                                              : env_int("PREFIXCAP_THREADS", 0);
  if (setup.num_threads <= 0) setup.num_threads = available_cores();
  int blas = options.blas_threads > 0 ? options.blas_threads : env_int("PREFIXCAP_BLAS_THREADS", 0);
  if (blas <= 0) blas = setup.num_threads;
  at::set_num_threads(setup.num_threads);
  setup.blas_threads = set_blas_threads(blas);
  return setup;
}

}  // namespace prefixcap
