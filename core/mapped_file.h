// A read-only view of a whole file through mmap, private copy-on-write pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace prefixcap {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws FileError
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace prefixcap
