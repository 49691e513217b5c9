#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/mapped_file.h"

namespace prefixcap {

// ---------------------------------------------------------------------------------------
// MappedFile

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw FileError(path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path, "not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    // Private + writable: tensors made over these pages may be written to by LibTorch
    // (in-place ops); the writes stay in this process and never reach the file.
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw FileError(path, std::string("cannot map: ") + std::strerror(err));
    }
    data_ = static_cast<uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

// ---------------------------------------------------------------------------------------
// dtypes

namespace {

struct DtypeInfo {
  const char* name;
  size_t size;
  at::ScalarType scalar_type;
};

const DtypeInfo kDtypes[] = {
    {"F64", 8, at::kDouble}, {"F32", 4, at::kFloat},  {"F16", 2, at::kHalf},
    {"BF16", 2, at::kBFloat16}, {"I64", 8, at::kLong}, {"I32", 4, at::kInt},
    {"I16", 2, at::kShort}, {"I8", 1, at::kChar},      {"U8", 1, at::kByte},
    {"BOOL", 1, at::kBool},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const DtypeInfo* find_dtype(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.scalar_type) return &d;
  return nullptr;
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  const DtypeInfo* d = find_dtype(dtype);
  if (!d) throw std::invalid_argument("unknown safetensors dtype '" + dtype + "'");
  return d->size;
}

// ---------------------------------------------------------------------------------------
// reader

SafetensorsFile::SafetensorsFile(const std::string& path, SafetensorsLimits limits)
    : path_(path), map_(std::make_shared<MappedFile>(path)) {
  const uint64_t file_size = map_->size();
  if (file_size < 8)
    throw FileError(path, "not a safetensors file: " + std::to_string(file_size) +
                              " bytes, shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_->data()[i];
  if (header_len > limits.max_header_bytes)
    throw FileError(path, "safetensors header length " + std::to_string(header_len) +
                              " exceeds the limit of " +
                              std::to_string(limits.max_header_bytes) + " bytes");
  if (header_len > file_size - 8)
    throw FileError(path, "safetensors header length " + std::to_string(header_len) +
                              " runs past the end of the file (" + std::to_string(file_size) +
                              " bytes)");
  data_start_ = 8 + header_len;
  const uint64_t data_size = file_size - data_start_;

  nlohmann::json header;
  std::string duplicate;  // a tensor named twice (JSON parsers keep the last: a shadowed tensor)
  std::set<std::string> top_keys;
  auto watch_keys = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 && !top_keys.insert(parsed.get<std::string>()).second &&
        duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  try {
    header = nlohmann::json::parse(map_->data() + 8, map_->data() + 8 + header_len, watch_keys);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(path, std::string("safetensors header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) throw FileError(path, "safetensors header is not a JSON object");
  if (!duplicate.empty()) throw FileError(path, "safetensors header names '" + duplicate + "' twice");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) throw FileError(path, "__metadata__ is not an object");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string())
          throw FileError(path, "__metadata__ value of '" + m.key() + "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) {
      return FileError(path, "tensor '" + name + "': " + what);
    };
    if (!value.is_object()) throw bad("entry is not an object");
    if (!value.contains("dtype") || !value["dtype"].is_string()) throw bad("missing dtype");
    if (!value.contains("shape") || !value["shape"].is_array()) throw bad("missing shape");
    if (!value.contains("data_offsets") || !value["data_offsets"].is_array() ||
        value["data_offsets"].size() != 2)
      throw bad("missing or malformed data_offsets");
    SafetensorsEntry e;
    e.name = name;
    e.dtype = value["dtype"].get<std::string>();
    const DtypeInfo* dt = find_dtype(e.dtype);
    if (!dt) throw bad("unknown dtype '" + e.dtype + "'");
    // numel * size must not overflow; each dim is bounded by the file size anyway.
    uint64_t numel = 1;
    for (const auto& d : value["shape"]) {
      if (!d.is_number_unsigned()) throw bad("shape has a non-integer or negative dimension");
      uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw bad("dimension too large");
      e.shape.push_back(static_cast<int64_t>(dim));
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim)
        throw bad("shape " + shape_to_string(e.shape) + " overflows");
      numel *= dim;
    }
    for (const auto& o : value["data_offsets"])
      if (!o.is_number_unsigned()) throw bad("data_offsets are not non-negative integers");
    e.begin = value["data_offsets"][0].get<uint64_t>();
    e.end = value["data_offsets"][1].get<uint64_t>();
    if (e.begin > e.end)
      throw bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                "] are reversed");
    if (e.end > data_size)
      throw bad("data_offsets end " + std::to_string(e.end) + " is past the data section (" +
                std::to_string(data_size) + " bytes; file truncated?)");
    if (numel > std::numeric_limits<uint64_t>::max() / dt->size)
      throw bad("byte size overflows");
    if (numel * dt->size != e.end - e.begin)
      throw bad("shape " + shape_to_string(e.shape) + " x " + e.dtype + " needs " +
                std::to_string(numel * dt->size) + " bytes, data_offsets give " +
                std::to_string(e.end - e.begin));
    entries_.push_back(std::move(e));
  }

