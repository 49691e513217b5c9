// safetensors reader: header validation, offsets, exact coverage, tensor views.
#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = prefixcap::fuzz::as_file(data, size);
  try {
    prefixcap::SafetensorsFile file(path);
    double sum = 0;
    for (const auto& e : file.entries()) {
      at::Tensor t = file.tensor(e.name);
      if (t.numel() > 0 && t.is_floating_point()) sum += t.reshape(-1)[0].item<double>();
    }
    (void)sum;
  } catch (const prefixcap::FileError&) {
  }
  return 0;
}
