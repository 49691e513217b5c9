#include "lm/wordpiece.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <stdexcept>

namespace prefixcap {

namespace {

using Codepoints = std::vector<utf8proc_int32_t>;

Codepoints decode(const std::string& s) {  // invalid bytes become U+FFFD (dropped by cleaning)
  Codepoints out;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
  while (left > 0) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
    if (n <= 0) {
      cp = 0xFFFD;
      n = 1;
    }
    out.push_back(cp);
    p += n;
    left -= n;
  }
  return out;
}

std::string encode_utf8(const Codepoints& cps, size_t begin = 0, size_t end = std::string::npos) {
  std::string out;
  end = std::min(end, cps.size());
  for (size_t i = begin; i < end; ++i) {
    utf8proc_uint8_t buf[4];
    const auto n = utf8proc_encode_char(cps[i], buf);
    out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  }
  return out;
}

utf8proc_category_t category(utf8proc_int32_t cp) { return utf8proc_category(cp); }

bool is_control(utf8proc_int32_t cp) {  // BasicTokenizer._is_control: category C*, but not \t \n \r
  if (cp == '\t' || cp == '\n' || cp == '\r') return false;
  const auto c = category(cp);
  return c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CN ||
         c == UTF8PROC_CATEGORY_CO || c == UTF8PROC_CATEGORY_CS;
}

bool is_whitespace(utf8proc_int32_t cp) {  // _is_whitespace
  return cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || category(cp) == UTF8PROC_CATEGORY_ZS;
}

bool splits_words(utf8proc_int32_t cp) {  // Python's str.split(): what it treats as whitespace
  if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x1F) || cp == 0x85) return true;
  const auto c = category(cp);
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

bool is_punctuation(utf8proc_int32_t cp) {  // _is_punctuation: ASCII symbols count too
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126)) return true;
  const auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

bool is_cjk(utf8proc_int32_t cp) {  // _is_chinese_char
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
         (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

std::string nfc(const std::string& s) {
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                              &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) return s;
  std::string result(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// Python's str.split(): runs of whitespace separate words.
std::vector<Codepoints> split_words(const Codepoints& text) {
  std::vector<Codepoints> words;
  Codepoints current;
  for (auto cp : text) {
    if (splits_words(cp)) {
      if (!current.empty()) words.push_back(std::move(current));
      current.clear();
    } else {
      current.push_back(cp);
    }
  }
  if (!current.empty()) words.push_back(std::move(current));
  return words;
}

// str.lower() (simple case mapping per code point) and _run_strip_accents (NFD, drop Mn).
Codepoints lower_and_strip_accents(const Codepoints& word) {
  Codepoints out;
  for (auto cp : word) {
    utf8proc_int32_t decomposed[16];
    int last = 0;
    const auto n = utf8proc_decompose_char(utf8proc_tolower(cp), decomposed, 16,
                                           static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE), &last);
    if (n < 0 || n > 16) {
      out.push_back(utf8proc_tolower(cp));
      continue;
    }
    for (utf8proc_ssize_t k = 0; k < n; ++k)
      if (category(decomposed[k]) != UTF8PROC_CATEGORY_MN) out.push_back(decomposed[k]);
  }
  return out;
}

}  // namespace

WordPieceTokenizer WordPieceTokenizer::from_vocab(const std::string& vocab_txt, bool lower_case) {
  std::ifstream in(vocab_txt);
  if (!in) throw std::runtime_error(vocab_txt + ": cannot read the vocabulary");
  WordPieceTokenizer t;
  t.lower_case_ = lower_case;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    // load_vocab: the token is the line without its newline; a repeated token takes the later id.
    t.ids_[line] = static_cast<int64_t>(t.tokens_.size());
    t.tokens_.push_back(line);
  }
  if (t.tokens_.empty()) throw std::runtime_error(vocab_txt + ": empty vocabulary");
  t.unk_ = t.id("[UNK]");
  t.cls_ = t.id("[CLS]");
  t.sep_ = t.id("[SEP]");
  if (t.unk_ < 0) throw std::runtime_error(vocab_txt + ": the vocabulary has no [UNK] token");
  return t;
}

