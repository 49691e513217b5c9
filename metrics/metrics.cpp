#include "metrics/metrics.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>
#include <stdexcept>
#include <unordered_map>

namespace prefixcap {

// ---------------------------------------------------------------------------------------
// tokenization

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// Splits a word into its clitics the way PTBLexer does (n't, 's, 're, 've, 'll, 'd, 'm) and
// the "splitAssimilations" forms (cannot -> can not, gonna -> gon na, ...).
void split_word(const std::string& w, std::vector<std::string>& out) {
  static const std::vector<std::pair<std::string, size_t>> assimilations = {
      {"cannot", 3}, {"gonna", 3}, {"gotta", 3}, {"lemme", 3}, {"gimme", 3}, {"wanna", 3}};
  for (const auto& [word, cut] : assimilations)
    if (w == word) {
      out.push_back(w.substr(0, cut));
      out.push_back(w.substr(cut));
      return;
    }
  if (w.size() > 3 && w.compare(w.size() - 3, 3, "n't") == 0) {
    out.push_back(w.substr(0, w.size() - 3));
    out.push_back("n't");
    return;
  }
  for (const char* clitic : {"'s", "'re", "'ve", "'ll", "'d", "'m"}) {
    const std::string c(clitic);
    if (w.size() > c.size() && w.compare(w.size() - c.size(), c.size(), c) == 0) {
      out.push_back(w.substr(0, w.size() - c.size()));
      out.push_back(c);
      return;
    }
  }
  out.push_back(w);
}

const std::set<std::string> kCocoPunctuation = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".",
                                                "?",  "!", ",",  ":", "-",     "--",    "...",   ";"};

}  // namespace

