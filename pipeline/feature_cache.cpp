#include "pipeline/feature_cache.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/safetensors.h"

namespace prefixcap {
namespace fs = std::filesystem;

MediaIdentity MediaIdentity::of(const std::string& path) {
  MediaIdentity id;
  std::error_code ec;
  id.path = fs::absolute(path, ec).lexically_normal().string();
  struct stat st {};
  if (::stat(id.path.c_str(), &st) != 0) throw FileError(path, "missing");
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return id;
}

namespace {
bool same(const MediaIdentity& a, const MediaIdentity& b) {
  return a.path == b.path && a.size == b.size && a.mtime_ns == b.mtime_ns;
}
std::optional<MediaIdentity> current_identity(const std::string& media) {
  try {
    return MediaIdentity::of(media);
  } catch (const FileError&) {
    return std::nullopt;
  }
}
}  // namespace

namespace {

const char* kFormat = "prefixcap-feature-cache";

std::string rank_index_name(int writer) { return "index.rank-" + std::to_string(writer) + ".json"; }

// The index files of a cache folder: index.json first, then the writers' (name order).
std::vector<std::string> index_files(const std::string& folder) {
  std::vector<std::string> out;
  if (fs::exists(fs::path(folder) / "index.json")) out.push_back((fs::path(folder) / "index.json").string());
  std::vector<std::string> ranks;
  for (const auto& e : fs::directory_iterator(folder)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("index.rank-", 0) == 0 && n.size() > 16 && n.compare(n.size() - 5, 5, ".json") == 0) ranks.push_back(e.path().string());
  }
  std::sort(ranks.begin(), ranks.end());
  out.insert(out.end(), ranks.begin(), ranks.end());
  return out;
}

}  // namespace

FeatureCache::FeatureCache(const std::string& dir, const std::string& encoder_hash, const Json& encoder, int writer)
    : folder_((fs::path(dir) / encoder_hash).string()), encoder_(encoder), writer_(writer) {
  std::error_code ec;
  fs::create_directories(folder_, ec);
  if (ec) throw FileError(folder_, "cannot create the feature cache folder: " + ec.message());
  for (const auto& index : index_files(folder_)) {
    Json j = read_json_file(index);
    const std::string where = index + " (delete the folder to rebuild the cache)";
    if (json_get_or<std::string>(j, "format", "", where) != kFormat) throw FileError(index, "not a prefixcap feature cache index");
    next_shard_ = std::max(next_shard_, json_get_or<int64_t>(j, "next_shard", 0, where));
    const Json entries = json_get<Json>(j, "entries", where);
    // This writer's own index of an earlier, unmerged run: its entries stay in the index it rewrites.
    const bool own = writer_ >= 0 && fs::path(index).filename() == rank_index_name(writer_);
    for (const auto& [path, e] : entries.items()) {
      if (own) written_.insert(path);
      Entry entry;
      entry.id.path = path;
      entry.id.size = json_get<uint64_t>(e, "size", where);
      entry.id.mtime_ns = json_get<int64_t>(e, "mtime_ns", where);
      entry.shard = json_get<std::string>(e, "shard", where);
      entry.slot = json_get<int64_t>(e, "slot", where);
      entry.features = json_get<std::vector<std::string>>(e, "features", where);
      entries_[path] = std::move(entry);
    }
  }
}

void FeatureCache::merge_indexes(const std::string& folder) {
  const auto files = index_files(folder);
  if (files.empty() || (files.size() == 1 && fs::path(files[0]).filename() == "index.json")) return;
  Json merged = {{"format", kFormat}, {"version", 1}, {"next_shard", 0}, {"entries", Json::object()}};
  for (const auto& f : files) {
    Json j = read_json_file(f);
    if (json_get_or<std::string>(j, "format", "", f) != kFormat) throw FileError(f, "not a prefixcap feature cache index");
    if (j.contains("encoder")) merged["encoder"] = j["encoder"];
    merged["next_shard"] = std::max(merged["next_shard"].get<int64_t>(), json_get_or<int64_t>(j, "next_shard", 0, f));
    const Json entries = json_get<Json>(j, "entries", f);
    for (const auto& [path, e] : entries.items()) merged["entries"][path] = e;
  }
  write_json_file((fs::path(folder) / "index.json").string(), merged);
  for (const auto& f : files)
    if (fs::path(f).filename() != "index.json") fs::remove(f);
}

