// Reference, prediction and dataset-manifest readers (csv, json, jsonl). The first byte picks
// the reader; they report problems as std::runtime_error with file and line. The rest also goes
// through the native PTB tokenization every caption gets (coco_tokenize), which never throws.
#include <stdexcept>

#include "data/datasets.h"
#include "data/references.h"
#include "metrics/metrics.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  (void)prefixcap::coco_tokenize(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  const std::string path = prefixcap::fuzz::as_file(data + 1, size - 1);
  try {
    switch (data[0] % 3) {
      case 0: (void)prefixcap::read_references(path, data[0] & 4 ? "test" : ""); break;
      case 1: (void)prefixcap::read_predictions(path); break;
      default: (void)prefixcap::read_dataset("manifest", path, ""); break;
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
