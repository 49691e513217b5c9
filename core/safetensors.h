// safetensors reader (memory-mapped, validated before anything is trusted) and writer.
// Format: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then data.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor_map.h"

namespace prefixcap {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;            // safetensors dtype string: "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;           // byte range inside the data section
  uint64_t end = 0;
};

struct SafetensorsLimits {
  uint64_t max_header_bytes = 100ull << 20;  // refuse larger JSON headers (as upstream does)
};

class MappedFile;

class SafetensorsFile {
 public:
  // Maps the file and validates the whole header; throws FileError naming the problem.
  explicit SafetensorsFile(const std::string& path, SafetensorsLimits limits = {});
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;

  // A CPU tensor over the mapped bytes (copy-on-write, so writes never reach the file).
  // Zero-copy when the data is aligned for its dtype, a copy otherwise. The mapping stays
  // alive as long as any returned tensor does.
  at::Tensor tensor(const std::string& name) const;
  TensorMap load_all() const;

 private:
  std::string path_;
  std::shared_ptr<MappedFile> map_;
  uint64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Reads every tensor of a safetensors file.
TensorMap load_safetensors(const std::string& path);

// Writes tensors (any CPU dtype safetensors knows) atomically: a temporary file in the same
// folder, flushed, then renamed over `path`. A failed write leaves an existing `path` intact.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Bytes per element of a safetensors dtype string; throws for unknown ones.
size_t safetensors_dtype_size(const std::string& dtype);

}  // namespace prefixcap
