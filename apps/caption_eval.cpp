// caption-eval: scores `caption` output against a dataset's references.
//   caption-eval --predictions preds.jsonl --references clotho_captions_evaluation.csv
// Prints a table (markdown, csv or json); --per-item writes one row per item. FENSE and
// SPIDEr-FL with --sbert and --echecker/--echecker-bert (docs/evaluation.md).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <tuple>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "core/threads.h"
#include "data/references.h"
#include "lm/fense.h"
#include "metrics/evaluate.h"

using namespace prefixcap;
using Json = nlohmann::json;

namespace {
const std::vector<std::pair<std::string, std::string>> kMetrics = {
    {"Bleu_1", "BLEU-1"}, {"Bleu_2", "BLEU-2"}, {"Bleu_3", "BLEU-3"}, {"Bleu_4", "BLEU-4"}, {"METEOR", "METEOR"},
    {"ROUGE_L", "ROUGE-L"}, {"CIDEr", "CIDEr-D"}, {"SPICE", "SPICE"}, {"SPIDEr", "SPIDEr"},
    {"SBERT_sim", "SBERT-sim"}, {"FER", "FER"}, {"FENSE", "FENSE"}, {"SPIDEr_FL", "SPIDEr-FL"}};

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

struct FenseArgs {
  std::string sbert, echecker, echecker_bert, device = "cpu";
  FenseOptions options;
};

// SBERT-sim, FER, FENSE and SPIDEr-FL into the report (on the raw captions, as aac-metrics
// scores them), or the reason each is missing.
void add_fense(EvalReport& report, const std::vector<CaptionItem>& items, const FenseArgs& args) {
  if (args.echecker.empty() != args.echecker_bert.empty())
    throw std::invalid_argument("--echecker and --echecker-bert go together (the checkpoint and its model_type's "
                                "folder: config.json, vocab.txt)");
  const std::string no_sbert = "needs --sbert (a sentence-transformers folder: paraphrase-TinyBERT-L6-v2)";
  const std::string no_echecker = "needs --echecker and --echecker-bert (fense's echecker_clotho_audiocaps_base.ckpt "
                                  "and a bert-base-uncased folder)";
  if (args.sbert.empty()) {
    report.missing["SBERT_sim"] = no_sbert;
    report.missing["FENSE"] = no_sbert;
  }
  if (args.echecker.empty()) {
    report.missing["FER"] = no_echecker;
    report.missing["FENSE"] = args.sbert.empty() ? no_sbert + "; " + no_echecker : no_echecker;
    report.missing["SPIDEr_FL"] = no_echecker;
  }
  if (args.sbert.empty() && args.echecker.empty()) return;
  std::vector<std::string> candidates;
  std::vector<std::vector<std::string>> references;
  for (const auto& it : items) {
    candidates.push_back(it.candidate);
    references.push_back(it.references);
  }
  const FenseScorer scorer(args.sbert, args.echecker, args.echecker_bert, args.device);
  const FenseScores s = scorer.score(candidates, references, args.options);
  for (const auto& [key, per_item, corpus] : {std::tuple{"SBERT_sim", &s.sbert_sim, s.corpus_sbert_sim},
                                              std::tuple{"FER", &s.fer, s.corpus_fer},
                                              std::tuple{"FENSE", &s.fense, s.corpus_fense}})
    if (!per_item->empty()) {
      report.per_item[key] = *per_item;
      report.corpus[key] = corpus;
    }
  if (s.error_prob.empty()) return;
  if (!report.per_item.count("SPIDEr")) {
    report.missing["SPIDEr_FL"] = "needs SPIDEr (SPICE: --spice-jar)";
    return;
  }
  report.missing.erase("SPIDEr_FL");
  report.per_item["SPIDEr_FL"] =
      fluency_penalized(report.per_item["SPIDEr"], s.error_prob, args.options.error_threshold, args.options.penalty);
  report.corpus["SPIDEr_FL"] = corpus_mean(report.per_item["SPIDEr_FL"]);
}
}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  CLI::App app{"Score caption predictions against references (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr, FENSE, "
               "SPIDEr-FL)"};
  std::string predictions, references, split, format = "markdown", output, per_item;
  EvalOptions options;
  options.meteor_jar = env_or("PREFIXCAP_METEOR_JAR", "");
  options.spice_jar = env_or("PREFIXCAP_SPICE_JAR", "");
  options.ptb_jar = env_or("PREFIXCAP_PTB_JAR", "");
  bool no_tokenize = false;
  FenseArgs fense;
  fense.sbert = env_or("PREFIXCAP_SBERT", "");
  fense.echecker = env_or("PREFIXCAP_ECHECKER", "");
  fense.echecker_bert = env_or("PREFIXCAP_ECHECKER_BERT", "");
  int threads = 0;
  app.add_option("-p,--predictions", predictions, "caption's jsonl or csv output")->required()->check(CLI::ExistingFile);
  app.add_option("-r,--references", references, "Clotho csv, AudioCaps csv, COCO Karpathy json or JSONL manifest")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--split", split, "COCO json: only images of this split (train, val, test)");
  app.add_option("-f,--format", format, "markdown, csv or json")->capture_default_str()->check(CLI::IsMember({"markdown", "csv", "json"}));
  app.add_option("-o,--output", output, "write the table here instead of stdout");
  app.add_option("--per-item", per_item, "also write per-item scores (csv) to this file");
  app.add_option("--meteor-jar", options.meteor_jar, "meteor-1.5.jar (or $PREFIXCAP_METEOR_JAR)");
  app.add_option("--spice-jar", options.spice_jar, "spice-1.0.jar (or $PREFIXCAP_SPICE_JAR)");
  app.add_option("--ptb-jar", options.ptb_jar,
                 "stanford-corenlp-3.4.1.jar (or $PREFIXCAP_PTB_JAR): tokenize with the official PTB tokenizer, as "
                 "pycocoevalcap does (default: the native tokenizer)");
  app.add_option("--java", options.java, "Java executable for the jars")->capture_default_str();
  app.add_option("--sbert", fense.sbert,
                 "FENSE's Sentence-BERT: a sentence-transformers folder, paraphrase-TinyBERT-L6-v2 (or $PREFIXCAP_SBERT)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--echecker", fense.echecker,
                 "FENSE's fluency-error detector: echecker_clotho_audiocaps_base.ckpt (or $PREFIXCAP_ECHECKER)")
      ->check(CLI::ExistingFile);
  app.add_option("--echecker-bert", fense.echecker_bert,
                 "the echecker's model_type folder, bert-base-uncased: config.json, vocab.txt (or $PREFIXCAP_ECHECKER_BERT)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--error-threshold", fense.options.error_threshold, "FENSE: error probability counted as an error")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--penalty", fense.options.penalty, "FENSE / SPIDEr-FL: score x (1 - penalty) on an error")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--bert-batch", fense.options.batch_size, "texts per BERT forward (FENSE)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.add_option("--device", fense.device, "where the BERT models run: cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads for tokenization, the native metrics and the BERT models (0 = all cores)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--no-tokenize", no_tokenize, "captions are already tokenized (skip pycocoevalcap's PTB tokenization)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;  // --help: 0; any usage error: 1
  }
  options.tokenize = !no_tokenize;
  try {
    References refs = read_references(references, split);
    Predictions preds = read_predictions(predictions);
    std::vector<CaptionItem> items;
    size_t without_refs = 0;
    std::set<std::string> used;
    for (const auto& [key, caption] : preds) {
      std::string base = key.substr(0, key.find('@'));
      auto it = refs.find(base);
      if (it == refs.end()) {
        if (++without_refs <= 5) std::fprintf(stderr, "caption-eval: warning: no references for '%s'\n", key.c_str());
        continue;
      }
      used.insert(base);
      items.push_back({key, it->second, caption});
    }
    if (without_refs > 5) std::fprintf(stderr, "caption-eval: warning: %zu predictions in all have no references\n", without_refs);
    if (used.size() < refs.size())
      std::fprintf(stderr, "caption-eval: warning: %zu of %zu referenced items have no prediction\n", refs.size() - used.size(),
                   refs.size());
    if (items.empty()) throw std::runtime_error("no prediction matches a reference (keys are file names without extension)");
    // 0: the cores this process may run on, counted as the other apps count them (affinity).
    options.threads = threads > 0 ? threads : available_cores();
    EvalReport report = evaluate(items, options);
    if (!fense.sbert.empty() || !fense.echecker.empty() || !fense.echecker_bert.empty()) configure_threads({threads, 0});
    add_fense(report, items, fense);
    for (const auto& w : report.warnings) std::fprintf(stderr, "caption-eval: warning: %s\n", w.c_str());

    std::ostringstream table;
    if (format == "json") {
      Json j = {{"items", items.size()}, {"scores", Json::object()}, {"missing", report.missing}};
      for (const auto& [key, name] : kMetrics)
        if (report.corpus.count(key)) j["scores"][name] = report.corpus[key];
      table << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
      if (format == "markdown") table << "| metric | score |\n| --- | ---: |\n";
      else table << "metric,score\n";
      for (const auto& [key, name] : kMetrics) {
        std::string value;
        if (report.corpus.count(key)) {
          char buf[32];
          std::snprintf(buf, sizeof buf, "%.4f", report.corpus[key]);
          value = buf;
        } else {
          value = format == "markdown" ? "missing (" + report.missing[key] + ")" : "";
        }
        table << (format == "markdown" ? "| " + name + " | " + value + " |\n" : name + "," + value + "\n");
      }
      if (format == "markdown") table << "\n" << items.size() << " items\n";
    }
    if (output.empty()) {
      std::cout << table.str();
    } else {
      std::ofstream out(output);
      out << table.str();
      if (!out) throw std::runtime_error("cannot write " + output);
    }
    if (!per_item.empty()) {
      std::ofstream out(per_item);
      out << "id";
      for (const auto& [key, name] : kMetrics)
        if (report.per_item.count(key)) out << "," << name;
      out << "\n";
      for (size_t i = 0; i < report.ids.size(); ++i) {
        out << report.ids[i];
        for (const auto& [key, name] : kMetrics)
          if (report.per_item.count(key)) out << "," << report.per_item[key][i];
        out << "\n";
      }
      if (!out) throw std::runtime_error("cannot write " + per_item);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption-eval: %s\n", e.what());
    return 1;
  }
}
