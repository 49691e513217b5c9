#!/usr/bin/env bash
# The main job. Until the captioning CLI and the demo captioner land (see the issues), this is a
# smoke run of the engine: it builds prefixcap if needed and checks GPT-2, the tokenizer, the
# audio and image paths against the upstream golden data in ../shared/fixtures.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${PREFIXCAP_BUILD_DIR:-$root/build}"
fixtures="${PREFIXCAP_FIXTURES:-$root/../shared/fixtures}"
[[ -x "$build_dir/tests/fixture_check" ]] || "$root/scripts/setup.sh"
"$build_dir/tests/fixture_check" "$fixtures/gpt2-tiny" "$fixtures/gpt2-tokenizer" "$fixtures/audio-decode" \
  "$fixtures/mel-frontend" "$fixtures/cnn14-tiny" "$fixtures/clip-vit-tiny" "$fixtures/clipcap-tiny" \
  "$fixtures/prefix-aac-tiny" 2>/dev/null | grep -E "^(FAIL|[0-9]+ passed)" || true
echo "GPT-2 124M decoding speed on this machine (random weights):"
"$build_dir/bench/lm_bench" --tokens 24
