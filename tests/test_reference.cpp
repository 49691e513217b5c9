// prefixcap's evaluation against pycocoevalcap itself, run here: its PTBTokenizer (the Stanford
// CoreNLP 3.4.1 jar) on a large caption corpus against the native tokenization, and its METEOR
// wrapper (meteor-1.5.jar) against prefixcap's jar runner. The reference environment
// (.venv-ref, pycocoevalcap from PyPI) and Java are installed by scripts/setup.sh.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "core/json_config.h"
#include "metrics/evaluate.h"
#include "metrics/metrics.h"
#include "lm/wordpiece.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::TempDir;
using prefixcap::testing::q;
using Json = nlohmann::json;

namespace {

const std::string kPython = PREFIXCAP_REFERENCE_PYTHON;
const std::string kScript = std::string(PREFIXCAP_SOURCE_DIR) + "/tests/reference/pycocoevalcap_ref.py";


// Runs the reference script; fails the test (not a skip) when the environment is missing.
Json reference(const TempDir& dir, const std::string& mode, const Json& input) {
  if (!std::ifstream(kPython)) {
    ADD_FAILURE() << kPython << " is missing: scripts/setup.sh installs pycocoevalcap into .venv-ref";
    return Json();
  }
  const std::string in = dir.file(mode + "-in.json"), out = dir.file(mode + "-out.json");
  std::ofstream(in) << input.dump();
  const int rc = std::system((q(kPython) + " " + q(kScript) + " " + mode + " " + q(in) + " " + q(out) + " 2>" +
                              q(dir.file("err")))
                                 .c_str());
  EXPECT_EQ(rc, 0) << prefixcap::testing::read_bytes(dir.file("err"));
  return read_json_file(out);
}

std::vector<std::string> jar_paths() {
  std::vector<std::string> out;
  FILE* p = popen((q(kPython) + " " + q(kScript) + " jars").c_str(), "r");
  if (!p) return out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) {
    std::string line(buf);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    out.push_back(line);
  }
  pclose(p);
  return out;
}

// Captions as datasets and models write them: the fixture corpora, the demo's category table,
// and generated ones mixing the constructs the PTB lexer treats specially.
std::vector<std::string> caption_corpus() {
  std::vector<std::string> out;
  for (const auto& [file, suffix] : {std::pair<std::string, std::string>{"corpus.json", ""}, {"corpus_raw.json", "_raw"}}) {
    Json c = read_json_file(fixture_dir("metrics") + "/" + file);
    for (const Json& it : c.at("items")) {
      for (const Json& r : it.at("references" + suffix)) out.push_back(r.get<std::string>());
      out.push_back(it.at("candidate" + suffix).get<std::string>());
    }
  }
  Json demo = read_json_file(std::string(PREFIXCAP_SOURCE_DIR) + "/data/demo/categories.json");
  for (const Json& category : demo.at("categories"))
    for (const Json& c : category.at("captions")) out.push_back(c.get<std::string>());
  return out;
}

