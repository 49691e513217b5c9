// Thread setup in one place. LibTorch parallelises element-wise ops and convolutions over its
// own OpenMP pool, and its matrix products call BLAS, which (OpenBLAS pthreads) keeps a second
// pool. Both default to all cores; running both at once oversubscribes the machine.
#pragma once

namespace prefixcap {

struct ThreadOptions {
  int num_threads = 0;    // LibTorch intra-op threads; 0 = $PREFIXCAP_THREADS or all cores
  int blas_threads = 0;   // pthreads OpenBLAS threads; 0 = $PREFIXCAP_BLAS_THREADS, else 1.
                          // OpenMP OpenBLAS always shares LibTorch's pool (num_threads).
};

struct ThreadSetup {
  int num_threads = 0;
  int blas_threads = 0;       // -1 when no OpenBLAS was found in the process
  int blas_mode = -1;         // openblas_get_parallel(): 1 = pthreads, 2 = OpenMP, -1 = no OpenBLAS
};

// Applies the options (call once, early, from the app's main). Returns what was set.
ThreadSetup configure_threads(const ThreadOptions& options = {});

// Number of cores this process may run on (sched affinity), at least 1.
int available_cores();

}  // namespace prefixcap
