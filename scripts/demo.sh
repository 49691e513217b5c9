#!/usr/bin/env bash
# The first command to run: prefixcap doing its job on real recordings.
#
#   scripts/demo.sh            the demo (first run <= 30 min on 2 cores, later runs ~1 min)
#   scripts/demo.sh --quick    a reduced run of the same path (a handful of clips, a few steps; CI)
#   scripts/demo.sh --fresh    forget the trained demo models (keeps the downloads)
#
# With the real checkpoints in place (scripts/download_models.sh: bundles/*/captioner.json), it
# captions the sample media with them. Without (no internet, as here), it builds a captioned
# corpus from the sound effects of Debian's 0ad-data package (CC-BY-SA-3.0), trains a small
# captioner with prefixcap's own commands (a GPT-2-architecture LM on the caption text, then a
# narrow CNN14 + Prefix-AAC mapper), evaluates it on held-out clips next to two baselines and
# captions a few clips and one video. Everything lands in $PREFIXCAP_DEMO_DIR (default
# demo-cache/) and is reused by later runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${PREFIXCAP_BUILD_DIR:-$root/build}"
demo_dir="${PREFIXCAP_DEMO_DIR:-$root/demo-cache}"
quick=0
fresh=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --fresh) fresh=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $arg (see --help)" >&2; exit 1 ;;
  esac
done
bin="$build_dir/apps"
py=/usr/bin/python3
step() { printf '\n== %s\n' "$*"; }
t_start=$SECONDS

if [[ ! -x "$bin/caption-train" || ! -x "$bin/caption" || ! -x "$bin/caption-eval" ]]; then
  step "building prefixcap (scripts/setup.sh)"
  "$root/scripts/setup.sh"
fi

