#include "core/torch_checkpoint.h"

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>

#include "core/errors.h"
#include "core/mapped_file.h"

namespace prefixcap {
namespace {

// The Python values a state-dict pickle can build.
struct PyValue;
using PyRef = std::shared_ptr<PyValue>;

struct PyValue {
  // Object: an instance of a TorchScript class (`__torch__.*`), built only from its attribute
  // dict (BUILD state), never by running anything; it flattens like a dict.
  enum class Kind { None, Bool, Int, BigInt, Float, String, Tuple, List, Dict, Object, Tensor, Global };
  Kind kind = Kind::None;
  int64_t int_value = 0;
  double float_value = 0;
  std::string text;                                // String, or "module.name" for Global
  std::vector<PyRef> items;                        // Tuple, List
  std::vector<std::pair<PyRef, PyRef>> dict_items; // Dict, in insertion order
  at::Tensor tensor;
};

PyRef make(PyValue::Kind kind) {
  auto v = std::make_shared<PyValue>();
  v->kind = kind;
  return v;
}

struct StorageType {
  const char* name;
  at::ScalarType dtype;
};
const StorageType kStorageTypes[] = {
    {"torch.DoubleStorage", at::kDouble}, {"torch.FloatStorage", at::kFloat},
    {"torch.HalfStorage", at::kHalf},     {"torch.BFloat16Storage", at::kBFloat16},
    {"torch.LongStorage", at::kLong},     {"torch.IntStorage", at::kInt},
    {"torch.ShortStorage", at::kShort},   {"torch.CharStorage", at::kChar},
    {"torch.ByteStorage", at::kByte},     {"torch.BoolStorage", at::kBool},
};

const StorageType* find_storage_type(const std::string& name) {
  for (const auto& s : kStorageTypes)
    if (name == s.name) return &s;
  return nullptr;
}

using StorageLoader = std::function<at::Tensor(const std::string& key, at::ScalarType, int64_t numel)>;

class Unpickler {
 public:
  // Reads one pickle starting at data[start]; `load_storage` turns a persistent storage id
  // into its tensor. `torchscript_objects` also accepts TorchScript module objects
  // (`__torch__.*` classes), whose attributes are read as a dict.
  Unpickler(const std::string& path, const uint8_t* data, size_t size, StorageLoader load_storage,
            size_t start = 0, bool torchscript_objects = false)
      : path_(path), data_(data), size_(size), pos_(start), load_storage_(std::move(load_storage)),
        torchscript_objects_(torchscript_objects) {}

  // Where the pickle ended (the byte after STOP).
  size_t position() const { return pos_; }

