// The fixture runner must fail when a fixture is wrong: each fixture folder is copied (links to
// its large files, real copies of golden.safetensors and cases.json), one thing is perturbed,
// and fixture_check must exit 1. Perturbations: every golden tensor in turn (one element
// changed well beyond any tolerance), an output key renamed, a case renamed where names carry
// meaning, expected values emptied, cases deleted. The unmodified copy must pass.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/json_config.h"
#include "core/safetensors.h"
#include "tests/test_helpers.h"

namespace {
namespace fs = std::filesystem;
using prefixcap::Json;
using prefixcap::testing::fixture_dir;

// A scratch fixtures/ root: every real fixture linked, except `name`, rebuilt as a folder of
// links with writable golden.safetensors and cases.json (clipcap-tiny reads ../clip-vit-tiny).
class MutableFixture {
 public:
  explicit MutableFixture(const std::string& name) : name_(name) {
    root_ = fs::path(dir_.path()) / "fixtures";
    fs::create_directories(root_);
    for (const auto& entry : fs::directory_iterator(fs::path(PREFIXCAP_FIXTURES)))
      if (entry.path().filename() != name) fs::create_directory_symlink(fs::absolute(entry.path()), root_ / entry.path().filename());
    folder_ = root_ / name;
    fs::create_directories(folder_);
    for (const auto& entry : fs::directory_iterator(fs::path(fixture_dir(name)))) {
      const auto file = entry.path().filename();
      if (file == "golden.safetensors" || file == "cases.json") continue;
      if (entry.is_directory()) fs::create_directory_symlink(fs::absolute(entry.path()), folder_ / file);
      else fs::create_symlink(fs::absolute(entry.path()), folder_ / file);
    }
    restore();
  }
  void restore() {
    for (const char* file : {"golden.safetensors", "cases.json"}) {
      const fs::path src = fs::path(fixture_dir(name_)) / file;
      fs::remove(folder_ / file);
      if (fs::exists(src)) {
        fs::copy_file(src, folder_ / file);
        fs::permissions(folder_ / file, fs::perms::owner_write, fs::perm_options::add);
      }
    }
  }
  Json cases() const { return prefixcap::read_json_file((fs::path(fixture_dir(name_)) / "cases.json").string()); }
  void write_cases(const Json& j) const { prefixcap::write_json_file((folder_ / "cases.json").string(), j); }
  bool has_golden() const { return fs::exists(fs::path(fixture_dir(name_)) / "golden.safetensors"); }
  std::vector<std::string> golden_names() const {
    std::vector<std::string> names;
    prefixcap::SafetensorsFile golden((fs::path(fixture_dir(name_)) / "golden.safetensors").string());
    for (const auto& e : golden.entries()) names.push_back(e.name);
    return names;
  }
  // Golden with tensor `name` changed at one element, far beyond any tolerance: 0/1 data
  // (masks) flipped, bytes moved by 128 levels, other integers by half their size (at least
  // 1), floats by at least 1.
  void perturb_golden(const std::string& name) const {
    prefixcap::TensorMap all = prefixcap::load_safetensors((fs::path(fixture_dir(name_)) / "golden.safetensors").string());
    at::Tensor t = all.at(name).clone().contiguous();
    if (t.numel() == 0) {  // an empty tensor: give it one element
      all[name] = at::zeros({1}, t.options());
      prefixcap::save_safetensors((folder_ / "golden.safetensors").string(), all);
      return;
    }
    at::Tensor flat = t.view(-1);
    at::Tensor as_double = flat.to(at::kDouble);
    const double x = as_double[0].item<double>();
    const bool binary = as_double.eq(0).logical_or(as_double.eq(1)).all().item<bool>();
    double y;
    if (binary) y = 1 - x;
    else if (t.scalar_type() == at::kByte) y = static_cast<double>((static_cast<int>(x) + 128) % 256);
    else if (!at::isFloatingType(t.scalar_type())) y = x + std::max(1.0, std::floor(std::fabs(x) / 2));
    else y = x + std::max(1.0, std::fabs(x));
    flat[0] = y;
    all[name] = t;
    prefixcap::save_safetensors((folder_ / "golden.safetensors").string(), all);
  }
  // fixture_check's exit code on the scratch folder (-1 when it did not exit normally).
  int check() const {
    const std::string log = (fs::path(dir_.path()) / "check.log").string();
    const std::string command = std::string("'") + PREFIXCAP_FIXTURE_CHECK_BIN + "' '" + folder_.string() + "' > '" + log + "' 2>&1";
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string log_path() const { return (fs::path(dir_.path()) / "check.log").string(); }
  std::string log_tail() const {
    std::string text = prefixcap::testing::read_bytes(log_path());
    return text.size() > 1500 ? text.substr(text.size() - 1500) : text;
  }

 private:
  prefixcap::testing::TempDir dir_;
  std::string name_;
  fs::path root_, folder_;
};

struct Tally {
  int tried = 0, caught = 0;
};

// Runs one perturbation: `mutate` changes the scratch copy, fixture_check must exit 1.
void expect_caught(MutableFixture& f, Tally& tally, const std::string& what, const std::function<void()>& mutate) {
  mutate();
  const int rc = f.check();
  ++tally.tried;
  if (rc == 1) ++tally.caught;
  EXPECT_EQ(rc, 1) << "perturbation not caught: " << what << "\n" << f.log_tail();
  f.restore();
}

// Case i of cases.json, in object or array form.
size_t case_count(const Json& cases) { return cases.at("cases").size(); }
Json& case_at(Json& cases, size_t i) {
  Json& all = cases["cases"];
  if (all.is_array()) return all[i];
  auto it = all.begin();
  std::advance(it, static_cast<std::ptrdiff_t>(i));
  return *it;
}

void mutate_fixture(const std::string& name) {
  MutableFixture f(name);
  ASSERT_EQ(f.check(), 0) << "the unmodified copy must pass\n" << f.log_tail();
  Tally tally;
  if (f.has_golden())
    for (const auto& tensor : f.golden_names())
      expect_caught(f, tally, "golden tensor " + tensor, [&] { f.perturb_golden(tensor); });

  const Json original = f.cases();
  // An output key nobody knows, in each case that has outputs.
  for (size_t i = 0; i < case_count(original); ++i) {
    Json cases = original;
    Json& c = case_at(cases, i);
    if (!c.is_object() || !c.contains("outputs") || !c["outputs"].is_object() || c["outputs"].empty()) continue;
    auto& outs = c["outputs"];
    const std::string key = outs.begin().key();
    Json value = outs[key];
    outs.erase(key);
    outs[key + "_renamed"] = value;
    expect_caught(f, tally, "case " + std::to_string(i) + ": output '" + key + "' renamed", [&] { f.write_cases(cases); });
  }
  // A metric nobody knows.
  for (size_t i = 0; i < case_count(original); ++i) {
    Json cases = original;
    Json& c = case_at(cases, i);
    if (!c.is_object() || !c.contains("metric") || !c["metric"].is_string()) continue;
    c["metric"] = "SPIDEr-X (renamed)";
    expect_caught(f, tally, "metric of case " + std::to_string(i) + " renamed", [&] { f.write_cases(cases); });
    break;
  }
  // A file that must be refused moved out of reach: "cannot open" is not the refusal asked for.
  for (size_t i = 0; i < case_count(original); ++i) {
    Json cases = original;
    Json& c = case_at(cases, i);
    const bool refusal = c.is_object() && c.contains("file") &&
                         ((c.contains("expected") && c["expected"].is_object() && c["expected"].value("error", false)) ||
                          c.value("expect", "") == "error");
    if (!refusal) continue;
    c["file"] = "no/such/file.bin";
    expect_caught(f, tally, "refused file of case " + std::to_string(i) + " missing", [&] { f.write_cases(cases); });
  }
  // Each case renamed in turn (object form, where the key is the name): it must either fail or
  // still run under its new name — never drop out silently. (Where the name says what the
  // case is, like clipcap's decode_mlp, it fails; where it is only a label, the case runs.)
  if (original["cases"].is_object()) {
    for (auto it = original["cases"].begin(); it != original["cases"].end(); ++it) {
      Json cases = original;
      const std::string key = it.key(), renamed = "renamed_" + key + "_x";
      cases["cases"].erase(key);
      cases["cases"][renamed] = it.value();
      f.write_cases(cases);
      const int rc = f.check();
      const std::string log = prefixcap::testing::read_bytes(f.log_path());
      const bool still_checked = rc == 0 && log.find("/" + renamed + ":") != std::string::npos;
      ++tally.tried;
      if (rc == 1 || still_checked) ++tally.caught;
      EXPECT_TRUE(rc == 1 || still_checked) << "case '" << key << "' renamed: dropped silently\n" << f.log_tail();
      f.restore();
    }
  }
  // Expected values emptied: the first non-empty outputs / expected / ids of a case.
  {
    Json cases = original;
    bool done = false;
    for (auto& c : cases["cases"]) {
      if (!c.is_object() || done) continue;
      for (const char* field : {"outputs", "expected", "ids", "tensors"}) {
        if (!c.contains(field) || !(c[field].is_object() || c[field].is_array()) || c[field].empty()) continue;
        c[field] = c[field].is_array() ? Json::array() : Json::object();
        expect_caught(f, tally, std::string("'") + field + "' emptied", [&] { f.write_cases(cases); });
        done = true;
        break;
      }
    }
  }
  // Cases deleted: all of them, and (array form) most of them.
  {
    Json cases = original;
    cases["cases"] = original["cases"].is_array() ? Json::array() : Json::object();
    expect_caught(f, tally, "every case deleted", [&] { f.write_cases(cases); });
  }
  if (original["cases"].is_array() && original["cases"].size() > 8 && original.contains("counts")) {
    Json cases = original;
    cases["cases"].erase(cases["cases"].begin() + 4, cases["cases"].end());
    expect_caught(f, tally, "all but 4 cases deleted", [&] { f.write_cases(cases); });
  }
  std::printf("[mutations] %s: %d perturbations tried, %d caught\n", name.c_str(), tally.tried, tally.caught);
}

}  // namespace

TEST(FixtureMutations, Gpt2Tiny) { mutate_fixture("gpt2-tiny"); }
TEST(FixtureMutations, Gpt2Tokenizer) { mutate_fixture("gpt2-tokenizer"); }
TEST(FixtureMutations, AudioDecode) { mutate_fixture("audio-decode"); }
TEST(FixtureMutations, MelFrontend) { mutate_fixture("mel-frontend"); }
TEST(FixtureMutations, Cnn14Tiny) { mutate_fixture("cnn14-tiny"); }
TEST(FixtureMutations, ClipVitTiny) { mutate_fixture("clip-vit-tiny"); }
TEST(FixtureMutations, ClipRnTiny) { mutate_fixture("clip-rn-tiny"); }
TEST(FixtureMutations, ClipcapTiny) { mutate_fixture("clipcap-tiny"); }
TEST(FixtureMutations, PrefixAacTiny) { mutate_fixture("prefix-aac-tiny"); }
TEST(FixtureMutations, Metrics) { mutate_fixture("metrics"); }
TEST(FixtureMutations, TorchLegacy) { mutate_fixture("torch-legacy"); }
