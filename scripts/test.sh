#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every test (CTest).
#   scripts/test.sh            all tests
#   scripts/test.sh -L fast    only the fast label (ctest arguments pass through)
# With no arguments it also fuzzes every parser for 30 s (scripts/fuzz.sh; replaying the saved
# crash inputs first), runs the fast and fixture tests under ASan + UBSan (scripts/sanitize.sh),
# and runs the demo's reduced path (scripts/demo.sh --quick: a small Debian package's clips, a
# few training steps) so that the demo cannot rot. PREFIXCAP_SKIP_FUZZ=1, PREFIXCAP_SKIP_SANITIZE=1,
# PREFIXCAP_SKIP_DEMO=1 skip those steps; PREFIXCAP_FUZZ_SECONDS sets the fuzzing time per target.
# Last, the second LibTorch configuration: the PyPI torch wheel's LibTorch 2.15 (a CUDA build,
# with prefixcap's CUDA kernels compiled and linked; run on the CPU here), built into build-pypi/
# and the whole CTest suite run again (PREFIXCAP_SKIP_PYPI=1 skips it; `gpu` tests skip
# themselves without a GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${PREFIXCAP_TORCH:-debian}" == pypi ]]; then
  build_dir="${PREFIXCAP_BUILD_DIR:-$root/build-pypi}"  # the PyPI configuration alone
  export PREFIXCAP_SKIP_PYPI=1
else
  build_dir="${PREFIXCAP_BUILD_DIR:-$root/build}"
fi
"$root/scripts/setup.sh"
cd "$build_dir"
ctest --output-on-failure -j "$(nproc)" "$@"
if [[ $# -eq 0 && "${PREFIXCAP_SKIP_FUZZ:-0}" != 1 ]]; then
  echo "== fuzzing: saved regressions replayed, every target ${PREFIXCAP_FUZZ_SECONDS:-30} s (scripts/fuzz.sh)"
  "$root/scripts/fuzz.sh" all "${PREFIXCAP_FUZZ_SECONDS:-30}"
fi
if [[ $# -eq 0 && "${PREFIXCAP_SKIP_SANITIZE:-0}" != 1 ]]; then
  echo "== fast and fixture tests under ASan + UBSan (scripts/sanitize.sh)"
  "$root/scripts/sanitize.sh"
fi
if [[ $# -eq 0 && "${PREFIXCAP_SKIP_DEMO:-0}" != 1 ]]; then
  echo "== demo, reduced (scripts/demo.sh --quick)"
  rc=0
  PREFIXCAP_DEMO_DIR="${PREFIXCAP_DEMO_DIR:-$build_dir/demo-quick}" "$root/scripts/demo.sh" --quick --fresh || rc=$?
  if [[ $rc == 3 ]]; then
    echo "== demo skipped: its Debian package could not be downloaded (no network?)"
  elif [[ $rc != 0 ]]; then
    echo "== demo FAILED (exit $rc)" >&2
    exit "$rc"
  fi
fi
if [[ $# -eq 0 && "${PREFIXCAP_SKIP_PYPI:-0}" != 1 ]]; then
  echo "== the second LibTorch configuration: PyPI torch (scripts/setup.sh with PREFIXCAP_TORCH=pypi)"
  PREFIXCAP_TORCH=pypi PREFIXCAP_BUILD_DIR="$root/build-pypi" "$root/scripts/setup.sh"
  (cd "$root/build-pypi" && ctest --output-on-failure -j "$(nproc)")
fi