FeatureCache::~FeatureCache() = default;

const SafetensorsFile& FeatureCache::shard(const std::string& name) const {
  auto it = shards_.find(name);
  if (it == shards_.end())
    it = shards_.emplace(name, std::make_shared<SafetensorsFile>((fs::path(folder_) / name).string())).first;
  return *it->second;
}

std::optional<TensorMap> FeatureCache::get(const std::string& media) const {
  auto id = current_identity(media);
  if (!id) return std::nullopt;
  std::lock_guard<std::mutex> lock(mutex_);
  if (auto p = pending_.find(id->path); p != pending_.end() && same(pending_ids_.at(id->path), *id)) return p->second;
  auto it = entries_.find(id->path);
  if (it == entries_.end() || !same(it->second.id, *id)) return std::nullopt;
  const Entry& e = it->second;
  TensorMap out;
  try {
    const SafetensorsFile& file = shard(e.shard);
    for (const auto& f : e.features) out[f] = file.tensor(std::to_string(e.slot) + "." + f);
  } catch (const std::exception&) {
    return std::nullopt;  // a shard that went missing or bad: recompute, as for a stale entry
  }
  return out;
}

bool FeatureCache::contains(const std::string& media) const { return get(media).has_value(); }

void FeatureCache::put(const std::string& media, const TensorMap& features) {
  MediaIdentity id = MediaIdentity::of(media);
  TensorMap copy;
  for (const auto& [k, v] : features) copy[k] = v.detach().to(at::kCPU).contiguous().clone();
  bool full = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_[id.path] = std::move(copy);
    pending_ids_[id.path] = id;
    full = static_cast<int64_t>(pending_.size()) >= shard_items;
  }
  if (full) flush();
}

void FeatureCache::flush() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (pending_.empty()) return;
  char name[64];
  if (writer_ < 0) std::snprintf(name, sizeof name, "shard-%06lld.safetensors", static_cast<long long>(next_shard_));
  else std::snprintf(name, sizeof name, "shard-%06lld-r%d.safetensors", static_cast<long long>(next_shard_), writer_);
  TensorMap tensors;
  std::map<std::string, Entry> added;
  int64_t slot = 0;
  for (const auto& [path, feats] : pending_) {
    Entry e{pending_ids_.at(path), name, slot, {}};
    for (const auto& [k, v] : feats) {
      tensors[std::to_string(slot) + "." + k] = v;
      e.features.push_back(k);
    }
    added[path] = std::move(e);
    ++slot;
  }
  save_safetensors((fs::path(folder_) / name).string(), tensors, {{"format", "pt"}});
  ++next_shard_;
  for (auto& [path, e] : added) {
    written_.insert(path);
    entries_[path] = std::move(e);
  }
  pending_.clear();
  pending_ids_.clear();
  write_index();
}

void FeatureCache::write_index() const {
  Json entries = Json::object();
  for (const auto& [path, e] : entries_) {
    if (writer_ >= 0 && !written_.count(path)) continue;  // a writer's index: its own entries only
    entries[path] = {{"size", e.id.size}, {"mtime_ns", e.id.mtime_ns}, {"shard", e.shard}, {"slot", e.slot},
                     {"features", e.features}};
  }
  write_json_file((fs::path(folder_) / (writer_ < 0 ? std::string("index.json") : rank_index_name(writer_))).string(),
                  {{"format", "prefixcap-feature-cache"}, {"version", 1}, {"encoder", encoder_},
                   {"next_shard", next_shard_}, {"entries", entries}});
}

size_t FeatureCache::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t n = 0;
  for (const auto& [path, e] : entries_) {
    auto id = current_identity(path);
    if (id && same(*id, e.id)) ++n;
  }
  for (const auto& [path, id] : pending_ids_)
    if (!entries_.count(path)) ++n;
  return n;
}

}  // namespace prefixcap
