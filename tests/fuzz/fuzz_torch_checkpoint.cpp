// torch.save files as they arrive: zip archives (state dicts, TorchScript) and legacy pickles.
#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/torch_checkpoint.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = prefixcap::fuzz::as_file(data, size);
  try {
    prefixcap::TensorMap tensors = prefixcap::load_torch_checkpoint(path);
    for (const auto& [name, t] : tensors)
      if (t.numel() > 0) (void)t.contiguous();
  } catch (const prefixcap::FileError&) {
  }
  return 0;
}
