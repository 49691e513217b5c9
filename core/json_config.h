// Reading JSON configuration files with errors that name the file and the key.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
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

// JSON text that is always valid: bytes that are not UTF-8 (a file name, a message quoting a
// file's bytes) become U+FFFD instead of making the serializer throw.
std::string json_dump(const Json& value, int indent = -1);

namespace detail {
// A JSON number as integer type T, or false when it is not a whole number in T's range
// (1e12 into an int, 64.5, 1e23, -1 into an unsigned are all refused, never wrapped).
template <typename T>
bool json_integer(const Json& v, T* out) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
    *out = static_cast<T>(u);
    return true;
  }
  if (v.is_number_integer()) {
    const auto i = v.get<int64_t>();
    if (std::is_unsigned<T>::value ? i < 0 : (i < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
                                              i > static_cast<int64_t>(std::numeric_limits<T>::max())))
      return false;
    *out = static_cast<T>(i);
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(d == std::floor(d)) || d < static_cast<double>(std::numeric_limits<T>::min()) ||
        d >= std::ldexp(1.0, std::numeric_limits<T>::digits))
      return false;
    *out = static_cast<T>(d);
    return true;
  }
  return false;
}
template <typename T>
struct is_integer_vector : std::false_type {};
template <typename T>
struct is_integer_vector<std::vector<T>> : std::integral_constant<bool, std::is_integral<T>::value && !std::is_same<T, bool>::value> {};
}  // namespace detail

// Value of `key` in object `j` as T; throws ConfigError "<where>: key 'k': expected T, got ...".
// Integers (and lists of them) must be whole numbers within T's range.
template <typename T>
T json_get(const Json& j, const std::string& key, const std::string& where) {
  if (!j.is_object() || !j.contains(key))
    throw ConfigError(where + ": missing key '" + key + "'");
  const Json& v = j.at(key);
  auto wrong = [&](const std::string& expected) {
    return ConfigError(where + ": key '" + key + "': expected " + expected + ", got " + std::string(v.type_name()) + " " +
                       json_dump(v));
  };
  if constexpr (std::is_integral<T>::value && !std::is_same<T, bool>::value) {
    T out{};
    if (!detail::json_integer(v, &out))
      throw wrong(std::string("a whole number in [") + std::to_string(std::numeric_limits<T>::min()) + ", " +
                  std::to_string(std::numeric_limits<T>::max()) + "]");
    return out;
  } else if constexpr (detail::is_integer_vector<T>::value) {
    if (!v.is_array()) throw wrong("a list of whole numbers");
    T out;
    for (const Json& item : v) {
      typename T::value_type x{};
      if (!detail::json_integer(item, &x)) throw wrong("a list of whole numbers in range");
      out.push_back(x);
    }
    return out;
  } else {
    try {
      return v.get<T>();
    } catch (const nlohmann::json::exception&) {
      throw ConfigError(where + ": key '" + key + "' has the wrong type (got " + std::string(v.type_name()) + ": " +
                        json_dump(v) + ")");
    }
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
