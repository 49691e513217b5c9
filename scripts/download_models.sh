#!/usr/bin/env bash
# Downloads the official checkpoints into models/ and turns the captioning ones into bundles.
# Needs internet access (and python3-torch for the PANNs conversion); says so when offline.
#
#   models/gpt2/                     Hugging Face openai-community/gpt2 (config, safetensors, tokenizer)
#   models/clip-vit-base-patch32/    Hugging Face openai/clip-vit-base-patch32
#   models/cnn14/                    PANNs Cnn14_mAP=0.431.pth -> model.safetensors + config.json
#   models/cnn14-16k/                PANNs Cnn14_16k_mAP=0.438.pth (Prefix-AAC's encoder)
#   bundles/clipcap-coco/            from ClipCap's coco_weights.pt, if you put it in models/clipcap/
#   bundles/prefix-aac-*/            from Prefix-AAC checkpoints in models/prefix-aac/ (+ a config.json)
#
# ClipCap and Prefix-AAC publish their weights on Google Drive links in their READMEs, which
# need a browser: download them by hand into models/clipcap/ and models/prefix-aac/, then rerun.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${PREFIXCAP_MODELS:-$root/models}"
bundles="${PREFIXCAP_BUNDLES:-$root/bundles}"
bin="${PREFIXCAP_BUILD_DIR:-$root/build}/apps"
hf=https://huggingface.co

if ! curl -fsS --max-time 10 -o /dev/null -I "$hf"; then
  echo "download_models.sh: no internet access ($hf cannot be reached)." >&2
  echo "Copy the files listed at the top of this script into $models by other means, then rerun." >&2
  exit 1
fi
fetch() {  # URL DEST
  if [[ -s "$2" ]]; then echo "have $2"; return; fi
  mkdir -p "$(dirname "$2")"
  echo "downloading $2"
  curl -fL --retry 3 -C - -o "$2.part" "$1" && mv "$2.part" "$2"
}
for f in config.json model.safetensors vocab.json merges.txt; do
  fetch "$hf/openai-community/gpt2/resolve/main/$f" "$models/gpt2/$f"
done
for f in config.json preprocessor_config.json model.safetensors; do
  fetch "$hf/openai/clip-vit-base-patch32/resolve/main/$f" "$models/clip-vit-base-patch32/$f"
done
fetch "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1" "$models/cnn14/Cnn14_mAP=0.431.pth"
fetch "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth?download=1" "$models/cnn14-16k/Cnn14_16k_mAP=0.438.pth"

convert_panns() {  # DIR PTH JSON
  [[ -s "$1/model.safetensors" ]] && return
  python3 "$root/scripts/convert_panns.py" "$1/$2" "$1/model.safetensors"
  echo "$3" > "$1/config.json"
}
convert_panns "$models/cnn14" "Cnn14_mAP=0.431.pth" \
  '{"model_type":"cnn14","sample_rate":32000,"window_size":1024,"hop_size":320,"mel_bins":64,"fmin":50,"fmax":14000,"classes_num":527,"channels":[64,128,256,512,1024,2048],"embedding_dim":2048}'
convert_panns "$models/cnn14-16k" "Cnn14_16k_mAP=0.438.pth" \
  '{"model_type":"cnn14","sample_rate":16000,"window_size":512,"hop_size":160,"mel_bins":64,"fmin":50,"fmax":8000,"classes_num":527,"channels":[64,128,256,512,1024,2048],"embedding_dim":2048}'

[[ -x "$bin/caption-import" ]] || "$root/scripts/setup.sh"
for pt in "$models"/clipcap/*.pt; do
  [[ -e "$pt" ]] || break
  name=$(basename "$pt" .pt)
  "$bin/caption-import" clipcap "$pt" -o "$bundles/clipcap-$name" --tokenizer "$models/gpt2" \
    --clip "$models/clip-vit-base-patch32" --force
done
for pt in "$models"/prefix-aac/*.pt; do
  [[ -e "$pt" ]] || break
  name=$(basename "$pt" .pt)
  cfg="$models/prefix-aac/$name.json"
  [[ -e "$cfg" ]] || { echo "skip $pt: write its config as $cfg (see README)"; continue; }
  "$bin/caption-import" prefix-aac "$pt" -o "$bundles/prefix-aac-$name" --tokenizer "$models/gpt2" --config "$cfg" --force
done
echo "models in $models, bundles in $bundles"