  // Values can nest arbitrarily deep (a hostile pickle nests a million lists): unlink every
  // value from its children first, so that no destructor recurses.
  ~Unpickler() {
    for (auto& v : made_) {
      v->items.clear();
      v->dict_items.clear();
    }
  }
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  PyRef run() {
    while (true) {
      uint8_t op = read_u8();
      switch (op) {
        case 0x80: read_u8(); break;                         // PROTO
        case 0x95: read_bytes(8); break;                     // FRAME
        case '.': {                                          // STOP
          if (stack_.size() != 1) fail("malformed pickle: stack has " +
                                       std::to_string(stack_.size()) + " items at STOP");
          return stack_.back();
        }
        case 'N': push(make(PyValue::Kind::None)); break;
        case 0x88: case 0x89: {                              // NEWTRUE / NEWFALSE
          auto v = make(PyValue::Kind::Bool);
          v->int_value = op == 0x88;
          push(v);
          break;
        }
        case 'J': push_int(static_cast<int32_t>(read_le(4))); break;  // BININT
        case 'K': push_int(read_le(1)); break;                        // BININT1
        case 'M': push_int(read_le(2)); break;                        // BININT2
        case 0x8a: {                                                  // LONG1
          size_t n = read_u8();
          if (n > 8) {  // e.g. the legacy format's 80-bit magic number: kept as its bytes
            auto v = make(PyValue::Kind::BigInt);
            std::vector<uint8_t> bytes = read_bytes(n);
            v->text.assign(bytes.begin(), bytes.end());
            push(v);
            break;
          }
          uint64_t raw = read_le(n);
          int64_t value = static_cast<int64_t>(raw);
          if (n > 0 && n < 8 && (raw >> (8 * n - 1)) & 1) value -= int64_t(1) << (8 * n);
          push_int(value);
          break;
        }
        case 'G': {                                                   // BINFLOAT (big-endian)
          uint64_t bits = 0;
          for (uint8_t b : read_bytes(8)) bits = (bits << 8) | b;
          auto v = make(PyValue::Kind::Float);
          std::memcpy(&v->float_value, &bits, 8);
          push(v);
          break;
        }
        case 'X': push_string(read_le(4)); break;            // BINUNICODE
        case 0x8c: push_string(read_u8()); break;            // SHORT_BINUNICODE
        case 'T': push_string(read_le(4)); break;            // BINSTRING
        case 'U': push_string(read_u8()); break;             // SHORT_BINSTRING
        case 'B': push_string(read_le(4)); break;            // BINBYTES
        case 'C': push_string(read_u8()); break;             // SHORT_BINBYTES
        case '}': push(make(PyValue::Kind::Dict)); break;    // EMPTY_DICT
        case ']': push(make(PyValue::Kind::List)); break;    // EMPTY_LIST
        case ')': push(make(PyValue::Kind::Tuple)); break;   // EMPTY_TUPLE
        case '(': marks_.push_back(stack_.size()); break;    // MARK
        case 't': {                                          // TUPLE
          auto v = make(PyValue::Kind::Tuple);
          v->items = pop_to_mark();
          push(v);
          break;
        }
        case 0x85: case 0x86: case 0x87: {                   // TUPLE1..3
          size_t n = op - 0x84;
          if (stack_.size() < n) fail("malformed pickle: stack underflow");
          auto v = make(PyValue::Kind::Tuple);
          v->items.assign(stack_.end() - n, stack_.end());
          stack_.resize(stack_.size() - n);
          push(v);
          break;
        }
        case 'q': memo_[read_u8()] = top(); break;          // BINPUT
        case 'r': memo_[read_le(4)] = top(); break;         // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;      // MEMOIZE
        case 'h': push(memo_get(read_u8())); break;         // BINGET
        case 'j': push(memo_get(read_le(4))); break;        // LONG_BINGET
        case 'c': {                                          // GLOBAL
          std::string module = read_line();
          std::string name = read_line();
          push_global(module + "." + name);
          break;
        }
        case 0x93: {                                         // STACK_GLOBAL
          PyRef name = pop();
          PyRef module = pop();
          if (module->kind != PyValue::Kind::String || name->kind != PyValue::Kind::String)
            fail("malformed STACK_GLOBAL");
          push_global(module->text + "." + name->text);
          break;
        }
        case 'Q': {                                          // BINPERSID
          PyRef pid = pop();
          push(persistent_load(pid));
          break;
        }
        case 'R': {                                          // REDUCE
          PyRef args = pop();
          PyRef callable = pop();
          push(call(callable, args));
          break;
        }
        case 0x81: {                                         // NEWOBJ: cls(*args)
          PyRef args = pop();
          PyRef cls = pop();
          if (!torchscript_objects_ || cls->kind != PyValue::Kind::Global || cls->text.rfind("__torch__.", 0) != 0 ||
              args->kind != PyValue::Kind::Tuple || !args->items.empty())
            fail("unsupported object construction (NEWOBJ) in pickle");
          auto v = make(PyValue::Kind::Object);
          v->text = cls->text;
          push(v);
          break;
        }
        case 'b': {                                          // BUILD
          PyRef state = pop();
          PyRef obj = top();
          if (obj->kind == PyValue::Kind::Object) {
            // A TorchScript module's attributes: parameters, buffers, submodules, flags.
            if (state->kind != PyValue::Kind::Dict) fail("TorchScript object state is not a dict");
            obj->dict_items = state->dict_items;
            break;
          }
          // OrderedDict state dicts carry a `_metadata` attribute (module versions): not
          // needed to read tensors. Anything else with state is not a plain state dict.
          if (obj->kind != PyValue::Kind::Dict && obj->kind != PyValue::Kind::Tensor)
            fail("unsupported object state (BUILD) in pickle");
          break;
        }
        case 's': {                                          // SETITEM
          PyRef value = pop();
          PyRef key = pop();
          dict_of(top())->dict_items.emplace_back(key, value);
          break;
        }
        case 'u': {                                          // SETITEMS
          auto items = pop_to_mark();
          if (items.size() % 2) fail("malformed SETITEMS");
          auto dict = dict_of(top());
          for (size_t i = 0; i < items.size(); i += 2)
            dict->dict_items.emplace_back(items[i], items[i + 1]);
          break;
        }
        case 'a': {                                          // APPEND
          PyRef value = pop();
          list_of(top())->items.push_back(value);
          break;
        }
        case 'e': {                                          // APPENDS
          auto items = pop_to_mark();
          auto list = list_of(top());
          list->items.insert(list->items.end(), items.begin(), items.end());
          break;
        }
        default: {
          char buf[8];
          std::snprintf(buf, sizeof buf, "0x%02x", op);
          fail(std::string("pickle opcode ") + buf + " at byte " + std::to_string(pos_ - 1) +
               " is not used by state dicts; this checkpoint holds more than tensors");
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw FileError(path_, "cannot read checkpoint: " + what);
  }
  // Every value is made here: counted (a state dict has thousands, not millions) and kept for
  // the flat teardown above.
  static constexpr size_t kMaxValues = 20'000'000;
  PyRef make(PyValue::Kind kind) {
    if (made_.size() >= kMaxValues) fail("more than " + std::to_string(kMaxValues) + " pickle values: not a state dict");
    made_.push_back(prefixcap::make(kind));
    return made_.back();
  }
  uint8_t read_u8() {
    if (pos_ >= size_) fail("pickle ends early (truncated?)");
    return data_[pos_++];
  }
  std::vector<uint8_t> read_bytes(size_t n) {
    if (n > size_ - pos_) fail("pickle ends early (truncated?)");
    std::vector<uint8_t> out(data_ + pos_, data_ + pos_ + n);
    pos_ += n;
    return out;
  }
  uint64_t read_le(size_t n) {
    if (n > size_ - pos_) fail("pickle ends early (truncated?)");
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= uint64_t(data_[pos_ + i]) << (8 * i);
    pos_ += n;
    return v;
  }
  std::string read_line() {
    std::string out;
    while (true) {
      uint8_t c = read_u8();
      if (c == '\n') return out;
      if (out.size() > 256) fail("GLOBAL name too long");
      out.push_back(static_cast<char>(c));
    }
  }
  void push(PyRef v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t i) {
    auto v = make(PyValue::Kind::Int);
    v->int_value = i;
    push(v);
  }
  void push_string(uint64_t n) {
    if (n > size_ - pos_) fail("string runs past the end of the pickle");
    auto v = make(PyValue::Kind::String);
    v->text.assign(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    push(v);
  }
  void push_global(const std::string& name) {
    bool allowed = name == "collections.OrderedDict" || name == "torch._utils._rebuild_tensor_v2" ||
                   name == "torch._utils._rebuild_parameter" || find_storage_type(name) ||
                   (torchscript_objects_ && name.rfind("__torch__.", 0) == 0 && name.find('\n') == std::string::npos);
    if (!allowed)
      fail("it refers to the Python object '" + name +
           "'; only state dicts (dicts of tensors) are read. Save model.state_dict() instead "
           "of the whole model");
    auto v = make(PyValue::Kind::Global);
    v->text = name;
    push(v);
  }
  PyRef pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back()))
      fail("malformed pickle: stack underflow");
    PyRef v = stack_.back();
    stack_.pop_back();
    return v;
  }
  PyRef top() const {
    if (stack_.empty()) fail("malformed pickle: empty stack");
    return stack_.back();
  }
  std::vector<PyRef> pop_to_mark() {
    if (marks_.empty()) fail("malformed pickle: no MARK");
    size_t mark = marks_.back();
    marks_.pop_back();
    if (mark > stack_.size()) fail("malformed pickle: MARK past the stack");
    std::vector<PyRef> out(stack_.begin() + mark, stack_.end());
    stack_.resize(mark);
    return out;
  }
  PyRef memo_get(uint64_t key) const {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("malformed pickle: memo key " + std::to_string(key) + " unset");
    return it->second;
  }
  PyRef dict_of(const PyRef& v) const {
    if (v->kind != PyValue::Kind::Dict) fail("malformed pickle: SETITEM on a non-dict");
    return v;
  }
  PyRef list_of(const PyRef& v) const {
    if (v->kind != PyValue::Kind::List) fail("malformed pickle: APPEND on a non-list");
    return v;
  }
  int64_t as_int(const PyRef& v, const char* what) const {
    if (v->kind != PyValue::Kind::Int) fail(std::string("expected an integer for ") + what);
    return v->int_value;
  }
  std::vector<int64_t> as_int_tuple(const PyRef& v, const char* what) const {
    if (v->kind != PyValue::Kind::Tuple) fail(std::string("expected a tuple for ") + what);
    std::vector<int64_t> out;
    for (const auto& i : v->items) out.push_back(as_int(i, what));
    return out;
  }

  PyRef persistent_load(const PyRef& pid) {
    // ('storage', <storage class>, key, location, numel) in zip archives; the legacy format
    // adds view_metadata: None, or (view_key, offset, view_numel) for a view of the storage.
    if (pid->kind != PyValue::Kind::Tuple || (pid->items.size() != 5 && pid->items.size() != 6) ||
        pid->items[0]->kind != PyValue::Kind::String || pid->items[0]->text != "storage" ||
        pid->items[1]->kind != PyValue::Kind::Global ||
        pid->items[2]->kind != PyValue::Kind::String)
      fail("unsupported persistent id (expected a tensor storage)");
    PyRef view;
    if (pid->items.size() == 6 && pid->items[5]->kind != PyValue::Kind::None) view = pid->items[5];
    const StorageType* st = find_storage_type(pid->items[1]->text);
    if (!st) fail("unsupported storage type '" + pid->items[1]->text + "'");
    int64_t numel = as_int(pid->items[4], "storage size");
    if (numel < 0) fail("negative storage size");
    const std::string& key = pid->items[2]->text;
    auto it = storages_.find(key);
    if (it == storages_.end()) it = storages_.emplace(key, load_storage_(key, st->dtype, numel)).first;
    if (it->second.scalar_type() != st->dtype || it->second.numel() < numel)
      fail("storage '" + key + "' is used with two different types or sizes");
    auto v = make(PyValue::Kind::Tensor);
    v->tensor = it->second;
    if (view) {
      if (view->kind != PyValue::Kind::Tuple || view->items.size() != 3) fail("malformed storage view");
      const int64_t offset = as_int(view->items[1], "storage view offset");
      const int64_t size = as_int(view->items[2], "storage view size");
      if (offset < 0 || size < 0 || offset > numel || size > numel - offset)
        fail("storage view [" + std::to_string(offset) + ", +" + std::to_string(size) + ") runs past storage '" + key + "'");
      v->tensor = it->second.narrow(0, offset, size);
    }
    return v;
  }

  PyRef call(const PyRef& callable, const PyRef& args) {
    if (callable->kind != PyValue::Kind::Global || args->kind != PyValue::Kind::Tuple)
      fail("unsupported REDUCE");
    const std::string& name = callable->text;
    if (name == "collections.OrderedDict") {
      if (!args->items.empty()) fail("OrderedDict called with arguments");
      return make(PyValue::Kind::Dict);
    }
    if (name == "torch._utils._rebuild_parameter") {
      if (args->items.size() < 1 || args->items[0]->kind != PyValue::Kind::Tensor)
        fail("malformed _rebuild_parameter");
      return args->items[0];
    }
    if (name == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (args->items.size() < 4 || args->items[0]->kind != PyValue::Kind::Tensor)
        fail("malformed _rebuild_tensor_v2");
      const at::Tensor& storage = args->items[0]->tensor;
      int64_t offset = as_int(args->items[1], "storage offset");
      auto sizes = as_int_tuple(args->items[2], "tensor size");
      auto strides = as_int_tuple(args->items[3], "tensor stride");
      if (sizes.size() != strides.size()) fail("tensor size and stride differ in length");
      // The view must stay inside its storage.
      int64_t last = offset;
      bool empty = false;
      for (size_t i = 0; i < sizes.size(); ++i) {
        if (sizes[i] < 0 || strides[i] < 0) fail("negative tensor size or stride");
        int64_t extent = 0;
        if (sizes[i] == 0) empty = true;
        else if (__builtin_mul_overflow(sizes[i] - 1, strides[i], &extent) || __builtin_add_overflow(last, extent, &last))
          fail("tensor size " + shape_to_string(sizes) + " with stride " + shape_to_string(strides) + " overflows");
      }
      if (offset < 0 || (!empty && last >= storage.numel()))
        fail("tensor view " + shape_to_string(sizes) + " at offset " + std::to_string(offset) +
             " runs past its storage of " + std::to_string(storage.numel()) + " elements");
      auto v = make(PyValue::Kind::Tensor);
      v->tensor = empty ? at::empty(sizes, storage.options())
                        : storage.as_strided(sizes, strides, offset);
      return v;
    }
    fail("cannot call '" + name + "'");
  }

  std::string path_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  StorageLoader load_storage_;
  bool torchscript_objects_ = false;
  std::vector<PyRef> made_;
  std::vector<PyRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PyRef> memo_;
  std::unordered_map<std::string, at::Tensor> storages_;
};

std::string key_to_string(const PyRef& key) {
  if (key->kind == PyValue::Kind::String) return key->text;
  if (key->kind == PyValue::Kind::Int) return std::to_string(key->int_value);
  return "";
}

void flatten(const PyRef& value, const std::string& prefix, TensorMap& out, int depth,
             const std::string& path) {
  if (depth > 32) throw FileError(path, "cannot read checkpoint: dicts nested too deeply");
  if (value->kind == PyValue::Kind::Tensor) {
    out[prefix] = value->tensor;
    return;
  }
  if (value->kind != PyValue::Kind::Dict && value->kind != PyValue::Kind::Object) return;  // numbers, strings: not weights
  for (const auto& [key, item] : value->dict_items) {
    std::string name = key_to_string(key);
    if (name.empty()) continue;
    flatten(item, prefix.empty() ? name : prefix + "." + name, out, depth + 1, path);
  }
}

}  // namespace

namespace {

// ref: torch/serialization.py _legacy_save / _legacy_load (torch 1.13): four pickles (magic
// number, protocol version 1001, sys_info, the object), a pickle of the storage keys, then
// per key an 8-byte little-endian element count and the raw little-endian bytes.
TensorMap load_legacy_checkpoint(const std::string& path, const MappedFile& file) {
  const uint8_t* data = file.data();
  const size_t size = file.size();
  auto fail = [&](const std::string& what) -> void { throw FileError(path, "cannot read legacy torch.save file: " + what); };
  StorageLoader no_storage = [&](const std::string&, at::ScalarType, int64_t) -> at::Tensor {
    fail("tensor data in a header pickle");
    return {};
  };

  Unpickler magic(path, data, size, no_storage);
  PyRef magic_value = magic.run();
  static const char kMagic[] = "\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";  // 0x1950a86a20f9469cfc6c
  if (magic_value->kind != PyValue::Kind::BigInt || magic_value->text != std::string(kMagic, 10))
    fail("wrong magic number: not a torch.save file");
  Unpickler protocol(path, data, size, no_storage, magic.position());
  PyRef protocol_value = protocol.run();
  if (protocol_value->kind != PyValue::Kind::Int || protocol_value->int_value != 1001)
    fail("unsupported legacy protocol version (expected 1001)");
  Unpickler sys_info(path, data, size, no_storage, protocol.position());
  PyRef info = sys_info.run();
  if (info->kind != PyValue::Kind::Dict) fail("malformed sys_info");
  for (const auto& [key, value] : info->dict_items)
    if (key->kind == PyValue::Kind::String && key->text == "little_endian" &&
        !(value->kind == PyValue::Kind::Bool && value->int_value == 1))
      fail("saved on a big-endian machine, which prefixcap does not read");

  // The object: storages are allocated now and filled from the data section below.
  std::map<std::string, at::Tensor> storages;
  StorageLoader allocate = [&](const std::string& key, at::ScalarType dtype, int64_t numel) {
    const uint64_t bytes = static_cast<uint64_t>(numel) * c10::elementSize(dtype);
    if (bytes > size) fail("storage '" + key + "' of " + std::to_string(numel) + " elements is larger than the file");
    at::Tensor t = at::empty({numel}, at::TensorOptions().dtype(dtype));
    storages[key] = t;
    return t;
  };
  Unpickler object(path, data, size, allocate, sys_info.position());
  PyRef root = object.run();
  Unpickler key_list(path, data, size, no_storage, object.position());
  PyRef keys = key_list.run();
  if (keys->kind != PyValue::Kind::List) fail("malformed storage key list");

  size_t pos = key_list.position();
  std::set<std::string> filled;
  for (const PyRef& key : keys->items) {
    if (key->kind != PyValue::Kind::String) fail("malformed storage key");
    auto it = storages.find(key->text);
    if (it == storages.end()) fail("storage '" + key->text + "' is listed but used by no tensor");
    if (!filled.insert(key->text).second) fail("storage '" + key->text + "' is listed twice");
    if (size - pos < 8) fail("file ends before storage '" + key->text + "' (truncated?)");
    uint64_t count = 0;
    for (int i = 0; i < 8; ++i) count |= uint64_t(data[pos + i]) << (8 * i);
    pos += 8;
    at::Tensor& t = it->second;
    if (count != static_cast<uint64_t>(t.numel()))
      fail("storage '" + key->text + "' holds " + std::to_string(count) + " elements, its tensors expect " +
           std::to_string(t.numel()));
    const uint64_t bytes = count * t.element_size();
    if (bytes > size - pos)
      fail("file ends inside storage '" + key->text + "' (" + std::to_string(size - pos) + " of " + std::to_string(bytes) +
           " bytes: truncated?)");
    if (bytes) std::memcpy(t.data_ptr(), data + pos, bytes);
    pos += bytes;
  }
  for (const auto& [key, tensor] : storages)
    if (!filled.count(key)) fail("storage '" + key + "' has no data");
  if (pos != size) fail(std::to_string(size - pos) + " unexpected bytes after the last storage");

  TensorMap out;
  flatten(root, "", out, 0, path);
  if (out.empty()) throw FileError(path, "checkpoint holds no tensors");
  // Views were taken of the storages before they were filled: make each tensor own its values.
  for (auto& [name, tensor] : out) tensor = tensor.contiguous();
  return out;
}

// LibTorch's zip reader allocates each record at the size the archive's central directory
// claims, before reading it: a 600-byte file claiming a 4 GB record would make it allocate 4 GB.
// torch.save stores records uncompressed, so no honest record is larger than the file: check
// every central-directory entry (ZIP64 included) against the file size first.
void check_zip_sizes(const std::string& path, const MappedFile& file) {
  const uint8_t* d = file.data();
  const uint64_t n = file.size();
  auto fail = [&](const std::string& what) { throw FileError(path, "cannot read the zip archive: " + what); };
  auto u16 = [&](uint64_t at) -> uint64_t {
    if (at + 2 > n) fail("a header runs past the end of the file (truncated?)");
    return d[at] | (d[at + 1] << 8);
  };
  auto u32 = [&](uint64_t at) -> uint64_t { return u16(at) | (u16(at + 2) << 16); };
  auto u64 = [&](uint64_t at) -> uint64_t { return u32(at) | (u32(at + 4) << 32); };
  // End of central directory: the last signature within the final 64 KiB + 22 bytes.
  if (n < 22) fail("no end-of-central-directory record (truncated?)");
  uint64_t eocd = n - 22;
  const uint64_t lowest = n > 65557 ? n - 65557 : 0;
  while (u32(eocd) != 0x06054b50) {
    if (eocd == lowest) fail("no end-of-central-directory record (truncated?)");
    --eocd;
  }
  uint64_t entries = u16(eocd + 10), cd_offset = u32(eocd + 16);
  if (entries == 0xFFFF || cd_offset == 0xFFFFFFFF) {  // ZIP64
    if (eocd < 20 || u32(eocd - 20) != 0x07064b50) fail("ZIP64 locator missing");
    const uint64_t z = u64(eocd - 20 + 8);
    if (z + 56 > n || u32(z) != 0x06064b50) fail("ZIP64 end-of-central-directory record missing");
    entries = u64(z + 32);
    cd_offset = u64(z + 48);
  }
  if (entries > n / 46) fail("the central directory claims " + std::to_string(entries) + " entries, more than fit in the file");
  uint64_t at = cd_offset;
  for (uint64_t i = 0; i < entries; ++i) {
    if (at > n || u32(at) != 0x02014b50) fail("central directory entry " + std::to_string(i) + " is damaged");
    const uint64_t method = u16(at + 10);
    uint64_t compressed = u32(at + 20), uncompressed = u32(at + 24), offset = u32(at + 42);
    const uint64_t name_len = u16(at + 28), extra_len = u16(at + 30), comment_len = u16(at + 32);
    if (at + 46 + name_len > n) fail("central directory entry " + std::to_string(i) + " runs past the end of the file");
    const std::string name(reinterpret_cast<const char*>(d + at + 46), name_len);
    // ZIP64 extra field: the 64-bit values of the fields saturated above, in this order.
    for (uint64_t e = at + 46 + name_len; e + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = u16(e), len = u16(e + 2);
      if (id == 0x0001) {
        uint64_t f = e + 4;
        if (uncompressed == 0xFFFFFFFF) uncompressed = u64(f), f += 8;
        if (compressed == 0xFFFFFFFF) compressed = u64(f), f += 8;
        if (offset == 0xFFFFFFFF) offset = u64(f);
      }
      e += 4 + len;
    }
    if (uncompressed > n || compressed > n || offset >= n)
      fail("record '" + name + "' claims " + std::to_string(uncompressed) + " bytes, more than the " + std::to_string(n) +
           "-byte file holds");
    if (method == 0 && compressed != uncompressed) fail("stored record '" + name + "' has two different sizes");
    at += 46 + name_len + extra_len + comment_len;
  }
}

}  // namespace

TensorMap load_torch_checkpoint(const std::string& path) {
  // One mapping serves the format check, the legacy reader and the zip size check.
  const MappedFile file(path);
  const uint8_t* magic = file.data();
  if (file.size() < 4) throw FileError(path, "file too short to be a checkpoint");
  if (magic[0] == 0x80 && magic[1] >= 2 && magic[1] <= 5) return load_legacy_checkpoint(path, file);
  if (std::memcmp(magic, "PK\x03\x04", 4) != 0) throw FileError(path, "not a PyTorch checkpoint (no zip archive header)");
  check_zip_sizes(path, file);

  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  at::DataPtr pickle;
  size_t pickle_size = 0;
  bool torchscript = false;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    if (!reader->hasRecord("data.pkl"))
      throw FileError(path, "zip archive has no data.pkl: not a torch.save checkpoint");
    // TorchScript archives (torch.jit.save, OpenAI's CLIP .pt files) add code/ and constants.pkl:
    // their data.pkl holds module objects, read here as dicts of attributes. Their code is
    // never compiled or run.
    torchscript = reader->hasRecord("constants.pkl");
    std::tie(pickle, pickle_size) = reader->getRecord("data.pkl");
  } catch (const c10::Error& e) {
    throw FileError(path, std::string("cannot read the zip archive: ") + e.what_without_backtrace());
  }

