// A small, stable 64-bit content hash (FNV-1a over 64-bit little-endian words, then a final
// avalanche) for cache keys: the same bytes give the same value on every run and machine.
// Not cryptographic. The value depends on how the bytes are split into update() calls, so
// callers hash their fields in a fixed order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace prefixcap {

class Hasher {
 public:
  void update(const void* data, size_t size);
  void update(const std::string& s) { update(s.data(), s.size()); }
  uint64_t digest() const;
  std::string hex() const;  // 16 lowercase hex digits

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
  uint64_t length_ = 0;
};

std::string hash_hex(const std::string& s);

}  // namespace prefixcap
