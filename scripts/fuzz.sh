#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted input (libFuzzer + ASan + UBSan).
#
#   scripts/fuzz.sh                  every target, 60 s each
#   scripts/fuzz.sh all 30           every target, 30 s each (CI)
#   scripts/fuzz.sh fuzz_pickle 600  one target, 10 minutes
#   scripts/fuzz.sh list             the targets
#
# Builds tests/fuzz/ with clang into build-fuzz/ (or $PREFIXCAP_FUZZ_BUILD_DIR), replays the
# saved regression inputs (tests/fuzz/regressions/TARGET/: every crash found so far, fixed), then
# fuzzes each target from seeds (tests/fuzz/make_seeds.py: small files of every format, plus
# the small fixture files) with its dictionary (tests/fuzz/dict/). A crash stops the run with
# its reproducer in build-fuzz/crashes/TARGET/; once fixed, copy it into
# tests/fuzz/regressions/TARGET/. Prints one JSON line per target (executions, crashes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PREFIXCAP_FUZZ_BUILD_DIR:-$root/build-fuzz}"
fixtures="${PREFIXCAP_FIXTURES:-$root/../shared/fixtures}"
which="${1:-all}"
seconds="${2:-60}"
targets=(fuzz_safetensors fuzz_torch_checkpoint fuzz_pickle fuzz_json_configs fuzz_tokenizer fuzz_audio fuzz_image fuzz_readers)
if [[ "$which" == list ]]; then printf '%s\n' "${targets[@]}"; exit 0; fi
if [[ "$which" != all ]]; then
  [[ " ${targets[*]} " == *" $which "* ]] || { echo "fuzz.sh: unknown target '$which' (scripts/fuzz.sh list)" >&2; exit 1; }
  targets=("$which")
fi
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 1; }
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is needed (scripts/setup.sh installs it)" >&2; exit 1; }

torch_dir=()
[[ -n "${Torch_DIR:-}" ]] && torch_dir=("-DTorch_DIR=$Torch_DIR")
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -gline-tables-only" -DPREFIXCAP_FUZZ=ON \
    -DPREFIXCAP_BUILD_TESTS=OFF -DPREFIXCAP_BUILD_BENCH=OFF ${torch_dir[@]+"${torch_dir[@]}"} >/dev/null
fi
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"

seeds="$build/seeds"
/usr/bin/python3 "$root/tests/fuzz/make_seeds.py" "$fixtures" "$seeds"
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export LSAN_OPTIONS="suppressions=$root/tests/fuzz/lsan.supp:${LSAN_OPTIONS:-}"
status=0
for t in "${targets[@]}"; do
  bin="$build/tests/fuzz/$t"
  # 1. every saved reproducer must now pass
  regressions="$root/tests/fuzz/regressions/$t"
  if [[ -d "$regressions" ]] && compgen -G "$regressions/*" >/dev/null; then
    if ! "$bin" -runs=1 "$regressions"/* >"$build/$t.replay.log" 2>&1; then
      echo "fuzz.sh: $t: a saved regression input fails again (log: $build/$t.replay.log)" >&2
      status=1
      continue
    fi
  fi
  # 2. fuzz from the seeds; the working corpus grows across runs
  corpus="$build/corpus/$t"
  crashes="$build/crashes/$t"
  mkdir -p "$corpus" "$crashes"
  dict=()
  [[ -f "$root/tests/fuzz/dict/$t.dict" ]] && dict=("-dict=$root/tests/fuzz/dict/$t.dict")
  max_len=65536
  [[ "$t" == fuzz_json_configs || "$t" == fuzz_tokenizer || "$t" == fuzz_readers ]] && max_len=8192
  rc=0
  "$bin" "$corpus" "$seeds/$t" ${dict[@]+"${dict[@]}"} -max_total_time="$seconds" -max_len="$max_len" -timeout=25 \
    -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix="$crashes/" >"$build/$t.log" 2>&1 || rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$build/$t.log" | grep -o '[0-9]*$' || echo 0)
  found=$(find "$crashes" -type f | wc -l)
  echo "{\"target\": \"$t\", \"seconds\": $seconds, \"executions\": ${runs:-0}, \"exit\": $rc, \"crash_files\": $found}"
  if [[ $rc -ne 0 ]]; then
    echo "fuzz.sh: $t found a problem; reproducer in $crashes, log $build/$t.log:" >&2
    grep -m 5 -E "ERROR|SUMMARY|terminate|Assertion" "$build/$t.log" >&2 || tail -5 "$build/$t.log" >&2
    status=1
  fi
done
exit $status
