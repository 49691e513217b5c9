#include "core/json_config.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <unistd.h>

namespace prefixcap {

std::string json_dump(const Json& value, int indent) {
  return value.dump(indent, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

Json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, std::string("cannot open: ") + std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return Json::parse(buffer.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw FileError(path, std::string("invalid JSON: ") + e.what());
  }
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw FileError(tmp, std::string("cannot create: ") + std::strerror(errno));
    out << bytes;
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw FileError(path, "write failed (the previous file, if any, is unchanged)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    throw FileError(path, std::string("cannot rename into place: ") + std::strerror(err));
  }
}

void write_json_file(const std::string& path, const Json& value) { write_file_atomic(path, json_dump(value, 2) + "\n"); }

void json_check_keys(const Json& j, const std::vector<std::string>& known, const std::string& where) {
  if (!j.is_object()) throw ConfigError(where + ": expected a JSON object, got " + j.type_name());
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(known.begin(), known.end(), it.key()) == known.end())
      throw ConfigError(where + ": unknown key '" + it.key() + "'");
}

}  // namespace prefixcap
