#!/usr/bin/env bash
# The fast tests and the fixture tests under AddressSanitizer + UndefinedBehaviorSanitizer (gcc),
# in build-asan/ (or $PREFIXCAP_ASAN_BUILD_DIR). Extra arguments replace the default selection
# (ctest -L fast, then ctest -R '^Fixtures\.').
#   scripts/sanitize.sh            build what the fast tests need, run them
#   scripts/sanitize.sh -R Hardening   other ctest selections (build everything first: PREFIXCAP_ASAN_ALL=1)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PREFIXCAP_ASAN_BUILD_DIR:-$root/build-asan}"
torch_dir=()
[[ -n "${Torch_DIR:-}" ]] && torch_dir=("-DTorch_DIR=$Torch_DIR")
# -O1 with line tables: readable sanitizer reports at a fraction of a debug build's compile time.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -g1" -DPREFIXCAP_SANITIZE=ON \
  -DPREFIXCAP_BUILD_BENCH=OFF ${torch_dir[@]+"${torch_dir[@]}"} >/dev/null
if [[ "${PREFIXCAP_ASAN_ALL:-0}" == 1 ]]; then
  cmake --build "$build" -j "$(nproc)"
else
  # the executables of the tests labelled fast (tests/CMakeLists.txt)
  cmake --build "$build" -j "$(nproc)" --target test_core test_lm test_audio test_image test_data test_service test_fixtures fixture_check
fi
# LibTorch is not built with the sanitizers: its own allocations are not checked, ours are. Leak
# checking stays on; ODR checks are off (the same inline functions come from two libraries).
export ASAN_OPTIONS="detect_leaks=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
cd "$build"
if [[ $# -gt 0 ]]; then
  ctest --output-on-failure -j "$(nproc)" "$@"
else
  # the fast label, and every fixture folder through the runner (the reference numbers)
  ctest --output-on-failure -j "$(nproc)" -L fast
  ctest --output-on-failure -j "$(nproc)" -R '^Fixtures\.'
fi