std::vector<std::string> ptb_tokenize(const std::string& raw) {
  std::string text;
  for (char c : raw) text.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  std::vector<std::string> out;
  size_t i = 0;
  const size_t n = text.size();
  bool after_space = true;  // a double quote here opens
  while (i < n) {
    char c = text[i];
    if (is_space(c)) {
      ++i;
      after_space = true;
      continue;
    }
    if (c == '"') {
      out.push_back(after_space ? "``" : "''");
      ++i;
      after_space = false;
      continue;
    }
    if (c == '`') {  // backquotes open a quote: `` or `
      size_t j = i;
      while (j < n && text[j] == '`') ++j;
      out.push_back(j - i >= 2 ? "``" : "`");
      i = j;
      after_space = false;
      continue;
    }
    if (c == '$' || c == '#' || c == '%') {  // currency, number sign, percent: tokens of their own
      out.push_back(std::string(1, c));
      ++i;
      after_space = false;
      continue;
    }
    if (c == '(' || c == '[' || c == '{') {
      out.push_back(c == '(' ? "-lrb-" : c == '[' ? "-lsb-" : "-lcb-");
      ++i;
      after_space = true;  // a quote right after an opening bracket opens
      continue;
    }
    if (c == ')' || c == ']' || c == '}') {
      out.push_back(c == ')' ? "-rrb-" : c == ']' ? "-rsb-" : "-rcb-");
      ++i;
      after_space = false;
      continue;
    }
    if (c == '.' && i + 2 < n && text[i + 1] == '.' && text[i + 2] == '.') {
      size_t j = i;
      while (j < n && text[j] == '.') ++j;
      out.push_back("...");
      i = j;
      after_space = false;
      continue;
    }
    if (c == '!' || c == '?') {  // runs of ! and ? are one token
      size_t j = i;
      while (j < n && (text[j] == '!' || text[j] == '?')) ++j;
      out.push_back(text.substr(i, j - i));
      i = j;
      after_space = false;
      continue;
    }
    if (c == ',' || c == ';' || c == ':' || c == '.') {
      out.push_back(std::string(1, c));
      ++i;
      after_space = false;
      continue;
    }
    if (c == '-' && (i + 1 >= n || text[i + 1] == '-' || is_space(text[i + 1]))) {
      size_t j = i;
      while (j < n && text[j] == '-') ++j;
      out.push_back(j - i >= 2 ? "--" : "-");
      i = j;
      after_space = false;
      continue;
    }
    // A word: letters, digits, inner hyphens, apostrophes; inside numbers also periods, commas
    // and colons between digits (3.5, 1,000, 5:30); inside acronyms periods between letters (u.s.).
    auto digit = [&](size_t k) { return k < n && std::isdigit(static_cast<unsigned char>(text[k])); };
    auto letter = [&](size_t k) { return k < n && std::isalpha(static_cast<unsigned char>(text[k])); };
    size_t j = i;
    bool number = true;  // the word so far is digits and separators only
    while (j < n) {
      char d = text[j];
      if (is_space(d) || d == '"' || d == '(' || d == ')' || d == '[' || d == ']' || d == '{' || d == '}' || d == ';' ||
          d == '!' || d == '?' || d == '`' || d == '%')
        break;
      const bool between_digits = j > i && digit(j - 1) && digit(j + 1);
      if ((d == ',' || d == ':') && !(number && between_digits)) break;
      if (d == '.' && !between_digits) {
        // u.s.a: a single letter, a period, a letter; the closing period is taken below
        const bool acronym = letter(j - 1) && (j - 1 == i || text[j - 2] == '.') && letter(j + 1) &&
                             (j + 2 >= n || !letter(j + 2));
        if (!acronym) break;
      }
      if (d == '-' && (j + 1 >= n || text[j + 1] == '-' || is_space(text[j + 1]))) break;
      if (!digit(j) && d != '.' && d != ',' && d != ':') number = false;
      ++j;
    }
    std::string word = text.substr(i, j - i);
    // An abbreviation or acronym keeps its period (mr., etc., u.s.).
    static const std::set<std::string> abbreviations = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr",
                                                       "etc", "vs", "inc", "ltd", "corp", "mt", "messrs"};
    if (j < n && text[j] == '.' && (abbreviations.count(word) || (word.size() >= 3 && word[1] == '.'))) {
      word.push_back('.');
      ++j;
    }
    // A leading or trailing single quote is a quote, not part of the word ('90s keeps its own).
    if (word.size() > 1 && word.front() == '\'' && word != "'s" && word != "'re" && word != "'ve" && word != "'ll" &&
        word != "'d" && word != "'m" && !(word.size() > 2 && std::isdigit(static_cast<unsigned char>(word[1])))) {
      out.push_back("`");
      word.erase(0, 1);
    }
    std::string trailing;
    if (word.size() > 2 && word.compare(word.size() - 2, 2, "''") == 0) {
      word.resize(word.size() - 2);
      trailing = "''";
    } else if (word.size() > 1 && word.back() == '\'') {
      word.pop_back();
      trailing = "'";
    }
    if (!word.empty()) split_word(word, out);
    if (!trailing.empty()) out.push_back(trailing);
    i = j;
    after_space = false;
  }
  return out;
}

std::string coco_tokenize(const std::string& raw) {
  std::string line;
  for (const auto& t : ptb_tokenize(raw)) line += (line.empty() ? "" : " ") + t;
  return coco_tokenize_ptb_line(line);
}

