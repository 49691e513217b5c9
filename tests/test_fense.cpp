// FENSE and SPIDEr-FL against the reference code, run here: tests/reference/fense_ref.py makes
// tiny random BERT models (a Sentence-BERT in three pooling variants, fense's echecker
// checkpoint) with transformers and sentence-transformers, and computes embeddings, fluency-error
// probabilities and aac-metrics' fense / fer / spider_fl on a caption corpus. prefixcap loads the
// same files and must give the same numbers. Tolerance: 2e-5 absolute on embeddings,
// probabilities and scores (float32 BERT; padding differs: fense pads the detector's input to 64
// tokens, prefixcap to the batch's longest text, both masked).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/json_config.h"
#include "lm/bert.h"
#include "lm/fense.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::q;
using prefixcap::testing::TempDir;
using Json = nlohmann::json;

namespace {

constexpr double kTol = 2e-5;
const std::string kPython = PREFIXCAP_REFERENCE_PYTHON;
const std::string kScript = std::string(PREFIXCAP_SOURCE_DIR) + "/tests/reference/fense_ref.py";

// Candidates and references: the metrics fixture's raw corpus, plus candidates with the faults
// fense's detector is trained on (repeated words, cut tails), punctuation and Unicode its text
// preprocessing removes, and captions longer than the models' token limits.
struct Corpus {
  std::vector<std::string> candidates;
  std::vector<std::vector<std::string>> references;
  std::vector<std::string> texts;  // for the per-text comparisons
  std::vector<double> spider;      // SPIDEr-FL's input, one per item
};

Corpus make_corpus() {
  Corpus c;
  const Json fixture = read_json_file(fixture_dir("metrics") + "/corpus_raw.json");
  for (const Json& it : fixture.at("items")) {
    c.candidates.push_back(it.at("candidate_raw").get<std::string>());
    c.references.push_back(it.at("references_raw").get<std::vector<std::string>>());
  }
  const std::vector<std::string> extra = {
      "a dog dog barks barks while while cars pass",
      "birds are singing and and and",
      "a man speaks and then a woman",
      "Rain falls; thunder rumbles — a car drives by!!!",
      "Café naïve résumé: water flows (slowly) over the rocks...",
      "e\u0301te\u0301 a_b x² ٣ 日本 tab\there",
      "a very long caption that goes on and on about a dog that barks at a car that drives past a house where "
      "a man is speaking loudly to a woman while birds sing in the trees and rain falls on the roof of the "
      "house and the wind blows through the leaves of the trees in the garden behind the house all day long",
      "",
  };
  for (size_t i = 0; i < extra.size(); ++i) {
    c.candidates.push_back(extra[i]);
    c.references.push_back(c.references[i % 20]);
  }
  for (size_t i = 0; i < c.candidates.size(); ++i) c.spider.push_back(0.05 * static_cast<double>(i % 13) + 0.01);
  c.texts = c.candidates;
  for (size_t i = 0; i < 5; ++i) c.texts.insert(c.texts.end(), c.references[i].begin(), c.references[i].end());
  return c;
}

// The reference run, once for the whole suite.
struct Golden {
  TempDir dir;
  Corpus corpus = make_corpus();
  Json out;
};

Golden& golden() {
  static Golden* g = [] {
    auto* g = new Golden;
    if (!std::ifstream(kPython)) {
      ADD_FAILURE() << kPython << " is missing: scripts/setup.sh installs the reference environment (.venv-ref)";
      return g;
    }
    std::vector<std::string> vocab_captions = g->corpus.texts;
    for (const auto& refs : g->corpus.references) vocab_captions.insert(vocab_captions.end(), refs.begin(), refs.end());
    Json items = Json::array();
    for (size_t i = 0; i < g->corpus.candidates.size(); ++i)
      items.push_back({{"candidate", g->corpus.candidates[i]}, {"references", g->corpus.references[i]}});
    const Json in = {{"dir", g->dir.file("models")}, {"seed", 11},       {"vocab_captions", vocab_captions},
                     {"items", items},               {"spider", g->corpus.spider}, {"texts", g->corpus.texts}};
    std::ofstream(g->dir.file("in.json")) << in.dump();
    const int rc = std::system((q(kPython) + " " + q(kScript) + " " + q(g->dir.file("in.json")) + " " +
                                q(g->dir.file("out.json")) + " >" + q(g->dir.file("log")) + " 2>&1")
                                   .c_str());
    if (rc != 0) {
      ADD_FAILURE() << "fense_ref.py failed:\n" << prefixcap::testing::read_bytes(g->dir.file("log"));
      return g;
    }
    g->out = read_json_file(g->dir.file("out.json"));
    return g;
  }();
  return *g;
}

std::string model(const std::string& name) { return golden().dir.file("models/" + name); }

double max_abs_diff(const at::Tensor& got, const Json& want_rows) {
  std::vector<double> flat;
  for (const auto& row : want_rows)
    for (const auto& v : row) flat.push_back(v.get<double>());
  if (static_cast<int64_t>(flat.size()) != got.numel()) return INFINITY;
  return (got.to(at::kDouble).reshape({-1}) - at::tensor(flat, at::kDouble)).abs().max().item<double>();
}

#define REQUIRE_GOLDEN() \
  if (golden().out.is_null()) GTEST_FAIL() << "no reference output"

}  // namespace

