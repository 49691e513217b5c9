// The captioner bundle the benchmarks use when none is given: the prefix-aac-tiny fixture's
// checkpoint imported with its config and the gpt2-tiny tokenizer.
#pragma once

#include <string>

#include "pipeline/checkpoint_import.h"

namespace prefixcap::bench {

// Writes the bundle to `dest` and returns `dest`.
inline std::string import_fixture_aac_bundle(const std::string& fixtures, const std::string& dest) {
  ImportOptions o;
  o.tokenizer_dir = fixtures + "/gpt2-tiny";
  o.model_config = fixtures + "/prefix-aac-tiny/config.json";
  import_prefix_aac(fixtures + "/prefix-aac-tiny/prefix_aac_tiny.pt", o).save(dest);
  return dest;
}

}  // namespace prefixcap::bench