std::string coco_tokenize_ptb_line(const std::string& line) {
  size_t end = line.size();
  while (end > 0 && is_space(line[end - 1])) --end;  // rstrip()
  std::string out;
  bool first = true;
  for (size_t start = 0;;) {  // split(' '): empty words between double spaces are kept
    const size_t space = line.find(' ', start);
    const size_t stop = space == std::string::npos || space > end ? end : space;
    const std::string word = line.substr(start, stop - start);
    if (!kCocoPunctuation.count(word)) {
      out += (first ? "" : " ") + word;
      first = false;
    }
    if (stop >= end) break;
    start = stop + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// n-grams

namespace {

std::vector<std::string> split_whitespace(const std::string& s) {  // Python str.split()
  std::vector<std::string> words;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && is_space(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !is_space(s[j])) ++j;
    if (j > i) words.emplace_back(s, i, j - i);
    i = j;
  }
  return words;
}

std::vector<std::string> split_single_space(const std::string& s) {  // Python str.split(" ")
  std::vector<std::string> words;
  size_t start = 0;
  while (true) {
    size_t at = s.find(' ', start);
    words.push_back(s.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (at == std::string::npos) break;
    start = at + 1;
  }
  return words;
}

using NgramCounts = std::unordered_map<std::string, int>;  // key: words joined by '\x1f'; order = key's separator count + 1

NgramCounts count_ngrams(const std::vector<std::string>& words, int max_n) {
  NgramCounts counts;
  for (int k = 1; k <= max_n; ++k)
    for (size_t i = 0; i + k <= words.size(); ++i) {
      std::string key = words[i];
      for (int j = 1; j < k; ++j) key += '\x1f' + words[i + j];
      ++counts[key];
    }
  return counts;
}

int ngram_order(const std::string& key) { return 1 + static_cast<int>(std::count(key.begin(), key.end(), '\x1f')); }

void check_items(const std::vector<CaptionItem>& items) {
  for (const auto& it : items)
    if (it.references.empty()) throw std::invalid_argument("item '" + it.id + "' has no references");
}

}  // namespace

// ---------------------------------------------------------------------------------------
// BLEU

MetricResult bleu(const std::vector<CaptionItem>& items, int max_n) {
  check_items(items);
  const double tiny = 1e-15, small = 1e-9;
  MetricResult r;
  std::vector<std::vector<double>> per(max_n);
  double total_test = 0, total_ref = 0;
  std::vector<double> total_guess(max_n, 0), total_correct(max_n, 0);
  for (const auto& item : items) {
    std::unordered_map<std::string, int> max_ref;
    std::vector<int> ref_lengths;
    for (const auto& ref : item.references) {
      auto words = split_whitespace(ref);
      ref_lengths.push_back(static_cast<int>(words.size()));
      for (const auto& [g, c] : count_ngrams(words, max_n)) max_ref[g] = std::max(max_ref[g], c);
    }
    auto test_words = split_whitespace(item.candidate);
    const int test_len = static_cast<int>(test_words.size());
    // "closest": the reference length nearest the candidate's, the shorter one on ties.
    int ref_len = ref_lengths[0];
    for (int l : ref_lengths)
      if (std::abs(l - test_len) < std::abs(ref_len - test_len) || (std::abs(l - test_len) == std::abs(ref_len - test_len) && l < ref_len))
        ref_len = l;
    std::vector<double> guess(max_n), correct(max_n, 0);
    for (int k = 0; k < max_n; ++k) guess[k] = std::max(0, test_len - k);
    for (const auto& [g, c] : count_ngrams(test_words, max_n)) {
      auto it = max_ref.find(g);
      correct[ngram_order(g) - 1] += std::min(it == max_ref.end() ? 0 : it->second, c);
    }
    double score = 1.0;
    for (int k = 0; k < max_n; ++k) {
      score *= (correct[k] + tiny) / (guess[k] + small);
      per[k].push_back(std::pow(score, 1.0 / (k + 1)));
      total_guess[k] += guess[k];
      total_correct[k] += correct[k];
    }
    const double ratio = (test_len + tiny) / (ref_len + small);
    if (ratio < 1)
      for (int k = 0; k < max_n; ++k) per[k].back() *= std::exp(1 - 1 / ratio);
    total_test += test_len;
    total_ref += ref_len;
  }
  double score = 1.0;
  const double ratio = (total_test + tiny) / (total_ref + small);
  for (int k = 0; k < max_n; ++k) {
    score *= (total_correct[k] + tiny) / (total_guess[k] + small);
    double b = std::pow(score, 1.0 / (k + 1));
    if (ratio < 1) b *= std::exp(1 - 1 / ratio);
    const std::string key = "Bleu_" + std::to_string(k + 1);
    r.corpus[key] = b;
    r.per_item[key] = per[k];
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// ROUGE-L

namespace {
int lcs(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  std::vector<int> prev(b.size() + 1, 0), cur(b.size() + 1, 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) cur[j] = a[i - 1] == b[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    std::swap(prev, cur);
  }
  return prev[b.size()];
}
double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / v.size();
}
}  // namespace

MetricResult rouge_l(const std::vector<CaptionItem>& items) {
  check_items(items);
  const double beta = 1.2;
  std::vector<double> scores;
  for (const auto& item : items) {
    auto cand = split_single_space(item.candidate);
    double p_max = 0, r_max = 0;
    for (const auto& ref : item.references) {
      auto r = split_single_space(ref);
      const int common = lcs(r, cand);
      p_max = std::max(p_max, common / double(cand.size()));
      r_max = std::max(r_max, common / double(r.size()));
    }
    scores.push_back(p_max != 0 && r_max != 0 ? (1 + beta * beta) * p_max * r_max / (r_max + beta * beta * p_max) : 0.0);
  }
  MetricResult r;
  r.per_item["ROUGE_L"] = scores;
  r.corpus["ROUGE_L"] = mean(scores);
  return r;
}

// ---------------------------------------------------------------------------------------
// CIDEr-D

MetricResult cider_d(const std::vector<CaptionItem>& items) {
  check_items(items);
  const int max_n = 4;
  const double sigma = 6.0;
  std::vector<std::vector<NgramCounts>> refs;
  std::vector<NgramCounts> tests;
  std::unordered_map<std::string, int> document_frequency;
  for (const auto& item : items) {
    refs.emplace_back();
    std::set<std::string> seen;
    for (const auto& ref : item.references) {
      refs.back().push_back(count_ngrams(split_whitespace(ref), max_n));
      for (const auto& [g, c] : refs.back().back()) seen.insert(g);
    }
    for (const auto& g : seen) ++document_frequency[g];
    tests.push_back(count_ngrams(split_whitespace(item.candidate), max_n));
  }
  const double log_docs = std::log(static_cast<double>(items.size()));

  struct Vec {
    std::vector<std::unordered_map<std::string, double>> weights;
    std::vector<double> norm;
    int length = 0;  // bigram count, as pycocoevalcap measures length
  };
  auto to_vec = [&](const NgramCounts& counts) {
    Vec v;
    v.weights.resize(max_n);
    v.norm.assign(max_n, 0.0);
    for (const auto& [g, tf] : counts) {
      auto it = document_frequency.find(g);
      const double df = std::log(std::max(1.0, it == document_frequency.end() ? 0.0 : double(it->second)));
      const int n = ngram_order(g) - 1;
      const double w = tf * (log_docs - df);
      v.weights[n][g] = w;
      v.norm[n] += w * w;
      if (n == 1) v.length += tf;
    }
    for (auto& x : v.norm) x = std::sqrt(x);
    return v;
  };

  std::vector<double> scores;
  for (size_t i = 0; i < items.size(); ++i) {
    Vec hyp = to_vec(tests[i]);
    std::vector<double> total(max_n, 0.0);
    for (const auto& ref_counts : refs[i]) {
      Vec ref = to_vec(ref_counts);
      const double delta = hyp.length - ref.length;
      for (int n = 0; n < max_n; ++n) {
        double val = 0;
        for (const auto& [g, w] : hyp.weights[n]) {
          auto it = ref.weights[n].find(g);
          const double rw = it == ref.weights[n].end() ? 0.0 : it->second;
          val += std::min(w, rw) * rw;
        }
        if (hyp.norm[n] != 0 && ref.norm[n] != 0) val /= hyp.norm[n] * ref.norm[n];
        total[n] += val * std::exp(-(delta * delta) / (2 * sigma * sigma));
      }
    }
    scores.push_back(mean(total) / refs[i].size() * 10.0);
  }
  MetricResult r;
  r.per_item["CIDEr"] = scores;
  r.corpus["CIDEr"] = mean(scores);
  return r;
}

}  // namespace prefixcap
