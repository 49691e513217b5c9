#include "core/errors.h"

namespace prefixcap {

FileError::FileError(const std::string& path, const std::string& problem)
    : std::runtime_error(path + ": " + problem), path_(path) {}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace prefixcap
