// Fixture kind of weight-file readers (torch-legacy): every tensor of a checkpoint read with
// its own dtype, shape and values; files that must be refused refused for their reason.
#include <filesystem>
#include <set>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/weights.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {
// What the reader must say about a file it refuses, from the case's description (a regex).
std::string expected_refusal(const std::string& description) {
  if (description.find("os.system") != std::string::npos) return "(posix|os|nt)\\.system";
  if (description.find("cut to") != std::string::npos || description.find("truncated") != std::string::npos)
    return "truncated|ends (early|before|inside)";
  return "";
}
}  // namespace

FixtureReport run_torch_checkpoint_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "torch-checkpoints";
  const Golden& golden = open_golden(report, folder, cases);
  for (auto c = cases.at("cases").begin(); c != cases.at("cases").end(); ++c) {
    const Json& spec = c.value();
    const std::string path = (fs::path(folder) / spec.at("file").get<std::string>()).string();
    const std::string expect = spec.at("expect").get<std::string>();
    report.ran.insert(c.key());
    report.cases.push_back(run_case(c.key(), [&]() -> std::string {
      if (expect == "error")
        return expect_refusal(path, expected_refusal(spec.value("description", std::string())),
                              [&] { return "read " + std::to_string(load_weight_file(path).size()) + " tensors"; });
      if (expect != "tensors") return "FAIL:unknown expectation '" + expect + "'";
      TensorMap all = load_weight_file(path);
      TensorMap tensors = spec.contains("key") ? tensors_under(all, spec["key"].get<std::string>() + ".") : all;
      const std::string prefix = spec.value("golden_prefix", std::string());
      Checks checks;
      std::set<std::string> listed;
      for (const Json& name : spec.at("tensors")) listed.insert(name.get<std::string>());
      if (listed.empty()) return "FAIL:the case lists no tensors";
      for (const auto& [name, tensor] : tensors)
        checks.require(listed.count(name) > 0, "tensor '" + name + "' is in the file but not in the case's list");
      for (const auto& name : listed) {
        auto it = tensors.find(name);
        if (it == tensors.end()) {
          checks.require(false, "tensor '" + name + "' not read");
          continue;
        }
        const at::Tensor expected = golden.tensor(prefix + name);
        checks.require(it->second.scalar_type() == expected.scalar_type(),
                       name + ": dtype " + std::string(c10::toString(it->second.scalar_type())) + ", expected " +
                           c10::toString(expected.scalar_type()));
        checks.exact(name, it->second, expected);
      }
      if (checks.failures.empty()) return std::to_string(listed.size()) + " tensors exact (dtype, shape, values)";
      return checks.result();
    }));
  }
  return report;
}

}  // namespace prefixcap::fixtures
