#!/usr/bin/env bash
# One prepared check for a machine with a GPU and a CUDA PyTorch already installed (its LibTorch
# is what prefixcap builds against): builds what the GPU checks need, runs the `gpu` tests and the
# fixture runner (which compares the CUDA kernels with the golden data when a GPU is present),
# then bench/gpu_bench, and prints one JSON object. Meant to finish in under 5 minutes on a
# machine with 16 cores.
#
#   scripts/device_check.sh                   # python3 must import a CUDA torch
#   PREFIXCAP_PYTHON=/path/to/python scripts/device_check.sh
#   PREFIXCAP_DEVICE_BUILD_DIR=build-device   # where to build (default)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PREFIXCAP_PYTHON:-python3}"
build="${PREFIXCAP_DEVICE_BUILD_DIR:-$root/build-device}"
log="$build/device_check.log"
mkdir -p "$build"
: >"$log"
started=$(date +%s)

json_error() {  # MESSAGE: one JSON object on stdout, the log's tail on stderr
  "$python" - "$1" "$log" <<'EOF' 2>/dev/null || printf '{"ok": false, "error": "%s"}\n' "$1"
import json, sys
print(json.dumps({"ok": False, "error": sys.argv[1], "log_tail": open(sys.argv[2]).read()[-4000:]}))
EOF
  exit 1
}

prefix=$("$python" -c 'import torch; assert torch.cuda.is_available(), "torch has no CUDA device"; print(torch.utils.cmake_prefix_path)' 2>>"$log") ||
  json_error "$python cannot import a CUDA torch with a visible GPU"
torch_version=$("$python" -c 'import torch; print(torch.__version__)')
gpu_name=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0))')
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[[ -x "$nvcc_bin" ]] || json_error "nvcc not found (the CUDA toolkit compiles prefixcap's kernels)"

jobs=$(nproc)
{
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DPREFIXCAP_BUILD_BENCH=ON -DPREFIXCAP_BUILD_TESTS=ON &&
    cmake --build "$build" -j "$jobs" --target test_gpu fixture_check gpu_bench
} >>"$log" 2>&1 || json_error "build failed"
built=$(date +%s)

cd "$build" || exit 1
ctest -L gpu --output-on-failure >>"$log" 2>&1
gpu_tests=$?
fixtures=$("$build/tests/fixture_check" "$root"/../shared/fixtures/mel-frontend "$root"/../shared/fixtures/clip-vit-tiny \
  "$root"/../shared/fixtures/clip-rn-tiny 2>&1 | tee -a "$log" | tail -1)
cuda_checks=$(grep -c "(CUDA)" "$log")
bench=$("$build/bench/gpu_bench" 2>>"$log") || bench='{"error": "gpu_bench failed"}'
finished=$(date +%s)

"$python" - "$gpu_tests" "$fixtures" "$cuda_checks" "$bench" "$torch_version" "$gpu_name" \
  "$((built - started))" "$((finished - started))" <<'EOF'
import json, sys
tests, fixtures, cuda_checks, bench, torch_version, gpu, build_s, total_s = sys.argv[1:]
print(json.dumps({
    "ok": tests == "0" and " 0 failed" in fixtures,
    "gpu": gpu, "torch": torch_version,
    "gpu_tests_exit_code": int(tests),
    "fixture_check": fixtures.strip(), "fixture_cases_compared_on_the_gpu": int(cuda_checks),
    "bench": json.loads(bench),
    "build_seconds": int(build_s), "total_seconds": int(total_s),
}, indent=2))
EOF
