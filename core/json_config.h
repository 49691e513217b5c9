// Reading JSON configuration files with errors that name the file and the key.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/errors.h"

namespace prefixcap {

using Json = nlohmann::json;

// Parses a JSON file; throws FileError (missing, unreadable, invalid JSON with line/column).
Json read_json_file(const std::string& path);

// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed, then
// renamed over `path`. A failed write (full disk, ...) leaves an existing `path` intact and
// throws FileError.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Writes JSON atomically (write_file_atomic), pretty-printed.
void write_json_file(const std::string& path, const Json& value);

// Value of `key` in object `j` as T; throws ConfigError "<where>: key 'k': expected T, got ...".
template <typename T>
T json_get(const Json& j, const std::string& key, const std::string& where) {
  if (!j.is_object() || !j.contains(key))
    throw ConfigError(where + ": missing key '" + key + "'");
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw ConfigError(where + ": key '" + key + "' has the wrong type (got " +
                      std::string(j.at(key).type_name()) + ": " + j.at(key).dump() + ")");
  }
}

// Like json_get, but `fallback` when the key is absent or null.
template <typename T>
T json_get_or(const Json& j, const std::string& key, const T& fallback, const std::string& where) {
  if (!j.is_object() || !j.contains(key) || j.at(key).is_null()) return fallback;
  return json_get<T>(j, key, where);
}

// Refuses keys outside `known` (catches typos in hand-written configs).
void json_check_keys(const Json& j, const std::vector<std::string>& known, const std::string& where);

}  // namespace prefixcap
