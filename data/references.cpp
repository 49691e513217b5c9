#include "data/references.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace prefixcap {
namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string media_key(const std::string& path) { return fs::path(path).stem().string(); }

std::vector<std::string> parse_csv_line(const std::string& line) {
  std::vector<std::string> fields;
  std::string cur;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        cur += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        cur += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      fields.push_back(cur);
      cur.clear();
    } else if (c != '\r') {
      cur += c;
    }
  }
  if (quoted) throw std::runtime_error("unterminated quoted field");
  fields.push_back(cur);
  return fields;
}

std::vector<std::string> read_text_lines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    // A UTF-8 byte-order mark (spreadsheet exports) is not part of the first field.
    if (lines.empty() && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);
    lines.push_back(line);
  }
  return lines;
}

std::string checked_caption(const std::string& caption, const std::string& where) {
  if (caption.size() > kMaxCaptionBytes)
    throw std::runtime_error(where + "caption of " + std::to_string(caption.size()) + " bytes exceeds the limit of " +
                             std::to_string(kMaxCaptionBytes) + " (not a caption?)");
  return caption;
}

namespace {

std::string where(const std::string& path, size_t line) { return path + ":" + std::to_string(line) + ": "; }

int column(const std::vector<std::string>& header, const std::string& name) {
  for (size_t i = 0; i < header.size(); ++i)
    if (header[i] == name) return static_cast<int>(i);
  return -1;
}

}  // namespace

std::vector<std::vector<std::string>> read_csv(const std::string& path, std::vector<std::string>* header) {
  return parse_csv_lines(read_text_lines(path), path, header);
}

std::vector<std::vector<std::string>> parse_csv_lines(const std::vector<std::string>& lines, const std::string& path,
                                                      std::vector<std::string>* header) {
  size_t first = 0;
  while (first < lines.size() && lines[first].find_first_not_of(" \t") == std::string::npos) ++first;
  if (first == lines.size()) throw std::runtime_error(path + ": empty file");
  *header = parse_csv_line(lines[first]);
  std::vector<std::vector<std::string>> rows;
  for (size_t i = first + 1; i < lines.size(); ++i) {
    if (lines[i].empty()) continue;
    std::vector<std::string> f;
    try {
      f = parse_csv_line(lines[i]);
    } catch (const std::exception& e) {
      throw std::runtime_error(where(path, i + 1) + e.what());
    }
    if (f.size() != header->size())
      throw std::runtime_error(where(path, i + 1) + "expected " + std::to_string(header->size()) + " fields, got " +
                               std::to_string(f.size()));
    rows.push_back(std::move(f));
  }
  return rows;
}