TEST(Fense, SentenceEmbeddingsEqualSentenceTransformers) {
  REQUIRE_GOLDEN();
  const auto& texts = golden().corpus.texts;
  for (const std::string name : {"sbert", "sbert-cls-normalize", "sbert-max"}) {
    SentenceEncoder enc = SentenceEncoder::load(model(name));
    const at::Tensor got = enc.encode(texts);
    ASSERT_EQ(got.size(0), static_cast<int64_t>(texts.size()));
    EXPECT_LT(max_abs_diff(got, golden().out["embeddings"][name]), kTol) << name;
    // Batching (and so padding) never changes an embedding.
    EXPECT_LT((enc.encode(texts, false, 1) - got).abs().max().item<double>(), kTol) << name;
    EXPECT_LT((enc.encode(texts, false, 7) - got).abs().max().item<double>(), kTol) << name;
  }
  EXPECT_EQ(SentenceEncoder::load(model("sbert")).max_seq_length(), 24);
  EXPECT_EQ(SentenceEncoder::load(model("sbert-max")).pooling(), SentenceEncoder::Pooling::Max);
}

TEST(Fense, TextPreprocessingEqualsFense) {
  REQUIRE_GOLDEN();
  const auto& texts = golden().corpus.texts;
  const auto want = golden().out["preprocess"].get<std::vector<std::string>>();
  ASSERT_EQ(want.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(remove_non_word_lower(texts[i]), want[i]) << texts[i];
}

TEST(Fense, FluencyProbabilitiesEqualEchecker) {
  REQUIRE_GOLDEN();
  FluencyErrorDetector d = FluencyErrorDetector::load(model("echecker.ckpt"), model("echecker-bert"));
  EXPECT_EQ(d.num_classes(), 6);
  const at::Tensor p = d.probabilities(golden().corpus.texts);
  EXPECT_LT(max_abs_diff(p, golden().out["probs"]), kTol);
  EXPECT_LT((d.probabilities(golden().corpus.texts, 3) - p).abs().max().item<double>(), kTol);
  // The same checkpoint written in torch.save's legacy format.
  FluencyErrorDetector legacy = FluencyErrorDetector::load(model("echecker-legacy.ckpt"), model("echecker-bert"));
  EXPECT_TRUE(legacy.probabilities(golden().corpus.texts).equal(p));
}

TEST(Fense, ScoresEqualAacMetrics) {
  REQUIRE_GOLDEN();
  const Corpus& c = golden().corpus;
  const Json& want = golden().out["fense"];
  FenseScorer scorer(model("sbert"), model("echecker.ckpt"), model("echecker-bert"));
  const FenseScores s = scorer.score(c.candidates, c.references);
  ASSERT_EQ(s.fense.size(), c.candidates.size());
  size_t errors = 0, near_threshold = 0;
  for (size_t i = 0; i < c.candidates.size(); ++i) {
    const double p = want["error_prob"][i].get<double>();
    EXPECT_NEAR(s.sbert_sim[i], want["sbert_sim"][i].get<double>(), kTol) << i;
    EXPECT_NEAR(s.error_prob[i], p, kTol) << i;
    if (std::fabs(p - 0.9) < kTol) {  // a decision float rounding may flip: not compared
      ++near_threshold;
      continue;
    }
    EXPECT_NEAR(s.fense[i], want["fense"][i].get<double>(), kTol) << i;
    EXPECT_EQ(s.fer[i], want["fer"][i].get<double>()) << i;
    errors += want["fer"][i].get<double>() > 0.5;
  }
  EXPECT_EQ(near_threshold, 0u) << "reference probabilities too close to the threshold: choose another seed";
  // The corpus has both fluent and penalised candidates, so the penalty is exercised.
  EXPECT_GT(errors, 3u);
  EXPECT_LT(errors, c.candidates.size() - 3);
  EXPECT_NEAR(s.corpus_sbert_sim, want["corpus"]["sbert_sim"].get<double>(), kTol);
  EXPECT_NEAR(s.corpus_fer, want["corpus"]["fer"].get<double>(), 1e-12);
  EXPECT_NEAR(s.corpus_fense, want["corpus"]["fense"].get<double>(), kTol);
}

TEST(Fense, SpiderFlEqualsAacMetrics) {
  REQUIRE_GOLDEN();
  const Corpus& c = golden().corpus;
  std::vector<double> probs;
  for (const auto& p : golden().out["fense"]["error_prob"]) probs.push_back(p.get<double>());
  const auto fl = fluency_penalized(c.spider, probs);
  const Json& want = golden().out["spider_fl"];
  double sum = 0;
  for (size_t i = 0; i < fl.size(); ++i) {
    EXPECT_NEAR(fl[i], want["per_item"][i].get<double>(), 1e-12) << i;
    sum += fl[i];
  }
  EXPECT_NEAR(sum / static_cast<double>(fl.size()), want["corpus"].get<double>(), 1e-12);
  EXPECT_THROW(fluency_penalized({1.0}, {0.5, 0.5}), std::invalid_argument);
}

// caption-eval reports FENSE and FER from the same files (the CLI path: options, item matching).
TEST(Fense, CaptionEvalReportsFense) {
  REQUIRE_GOLDEN();
  const Corpus& c = golden().corpus;
  TempDir dir;
  std::ofstream preds(dir.file("preds.jsonl")), refs(dir.file("refs.jsonl"));
  size_t n = 0;
  for (size_t i = 0; i < c.candidates.size(); ++i) {
    if (c.candidates[i].empty()) continue;  // caption-eval refuses empty captions
    const std::string media = "clip" + std::to_string(i) + ".wav";
    preds << Json{{"path", media}, {"caption", c.candidates[i]}}.dump() << "\n";
    refs << Json{{"media", media}, {"captions", c.references[i]}}.dump() << "\n";
    ++n;
  }
  preds.close();
  refs.close();
  // Expected: the reference's per-item FENSE over the same items.
  double want = 0, want_fer = 0;
  for (size_t i = 0; i < c.candidates.size(); ++i)
    if (!c.candidates[i].empty()) {
      want += golden().out["fense"]["fense"][i].get<double>();
      want_fer += golden().out["fense"]["fer"][i].get<double>();
    }
  const std::string cmd = q(PREFIXCAP_CAPTION_EVAL_BIN) + " -p " + q(dir.file("preds.jsonl")) + " -r " +
                          q(dir.file("refs.jsonl")) + " -f json --sbert " + q(model("sbert")) + " --echecker " +
                          q(model("echecker.ckpt")) + " --echecker-bert " + q(model("echecker-bert")) + " --threads 1";
  using prefixcap::testing::read_bytes;
  using prefixcap::testing::run;
  ASSERT_EQ(run(cmd + " >" + q(dir.file("out")) + " 2>" + q(dir.file("err"))), 0) << read_bytes(dir.file("err"));
  const Json j = Json::parse(read_bytes(dir.file("out")));
  EXPECT_NEAR(j["scores"]["FENSE"].get<double>(), want / static_cast<double>(n), kTol);
  EXPECT_NEAR(j["scores"]["FER"].get<double>(), want_fer / static_cast<double>(n), 1e-12);
  EXPECT_TRUE(j["scores"].contains("SBERT-sim"));
  EXPECT_TRUE(j["missing"].contains("SPIDEr_FL"));  // no SPICE here

  // Without the models: listed as missing, with the reason.
  ASSERT_EQ(run(q(PREFIXCAP_CAPTION_EVAL_BIN) + " -p " + q(dir.file("preds.jsonl")) + " -r " + q(dir.file("refs.jsonl")) +
                " -f json >" + q(dir.file("out2")) + " 2>/dev/null"),
            0);
  const Json j2 = Json::parse(read_bytes(dir.file("out2")));
  EXPECT_FALSE(j2["scores"].contains("FENSE"));
  EXPECT_NE(j2["missing"]["FENSE"].get<std::string>().find("--sbert"), std::string::npos);
  // The detector alone: FER, and FENSE missing for want of the Sentence-BERT.
  const std::string detector_only = cmd.substr(0, cmd.find(" --sbert")) + cmd.substr(cmd.find(" --echecker "));
  ASSERT_EQ(run(detector_only + " >" + q(dir.file("out4")) + " 2>/dev/null"), 0);
  const Json j4 = Json::parse(read_bytes(dir.file("out4")));
  EXPECT_EQ(j4["scores"]["FER"], j["scores"]["FER"]);
  EXPECT_FALSE(j4["scores"].contains("FENSE"));
  EXPECT_NE(j4["missing"]["FENSE"].get<std::string>().find("--sbert"), std::string::npos);
  // Half a detector is refused.
  EXPECT_EQ(run(cmd.substr(0, cmd.find(" --echecker-bert")) + " >/dev/null 2>" + q(dir.file("err3"))), 1);
  EXPECT_NE(read_bytes(dir.file("err3")).find("--echecker-bert"), std::string::npos) << read_bytes(dir.file("err3"));
}

// What a user can get wrong, each with an error naming the file.
TEST(Fense, BadModelFilesAreRefusedClearly) {
  REQUIRE_GOLDEN();
  namespace fs = std::filesystem;
  TempDir dir;
  auto copy = [&](const std::string& name) {
    const std::string to = dir.file(name);
    fs::copy(model(name), to, fs::copy_options::recursive);
    return to;
  };
  auto expect_error = [](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error (expected one mentioning '" << needle << "')";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  // A Dense module after pooling (not supported): refused, not silently skipped.
  const std::string dense = copy("sbert");
  {
    Json modules = read_json_file(dense + "/modules.json");
    modules.push_back({{"idx", 2}, {"name", "2"}, {"path", "2_Dense"}, {"type", "sentence_transformers.models.Dense"}});
    std::ofstream(dense + "/modules.json") << modules.dump();
  }
  expect_error([&] { SentenceEncoder::load(dense); }, "Dense");
  // No vocabulary.
  const std::string novocab = copy("echecker-bert");
  fs::remove(novocab + "/vocab.txt");
  expect_error([&] { FluencyErrorDetector::load(model("echecker.ckpt"), novocab); }, "vocab.txt");
  // The echecker's BERT folder of another size than the checkpoint.
  expect_error([&] { FluencyErrorDetector::load(model("echecker.ckpt"), model("hf-sbert")); }, "clf.weight");
  // A Sentence-BERT folder given as the echecker checkpoint.
  expect_error([&] { FluencyErrorDetector::load(model("sbert/model.safetensors"), model("echecker-bert")); },
               "not a fense echecker checkpoint");
  // A pooling config with two modes on.
  const std::string two = copy("sbert-max");
  {
    Json p = read_json_file(two + "/1_Pooling/config.json");
    p["pooling_mode_mean_tokens"] = true;
    std::ofstream(two + "/1_Pooling/config.json") << p.dump();
  }
  expect_error([&] { SentenceEncoder::load(two); }, "exactly one pooling mode");
  // No model at all, half a detector, a malformed device.
  expect_error([&] { FenseScorer("", "", ""); }, "neither a Sentence-BERT nor a fluency-error detector");
  expect_error([&] { FenseScorer(model("sbert"), model("echecker.ckpt"), ""); }, "needs both its checkpoint and its BERT folder");
  expect_error([&] { FenseScorer(model("sbert"), "", "", "gpu7"); }, "gpu7");
}
