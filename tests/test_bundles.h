// Captioner bundles made once per test binary from the fixtures' checkpoints (for the CLI tests).
#pragma once

#include <string>

#include "pipeline/checkpoint_import.h"
#include "tests/test_helpers.h"

namespace prefixcap::testing {

// ClipCap's MLP checkpoint with clip-vit-tiny as the image encoder.
inline const std::string& clipcap_bundle() {
  static TempDir dir;
  static std::string path = [] {
    ImportOptions o;
    o.tokenizer_dir = fixture_dir("gpt2-tiny");
    o.gpt2_config = fixture_dir("gpt2-tiny") + "/config.json";
    o.clip_dir = fixture_dir("clip-vit-tiny");
    std::string p = dir.file("clipcap");
    import_clipcap(fixture_dir("clipcap-tiny") + "/coco_weights_tiny.pt", o).save(p);
    return p;
  }();
  return path;
}

// The Prefix-AAC checkpoint with its fixture config.
inline const std::string& aac_bundle() {
  static TempDir dir;
  static std::string path = [] {
    ImportOptions o;
    o.tokenizer_dir = fixture_dir("gpt2-tiny");
    o.model_config = fixture_dir("prefix-aac-tiny") + "/config.json";
    std::string p = dir.file("aac");
    import_prefix_aac(fixture_dir("prefix-aac-tiny") + "/prefix_aac_tiny.pt", o).save(p);
    return p;
  }();
  return path;
}

}  // namespace prefixcap::testing
