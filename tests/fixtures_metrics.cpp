// Fixture kind of the evaluation metrics: pycocoevalcap BLEU / ROUGE-L / CIDEr-D values and
// its tokenization. NLTK METEOR cases are reported as skipped: prefixcap runs METEOR 1.5
// through the official jar instead, and NLTK's variant is a different metric.
#include <filesystem>
#include <sstream>

#include "metrics/metrics.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

FixtureReport run_metrics_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "metrics";
  std::map<std::string, Json> corpora;
  auto corpus = [&](const std::string& name) -> const Json& {
    if (!corpora.count(name)) corpora[name] = read_json_file((fs::path(folder) / name).string());
    return corpora[name];
  };
  double default_atol = 1e-6, default_rtol = 0;
  if (cases.contains("default_tolerance")) tolerance_of(cases["default_tolerance"], &default_atol, &default_rtol, 1e-6, 0.0);
  for (const Json& c : cases.at("cases")) {
    const std::string name = c.at("name").get<std::string>();
    const std::string metric = c.at("metric").get<std::string>();
    report.ran.insert(name);
    CaseResult result = run_case(name, [&]() -> std::string {
      const Json& items_json = corpus(c.at("corpus").get<std::string>()).at("items");
      std::map<std::string, const Json*> by_id;
      for (const Json& it : items_json) by_id[it.at("id").get<std::string>()] = &it;
      const bool tokenized = c.value("subset", "").find("tokenized") != std::string::npos;
      if (metric.find("PTBTokenizer") != std::string::npos) {
        Checks checks;
        const Json& expected = c.at("expected");
        if (expected.empty()) return "FAIL:no expected tokenizations: nothing compared";
        if (c.contains("item_ids"))
          checks.require(expected.size() == c["item_ids"].size(), "expected lists " + std::to_string(expected.size()) +
                                                                      " items, item_ids " + std::to_string(c["item_ids"].size()));
        for (const Json& e : expected) {
          const Json& item = *by_id.at(e.at("id").get<std::string>());
          auto check = [&](const std::string& raw, const std::string& expected) {
            std::string got = coco_tokenize(raw);
            checks.require(got == expected, e.at("id").get<std::string>() + ": '" + got + "' != '" + expected + "'");
          };
          check(item.at("candidate_raw").get<std::string>(), e.at("candidate").get<std::string>());
          for (size_t r = 0; r < e.at("references").size(); ++r)
            check(item.at("references_raw")[r].get<std::string>(), e.at("references")[r].get<std::string>());
        }
        return checks.result().empty() ? "all tokenizations equal" : checks.result();
      }
      std::vector<CaptionItem> items;
      for (const Json& id : c.at("item_ids")) {
        const Json& it = *by_id.at(id.get<std::string>());
        CaptionItem item;
        item.id = id.get<std::string>();
        item.references = it.at(tokenized ? "references_tokenized" : "references").get<std::vector<std::string>>();
        item.candidate = it.at(tokenized ? "candidate_tokenized" : "candidate").get<std::string>();
        items.push_back(std::move(item));
      }
      MetricResult got;
      if (metric.rfind("BLEU", 0) == 0) got = bleu(items);
      else if (metric.rfind("ROUGE-L", 0) == 0) got = rouge_l(items);
      else if (metric.rfind("CIDEr-D", 0) == 0) got = cider_d(items);
      else return "SKIP:" + metric;  // only the listed deliberate omissions pass as skipped
      double atol, rtol;
      tolerance_of(c, &atol, &rtol, default_atol, default_rtol);
      Checks checks;
      double worst = 0;
      auto compare = [&](const std::string& what, double g, double e) {
        double d = std::fabs(g - e);
        worst = std::max(worst, d);
        if (d > atol + rtol * std::fabs(e)) {
          std::ostringstream s;
          s.precision(17);
          s << what << ": got " << g << ", expected " << e;
          checks.failures.push_back(s.str());
        }
      };
      const Json& expected = c.at("expected");
      for (auto it = expected.begin(); it != expected.end(); ++it)
        if (it.key() != "corpus" && it.key() != "per_item") checks.failures.push_back("unknown expected entry '" + it.key() + "'");
      if (!expected.contains("corpus") || expected["corpus"].empty()) checks.failures.push_back("no expected corpus scores");
      if (!expected.contains("per_item") || expected["per_item"].empty()) checks.failures.push_back("no expected per-item scores");
      if (!checks.failures.empty()) return checks.result();
      for (auto it = expected.at("corpus").begin(); it != expected.at("corpus").end(); ++it) {
        if (!got.corpus.count(it.key())) {
          checks.failures.push_back("unknown score '" + it.key() + "' for " + metric);
          continue;
        }
        compare("corpus " + it.key(), got.corpus.at(it.key()), it.value().get<double>());
      }
      for (auto it = expected.at("per_item").begin(); it != expected.at("per_item").end(); ++it) {
        if (!got.per_item.count(it.key())) {
          checks.failures.push_back("unknown per-item score '" + it.key() + "' for " + metric);
          continue;
        }
        const auto& values = got.per_item.at(it.key());
        if (it.value().size() != items.size()) {
          checks.failures.push_back(it.key() + ": " + std::to_string(it.value().size()) + " expected values for " +
                                    std::to_string(items.size()) + " items");
          continue;
        }
        for (size_t i = 0; i < it.value().size(); ++i)
          compare(it.key() + " item " + items[i].id, values.at(i), it.value()[i].get<double>());
      }
      std::ostringstream s;
      s.precision(3);
      s << items.size() << " items, max|d| " << worst;
      return checks.failures.empty() ? s.str() : checks.result();
    });
    report.cases.push_back(result);
  }
  return report;
}

}  // namespace prefixcap::fixtures
