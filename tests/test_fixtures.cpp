// Every fixture folder of the core engine, through the same runner as fixture_check.
#include <gtest/gtest.h>

#include "tests/fixture_runner.h"
#include "tests/test_helpers.h"

namespace {

void expect_fixture_passes(const std::string& name) {
  auto report = prefixcap::fixtures::run_fixture(prefixcap::testing::fixture_dir(name));
  ASSERT_FALSE(report.cases.empty());
  // Skips only for the deliberate omissions (NLTK's METEOR), each with its reason.
  for (const auto& c : report.cases) {
    EXPECT_TRUE(c.passed || c.skipped) << name << "/" << c.name << ": " << c.detail;
    if (c.skipped) EXPECT_NE(prefixcap::fixtures::deliberate_skip_reason(c.detail), nullptr) << c.name;
  }
}

}  // namespace

TEST(Fixtures, Gpt2Tiny) { expect_fixture_passes("gpt2-tiny"); }
TEST(Fixtures, Gpt2Tokenizer) { expect_fixture_passes("gpt2-tokenizer"); }
TEST(Fixtures, AudioDecode) { expect_fixture_passes("audio-decode"); }
TEST(Fixtures, MelFrontend) { expect_fixture_passes("mel-frontend"); }
TEST(Fixtures, Cnn14Tiny) { expect_fixture_passes("cnn14-tiny"); }
TEST(Fixtures, ClipVitTiny) { expect_fixture_passes("clip-vit-tiny"); }
TEST(Fixtures, ClipcapTiny) { expect_fixture_passes("clipcap-tiny"); }
TEST(Fixtures, PrefixAacTiny) { expect_fixture_passes("prefix-aac-tiny"); }
TEST(Fixtures, Metrics) { expect_fixture_passes("metrics"); }
TEST(Fixtures, ClipRnTiny) { expect_fixture_passes("clip-rn-tiny"); }
TEST(Fixtures, TorchLegacy) { expect_fixture_passes("torch-legacy"); }
