// Every fixture folder of the core engine, through the same runner as fixture_check.
#include <gtest/gtest.h>

#include <cmath>

#include <ATen/ATen.h>

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

// The comparison helpers themselves: exact means exact for floats (no cast to integers), shapes
// must agree, NaN equals NaN only where both are NaN.
TEST(FixtureRunner, ExactComparisonIsExactForFloats) {
  using prefixcap::fixtures::compare_exact;
  EXPECT_NE(compare_exact("x", at::tensor({0.25, 1.0}), at::tensor({0.5, 1.0})), "");
  EXPECT_EQ(compare_exact("x", at::tensor({0.25f, 1.0f}), at::tensor({0.25, 1.0})), "");
  EXPECT_NE(compare_exact("x", at::tensor({1.0, 2.0}), at::tensor({1.0, 2.0, 3.0})), "");
  const double nan = std::nan("");
  EXPECT_EQ(compare_exact("x", at::tensor({nan, 1.0}), at::tensor({nan, 1.0})), "");
  EXPECT_NE(compare_exact("x", at::tensor({nan, 1.0}), at::tensor({0.0, 1.0})), "");
  EXPECT_NE(compare_exact("ids", at::tensor({int64_t(3)}), at::tensor({int64_t(4)})), "");
  // compare_close: a shape mismatch and non-finite output are failures
  EXPECT_NE(prefixcap::fixtures::compare_close("x", at::ones({2}), at::ones({3}), 1, 1), "");
  EXPECT_NE(prefixcap::fixtures::compare_close("x", at::tensor({INFINITY}), at::tensor({1.0}), 1e9, 0), "");
}

TEST(FixtureRunner, OnlyNltkMeteorMaySkip) {
  EXPECT_NE(prefixcap::fixtures::deliberate_skip_reason("NLTK METEOR (nltk.translate.meteor_score 3.8)"), nullptr);
  EXPECT_EQ(prefixcap::fixtures::deliberate_skip_reason("METEOR 1.5"), nullptr);
  EXPECT_EQ(prefixcap::fixtures::deliberate_skip_reason("CIDEr-X"), nullptr);
}
