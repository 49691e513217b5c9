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

// OpenBLAS chooses its kernels when it loads, from the CPU model. Debian 12's OpenBLAS (0.3.21)
// does not know recent Xeons (seen here: an AVX-512/AMX Xeon reported as "Prescott") and falls
// back to generic SSE3 kernels, about 4x slower (ViT-B/32 at batch 16: 3.7 vs 14-21 images/s).
// When OpenBLAS is in the process, reports such a fallback core, and $OPENBLAS_CORETYPE is unset,
// this re-executes the program with OPENBLAS_CORETYPE chosen from the CPU's features (SkylakeX
// with AVX-512, Haswell with AVX2 + FMA): the same program, arguments and streams. Call it first in
// main(), before any thread starts. Returns normally in every other case (and if exec fails).
void select_blas_kernels(char** argv);

// Number of cores this process may run on (sched affinity), at least 1.
int available_cores();

}  // namespace prefixcap
