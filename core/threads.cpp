#include "core/threads.h"

#include <dlfcn.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>

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

// OpenBLAS is reached through LibTorch's BLAS dependency (Debian's libblas.so.3 alternative);
// look its functions up at run time so the build does not depend on which BLAS that is.
// openblas_get_parallel(): 0 = single-threaded build, 1 = pthreads, 2 = OpenMP.
int blas_parallel_mode() {
  using GetFn = int (*)();
  auto fn = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  return fn ? fn() : -1;
}

int set_blas_threads(int n) {
  using SetFn = void (*)(int);
  auto fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (!fn) return -1;
  fn(n);
  return n;
}
}  // namespace

void select_blas_kernels(char** argv) {
  if (argv == nullptr || argv[0] == nullptr || std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  using NameFn = char* (*)();
  auto corename = reinterpret_cast<NameFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (!corename || !corename()) return;
  std::string core = corename();
  std::transform(core.begin(), core.end(), core.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // OpenBLAS's generic x86-64 fallbacks (DYNAMIC_ARCH): what it runs on a CPU it does not know.
  if (core != "prescott" && core != "core2" && core != "nehalem" && core != "unknown") return;
  __builtin_cpu_init();
  const char* better = __builtin_cpu_supports("avx512f") ? "SkylakeX"
                       : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? "Haswell"
                                                                                            : nullptr;
  if (!better) return;
  if (setenv("OPENBLAS_CORETYPE", better, 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: go on with the generic kernels
}

ThreadSetup configure_threads(const ThreadOptions& options) {
  ThreadSetup setup;
  setup.num_threads = options.num_threads > 0 ? options.num_threads
                                              : env_int("PREFIXCAP_THREADS", 0);
  if (setup.num_threads <= 0) setup.num_threads = available_cores();
  const int mode = blas_parallel_mode();
  int blas = options.blas_threads > 0 ? options.blas_threads : env_int("PREFIXCAP_BLAS_THREADS", 0);
  if (mode == 2) {
    // OpenMP OpenBLAS shares LibTorch's thread pool (its setter changes the OpenMP thread
    // count for everyone), so both get the same number.
    blas = setup.num_threads;
  } else if (blas <= 0) {
    // The pthreads build keeps a second pool whose threads fight LibTorch's spinning OpenMP
    // workers for the cores (GPT-2 decoding measured 16 tokens/s with 2+2 threads, 38 with
    // 2+1 on 2 cores), so it gets one thread unless told otherwise.
    blas = mode == 1 ? 1 : setup.num_threads;
  }
  setup.blas_threads = set_blas_threads(blas);
  at::set_num_threads(setup.num_threads);  // last: OpenBLAS's setter may touch OpenMP's count
  setup.blas_mode = mode;
  return setup;
}

}  // namespace prefixcap