  auto load_storage = [&](const std::string& key, at::ScalarType dtype, int64_t numel) {
    const std::string record = "data/" + key;
    try {
      if (!reader->hasRecord(record))
        throw FileError(path, "cannot read checkpoint: storage record '" + record + "' is missing");
      size_t element = c10::elementSize(dtype);
      auto [data, nbytes] = reader->getRecord(record);
      if (static_cast<uint64_t>(numel) > nbytes / element)
        throw FileError(path, "cannot read checkpoint: storage '" + key + "' holds " +
                                  std::to_string(nbytes) + " bytes, " + std::to_string(numel) +
                                  " elements need " + std::to_string(numel * element));
      auto holder = std::make_shared<at::DataPtr>(std::move(data));
      void* ptr = holder->get();
      if (numel == 0) return at::empty({0}, at::TensorOptions().dtype(dtype));
      return at::from_blob(ptr, {numel}, [holder](void*) mutable { holder.reset(); },
                           at::TensorOptions().dtype(dtype));
    } catch (const c10::Error& e) {
      throw FileError(path, std::string("cannot read storage '") + key + "': " + e.what_without_backtrace());
    }
  };

  Unpickler unpickler(path, static_cast<const uint8_t*>(pickle.get()), pickle_size, load_storage, 0, torchscript);
  PyRef root = unpickler.run();
  TensorMap out;
  flatten(root, "", out, 0, path);
  if (out.empty()) throw FileError(path, "checkpoint holds no tensors");
  return out;
}

}  // namespace prefixcap