int64_t WordPieceTokenizer::id(const std::string& token) const {
  auto it = ids_.find(token);
  return it == ids_.end() ? -1 : it->second;
}

std::vector<std::string> WordPieceTokenizer::basic_tokenize(const std::string& raw) const {
  // _clean_text, then CJK characters spaced
  Codepoints text;
  for (auto cp : decode(raw)) {
    if (cp == 0 || cp == 0xFFFD || is_control(cp)) continue;
    if (is_whitespace(cp)) {
      text.push_back(' ');
    } else if (is_cjk(cp)) {
      text.push_back(' ');
      text.push_back(cp);
      text.push_back(' ');
    } else {
      text.push_back(cp);
    }
  }
  const Codepoints normalized = decode(nfc(encode_utf8(text)));
  std::vector<std::string> out;
  for (const auto& word0 : split_words(normalized)) {
    const Codepoints word = lower_case_ ? lower_and_strip_accents(word0) : word0;
    // _run_split_on_punc: every punctuation character is a word of its own
    Codepoints current;
    for (auto cp : word) {
      if (is_punctuation(cp)) {
        if (!current.empty()) out.push_back(encode_utf8(current));
        current.clear();
        out.push_back(encode_utf8(Codepoints{cp}));
      } else {
        current.push_back(cp);
      }
    }
    if (!current.empty()) out.push_back(encode_utf8(current));
  }
  // whitespace_tokenize(" ".join(split_tokens)): pieces holding whitespace again (none after the
  // steps above, but a stripped accent can leave an empty word) are re-split.
  std::vector<std::string> words;
  for (const auto& piece : out)
    for (const auto& w : split_words(decode(piece))) words.push_back(encode_utf8(w));
  return words;
}

std::vector<std::string> WordPieceTokenizer::tokenize(const std::string& text) const {
  std::vector<std::string> out;
  for (const auto& word : basic_tokenize(text)) {
    const Codepoints cps = decode(word);
    if (cps.size() > 100) {  // max_input_chars_per_word
      out.push_back("[UNK]");
      continue;
    }
    std::vector<std::string> pieces;
    size_t start = 0;
    bool bad = false;
    while (start < cps.size()) {
      size_t end = cps.size();
      std::string found;
      while (start < end) {
        std::string piece = (start > 0 ? "##" : "") + encode_utf8(cps, start, end);
        if (ids_.count(piece)) {
          found = std::move(piece);
          break;
        }
        --end;
      }
      if (found.empty()) {
        bad = true;
        break;
      }
      pieces.push_back(std::move(found));
      start = end;
    }
    if (bad) out.push_back("[UNK]");
    else out.insert(out.end(), pieces.begin(), pieces.end());
  }
  return out;
}

std::vector<int64_t> WordPieceTokenizer::encode(const std::string& text, size_t max_length) const {
  if (max_length < 2) throw std::invalid_argument("max_length must be at least 2 ([CLS] and [SEP])");
  if (cls_ < 0 || sep_ < 0) throw std::runtime_error("the vocabulary has no [CLS] or [SEP] token");
  std::vector<int64_t> ids = {cls_};
  for (const auto& piece : tokenize(text)) {
    if (ids.size() + 1 >= max_length) break;
    ids.push_back(id(piece));
  }
  ids.push_back(sep_);
  return ids;
}

std::string lowercase_utf8(const std::string& text) {
  Codepoints cps = decode(text);
  for (auto& cp : cps) cp = utf8proc_tolower(cp);
  return encode_utf8(cps);
}

std::string remove_non_word_lower(const std::string& text) {
  Codepoints kept;
  for (const auto cp : decode(text)) {
    const auto c = category(cp);
    const bool word = cp == '_' || (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) ||
                      (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO);
    if (word || splits_words(cp)) kept.push_back(utf8proc_tolower(cp));
  }
  return encode_utf8(kept);
}

}  // namespace prefixcap
