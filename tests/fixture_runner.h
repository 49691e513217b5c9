// Runs the cases of a fixture folder (../shared/fixtures/<name>) according to its cases.json.
// The kind of fixture is recognised from the folder's content, and nothing about a particular
// folder (shapes, names, counts) is assumed: any folder with the same schema runs unchanged.
#pragma once

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <ATen/Tensor.h>

#include "core/json_config.h"
#include "core/safetensors.h"

namespace prefixcap::fixtures {

struct CaseResult {
  std::string name;     // "<weights file>/<case>" or "<case>"
  bool passed = false;
  bool skipped = false;  // the case asks for something prefixcap deliberately does not do
  std::string detail;   // what was compared, the worst difference, or why it failed
};

// A fixture's golden.safetensors that remembers which tensors were read: run_fixture fails
// every golden tensor that no case compared or fed to the engine.
class Golden {
 public:
  explicit Golden(const std::string& path) : file_(path) {}
  at::Tensor tensor(const std::string& name) const;  // marks `name` as used
  const SafetensorsEntry& entry(const std::string& name) const { return file_.entry(name); }  // shape only: not a use
  bool contains(const std::string& name) const { return file_.contains(name); }
  std::vector<std::string> unused() const;

 private:
  SafetensorsFile file_;
  mutable std::set<std::string> used_;
};

struct FixtureReport {
  std::string kind;
  std::vector<CaseResult> cases;
  // What the kind runner touched, for run_fixture's coverage checks.
  std::shared_ptr<Golden> golden;      // the golden file it read (null: the fixture has none)
  std::set<std::string> ran;           // ids of the cases.json cases it ran (see case_ids)
  int passed() const;
  int failed() const;
  int skipped() const;
};

// Runs the kind's runner, then fails the run (as extra failed cases, named) for every case of
// cases.json that did not run, every golden tensor never read, and a fixture with no cases.
// Throws if the folder is not a fixture of a known kind.
FixtureReport run_fixture(const std::string& folder);

// Ids of the cases a cases.json declares: the keys of an object "cases", or each array
// element's "name" (else its position); plus "decode:<name>" for a tokenizer's decode_cases.
std::vector<std::string> case_ids(const Json& cases);

// Reference variants prefixcap deliberately does not implement: the only cases that may be
// reported as skipped (with this reason); anything else unknown fails.
const char* deliberate_skip_reason(const std::string& what);

// Kind name of a folder ("gpt2-lm", "gpt2-tokenizer", ...), or "" if unknown.
std::string detect_kind(const std::string& folder, const Json& cases);

// ---- helpers shared by the per-kind runners ----

// Opens the fixture's golden file (cases.json "golden.file", else golden.safetensors) into
// report.golden, so that run_fixture can check that every tensor in it was used.
const Golden& open_golden(FixtureReport& report, const std::string& folder, const Json& cases);

// "model.pt (a TorchScript archive)" -> "model.pt": file names in cases.json may carry a note.
std::string first_word(const std::string& text);

// Elementwise max|got-ref| <= atol + rtol*|ref|. Returns "" on success, else a description
// with the worst index, got, expected and max difference.
std::string compare_close(const std::string& what, const at::Tensor& got, const at::Tensor& expected,
                          double atol, double rtol, double* max_diff = nullptr);
// Equal values and shapes; floating tensors compare as floating values (no cast to integers),
// NaN equal to NaN.
std::string compare_exact(const std::string& what, const at::Tensor& got, const at::Tensor& expected);

// The {"atol", "rtol"} of an entry of cases.json, nested under "tolerance" or flat in the
// entry itself; absent values keep the given defaults.
void tolerance_of(const Json& entry, double* atol, double* rtol, double default_atol = 0, double default_rtol = 0);

// Collects the comparisons of one case; result() is what a run_case body returns.
struct Checks {
  std::vector<std::string> failures;
  std::vector<std::string> notes;
  void close(const std::string& what, const at::Tensor& got, const at::Tensor& expected, double atol, double rtol);
  void exact(const std::string& what, const at::Tensor& got, const at::Tensor& expected);
  void require(bool ok, const std::string& failure);
  std::string result() const;  // "FAIL:..." when any comparison failed
};

// A case whose file must be refused: the file must exist (an error from a wrong path proves
// nothing), `read` must throw FileError, and its message must match `reason`, a regex the kind
// runner derives from the case's description. `read` returns what it read instead, for the
// failure message. Returns a run_case result ("FAIL:..." or "refused: <message>").
std::string expect_refusal(const std::string& path, const std::string& reason, const std::function<std::string()>& read);

// Runs `body`, turning exceptions into a failed result; a body result starting "FAIL:" fails,
// one starting "SKIP:" is skipped.
CaseResult run_case(const std::string& name, const std::function<std::string()>& body);

// Per-kind runners.
FixtureReport run_gpt2_lm_fixture(const std::string& folder, const Json& cases);
FixtureReport run_gpt2_tokenizer_fixture(const std::string& folder, const Json& cases);
FixtureReport run_audio_decode_fixture(const std::string& folder, const Json& cases);
FixtureReport run_mel_frontend_fixture(const std::string& folder, const Json& cases);
FixtureReport run_cnn14_fixture(const std::string& folder, const Json& cases);
FixtureReport run_clip_vision_fixture(const std::string& folder, const Json& cases);
FixtureReport run_clip_resnet_fixture(const std::string& folder, const Json& cases);
FixtureReport run_torch_checkpoint_fixture(const std::string& folder, const Json& cases);
FixtureReport run_clipcap_fixture(const std::string& folder, const Json& cases);
FixtureReport run_prefix_aac_fixture(const std::string& folder, const Json& cases);
FixtureReport run_metrics_fixture(const std::string& folder, const Json& cases);

}  // namespace prefixcap::fixtures
