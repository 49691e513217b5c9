#include "tests/fixture_runner.h"

#include <cmath>
#include <filesystem>
#include <regex>
#include <sstream>

#include <ATen/ATen.h>

#include "core/errors.h"

namespace prefixcap::fixtures {

int FixtureReport::passed() const {
  int n = 0;
  for (const auto& c : cases) n += c.passed;
  return n;
}
int FixtureReport::skipped() const {
  int n = 0;
  for (const auto& c : cases) n += c.skipped;
  return n;
}
int FixtureReport::failed() const { return static_cast<int>(cases.size()) - passed() - skipped(); }

std::string first_word(const std::string& text) { return text.substr(0, text.find(' ')); }

std::string detect_kind(const std::string& folder, const Json& cases) {
  namespace fs = std::filesystem;
  if (cases.contains("references") && cases["references"].contains("pycocoevalcap")) return "metrics";
  if (cases.contains("merges") && cases.contains("vocab") && cases.contains("cases") && cases["cases"].is_array())
    return "gpt2-tokenizer";
  if (cases.contains("model_files") && cases["model_files"].contains("config")) {
    fs::path config = fs::path(folder) / cases["model_files"]["config"].get<std::string>();
    if (fs::exists(config) && read_json_file(config.string()).value("model_type", "") == "cnn14") return "cnn14";
  }
  if (cases.contains("cases") && cases["cases"].is_array() && !cases["cases"].empty()) {
    const Json& first = cases["cases"][0];
    if (first.contains("file") && first.contains("expected")) return "audio-decode";
    if (cases.contains("config") && first.contains("outputs")) {
      for (const Json& c : cases["cases"])
        if (c.contains("outputs") && (c["outputs"].contains("logmel") || c["outputs"].contains("mel_filterbank")))
          return "mel-frontend";
    }
  }
  if (cases.contains("model") && cases["model"].is_object() && cases["model"].contains("checkpoints") &&
      cases["model"].contains("constructor_args"))
    return "clipcap";
  if (cases.contains("model") && cases["model"].is_object() && cases["model"].contains("config")) {
    fs::path config = fs::path(folder) / first_word(cases["model"]["config"].get<std::string>());
    if (fs::exists(config) && read_json_file(config.string()).value("model_type", "") == "prefix_aac") return "prefix-aac";
  }
  if (cases.contains("model") && cases["model"].is_object() && cases["model"].contains("config")) {
    fs::path config = fs::path(folder) / first_word(cases["model"]["config"].get<std::string>());
    if (fs::exists(config)) {
      Json c = read_json_file(config.string());
      if (c.value("model_type", "") == "gpt2") return "gpt2-lm";
      if (c.value("model_type", "") == "clip" || c.value("model_type", "") == "clip_vision_model") return "clip-vision";
      if (c.value("model_type", "") == "clip_resnet") return "clip-resnet";
    }
  }
  // Weight files to read (or refuse): {"cases": {name: {"file", "expect": "tensors"|"error"}}}.
  if (cases.contains("cases") && cases["cases"].is_object() && !cases["cases"].empty()) {
    bool all_files = true;
    for (const Json& c : cases["cases"]) all_files = all_files && c.is_object() && c.contains("file") && c.contains("expect");
    if (all_files) return "torch-checkpoints";
  }
  return "";
}

at::Tensor Golden::tensor(const std::string& name) const {
  at::Tensor t = file_.tensor(name);
  used_.insert(name);
  return t;
}

const Golden& open_golden(FixtureReport& report, const std::string& folder, const Json& cases) {
  std::string file = "golden.safetensors";
  if (cases.contains("golden") && cases["golden"].is_object() && cases["golden"].contains("file"))
    file = cases["golden"]["file"].get<std::string>();
  report.golden = std::make_shared<Golden>((std::filesystem::path(folder) / file).string());
  return *report.golden;
}

std::vector<std::string> Golden::unused() const {
  std::vector<std::string> out;
  for (const auto& e : file_.entries())
    if (!used_.count(e.name)) out.push_back(e.name);
  return out;
}

std::vector<std::string> case_ids(const Json& cases) {
  std::vector<std::string> ids;
  if (!cases.contains("cases")) return ids;
  const Json& all = cases["cases"];
  if (all.is_object()) {
    for (auto it = all.begin(); it != all.end(); ++it) ids.push_back(it.key());
  } else if (all.is_array()) {
    for (size_t i = 0; i < all.size(); ++i)
      ids.push_back(all[i].is_object() && all[i].contains("name") && all[i]["name"].is_string()
                        ? all[i]["name"].get<std::string>()
                        : std::to_string(i));
  }
  if (cases.contains("decode_cases") && cases["decode_cases"].is_array())
    for (size_t i = 0; i < cases["decode_cases"].size(); ++i) {
      const Json& c = cases["decode_cases"][i];
      ids.push_back("decode:" + (c.is_object() && c.contains("name") && c["name"].is_string() ? c["name"].get<std::string>()
                                                                                              : std::to_string(i)));
    }
  return ids;
}

const char* deliberate_skip_reason(const std::string& what) {
  // NLTK's METEOR is another metric than METEOR 1.5 (the jar prefixcap runs): different
  // matching and parameters, 0.68 vs 0.42 on the same pair.
  if (what.find("METEOR") != std::string::npos && what.find("NLTK") != std::string::npos)
    return "NLTK's METEOR variant: prefixcap reports METEOR 1.5 through the official jar instead";
  return nullptr;
}

namespace {
FixtureReport run_kind(const std::string& kind, const std::string& folder, const Json& cases) {
  if (kind == "gpt2-tokenizer") return run_gpt2_tokenizer_fixture(folder, cases);
  if (kind == "gpt2-lm") return run_gpt2_lm_fixture(folder, cases);
  if (kind == "audio-decode") return run_audio_decode_fixture(folder, cases);
  if (kind == "mel-frontend") return run_mel_frontend_fixture(folder, cases);
  if (kind == "cnn14") return run_cnn14_fixture(folder, cases);
  if (kind == "clip-vision") return run_clip_vision_fixture(folder, cases);
  if (kind == "clip-resnet") return run_clip_resnet_fixture(folder, cases);
  if (kind == "clipcap") return run_clipcap_fixture(folder, cases);
  if (kind == "prefix-aac") return run_prefix_aac_fixture(folder, cases);
  if (kind == "metrics") return run_metrics_fixture(folder, cases);
  if (kind == "torch-checkpoints") return run_torch_checkpoint_fixture(folder, cases);
  throw std::logic_error("no runner for kind " + kind);
}

CaseResult coverage_failure(const std::string& name, const std::string& detail) {
  CaseResult r;
  r.name = name;
  r.detail = detail;
  return r;
}
}  // namespace

FixtureReport run_fixture(const std::string& folder) {
  namespace fs = std::filesystem;
  fs::path cases_path = fs::path(folder) / "cases.json";
  if (!fs::exists(cases_path)) throw FileError(cases_path.string(), "missing: not a fixture folder");
  Json cases = read_json_file(cases_path.string());
  std::string kind = detect_kind(folder, cases);
  if (kind.empty())
    throw FileError(cases_path.string(), "fixture kind not recognised (fixture '" +
                                             cases.value("fixture", std::string("?")) + "')");
  FixtureReport report = run_kind(kind, folder, cases);

  // Every declared case ran; nothing ran that is not declared (a runner bug).
  const std::vector<std::string> declared = case_ids(cases);
  if (declared.empty()) report.cases.push_back(coverage_failure("cases.json", "declares no cases: nothing is checked"));
  for (const auto& id : declared)
    if (!report.ran.count(id))
      report.cases.push_back(coverage_failure("cases.json/" + id, "case never ran: its name or inputs match nothing this "
                                                                  "kind (" + kind + ") knows how to check"));
  // Every golden tensor read by some case.
  const bool has_golden = fs::exists(fs::path(folder) / "golden.safetensors");
  if (has_golden && !report.golden)
    report.cases.push_back(coverage_failure("golden.safetensors", "the " + kind + " runner never opened it"));
  if (report.golden)
    for (const auto& name : report.golden->unused())
      report.cases.push_back(coverage_failure("golden.safetensors/" + name, "golden tensor never compared or used as an input"));
  return report;
}

namespace {
std::string index_string(const at::Tensor& t, int64_t flat) {
  std::string out = "[";
  auto sizes = t.sizes();
  std::vector<int64_t> idx(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    idx[d] = sizes[d] ? flat % sizes[d] : 0;
    flat = sizes[d] ? flat / sizes[d] : 0;
  }
  for (size_t i = 0; i < idx.size(); ++i) out += (i ? "," : "") + std::to_string(idx[i]);
  return out + "]";
}
}  // namespace

std::string compare_close(const std::string& what, const at::Tensor& got_in, const at::Tensor& expected_in,
                          double atol, double rtol, double* max_diff) {
  at::Tensor got = got_in.detach().to(at::kCPU, at::kDouble).contiguous();
  at::Tensor expected = expected_in.detach().to(at::kCPU, at::kDouble).contiguous();
  if (got.sizes() != expected.sizes()) {
    std::ostringstream s;
    s << what << ": shape " << got.sizes() << ", expected " << expected.sizes();
    return s.str();
  }
  at::Tensor diff = (got - expected).abs();
  at::Tensor excess = diff - (atol + rtol * expected.abs());
  double worst_diff = diff.numel() ? diff.max().item<double>() : 0.0;
  if (max_diff) *max_diff = worst_diff;
  if (got.numel() == 0 && expected.numel() == 0) return "";
  if (!got.isfinite().all().item<bool>() && expected.isfinite().all().item<bool>()) {
    return what + ": non-finite values in the output";
  }
  if (excess.numel() == 0 || excess.max().item<double>() <= 0) return "";
  int64_t i = excess.view(-1).argmax().item<int64_t>();
  std::ostringstream s;
  s.precision(9);
  s << what << ": at " << index_string(got, i) << " got " << got.view(-1)[i].item<double>() << ", expected "
    << expected.view(-1)[i].item<double>() << " (max|diff| " << worst_diff << ", atol " << atol << ", rtol "
    << rtol << ")";
  return s.str();
}

std::string compare_exact(const std::string& what, const at::Tensor& got_in, const at::Tensor& expected_in) {
  const bool floating = at::isFloatingType(got_in.scalar_type()) || at::isFloatingType(expected_in.scalar_type());
  const at::ScalarType common = floating ? at::kDouble : at::kLong;
  at::Tensor got = got_in.detach().to(at::kCPU, common).contiguous();
  at::Tensor expected = expected_in.detach().to(at::kCPU, common).contiguous();
  std::ostringstream s;
  s.precision(17);
  if (got.sizes() != expected.sizes()) {
    s << what << ": shape " << got.sizes() << ", expected " << expected.sizes();
    if (got.numel() <= 64 && expected.numel() <= 64) s << "; got " << got.view(-1) << " expected " << expected.view(-1);
    return s.str();
  }
  at::Tensor ne = got.ne(expected);
  if (floating) ne = ne.logical_and(got.isnan().logical_and(expected.isnan()).logical_not());
  ne = ne.view(-1);
  if (!ne.any().item<bool>()) return "";
  int64_t i = ne.nonzero()[0][0].item<int64_t>();
  s << what << ": first difference at " << index_string(got, i) << ": got ";
  if (floating) s << got.view(-1)[i].item<double>() << ", expected " << expected.view(-1)[i].item<double>();
  else s << got.view(-1)[i].item<int64_t>() << ", expected " << expected.view(-1)[i].item<int64_t>();
  s << " (" << ne.sum().item<int64_t>() << " of " << ne.numel() << " differ)";
  return s.str();
}

void tolerance_of(const Json& entry, double* atol, double* rtol, double default_atol, double default_rtol) {
  const Json& t = entry.contains("tolerance") ? entry["tolerance"] : entry;
  *atol = t.value("atol", default_atol);
  *rtol = t.value("rtol", default_rtol);
}

void Checks::close(const std::string& what, const at::Tensor& got, const at::Tensor& expected, double atol,
                   double rtol) {
  double max_diff = 0;
  std::string problem = compare_close(what, got, expected, atol, rtol, &max_diff);
  if (!problem.empty()) {
    failures.push_back(problem);
    return;
  }
  std::ostringstream s;
  s.precision(3);
  s << what << " max|d| " << max_diff;
  notes.push_back(s.str());
}

void Checks::exact(const std::string& what, const at::Tensor& got, const at::Tensor& expected) {
  std::string problem = compare_exact(what, got, expected);
  if (problem.empty()) notes.push_back(what + " exact");
  else failures.push_back(problem);
}

void Checks::require(bool ok, const std::string& failure) {
  if (!ok) failures.push_back(failure);
}

std::string Checks::result() const {
  auto join = [](const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) out += (out.empty() ? "" : "; ") + s;
    return out;
  };
  if (!failures.empty()) return "FAIL:" + join(failures);
  return join(notes);
}

