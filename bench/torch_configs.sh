#!/usr/bin/env bash
# The two LibTorch configurations side by side, in one run: lm_bench, image_bench, audio_bench and
# train_bench's Prefix-AAC step from build/ (Debian's LibTorch 1.13) and build-pypi/ (the PyPI
# wheel's LibTorch 2.15), alternating, each figure with its ratio pypi / debian. Prints JSON.
#   bench/torch_configs.sh [DEBIAN_BUILD [PYPI_BUILD]]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
debian="${1:-$root/build}"
pypi="${2:-$root/build-pypi}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for b in lm_bench image_bench audio_bench train_bench; do
  for which in debian pypi; do
    dir=$debian
    [[ $which == pypi ]] && dir=$pypi
    args=(--threads 2)
    [[ $b == train_bench ]] && args+=(--skip-pipeline)
    [[ $b == lm_bench ]] && args+=(--dtypes float32 --no-anchor)
    [[ $b == audio_bench ]] && args+=(--conv-paths auto --no-anchor)
    [[ $b == image_bench ]] && args+=(--no-anchor)
    "$dir/bench/$b" "${args[@]}" >"$out/$b.$which.json" 2>/dev/null
  done
done
python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(b, w): return json.load(open(os.path.join(out, f"{b}.{w}.json")))
figures = {
    "gpt2_greedy_b1_tokens_per_s": ("lm_bench", lambda d: d["dtypes"]["float32"]["greedy_b1_tokens_per_s"]),
    "gpt2_greedy_b16_tokens_per_s": ("lm_bench", lambda d: d["dtypes"]["float32"]["greedy_b16_tokens_per_s"]),
    "gpt2_beam5_steps_per_s": ("lm_bench", lambda d: 1000.0 / d["dtypes"]["float32"]["beam5_step_ms"]),
    "vit_b32_b1_images_per_s": ("image_bench", lambda d: d["vit_b32_images_per_s_batch1"]),
    "vit_b32_b16_images_per_s": ("image_bench", lambda d: d["vit_b32_images_per_s_batch16"]),
    "clip_preprocess_images_per_s": ("image_bench", lambda d: d["preprocess_1024x768_jpeg_images_per_s"]),
    "cnn14_b1_clips_per_s": ("audio_bench", lambda d: 1000.0 / d["cnn14_ms_per_clip_batch1"]),
    "cnn14_b8_clips_per_s": ("audio_bench", lambda d: 1000.0 / d["cnn14_ms_per_clip_batch8"]),
    "log_mel_x_realtime": ("audio_bench", lambda d: d["logmel_x_realtime"]),
    "prefix_aac_train_samples_per_s": ("train_bench", lambda d: d["step"]["samples_per_s"]),
}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
table = {}
for name, (bench, get) in figures.items():
    a, b = get(load(bench, "debian")), get(load(bench, "pypi"))
    table[name] = {"debian_1_13": round(a, 2), "pypi_2_15": round(b, 2), "pypi_over_debian": round(b / a, 2)}
print(json.dumps({"cpu": cpu, "threads": 2, "figures": table}, indent=2))
EOF