// Generated captions mixing the constructs the PTB lexer treats specially: contractions,
// abbreviations, numbers with separators, currency, quotes of every kind, brackets, slashes.
std::vector<std::string> adversarial_corpus() {
  std::vector<std::string> out;
  const std::vector<std::string> words = {
      "a",      "dog",     "barks",  "while", "cars",    "pass",   "by",      "the",    "rain",     "Falls",
      "on",     "roof",    "Birds",  "chirp", "in",      "distance", "man",   "speaks", "loudly",   "water",
      "it's",   "can't",   "won't",  "I'm",   "they're", "we've",  "she'd",   "don't",  "cannot",   "gonna",
      "wanna",  "o'clock", "e-mail", "well-known", "U.S.", "Mr.",  "etc.",    "3.5",    "1,000",    "$5",
      "50%",    "a/b",     "&",      "#1",    "@home",   "rock'n'roll", "90's", "'90s",   "dogs'",    "James's",
      "café",   "naïve",   "TV",     "OK",    "x2",      "10am",   "5:30",    "2-3",    "semi-truck", "co-op"};
  const std::vector<std::string> glue = {" ", " ", " ", " ", ", ", ". ", "! ", "? ", "; ", ": ", " - ", " -- ",
                                         "... ", " (", ") ", " \"", "\" ", " '", "' ", " [", "] ", " {", "} ",
                                         "  ", "\t", " `", "`` ", "'' ", "/", "-", "!!", "?!"};
  std::mt19937 rng(2026);
  for (int n = 0; n < 3000; ++n) {
    std::string s;
    const int length = 3 + static_cast<int>(rng() % 12);
    for (int i = 0; i < length; ++i) {
      s += words[rng() % words.size()];
      if (i + 1 < length) s += glue[rng() % glue.size()];
    }
    switch (rng() % 5) {
      case 0: s += "."; break;
      case 1: s += " ."; break;
      case 2: s = " " + s + "  "; break;
      default: break;
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace

// Number of captions whose tokenization differs from `expected`, the first few reported.
size_t count_differences(const std::vector<std::string>& corpus, const Json& expected, const std::vector<std::string>& got,
                         size_t report) {
  size_t differ = 0;
  for (size_t i = 0; i < corpus.size(); ++i)
    if (got[i] != expected[i].get<std::string>() && ++differ <= report)
      ADD_FAILURE() << "input:     [" << corpus[i] << "]\n  jar:       [" << expected[i].get<std::string>()
                    << "]\n  prefixcap: [" << got[i] << "]";
  return differ;
}

TEST(Reference, PtbTokenizationEqualsTheStanfordJar) {
  TempDir dir;
  auto jars = jar_paths();
  ASSERT_EQ(jars.size(), 2u) << "pycocoevalcap's jars not found through " << kPython;
  const std::vector<std::string> captions = caption_corpus();
  const std::vector<std::string> adversarial = adversarial_corpus();
  std::vector<std::string> all = captions;
  all.insert(all.end(), adversarial.begin(), adversarial.end());
  ASSERT_GT(all.size(), 3500u);
  Json expected = reference(dir, "ptb", all);
  ASSERT_TRUE(expected.is_array());
  ASSERT_EQ(expected.size(), all.size());
  // prefixcap's jar runner (caption-eval --ptb-jar): every caption exactly as pycocoevalcap's.
  const std::vector<std::string> through_jar = coco_tokenize_with_jar(all, jars[1]);
  EXPECT_EQ(count_differences(all, expected, through_jar, 10), 0u);
  // The native tokenizer: exact on dataset-style captions (the fixture corpora, the demo's
  // captions); on the adversarial mix it approximates (docs/evaluation.md), reported here.
  std::vector<std::string> native;
  for (const auto& c : all) native.push_back(coco_tokenize(c));
  Json expected_captions(expected.begin(), expected.begin() + static_cast<std::ptrdiff_t>(captions.size()));
  EXPECT_EQ(count_differences(captions, expected_captions,
                              std::vector<std::string>(native.begin(), native.begin() + static_cast<std::ptrdiff_t>(captions.size())), 10),
            0u);
  // PREFIXCAP_SHOW_PTB_DIFFS=N prints the first N adversarial differences (for work on the lexer).
  const char* show = std::getenv("PREFIXCAP_SHOW_PTB_DIFFS");
  size_t adversarial_differ = 0;
  for (size_t i = captions.size(); i < all.size(); ++i)
    if (native[i] != expected[i].get<std::string>() && ++adversarial_differ <= (show ? std::strtoul(show, nullptr, 10) : 0))
      std::printf("input:     [%s]\n  jar:       [%s]\n  prefixcap: [%s]\n", all[i].c_str(),
                  expected[i].get<std::string>().c_str(), native[i].c_str());
  std::printf("PTB tokenization over %zu captions: the jar runner as pycocoevalcap; native: the %zu dataset-style ones "
              "checked, %zu of %zu adversarial ones differ\n",
              all.size(), captions.size(), adversarial_differ, adversarial.size());
}

TEST(Reference, MeteorThroughTheJarEqualsPycocoevalcapsWrapper) {
  TempDir dir;
  auto jars = jar_paths();
  ASSERT_EQ(jars.size(), 2u) << "pycocoevalcap's jars not found through " << kPython;
  Json corpus = read_json_file(fixture_dir("metrics") + "/corpus.json");
  std::vector<CaptionItem> items;
  Json input = Json::array();
  for (const Json& it : corpus.at("items")) {
    CaptionItem c;
    c.id = it.at("id").get<std::string>();
    for (const Json& r : it.at("references")) c.references.push_back(r.get<std::string>());
    c.candidate = it.at("candidate").get<std::string>();
    input.push_back({{"id", c.id}, {"references", c.references}, {"candidate", c.candidate}});
    items.push_back(std::move(c));
  }
  Json expected = reference(dir, "meteor", input);
  EvalOptions o;
  o.tokenize = false;  // the corpus is lower-case words already; both sides get the same strings
  o.meteor_jar = jars[0];
  EvalReport r = evaluate(items, o);
  ASSERT_TRUE(r.corpus.count("METEOR")) << (r.missing.count("METEOR") ? r.missing["METEOR"] : "");
  EXPECT_EQ(r.corpus["METEOR"], expected["corpus"].get<double>());
  ASSERT_EQ(r.per_item["METEOR"].size(), expected["per_item"].size());
  for (size_t i = 0; i < items.size(); ++i)
    EXPECT_EQ(r.per_item["METEOR"][i], expected["per_item"][i].get<double>()) << items[i].id;
  std::printf("METEOR (meteor-1.5.jar) on %zu items: %.17g\n", items.size(), r.corpus["METEOR"]);
}

TEST(Reference, EvaluateWithThePtbJarScoresTheJarsTokens) {
  TempDir dir;
  auto jars = jar_paths();
  ASSERT_EQ(jars.size(), 2u);
  Json corpus = read_json_file(fixture_dir("metrics") + "/corpus_raw.json");
  std::vector<CaptionItem> raw;
  std::vector<std::string> strings;
  for (const Json& it : corpus.at("items")) {
    CaptionItem c;
    c.id = it.at("id").get<std::string>();
    for (const Json& r : it.at("references_raw")) c.references.push_back(r.get<std::string>());
    c.candidate = it.at("candidate_raw").get<std::string>();
    strings.insert(strings.end(), c.references.begin(), c.references.end());
    strings.push_back(c.candidate);
    raw.push_back(std::move(c));
  }
  Json tokens = reference(dir, "ptb", strings);  // pycocoevalcap's PTBTokenizer
  std::vector<CaptionItem> pre = raw;
  size_t k = 0;
  for (auto& it : pre) {
    for (auto& r : it.references) r = tokens[k++].get<std::string>();
    it.candidate = tokens[k++].get<std::string>();
  }
  EvalOptions with_jar;
  with_jar.ptb_jar = jars[1];
  EvalOptions already;
  already.tokenize = false;
  EvalReport a = evaluate(raw, with_jar), b = evaluate(pre, already);
  ASSERT_EQ(a.corpus.size(), b.corpus.size());
  for (const auto& [metric, value] : b.corpus) EXPECT_EQ(a.corpus[metric], value) << metric;
  EXPECT_GT(b.corpus["CIDEr"], 0.0);
}

// FENSE's tokenizer: WordPiece as transformers' BertTokenizer does it, on the caption corpus plus
// captions with accents, CJK, Unicode punctuation, control characters and very long words.
TEST(Reference, WordPieceEqualsTransformersBertTokenizer) {
  TempDir dir;
  std::vector<std::string> captions = caption_corpus();
  const std::vector<std::string> adversarial = adversarial_corpus();
  captions.insert(captions.end(), adversarial.begin(), adversarial.begin() + 1000);
  for (const std::string extra :
       {"Café naïve résumé Ångström", "ÉCOLE über straße", "日本語のテキスト mixed with English", "em—dash “quotes” «guillemets» ¿qué?",
        "tab\tnew\nline\rcarriage", "zero\u200bwidth soft\u00adhyphen", "nbsp\u00a0space and\u2028line sep",
        "supercalifragilisticexpialidocious-and-then-some-more-words-glued-together-until-it-is-over-one-hundred-characters-long-for-sure",
        "  leading and trailing  ", "",
        "dogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarksdogbarks loudly", "ünïcödé ãccents ñ ç ø æ œ ß", "emoji 🎵 music 🐕 dog", "fullwidth ｆｕｌｌｗｉｄｔｈ"})
    captions.push_back(extra);
  const std::string vocab = dir.file("vocab.txt");
  Json expected = reference(dir, "wordpiece", Json{{"vocab", vocab}, {"captions", captions}});
  ASSERT_TRUE(expected.contains("tokens"));
  WordPieceTokenizer tok = WordPieceTokenizer::from_vocab(vocab);
  ASSERT_GT(tok.vocab_size(), 100u);
  size_t differ = 0;
  for (size_t i = 0; i < captions.size(); ++i) {
    const auto pieces = tok.tokenize(captions[i]);
    const auto want = expected["tokens"][i].get<std::vector<std::string>>();
    const auto ids = tok.encode(captions[i], 64);
    const auto want_ids = expected["ids"][i].get<std::vector<int64_t>>();
    if ((pieces != want || ids != want_ids) && ++differ <= 10) {
      std::string a, b;
      for (const auto& p : want) a += p + " ";
      for (const auto& p : pieces) b += p + " ";
      ADD_FAILURE() << "input:        [" << captions[i] << "]\n  transformers: [" << a << "]\n  prefixcap:    [" << b << "]";
    }
  }
  std::printf("WordPiece: %zu of %zu captions differ from BertTokenizer\n", differ, captions.size());
  EXPECT_EQ(differ, 0u);
}