std::string expect_refusal(const std::string& path, const std::string& reason, const std::function<std::string()>& read) {
  if (!std::filesystem::is_regular_file(path)) return "FAIL:fixture file " + path + " is missing";
  if (reason.empty()) return "FAIL:the case's description names no refusal reason this kind knows";
  try {
    return "FAIL:" + read() + " instead of refusing the file";
  } catch (const FileError& e) {
    const std::string message = e.what();
    if (!std::regex_search(message, std::regex(reason, std::regex::icase)))
      return "FAIL:refused for another reason than /" + reason + "/: " + message;
    return "refused: " + message;
  }
}

CaseResult run_case(const std::string& name, const std::function<std::string()>& body) {
  CaseResult r;
  r.name = name;
  try {
    std::string problem = body();
    if (problem.rfind("SKIP:", 0) == 0) {
      // Only the listed deliberate omissions may skip; any other skip is a failure.
      const char* reason = deliberate_skip_reason(problem.substr(5));
      r.skipped = reason != nullptr;
      r.detail = reason ? problem.substr(5) + " (" + reason + ")" : "not a deliberate omission: " + problem.substr(5);
      return r;
    }
    r.passed = problem.rfind("FAIL:", 0) != 0;
    r.detail = r.passed ? problem : problem.substr(5);
  } catch (const std::exception& e) {
    r.passed = false;
    r.detail = std::string("error: ") + e.what();
  }
  return r;
}

}  // namespace prefixcap::fixtures
