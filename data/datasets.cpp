#include "data/datasets.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "data/references.h"

namespace prefixcap {
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

int require_column(const std::vector<std::string>& header, const std::string& name, const std::string& path) {
  for (size_t i = 0; i < header.size(); ++i)
    if (header[i] == name) return static_cast<int>(i);
  throw std::runtime_error(path + ": no '" + name + "' column");
}

}  // namespace

std::vector<DatasetItem> read_dataset(const std::string& kind, const std::string& root, const std::string& split) {
  std::vector<DatasetItem> items;
  if (kind == "clotho") {
    const std::string csv = (fs::path(root) / ("clotho_captions_" + split + ".csv")).string();
    std::vector<std::string> header;
    auto rows = read_csv(csv, &header);
    const int file = require_column(header, "file_name", csv);
    for (const auto& r : rows) {
      DatasetItem it{(fs::path(root) / split / r[file]).string(), {}};
      for (size_t k = 0; k < header.size(); ++k)
        if (header[k].rfind("caption_", 0) == 0 && !r[k].empty()) it.captions.push_back(r[k]);
      items.push_back(std::move(it));
    }
  } else if (kind == "audiocaps") {
    const std::string csv = (fs::path(root) / (split + ".csv")).string();
    std::vector<std::string> header;
    auto rows = read_csv(csv, &header);
    const int ytid = require_column(header, "youtube_id", csv), start = require_column(header, "start_time", csv),
              cap = require_column(header, "caption", csv);
    std::map<std::string, size_t> index;  // one item per clip, all its captions
    for (const auto& r : rows) {
      const std::string stem = r[ytid] + "_" + r[start];
      auto it = index.find(stem);
      if (it == index.end()) {
        fs::path media = fs::path(root) / split / (stem + ".wav");
        for (const char* ext : {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"})
          if (fs::exists(fs::path(root) / split / (stem + ext))) {
            media = fs::path(root) / split / (stem + ext);
            break;
          }
        it = index.emplace(stem, items.size()).first;
        items.push_back({media.string(), {}});
      }
      items[it->second].captions.push_back(r[cap]);
    }
  } else if (kind == "coco") {
    const std::string json_path = (fs::path(root) / "dataset_coco.json").string();
    Json j;
    try {
      std::ifstream in(json_path);
      if (!in) throw std::runtime_error("cannot open");
      j = Json::parse(in);
    } catch (const std::exception& e) {
      throw std::runtime_error(json_path + ": " + e.what());
    }
    for (const auto& img : j.at("images")) {
      if (!split.empty() && img.value("split", "") != split && !(split == "train" && img.value("split", "") == "restval"))
        continue;
      DatasetItem it{(fs::path(root) / img.value("filepath", "") / img.at("filename").get<std::string>()).string(), {}};
      for (const auto& s : img.at("sentences")) it.captions.push_back(s.at("raw").get<std::string>());
      items.push_back(std::move(it));
    }
  } else if (kind == "manifest") {
    auto lines = read_text_lines(root);
    const fs::path base = fs::path(root).parent_path();
    for (size_t i = 0; i < lines.size(); ++i) {
      if (lines[i].find_first_not_of(" \t") == std::string::npos) continue;
      Json j;
      try {
        j = Json::parse(lines[i]);
      } catch (const Json::exception& e) {
        throw std::runtime_error(root + ":" + std::to_string(i + 1) + ": invalid JSON: " + e.what());
      }
      if (!j.contains("media") || !j["media"].is_string() || !j.contains("captions") || !j["captions"].is_array())
        throw std::runtime_error(root + ":" + std::to_string(i + 1) + ": expected {\"media\": path, \"captions\": [...]}");
      fs::path media = j["media"].get<std::string>();
      if (media.is_relative()) media = base / media;
      DatasetItem it{media.string(), {}};
      for (const auto& c : j["captions"]) {
        if (!c.is_string()) throw std::runtime_error(root + ":" + std::to_string(i + 1) + ": captions must be strings");
        it.captions.push_back(c.get<std::string>());
      }
      items.push_back(std::move(it));
    }
  } else {
    throw std::invalid_argument("unknown dataset kind '" + kind + "' (clotho, audiocaps, coco, manifest)");
  }
  return items;
}

std::vector<DatasetProblem> check_media(const std::vector<DatasetItem>& items) {
  std::vector<DatasetProblem> problems;
  for (const auto& it : items) {
    std::error_code ec;
    if (!fs::exists(it.media, ec)) problems.push_back({it.media, "missing"});
    else if (!fs::is_regular_file(it.media, ec)) problems.push_back({it.media, "not a file"});
    else if (fs::file_size(it.media, ec) == 0) problems.push_back({it.media, "empty"});
    else if (!std::ifstream(it.media)) problems.push_back({it.media, "unreadable"});
  }
  return problems;
}

}  // namespace prefixcap
