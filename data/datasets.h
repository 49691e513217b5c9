// Training/evaluation datasets as (media file, captions) items, from the layouts users
// download. Missing or unreadable media are listed before anything starts, not discovered
// mid-training.
#pragma once

#include <string>
#include <vector>

namespace prefixcap {

struct DatasetItem {
  std::string media;                  // path to the audio / image file
  std::vector<std::string> captions;  // raw reference captions
};

struct DatasetProblem {
  std::string media;
  std::string reason;  // "missing", "empty", "unreadable"
};

// kind: "clotho" (ROOT/clotho_captions_SPLIT.csv, audio in ROOT/SPLIT/),
//       "audiocaps" (ROOT/SPLIT.csv, audio in ROOT/SPLIT/YOUTUBEID_STARTTIME.<wav|flac|mp3|...>,
//                    the first extension found),
//       "coco" (ROOT/dataset_coco.json Karpathy split, images at ROOT/filepath/filename),
//       "manifest" (ROOT is a JSONL file {"media": path (relative to the file), "captions": [...]}).
// Malformed lines are reported with file and line number (std::runtime_error).
std::vector<DatasetItem> read_dataset(const std::string& kind, const std::string& root, const std::string& split);

// Every item whose media file is missing, empty or unreadable.
std::vector<DatasetProblem> check_media(const std::vector<DatasetItem>& items);

}  // namespace prefixcap
