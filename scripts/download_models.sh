#!/usr/bin/env bash
# Downloads the official checkpoints into models/ and turns every captioning checkpoint it finds
# into a bundle. No Python: prefixcap reads every file as published (Hugging Face safetensors,
# OpenAI's TorchScript CLIP archives, the legacy torch.save PANNs files, ClipCap and Prefix-AAC
# state dicts). Needs internet access; says so when offline.
#
#   models/gpt2/                     Hugging Face openai-community/gpt2 (config, safetensors, tokenizer)
#   models/clip-vit-base-patch32/    Hugging Face openai/clip-vit-base-patch32 (ClipCap's MLP weights)
#   models/clip/RN50x4.pt            OpenAI's CLIP RN50x4 (ClipCap's transformer weights: 640-d, 288 px)
#   models/cnn14/                    PANNs Cnn14_mAP=0.431.pth (legacy torch.save) + config.json
#   models/cnn14-16k/                PANNs Cnn14_16k_mAP=0.438.pth (Prefix-AAC's encoder) + config.json
#   models/fense/paraphrase-TinyBERT-L6-v2/   FENSE's Sentence-BERT (sentence-transformers folder)
#   models/fense/echecker_clotho_audiocaps_base.ckpt   FENSE's fluency-error detector (SHA-256 checked)
#   models/fense/bert-base-uncased/  the echecker's model_type: config.json, vocab.txt (no weights needed)
#   bundles/clipcap-NAME/            from each ClipCap checkpoint you put in models/clipcap/
#                                    (coco_weights.pt, conceptual_weights.pt, transformer_weights.pt)
#   bundles/prefix-aac-NAME/         from each Prefix-AAC checkpoint in models/prefix-aac/ (preset by
#                                    name: *clotho* -> clotho, else audiocaps; NAME.json overrides)
#
# ClipCap and Prefix-AAC publish their weights on Google Drive links in their READMEs, which
# need a browser: download them by hand into models/clipcap/ and models/prefix-aac/, then rerun.
# A bundle that cannot be built is reported and the others are still built; the exit status is
# then 2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${PREFIXCAP_MODELS:-$root/models}"
bundles="${PREFIXCAP_BUNDLES:-$root/bundles}"
bin="${PREFIXCAP_BUILD_DIR:-$root/build}/apps"
hf=https://huggingface.co
openai_rn50x4=https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt

if ! curl -fsS --max-time 10 -o /dev/null -I "$hf"; then
  echo "download_models.sh: no internet access ($hf cannot be reached)." >&2
  echo "Copy the files listed at the top of this script into $models by other means, then rerun." >&2
  exit 1
fi
failed=()
fetch() {  # URL DEST
  if [[ -s "$2" ]]; then echo "have $2"; return 0; fi
  mkdir -p "$(dirname "$2")"
  echo "downloading $2"
  if curl -fL --retry 3 -C - -o "$2.part" "$1"; then mv "$2.part" "$2"; else failed+=("download $2"); return 1; fi
}
for f in config.json model.safetensors vocab.json merges.txt; do
  fetch "$hf/openai-community/gpt2/resolve/main/$f" "$models/gpt2/$f" || true
done
for f in config.json preprocessor_config.json model.safetensors; do
  fetch "$hf/openai/clip-vit-base-patch32/resolve/main/$f" "$models/clip-vit-base-patch32/$f" || true
done
fetch "$openai_rn50x4" "$models/clip/RN50x4.pt" || true
fetch "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1" "$models/cnn14/checkpoint.pth" || true
fetch "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth?download=1" "$models/cnn14-16k/checkpoint.pth" || true
# FENSE (caption-eval --sbert/--echecker/--echecker-bert; docs/evaluation.md).
sbert_repo="$hf/sentence-transformers/paraphrase-TinyBERT-L6-v2/resolve/main"
for f in config.json modules.json sentence_bert_config.json 1_Pooling/config.json vocab.txt tokenizer_config.json \
         special_tokens_map.json pytorch_model.bin; do
  fetch "$sbert_repo/$f" "$models/fense/paraphrase-TinyBERT-L6-v2/$f" || true
done
for f in config.json vocab.txt tokenizer_config.json; do
  fetch "$hf/google-bert/bert-base-uncased/resolve/main/$f" "$models/fense/bert-base-uncased/$f" || true
done
echecker="$models/fense/echecker_clotho_audiocaps_base.ckpt"
if fetch "https://github.com/blmoistawinde/fense/releases/download/V0.1/echecker_clotho_audiocaps_base.ckpt" "$echecker"; then
  if [[ "$(sha256sum "$echecker" | cut -d' ' -f1)" != 1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa ]]; then
    mv "$echecker" "$echecker.bad"
    failed+=("$echecker: SHA-256 differs from fense's published one (kept as $echecker.bad)")
  fi
fi
# PANNs publish no config: the values of their Cnn14(...) constructors.
[[ -s "$models/cnn14/config.json" ]] || echo '{"model_type":"cnn14","sample_rate":32000,"window_size":1024,"hop_size":320,"mel_bins":64,"fmin":50,"fmax":14000,"classes_num":527,"channels":[64,128,256,512,1024,2048],"embedding_dim":2048}' > "$models/cnn14/config.json"
[[ -s "$models/cnn14-16k/config.json" ]] || echo '{"model_type":"cnn14","sample_rate":16000,"window_size":512,"hop_size":160,"mel_bins":64,"fmin":50,"fmax":8000,"classes_num":527,"channels":[64,128,256,512,1024,2048],"embedding_dim":2048}' > "$models/cnn14-16k/config.json"

[[ -x "$bin/caption-import" ]] || "$root/scripts/setup.sh"
for pt in "$models"/clipcap/*.pt; do
  [[ -e "$pt" ]] || break
  name=$(basename "$pt" .pt)
  name=${name%_weights}
  # ClipCap's transformer weights were trained on RN50x4 features, its MLP weights on ViT-B/32.
  clip="$models/clip-vit-base-patch32"
  [[ "$name" == *transformer* ]] && clip="$models/clip/RN50x4.pt"
  "$bin/caption-import" clipcap "$pt" -o "$bundles/clipcap-$name" --tokenizer "$models/gpt2" --clip "$clip" --force ||
    failed+=("bundle clipcap-$name (from $pt)")
done
for pt in "$models"/prefix-aac/*.pt; do
  [[ -e "$pt" ]] || break
  name=$(basename "$pt" .pt)
  cfg="$models/prefix-aac/$name.json"
  if [[ -e "$cfg" ]]; then choice=(--config "$cfg");
  elif [[ "${name,,}" == *clotho* ]]; then choice=(--preset clotho);
  else choice=(--preset audiocaps); fi
  "$bin/caption-import" prefix-aac "$pt" -o "$bundles/prefix-aac-$name" --tokenizer "$models/gpt2" "${choice[@]}" --force ||
    failed+=("bundle prefix-aac-$name (from $pt)")
done
echo "models in $models, bundles in $bundles"
echo "FENSE: export PREFIXCAP_SBERT=$models/fense/paraphrase-TinyBERT-L6-v2 PREFIXCAP_ECHECKER=$echecker PREFIXCAP_ECHECKER_BERT=$models/fense/bert-base-uncased"
if ((${#failed[@]})); then
  echo "download_models.sh: not done:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 2
fi
