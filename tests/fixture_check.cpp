// fixture_check DIR...: runs every case of each fixture folder according to its cases.json,
// one line per case, then "N passed, M failed". Exit code 1 on any failure.
#include <cstdio>
#include <exception>
#include <string>

#include "core/threads.h"
#include "tests/fixture_runner.h"

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::printf("usage: fixture_check FIXTURE_DIR...\n"
                "Runs every case of each fixture folder (cases.json + golden data) and prints one line\n"
                "per case and a closing 'N passed, M failed'. Exit code 1 if any case fails.\n");
    return argc < 2 ? 1 : 0;
  }
  try {
    prefixcap::configure_threads();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fixture_check: %s\n", e.what());
    return 1;
  }
  int passed = 0, failed = 0, skipped = 0;
  for (int i = 1; i < argc; ++i) {
    try {
      auto report = prefixcap::fixtures::run_fixture(argv[i]);
      for (const auto& c : report.cases)
        std::printf("%s %s/%s: %s\n", c.skipped ? "SKIP" : c.passed ? "PASS" : "FAIL", argv[i], c.name.c_str(),
                    c.detail.c_str());
      passed += report.passed();
      failed += report.failed();
      skipped += report.skipped();
    } catch (const std::exception& e) {
      std::printf("FAIL %s: %s\n", argv[i], e.what());
      ++failed;
    }
  }
  if (skipped) std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  else std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
