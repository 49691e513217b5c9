#include "lm/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/json_config.h"

namespace prefixcap {
namespace {

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 if the byte sequence there
// is invalid; `valid_prefix` receives how many bytes form the longest valid-so-far prefix
// (the "maximal subpart" that Python replaces by one U+FFFD).
size_t utf8_sequence(const std::string& s, size_t i, size_t* valid_prefix) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) need = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *valid_prefix = 1;  // C0, C1, F5..FF, or a lone continuation byte
    return 0;
  }
  size_t k = 1;
  for (; k < need; ++k) {
    if (i + k >= s.size()) break;
    const auto b = static_cast<uint8_t>(s[i + k]);
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) break;
  }
  if (k == need) return need;
  *valid_prefix = k;
  return 0;
}

uint32_t utf8_codepoint(const std::string& s, size_t i, size_t len) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  if (len == 1) return b0;
  uint32_t cp = b0 & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
  return cp;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open");
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// encoder.py's pattern. `\s` is spelled out as the code points Python's `regex` module treats
// as white space (Unicode White_Space), since PCRE2's \s differs (U+0085, U+180E).
const char* const kWhite = "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}"
                           "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

}  // namespace

struct Gpt2Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

std::string utf8_decode_replace(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t prefix = 0;
    size_t len = utf8_sequence(bytes, i, &prefix);
    if (len) {
      out.append(bytes, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

Gpt2Tokenizer::Gpt2Tokenizer(const std::string& vocab_path, const std::string& merges_path)
    : regex_(std::make_unique<Regex>()) {
  // Byte <-> printable stand-in characters (encoder.py bytes_to_unicode).
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
    append_utf8(byte_to_unicode_[b], cp);
    unicode_to_byte_[cp] = static_cast<uint8_t>(b);
  }

  nlohmann::json vocab;
  try {
    vocab = nlohmann::json::parse(read_file(vocab_path));
  } catch (const nlohmann::json::exception& e) {
    throw FileError(vocab_path, std::string("invalid JSON: ") + e.what());
  }
  if (!vocab.is_object() || vocab.empty()) throw FileError(vocab_path, "expected a JSON object token -> id");
  id_to_token_.resize(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) throw FileError(vocab_path, "id of '" + it.key() + "' is not an integer");
    int64_t id = it.value().get<int64_t>();
    if (id < 0 || id >= static_cast<int64_t>(vocab.size()))
      throw FileError(vocab_path, "id " + std::to_string(id) + " of '" + it.key() + "' is out of range");
    if (!id_to_token_[id].empty()) throw FileError(vocab_path, "id " + std::to_string(id) + " is used twice");
    id_to_token_[id] = it.key();
    token_to_id_[it.key()] = id;
  }
  eos_id_ = token_to_id("<|endoftext|>");

  const std::string merges = read_file(merges_path);
  merges_text_ = merges;
  std::vector<std::string> lines;
  {
    size_t start = 0;
    while (true) {
      size_t end = merges.find('\n', start);
      if (end == std::string::npos) {
        lines.push_back(merges.substr(start));
        break;
      }
      lines.push_back(merges.substr(start, end - start));
      start = end + 1;
    }
  }
  // encoder.py: bpe_data.split('\n')[1:-1] (a version line first, an empty line last).
  if (lines.size() < 2 || lines[0].rfind("#version", 0) != 0)
    throw FileError(merges_path, "expected a '#version' first line (GPT-2 merges.txt)");
  size_t last = lines.back().empty() ? lines.size() - 1 : lines.size();
  for (size_t i = 1; i < last; ++i) {
    const std::string& line = lines[i];
    size_t space = line.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 >= line.size() ||
        line.find(' ', space + 1) != std::string::npos)
      throw FileError(merges_path, "line " + std::to_string(i + 1) + ": expected two symbols separated by one space");
    merge_rank_.emplace(line, static_cast<int>(i - 1));
  }

  std::string pattern = std::string("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^") + kWhite +
                        "\\p{L}\\p{N}]+|[" + kWhite + "]+(?![^" + kWhite + "])|[" + kWhite + "]+";
  int error = 0;
  PCRE2_SIZE offset = 0;
  regex_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF,
                               &error, &offset, nullptr);
  if (!regex_->code) throw std::runtime_error("GPT-2 pre-tokenizer pattern failed to compile (PCRE2 error " +
                                              std::to_string(error) + ")");
  pcre2_jit_compile(regex_->code, PCRE2_JIT_COMPLETE);  // optional speed-up; falls back silently
}

