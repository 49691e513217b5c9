#!/usr/bin/env bash
# Captions a dataset split with `caption` and scores it with `caption-eval`.
#
#   scripts/evaluate.sh BUNDLE DATASET SPLIT [OUT_DIR]
#
# DATASET is one of:
#   clotho:ROOT     ROOT/clotho_captions_SPLIT.csv + audio in ROOT/SPLIT/ (Clotho v2.1 layout;
#                   SPLIT = development, validation or evaluation)
#   audiocaps:ROOT  ROOT/SPLIT.csv + audio in ROOT/SPLIT/ named YOUTUBEID_STARTTIME.<ext>
#                   (SPLIT = train, val or test)
#   coco:ROOT       ROOT/dataset_coco.json (Karpathy split) + images under ROOT/ (SPLIT = test, val)
#   manifest:FILE   a JSONL manifest {"media": path, "captions": [...]} (SPLIT is a label only)
# Writes OUT_DIR/predictions.jsonl, OUT_DIR/scores.md and OUT_DIR/per_item.csv
# (OUT_DIR defaults to results/<dataset>-<split>). METEOR/SPICE run when
# $PREFIXCAP_METEOR_JAR / $PREFIXCAP_SPICE_JAR point at the official jars.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 1
fi
root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${PREFIXCAP_BUILD_DIR:-$root_dir/build}/apps"
[[ -x "$bin/caption" ]] || "$root_dir/scripts/setup.sh"
bundle=$1 dataset=$2 split=$3
kind=${dataset%%:*} path=${dataset#*:}
out=${4:-results/$kind-$split}
mkdir -p "$out"
case "$kind" in
  clotho)    refs="$path/clotho_captions_$split.csv"; inputs=("$path/$split") ;;
  audiocaps) refs="$path/$split.csv"; inputs=("$path/$split") ;;
  coco)      refs="$path/dataset_coco.json"; inputs=("$path") ;;
  manifest)  refs="$path"
             list="$out/inputs.txt"
             base=$(dirname "$path")
             sed -n 's/.*"media"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$path" |
               while read -r m; do [[ "$m" = /* ]] && echo "$m" || echo "$base/$m"; done > "$list"
             inputs=("@$list") ;;
  *) echo "evaluate.sh: unknown dataset kind '$kind' (clotho, audiocaps, coco, manifest)" >&2; exit 1 ;;
esac
[[ -e "$refs" ]] || { echo "evaluate.sh: references not found: $refs" >&2; exit 1; }
split_args=()
[[ "$kind" == coco ]] && split_args=(--split "$split")
echo "captioning ${inputs[*]} with $bundle ..."
rc=0
"$bin/caption" -m "$bundle" "${inputs[@]}" -f jsonl -o "$out/predictions.jsonl" || rc=$?
if [[ $rc -ne 0 && $rc -ne 2 ]]; then exit $rc; fi
[[ $rc -eq 2 ]] && echo "evaluate.sh: some files could not be captioned (see above); scoring the rest" >&2
"$bin/caption-eval" -p "$out/predictions.jsonl" -r "$refs" "${split_args[@]}" --per-item "$out/per_item.csv" -o "$out/scores.md"
cat "$out/scores.md"
