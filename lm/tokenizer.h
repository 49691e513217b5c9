// GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt), identical to OpenAI's encoder.py.
// ref: openai/gpt-2 src/encoder.py (9b63575).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace prefixcap {

class Gpt2Tokenizer {
 public:
  // Reads vocab.json and merges.txt; throws FileError naming a bad file or line.
  Gpt2Tokenizer(const std::string& vocab_path, const std::string& merges_path);
  // From a folder holding vocab.json and merges.txt.
  static Gpt2Tokenizer from_folder(const std::string& folder);
  ~Gpt2Tokenizer();
  Gpt2Tokenizer(Gpt2Tokenizer&&) noexcept;
  Gpt2Tokenizer& operator=(Gpt2Tokenizer&&) noexcept;

  // UTF-8 text -> ids. With allow_special, "<|endoftext|>" in the text becomes its id (as
  // Hugging Face's GPT2Tokenizer does); without, it is plain text (as encoder.py does).
  // Throws std::invalid_argument for text that is not valid UTF-8.
  std::vector<int64_t> encode(const std::string& text, bool allow_special = false) const;
  // ids -> UTF-8 text; invalid byte sequences become U+FFFD as Python's errors='replace' does.
  std::string decode(const std::vector<int64_t>& ids) const;
  // The vocabulary string of one id (byte-level form, e.g. "\u0120the").
  const std::string& token(int64_t id) const;
  // The regex pre-tokens of `text` (for tests and debugging).
  std::vector<std::string> pretokenize(const std::string& text) const;

  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  int64_t eos_token_id() const { return eos_id_; }
  // merges.txt as read (for writing a copy next to saved models).
  const std::string& merges_text() const { return merges_text_; }
  // Writes FOLDER/vocab.json and FOLDER/merges.txt (the folder must exist).
  void save(const std::string& folder) const;
  // Id of a vocabulary entry, or -1.
  int64_t token_to_id(const std::string& token) const;

 private:
  std::vector<int64_t> bpe(const std::string& word) const;

  std::unordered_map<std::string, int64_t> token_to_id_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int> merge_rank_;  // "a b" -> rank
  std::string byte_to_unicode_[256];                 // byte -> UTF-8 of its stand-in char
  std::unordered_map<uint32_t, uint8_t> unicode_to_byte_;
  int64_t eos_id_ = -1;
  std::string merges_text_;
  struct Regex;
  std::unique_ptr<Regex> regex_;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

// Learns a byte-level BPE vocabulary in GPT-2's format from `texts`: the 256 byte symbols,
// then the most frequent adjacent pair merged (ties: the smaller pair first) until
// `vocab_size` - 1 entries, then <|endoftext|>. Words are GPT-2's pre-tokens. Writes
// FOLDER/vocab.json and FOLDER/merges.txt, which Gpt2Tokenizer reads like OpenAI's files.
void train_bpe_tokenizer(const std::vector<std::string>& texts, int64_t vocab_size, const std::string& folder);

// Decodes UTF-8 like Python's bytes.decode('utf-8', errors='replace'): one U+FFFD per
// maximal invalid subsequence.
std::string utf8_decode_replace(const std::string& bytes);

}  // namespace prefixcap