Gpt2Tokenizer::~Gpt2Tokenizer() = default;
Gpt2Tokenizer::Gpt2Tokenizer(Gpt2Tokenizer&& other) noexcept
    : token_to_id_(std::move(other.token_to_id_)),
      id_to_token_(std::move(other.id_to_token_)),
      merge_rank_(std::move(other.merge_rank_)),
      unicode_to_byte_(std::move(other.unicode_to_byte_)),
      eos_id_(other.eos_id_),
      merges_text_(std::move(other.merges_text_)),
      regex_(std::move(other.regex_)),
      cache_(std::move(other.cache_)) {
  for (int i = 0; i < 256; ++i) byte_to_unicode_[i] = std::move(other.byte_to_unicode_[i]);
}
Gpt2Tokenizer& Gpt2Tokenizer::operator=(Gpt2Tokenizer&& other) noexcept {
  if (this != &other) {
    token_to_id_ = std::move(other.token_to_id_);
    id_to_token_ = std::move(other.id_to_token_);
    merge_rank_ = std::move(other.merge_rank_);
    unicode_to_byte_ = std::move(other.unicode_to_byte_);
    eos_id_ = other.eos_id_;
    merges_text_ = std::move(other.merges_text_);
    regex_ = std::move(other.regex_);
    cache_ = std::move(other.cache_);
    for (int i = 0; i < 256; ++i) byte_to_unicode_[i] = std::move(other.byte_to_unicode_[i]);
  }
  return *this;
}

Gpt2Tokenizer Gpt2Tokenizer::from_folder(const std::string& folder) {
  namespace fs = std::filesystem;
  return Gpt2Tokenizer((fs::path(folder) / "vocab.json").string(), (fs::path(folder) / "merges.txt").string());
}

int64_t Gpt2Tokenizer::token_to_id(const std::string& token) const {
  auto it = token_to_id_.find(token);
  return it == token_to_id_.end() ? -1 : it->second;
}

const std::string& Gpt2Tokenizer::token(int64_t id) const {
  if (id < 0 || id >= vocab_size())
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                            std::to_string(vocab_size()) + ")");
  return id_to_token_[id];
}

std::vector<std::string> Gpt2Tokenizer::pretokenize(const std::string& text) const {
  for (size_t i = 0; i < text.size();) {
    size_t prefix = 0;
    size_t len = utf8_sequence(text, i, &prefix);
    if (!len) throw std::invalid_argument("text is not valid UTF-8 (byte " + std::to_string(i) + ")");
    i += len;
  }
  std::vector<std::string> out;
  pcre2_match_data* match = pcre2_match_data_create_from_pattern(regex_->code, nullptr);
  size_t offset = 0;
  while (offset < text.size()) {
    int rc = pcre2_match(regex_->code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), offset,
                         PCRE2_NO_UTF_CHECK, match, nullptr);
    if (rc < 0) {
      pcre2_match_data_free(match);
      throw std::runtime_error("pre-tokenizer failed at byte " + std::to_string(offset));
    }
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
    if (ov[1] <= ov[0]) {  // cannot happen with this pattern; guard against a loop
      pcre2_match_data_free(match);
      throw std::runtime_error("pre-tokenizer made no progress at byte " + std::to_string(offset));
    }
    out.emplace_back(text, ov[0], ov[1] - ov[0]);
    offset = ov[1];
  }
  pcre2_match_data_free(match);
  return out;
}

std::vector<int64_t> Gpt2Tokenizer::bpe(const std::string& word_bytes) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(word_bytes);
    if (it != cache_.end()) return it->second;
  }
  std::vector<std::string> word;
  for (unsigned char b : word_bytes) word.push_back(byte_to_unicode_[b]);
  while (word.size() > 1) {
    int best = INT_MAX;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = merge_rank_.find(word[i] + " " + word[i + 1]);
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        best_i = i;
      }
    }
    if (best == INT_MAX) break;
    const std::string first = word[best_i], second = word[best_i + 1];
    std::vector<std::string> merged;
    merged.reserve(word.size());
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        merged.push_back(first + second);
        i += 2;
      } else {
        merged.push_back(word[i]);
        i += 1;
      }
    }
    word.swap(merged);
  }
  std::vector<int64_t> ids;
  for (const auto& piece : word) {
    auto it = token_to_id_.find(piece);
    if (it == token_to_id_.end()) throw std::runtime_error("BPE produced '" + piece + "', which is not in the vocabulary");
    ids.push_back(it->second);
  }
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() > 200000) cache_.clear();
  cache_.emplace(word_bytes, ids);
  return ids;
}

