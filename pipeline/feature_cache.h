// Frozen-encoder features computed once, kept on disk, read back memory-mapped.
//
// DIR/ENCODER_HASH/index.json maps each media file (absolute path, with the size and
// modification time it had) to an entry of a shard; shards are safetensors files holding the
// tensors of many items ("<n>.<feature>"). Several processes fill one cache in parallel (the
// ranks of a distributed run) as numbered writers: writer r writes only shard-N-rR files and
// index.rank-R.json, and merge_indexes() folds those indexes into index.json afterwards. A different encoder (configuration or weights)
// gives a different ENCODER_HASH, so its features never mix with another's; a media file whose
// size or modification time changed is a stale entry, recomputed on the next fill.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/json_config.h"
#include "core/tensor_map.h"

namespace prefixcap {

class SafetensorsFile;

// What identifies a media file's content cheaply: absolute path, size, mtime (ns).
struct MediaIdentity {
  std::string path;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  static MediaIdentity of(const std::string& path);  // throws FileError when missing
};

class FeatureCache {
 public:
  // Opens (creating) DIR/<encoder_hash>/. `encoder` describes the encoder and is stored in
  // the index for people to read. `writer` >= 0: one of several processes filling the cache
  // (see above); -1: the only one. Entries of every writer's index are read.
  FeatureCache(const std::string& dir, const std::string& encoder_hash, const Json& encoder, int writer = -1);
  ~FeatureCache();

  // The features of `media` when a valid entry exists (zero-copy views of the shard).
  std::optional<TensorMap> get(const std::string& media) const;
  bool contains(const std::string& media) const;
  // Adds features (copied); they reach the disk at the next flush(), which happens on its own
  // every `shard_items` puts.
  void put(const std::string& media, const TensorMap& features);
  // Writes pending entries as a new shard, then the index (both atomically).
  void flush();

  const std::string& folder() const { return folder_; }
  // Folds every index.rank-R.json of `folder` into index.json (atomically), then removes them.
  // Call when no writer is running.
  static void merge_indexes(const std::string& folder);
  size_t size() const;                    // valid entries (flushed or pending)
  int64_t shard_items = 256;

 private:
  struct Entry {
    MediaIdentity id;
    std::string shard;
    int64_t slot = 0;
    std::vector<std::string> features;
  };
  const SafetensorsFile& shard(const std::string& name) const;
  void write_index() const;

  std::string folder_;
  Json encoder_;
  std::map<std::string, Entry> entries_;             // by absolute path
  std::map<std::string, TensorMap> pending_;         // by absolute path
  std::map<std::string, MediaIdentity> pending_ids_;
  mutable std::map<std::string, std::shared_ptr<SafetensorsFile>> shards_;
  mutable std::mutex mutex_;
  int64_t next_shard_ = 0;
  int writer_ = -1;
  std::set<std::string> written_;  // entries this object flushed (a writer's index lists only these)
};

}  // namespace prefixcap
