// The anchors' published checkpoints as captioners: ClipCap (ClipCaptionModel with its MLP
// mapper and fine-tuned GPT-2; ClipCaptionPrefix with the TransformerMapper) and Prefix-AAC
// (AAC_Prefix: CNN14 + temporal/global mapping networks + GPT-2 + untied language header).
// Their prefix normalisation, decoding defaults and stop rules come along.
#pragma once

#include <string>

#include "pipeline/captioner.h"

namespace prefixcap {

struct ImportOptions {
  std::string tokenizer_dir;     // folder with vocab.json + merges.txt (required)
  std::string gpt2_config;       // HF GPT-2 config.json for the LM inside (optional: derived from
                                 // the tensors, n_head from the standard GPT-2 sizes)
  std::string clip_dir;          // ClipCap: CLIP folder to caption images (optional: features only)
  std::string model_config;      // Prefix-AAC: config.json with audio_encoder / gpt2 / prefix sizes
  std::string preset;            // Prefix-AAC instead of model_config: "audiocaps" or "clotho"
  int num_heads = 8;             // ClipCap transformer mapper heads (not stored in checkpoints)
  int normalize_prefix = -1;     // -1 = the original code's default (MLP no, transformer yes)
};

Captioner import_clipcap(const std::string& checkpoint, const ImportOptions& options);
Captioner import_prefix_aac(const std::string& checkpoint, const ImportOptions& options);

// The published Prefix-AAC configuration `name` (audiocaps | clotho) for these weights: the
// authors' constructor values, with every shape the weights hold read from them. The same JSON
// form as a --config file.
Json prefix_aac_preset(const std::string& name, const TensorMap& weights, const std::string& source);

}  // namespace prefixcap
