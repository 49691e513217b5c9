// BERT's tokenizer (Hugging Face BertTokenizer, the "slow" Python one) from a vocab.txt: the
// basic tokenizer (control characters dropped, whitespace normalised, CJK characters spaced,
// lower-casing and accent stripping by NFD, punctuation split off), then greedy longest-match
// WordPiece with "##" continuations. For FENSE's Sentence-BERT and its fluency-error detector.
// ref: huggingface/transformers models/bert/tokenization_bert.py (BasicTokenizer, WordpieceTokenizer).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace prefixcap {

class WordPieceTokenizer {
 public:
  // vocab.txt: one token per line, id = line number. Throws std::runtime_error naming the file
  // when it is unreadable, empty or has no [UNK].
  static WordPieceTokenizer from_vocab(const std::string& vocab_txt, bool lower_case = true);

  // The basic tokenizer's words (before WordPiece).
  std::vector<std::string> basic_tokenize(const std::string& text) const;
  // Word pieces ("##" marks a continuation); a word with no decomposition is [UNK].
  std::vector<std::string> tokenize(const std::string& text) const;
  // [CLS] pieces [SEP] as ids, the pieces cut so that the whole is at most max_length (>= 2).
  std::vector<int64_t> encode(const std::string& text, size_t max_length = 512) const;

  int64_t id(const std::string& token) const;  // -1 when absent
  size_t vocab_size() const { return tokens_.size(); }

 private:
  std::unordered_map<std::string, int64_t> ids_;
  std::vector<std::string> tokens_;
  bool lower_case_ = true;
  int64_t unk_ = -1, cls_ = -1, sep_ = -1;
};

// Python's str.lower() per code point (utf8proc's simple lowercase mapping; Python differs only
// for U+0130, which it maps to "i̇").
std::string lowercase_utf8(const std::string& text);

// fense's text preprocessing for its fluency-error detector, re.sub(r"[^\w\s]", "", text).lower():
// every code point that is neither a word character (letters L*, numbers Nd/Nl/No, '_') nor
// whitespace (as str.isspace) removed, the rest lower-cased.
std::string remove_non_word_lower(const std::string& text);

}  // namespace prefixcap