std::vector<int64_t> Gpt2Tokenizer::encode(const std::string& text, bool allow_special) const {
  std::vector<int64_t> ids;
  auto encode_plain = [&](const std::string& part) {
    for (const auto& word : pretokenize(part)) {
      auto w = bpe(word);
      ids.insert(ids.end(), w.begin(), w.end());
    }
  };
  const std::string special = "<|endoftext|>";
  if (!allow_special || eos_id_ < 0) {
    encode_plain(text);
    return ids;
  }
  size_t start = 0;
  while (true) {
    size_t at = text.find(special, start);
    encode_plain(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (at == std::string::npos) break;
    ids.push_back(eos_id_);
    start = at + special.size();
  }
  return ids;
}

std::string Gpt2Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string bytes;
  for (int64_t id : ids) {
    const std::string& tok = token(id);
    for (size_t i = 0; i < tok.size();) {
      size_t prefix = 0;
      size_t len = utf8_sequence(tok, i, &prefix);
      if (!len) throw std::runtime_error("vocabulary entry " + std::to_string(id) + " is not valid UTF-8");
      auto it = unicode_to_byte_.find(utf8_codepoint(tok, i, len));
      if (it == unicode_to_byte_.end())
        throw std::runtime_error("vocabulary entry " + std::to_string(id) + " has a character outside the byte alphabet");
      bytes.push_back(static_cast<char>(it->second));
      i += len;
    }
  }
  return utf8_decode_replace(bytes);
}

}  // namespace prefixcap

namespace prefixcap {

namespace {
void write_tokenizer_files(const std::string& folder, const std::string& vocab_json, const std::string& merges) {
  write_file_atomic((std::filesystem::path(folder) / "vocab.json").string(), vocab_json);
  write_file_atomic((std::filesystem::path(folder) / "merges.txt").string(), merges);
}
}  // namespace

void Gpt2Tokenizer::save(const std::string& folder) const {
  nlohmann::json v = nlohmann::json::object();
  for (int64_t i = 0; i < vocab_size(); ++i) v[token(i)] = i;
  write_tokenizer_files(folder, v.dump(), merges_text());
}

}  // namespace prefixcap

namespace prefixcap {

void train_bpe_tokenizer(const std::vector<std::string>& texts, int64_t vocab_size, const std::string& folder) {
  if (vocab_size < 257) throw std::invalid_argument("BPE vocabulary size must be at least 257 (256 bytes + <|endoftext|>)");
  namespace fs = std::filesystem;
  fs::create_directories(folder);
  // The byte alphabet in encoder.py's stand-in characters, and a merge-free tokenizer that
  // gives us GPT-2's pre-tokenizer.
  std::vector<std::string> byte_symbol(256);
  {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(byte_symbol[b], printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++));
    }
  }
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_symbol[b]] = b;
  vocab["<|endoftext|>"] = 256;
  const fs::path base = fs::path(folder) / ".bpe-base";
  fs::create_directories(base);
  {
    std::ofstream(base / "vocab.json") << vocab.dump();
    std::ofstream(base / "merges.txt") << "#version: 0.2\n";
  }
  Gpt2Tokenizer bytes_only = Gpt2Tokenizer::from_folder(base.string());
  fs::remove_all(base);

  // Word (as symbols) -> count.
  std::map<std::vector<std::string>, int64_t> words;
  for (const auto& text : texts)
    for (const auto& piece : bytes_only.pretokenize(text)) {
      std::vector<std::string> symbols;
      for (unsigned char ch : piece) symbols.push_back(byte_symbol[ch]);
      ++words[symbols];
    }
  std::vector<std::pair<std::vector<std::string>, int64_t>> corpus(words.begin(), words.end());
  std::vector<std::string> merges;
  int64_t next_id = 256;
  while (next_id < vocab_size - 1) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [w, count] : corpus)
      for (size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += count;
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;  // map order: the smallest pair wins ties
    if (best->second < 2) break;  // nothing left worth a vocabulary entry
    const auto [a, b] = best->first;
    const std::string joined = a + b;
    for (auto& [w, count] : corpus) {
      std::vector<std::string> merged;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
          merged.push_back(joined);
          ++i;
        } else {
          merged.push_back(w[i]);
        }
      }
      w = std::move(merged);
    }
    merges.push_back(a + " " + b);
    if (!vocab.contains(joined)) vocab[joined] = next_id++;  // "a"+"bc" and "ab"+"c" share one entry
  }
  vocab["<|endoftext|>"] = next_id;
  std::string merges_text = "#version: 0.2\n";
  for (const auto& m : merges) merges_text += m + "\n";
  write_tokenizer_files(folder, vocab.dump(), merges_text);
}

}  // namespace prefixcap