  // Ranges must not overlap (an aliasing file could make two tensors share bytes).
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto* prev = by_offset[i - 1];
    const auto* cur = by_offset[i];
    if (cur->begin < prev->end)
      throw FileError(path, "tensors '" + prev->name + "' and '" + cur->name +
                                "' have overlapping data_offsets");
  }
  // The data section must be covered exactly, as the format requires: no hole between tensors,
  // nothing after the last one. A header length that is off by a few bytes (which would shift
  // every tensor) or bytes appended to the file show up here.
  uint64_t covered = 0;
  for (const auto* e : by_offset) {
    if (e->begin != covered)
      throw FileError(path, "safetensors data section has " + std::to_string(e->begin - covered) + " unindexed bytes before tensor '" +
                                e->name + "' (wrong header length or a damaged file)");
    covered = e->end;
  }
  if (covered != data_size)
    throw FileError(path, "safetensors data section holds " + std::to_string(data_size) + " bytes, its tensors cover " +
                              std::to_string(covered) + " (wrong header length, or bytes appended to the file)");
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() = default;

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw FileError(path_, "no tensor named '" + name + "'");
  return entries_[it->second];
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  const DtypeInfo* dt = find_dtype(e.dtype);
  auto options = at::TensorOptions().dtype(dt->scalar_type).device(at::kCPU);
  const uint64_t nbytes = e.end - e.begin;
  uint8_t* ptr = map_->data() + data_start_ + e.begin;
  if (nbytes == 0) return at::empty(e.shape, options);
  if (reinterpret_cast<uintptr_t>(ptr) % dt->size == 0) {
    std::shared_ptr<MappedFile> keep = map_;
    return at::from_blob(
        ptr, e.shape, [keep](void*) mutable { keep.reset(); }, options);
  }
  at::Tensor out = at::empty(e.shape, options);
  std::memcpy(out.data_ptr(), ptr, nbytes);
  return out;
}

TensorMap SafetensorsFile::load_all() const {
  TensorMap out;
  for (const auto& e : entries_) out[e.name] = tensor(e.name);
  return out;
}

TensorMap load_safetensors(const std::string& path) { return SafetensorsFile(path).load_all(); }

// ---------------------------------------------------------------------------------------
// writer

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw std::invalid_argument("tensor name '__metadata__' is reserved");
    const DtypeInfo* dt = find_dtype(t.scalar_type());
    if (!dt)
      throw std::invalid_argument("tensor '" + name + "': dtype " +
                                  std::string(c10::toString(t.scalar_type())) +
                                  " cannot be stored in safetensors");
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    uint64_t nbytes = static_cast<uint64_t>(c.numel()) * dt->size;
    header[name] = {{"dtype", dt->name},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    contiguous.push_back(c);
  }
  std::string text = header.dump();
  // Pad so the data section starts 8-byte aligned (zero-copy reads of every dtype).
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw FileError(tmp, std::string("cannot create: ") + std::strerror(errno));
  bool ok = true;
  uint8_t len_bytes[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(n >> (8 * i));
  ok = ok && std::fwrite(len_bytes, 1, 8, f) == 8;
  ok = ok && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const auto& c : contiguous) {
    size_t nbytes = c.numel() * c.element_size();
    if (nbytes) ok = ok && std::fwrite(c.data_ptr(), 1, nbytes, f) == nbytes;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw FileError(path, std::string("write failed: ") + std::strerror(err ? err : EIO) +
                              " (the previous file, if any, is unchanged)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    std::remove(tmp.c_str());
    throw FileError(path, std::string("cannot rename the finished file into place: ") +
                              std::strerror(err));
  }
}

}  // namespace prefixcap
