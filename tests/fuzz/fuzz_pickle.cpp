// The strict unpickler, reached directly: the input is data.pkl of a well-formed zip archive with
// one 64-byte storage record "data/0" (and, when the first byte is odd, constants.pkl, which
// turns on the TorchScript object rules).
#include <caffe2/serialize/inline_container.h>

#include "tests/fuzz/fuzz_checkpoint.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool torchscript = data[0] & 1;
  const std::string path = prefixcap::fuzz::as_file(nullptr, 0, 1);
  {
    caffe2::serialize::PyTorchStreamWriter writer(path);
    writer.writeRecord("data.pkl", data + 1, size - 1);
    const std::string storage(64, '\x01');
    writer.writeRecord("data/0", storage.data(), storage.size());
    if (torchscript) writer.writeRecord("constants.pkl", "\x80\x02).", 4);
    writer.writeEndOfFile();
  }
  prefixcap::fuzz::read_checkpoint(path);
  return 0;
}
