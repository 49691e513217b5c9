#include "core/hash.h"

#include <cstring>

namespace prefixcap {

namespace {
constexpr uint64_t kPrime = 0x100000001b3ull;
}

void Hasher::update(const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t w = 0;
    for (int b = 7; b >= 0; --b) w = (w << 8) | p[i + b];  // little-endian on every host
    h_ = (h_ ^ w) * kPrime;
  }
  for (; i < size; ++i) h_ = (h_ ^ p[i]) * kPrime;
  length_ += size;
}

uint64_t Hasher::digest() const {
  uint64_t x = h_ ^ length_;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

std::string Hasher::hex() const {
  static const char* digits = "0123456789abcdef";
  uint64_t d = digest();
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, d >>= 4) s[i] = digits[d & 15];
  return s;
}

std::string hash_hex(const std::string& s) {
  Hasher h;
  h.update(s);
  return h.hex();
}

}  // namespace prefixcap
