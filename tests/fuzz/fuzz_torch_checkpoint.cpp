// torch.save files as they arrive: zip archives (state dicts, TorchScript) and legacy pickles.
#include "tests/fuzz/fuzz_checkpoint.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = prefixcap::fuzz::as_file(data, size);
  prefixcap::fuzz::read_checkpoint(path);
  return 0;
}
