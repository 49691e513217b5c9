// Reference captions of the datasets users evaluate on, keyed by media identity (the file
// name without folder and extension), and caption predictions as `caption` writes them.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace prefixcap {

// key -> reference captions (raw text).
using References = std::map<std::string, std::vector<std::string>>;
// key -> predicted caption (raw text).
using Predictions = std::map<std::string, std::string>;

// Longest caption accepted (bytes): longer text is not a caption, and metrics are quadratic in
// caption length (ROUGE-L's longest common subsequence).
constexpr size_t kMaxCaptionBytes = 10000;
// `caption`, or a std::runtime_error "<where>caption of N bytes exceeds the limit ...".
std::string checked_caption(const std::string& caption, const std::string& where);

// The key of a media path: its file name without folder and extension ("a/b/x.wav" -> "x").
std::string media_key(const std::string& path);

// Reads references, the format chosen from the content:
//   Clotho csv  (file_name, caption_1..caption_5)
//   AudioCaps csv (audiocap_id, youtube_id, start_time, caption; key = youtube_id + "_" + start_time
//                 and youtube_id alone, see README)
//   COCO Karpathy json (dataset_coco.json: images[].filename, sentences[].raw; split optional)
//   COCO official captions json (captions_val2014.json: images[].{id, file_name}, annotations[].{image_id, caption})
//   JSONL manifest ({"media": path, "captions": [...]} per line)
// Malformed lines are reported with file and line number (std::runtime_error); a leading UTF-8
// byte-order mark is ignored; captions longer than kMaxCaptionBytes are refused.
References read_references(const std::string& path, const std::string& split = "");

// Reads `caption` output: jsonl (records with "path" and "caption"; error records skipped) or
// csv (path,...,caption,...); windows are keyed "key@start". Two predictions for one key are
// refused, naming both lines.
Predictions read_predictions(const std::string& path);

// One CSV record (RFC 4180 quoting) from a line; multi-line fields are not supported.
std::vector<std::string> parse_csv_line(const std::string& line);

// The lines of a text file without their line ends (\n or \r\n); throws if it cannot be read.
std::vector<std::string> read_text_lines(const std::string& path);

// The records of a CSV file after its header (the first non-blank line, returned in
// `header`); blank lines are skipped; a malformed record or one with a different field count
// throws "PATH:LINE: ...".
std::vector<std::vector<std::string>> read_csv(const std::string& path, std::vector<std::string>* header);
// The same for lines already read from `path` (named in the errors).
std::vector<std::vector<std::string>> parse_csv_lines(const std::vector<std::string>& lines, const std::string& path,
                                                      std::vector<std::string>* header);

}  // namespace prefixcap
