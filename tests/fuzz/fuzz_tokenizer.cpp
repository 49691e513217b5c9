// GPT-2 byte-level BPE on arbitrary bytes: for valid UTF-8, decode(encode(text)) == text; other
// bytes are refused with std::invalid_argument; decode of any id sequence never fails.
#include <cstdlib>
#include <stdexcept>

#include "lm/tokenizer.h"

namespace {
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n;
  }
  return true;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const prefixcap::Gpt2Tokenizer tokenizer =
      prefixcap::Gpt2Tokenizer::from_folder(std::string(PREFIXCAP_FIXTURES) + "/gpt2-tokenizer");
  const std::string text(reinterpret_cast<const char*>(data), size);
  if (valid_utf8(text)) {
    const std::vector<int64_t> ids = tokenizer.encode(text);
    if (tokenizer.decode(ids) != text) std::abort();  // the round trip is exact
  } else {
    // GPT-2 encodes text (Unicode), not bytes: invalid UTF-8 is refused with std::invalid_argument
    try {
      (void)tokenizer.encode(text);
      std::abort();
    } catch (const std::invalid_argument&) {
    }
  }
  std::vector<int64_t> any;
  for (size_t i = 0; i + 1 < size; i += 2) any.push_back((data[i] | (data[i + 1] << 8)) % tokenizer.vocab_size());
  (void)tokenizer.decode(any);
  return 0;
}