# ---- real checkpoints ------------------------------------------------------------------
real_bundles=()
for b in "$root"/bundles/*/captioner.json; do [[ -f "$b" ]] && real_bundles+=("$(dirname "$b")"); done

if [[ $quick == 1 ]]; then
  work="$demo_dir/quick"
  source_pkg=sonic-pi-samples
  corpus_args=(--source sonic-pi-samples --max-per-category 5)
  lm_args=(--epochs 40 --batch-size 16)
  cap_args=(--encoder-train-epochs 2 --epochs 12 --batch-size 8)
else
  work="$demo_dir/full"
  source_pkg=0ad-data
  corpus_args=(--source 0ad-data)
  lm_args=(--epochs 15 --batch-size 32)
  cap_args=(--encoder-train-epochs "${PREFIXCAP_DEMO_ENCODER_EPOCHS:-6}" --epochs 20 --batch-size 32)
fi
[[ $fresh == 1 ]] && rm -rf "$work/lm" "$work/captioner" "$work/eval"
mkdir -p "$work"

step "corpus: real sound effects from Debian's $source_pkg package"
"$py" "$root/scripts/demo_corpus.py" --cache "$demo_dir" --out "$work/corpus" "${corpus_args[@]}"
corpus="$work/corpus"

# The video: opencv-doc's Megamind.avi (MPEG-4 + AC-3 sound track).
video="$demo_dir/video/Megamind.avi"
if [[ ! -s "$video" ]]; then
  step "video: opencv-doc's Megamind.avi"
  mkdir -p "$demo_dir/debs" "$demo_dir/video"
  if ! ls "$demo_dir"/debs/opencv-doc_*.deb >/dev/null 2>&1; then
    (cd "$demo_dir/debs" && apt-get download opencv-doc) ||
      { echo "demo.sh: could not download opencv-doc (no network?); going on without the video" >&2; }
  fi
  if ls "$demo_dir"/debs/opencv-doc_*.deb >/dev/null 2>&1; then
    dpkg-deb --fsys-tarfile "$(ls "$demo_dir"/debs/opencv-doc_*.deb | tail -1)" |
      tar -x -O ./usr/share/doc/opencv-doc/examples/data/Megamind.avi > "$video.part" && mv "$video.part" "$video" ||
      { rm -f "$video.part"; echo "demo.sh: could not extract the video; going on without it" >&2; }
  fi
fi

if ((${#real_bundles[@]})); then
  step "captioning with the real checkpoints: ${real_bundles[*]}"
  for b in "${real_bundles[@]}"; do
    kind=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["encoder"]["kind"])' "$b/captioner.json")
    echo "-- $(basename "$b") ($kind)"
    if [[ $kind == cnn14 ]]; then
      inputs=("$corpus"/clips/*)
      "$bin/caption" -m "$b" "${inputs[@]:0:8}" ${video:+$( [[ -s $video ]] && echo "$video")} --no-progress
    else
      echo "   (an image captioner: give it pictures, e.g. $bin/caption -m $b photo.jpg)"
      [[ -s "$video" ]] && "$bin/caption" -m "$b" "$video" --no-progress
    fi
  done
  exit 0
fi

# ---- the demo captioner, trained here --------------------------------------------------
lm_run="$work/lm"
if [[ ! -f "$lm_run/lm/model.safetensors" ]]; then
  step "language model: a small GPT-2 trained on the corpus's caption text (caption-train --task lm)"
  resume=(); [[ -f "$lm_run/checkpoints/latest" ]] && resume=(--resume)
  "$bin/caption-train" --task lm --text "$corpus/train_captions.txt" --val-split "$corpus/val_captions.txt" \
    --tokenizer-vocab 2048 --lm-config '{"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64}' \
    --lr 2e-3 --warmup-steps 30 --out "$lm_run" "${lm_args[@]}" "${resume[@]}"
else
  echo "language model: have $lm_run/lm"
fi

cap_run="$work/captioner"
bundle="$cap_run/best"
if [[ ! -f "$cap_run/bundle/captioner.json" ]]; then
  step "captioner: narrow CNN14 (trained for the first epochs, then frozen) + Prefix-AAC mapper, GPT-2 frozen"
  resume=(); [[ -f "$cap_run/checkpoints/latest" ]] && resume=(--resume)
  "$bin/caption-train" --encoder "$root/data/demo/cnn14-narrow.json" --lm "$lm_run/lm" \
    --mapper "$root/data/demo/mapper.json" --data-root "$corpus" --train-split train.jsonl --val-split val.jsonl \
    --lr 1e-3 --warmup-steps 50 --max-tokens 16 --beam-size 3 --out "$cap_run" "${cap_args[@]}" "${resume[@]}"
else
  echo "captioner: have $cap_run"
fi
[[ -f "$bundle/captioner.json" ]] || bundle="$cap_run/bundle"

step "evaluation on the held-out test clips"
eval_dir="$work/eval"
mkdir -p "$eval_dir"
"$bin/caption" -m "$bundle" @<(sed -n 's/.*"media": "\([^"]*\)".*/\1/p' "$corpus/test.jsonl" | sed "s|^|$corpus/|") \
  -f jsonl -o "$eval_dir/prefixcap.jsonl"
"$py" "$root/scripts/demo_report.py" baselines --train "$corpus/train.jsonl" --test "$corpus/test.jsonl" --out "$eval_dir"
for sys in prefixcap most_frequent random; do
  "$bin/caption-eval" -p "$eval_dir/$sys.jsonl" -r "$corpus/test.jsonl" -f json -o "$eval_dir/$sys.scores.json"
done

step "captions of held-out clips (never seen in training)"
"$py" "$root/scripts/demo_report.py" show --predictions "$eval_dir/prefixcap.jsonl" --test "$corpus/test.jsonl" -n 6
if [[ -s "$video" ]]; then
  step "a video (its sound track): $(basename "$video")"
  "$bin/caption" -m "$bundle" "$video" --no-progress || echo "(the video could not be captioned; see the message above)"
fi

step "metrics (pycocoevalcap-exact BLEU, ROUGE-L, CIDEr-D)"
"$py" "$root/scripts/demo_report.py" table "prefixcap demo captioner=$eval_dir/prefixcap.scores.json" \
  "most frequent training caption=$eval_dir/most_frequent.scores.json" \
  "random training caption=$eval_dir/random.scores.json" | tee "$eval_dir/metrics.md"
echo
echo "This is a demo model trained here on $(cat "$corpus/corpus.json" | tr -d '\n ' | sed 's/.*"train_clips":\([0-9]*\).*/\1/') clips of sound effects from Debian's $source_pkg,"
echo "not a general captioner. For the real one: scripts/download_models.sh, then caption -m bundles/<name> FILES."
echo "Bundle: $bundle   (caption -m $bundle your.wav)   [$((SECONDS - t_start)) s]"