References read_references(const std::string& path, const std::string& split) {
  std::vector<std::string> lines = read_text_lines(path);
  References refs;
  size_t first = 0;
  while (first < lines.size() && lines[first].find_first_not_of(" \t") == std::string::npos) ++first;
  if (first == lines.size()) throw std::runtime_error(path + ": empty reference file");
  const std::string& head = lines[first];
  if (head[0] == '{' && head.find("\"images\"") == std::string::npos && head.find("\"media\"") != std::string::npos) {
    for (size_t i = 0; i < lines.size(); ++i) {  // JSONL manifest
      if (lines[i].find_first_not_of(" \t") == std::string::npos) continue;
      Json j;
      try {
        j = Json::parse(lines[i]);
      } catch (const Json::exception& e) {
        throw std::runtime_error(where(path, i + 1) + "invalid JSON: " + e.what());
      }
      if (!j.is_object() || !j.contains("media") || !j["media"].is_string() || !j.contains("captions") || !j["captions"].is_array())
        throw std::runtime_error(where(path, i + 1) + "expected {\"media\": path, \"captions\": [...]}");
      auto& list = refs[media_key(j["media"].get<std::string>())];
      for (const auto& c : j["captions"]) {
        if (!c.is_string()) throw std::runtime_error(where(path, i + 1) + "captions must be strings, got " + c.type_name());
        list.push_back(checked_caption(c.get<std::string>(), where(path, i + 1)));
      }
    }
    return refs;
  }
  if (head[0] == '{') {  // COCO Karpathy split json
    Json j;
    try {
      std::ifstream in(path);
      j = Json::parse(in);
    } catch (const Json::exception& e) {
      throw std::runtime_error(path + ": invalid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("images") || !j["images"].is_array())
      throw std::runtime_error(path + ": expected a COCO json with \"images\"");
    auto string_at = [&](const Json& o, const char* key, const std::string& what) -> std::string {
      if (!o.is_object() || !o.contains(key) || !o[key].is_string())
        throw std::runtime_error(path + ": " + what + ": expected a string \"" + key + "\"");
      return o[key].get<std::string>();
    };
    if (j.contains("annotations")) {
      // The official COCO captions file (captions_val2014.json): images[] {id, file_name},
      // annotations[] {image_id, caption}.
      if (!j["annotations"].is_array()) throw std::runtime_error(path + ": \"annotations\" is not a list");
      std::map<int64_t, std::string> file_of;
      for (size_t i = 0; i < j["images"].size(); ++i) {
        const Json& img = j["images"][i];
        const std::string what = "images[" + std::to_string(i) + "]";
        if (!img.is_object() || !img.contains("id") || !img["id"].is_number_integer())
          throw std::runtime_error(path + ": " + what + ": expected an integer \"id\"");
        file_of[img["id"].get<int64_t>()] = string_at(img, "file_name", what);
      }
      for (size_t i = 0; i < j["annotations"].size(); ++i) {
        const Json& a = j["annotations"][i];
        const std::string what = "annotations[" + std::to_string(i) + "]";
        if (!a.is_object() || !a.contains("image_id") || !a["image_id"].is_number_integer())
          throw std::runtime_error(path + ": " + what + ": expected an integer \"image_id\"");
        auto it = file_of.find(a["image_id"].get<int64_t>());
        if (it == file_of.end())
          throw std::runtime_error(path + ": " + what + ": image_id " + a["image_id"].dump() + " is not among the images");
        refs[media_key(it->second)].push_back(checked_caption(string_at(a, "caption", what), path + ": " + what + ": "));
      }
      return refs;
    }
    // The Karpathy split file (dataset_coco.json): images[] {filename, split, sentences[] {raw}}.
    for (size_t i = 0; i < j["images"].size(); ++i) {
      const Json& img = j["images"][i];
      const std::string what = "images[" + std::to_string(i) + "]";
      if (!split.empty() && img.is_object() && img.value("split", "") != split) continue;
      auto& list = refs[media_key(string_at(img, "filename", what))];
      if (!img.contains("sentences") || !img["sentences"].is_array())
        throw std::runtime_error(path + ": " + what + ": expected a list \"sentences\"");
      for (const auto& sentence : img["sentences"]) list.push_back(checked_caption(string_at(sentence, "raw", what + " sentences"), path + ": " + what + ": "));
    }
    return refs;
  }
  std::vector<std::string> header;
  const auto rows = parse_csv_lines(lines, path, &header);
  const int file_col = column(header, "file_name");
  const int ytid_col = column(header, "youtube_id");
  const int cap_col = column(header, "caption");
  const int start_col = column(header, "start_time");
  if (file_col < 0 && ytid_col < 0)
    throw std::runtime_error(path + ": unknown reference format (expected a Clotho or AudioCaps csv, COCO json or JSONL manifest)");
  for (const auto& f : rows) {
    const std::string at = path + ": " + (file_col >= 0 ? f[file_col] : f[ytid_col]) + ": ";
    if (file_col >= 0) {  // Clotho: caption_1..caption_N
      auto& list = refs[media_key(f[file_col])];
      for (size_t k = 0; k < header.size(); ++k)
        if (header[k].rfind("caption_", 0) == 0 && !f[k].empty()) list.push_back(checked_caption(f[k], at));
    } else {  // AudioCaps: one caption per row
      if (cap_col < 0) throw std::runtime_error(path + ": AudioCaps csv without a 'caption' column");
      std::string key = f[ytid_col];
      if (start_col >= 0) key += "_" + f[start_col];
      refs[key].push_back(checked_caption(f[cap_col], at));
    }
  }
  return refs;
}

Predictions read_predictions(const std::string& path) {
  std::vector<std::string> lines = read_text_lines(path);
  Predictions preds;
  if (lines.empty()) throw std::runtime_error(path + ": empty prediction file");
  // One prediction per clip (or window): a second one would silently replace the first.
  std::map<std::string, size_t> line_of;
  auto add = [&](const std::string& key, const std::string& caption, size_t line) {
    auto [it, fresh] = line_of.emplace(key, line);
    if (!fresh)
      throw std::runtime_error(where(path, line) + "a second prediction for '" + key + "' (the first is on line " +
                               std::to_string(it->second) + ")");
    preds[key] = caption;
  };
  if (!lines[0].empty() && lines[0][0] == '{') {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (lines[i].empty()) continue;
      Json j;
      try {
        j = Json::parse(lines[i]);
      } catch (const Json::exception& e) {
        throw std::runtime_error(where(path, i + 1) + "invalid JSON: " + e.what());
      }
      if (!j.is_object()) throw std::runtime_error(where(path, i + 1) + "expected a JSON object");
      if (j.contains("error")) continue;
      if (!j.contains("path") || !j["path"].is_string() || !j.contains("caption") || !j["caption"].is_string())
        throw std::runtime_error(where(path, i + 1) + "expected a string \"path\" and a string \"caption\"");
      std::string key = media_key(j["path"].get<std::string>());
      if (j.contains("start")) {
        if (!j["start"].is_number()) throw std::runtime_error(where(path, i + 1) + "\"start\" must be a number");
        key += "@" + j["start"].dump();
      }
      add(key, checked_caption(j["caption"].get<std::string>(), where(path, i + 1)), i + 1);
    }
    return preds;
  }
  std::vector<std::string> header;
  const auto rows = parse_csv_lines(lines, path, &header);
  const int path_col = column(header, "path"), cap_col = column(header, "caption"), start_col = column(header, "start");
  if (path_col < 0 || cap_col < 0) throw std::runtime_error(path + ": expected a csv with 'path' and 'caption' columns");
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto& f = rows[r];
    std::string key = media_key(f[path_col]);
    if (start_col >= 0 && !f[start_col].empty()) key += "@" + f[start_col];
    add(key, checked_caption(f[cap_col], path + ": " + f[path_col] + ": "), r + 2);
  }
  return preds;
}

}  // namespace prefixcap
