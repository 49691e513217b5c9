#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every test (CTest).
#   scripts/test.sh            all tests
#   scripts/test.sh -L fast    only the fast label (ctest arguments pass through)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${PREFIXCAP_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
cd "$build_dir"
ctest --output-on-failure -j "$(nproc)" "$@"
