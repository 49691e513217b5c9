// Shared error helpers: library code throws, apps catch (see STYLE.md).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace prefixcap {

// A file could not be read or is not what it claims to be. what() names the file.
class FileError : public std::runtime_error {
 public:
  FileError(const std::string& path, const std::string& problem);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A configuration value is missing, of the wrong type or out of range.
class ConfigError : public std::invalid_argument {
 public:
  explicit ConfigError(const std::string& message) : std::invalid_argument(message) {}
};

// "[768, 2304]"
std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace prefixcap
