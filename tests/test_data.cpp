// Dataset readers: layouts, malformed lines with file and line, missing-media summary.
#include <gtest/gtest.h>

#include <filesystem>

#include "data/datasets.h"
#include "data/references.h"
#include "metrics/evaluate.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;
namespace fs = std::filesystem;

TEST(Datasets, ClothoAudioCapsCocoAndManifestLayouts) {
  TempDir dir;
  fs::create_directories(dir.file("clotho/development"));
  write_bytes(dir.file("clotho/clotho_captions_development.csv"),
              "file_name,caption_1,caption_2\na.wav,\"Rain, heavy.\",Rain falls\nb.wav,Birds sing,Birds chirp\n");
  write_bytes(dir.file("clotho/development/a.wav"), "RIFF....");
  auto clotho = read_dataset("clotho", dir.file("clotho"), "development");
  ASSERT_EQ(clotho.size(), 2u);
  EXPECT_EQ(clotho[0].captions, (std::vector<std::string>{"Rain, heavy.", "Rain falls"}));
  auto problems = check_media(clotho);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_EQ(fs::path(problems[0].media).filename(), "b.wav");
  EXPECT_EQ(problems[0].reason, "missing");

  fs::create_directories(dir.file("ac/test"));
  write_bytes(dir.file("ac/test.csv"), "audiocap_id,youtube_id,start_time,caption\n1,abc,30,A dog barks\n2,abc,30,Dog barking\n3,xyz,0,Wind\n");
  write_bytes(dir.file("ac/test/abc_30.flac"), "fLaC");
  auto ac = read_dataset("audiocaps", dir.file("ac"), "test");
  ASSERT_EQ(ac.size(), 2u);
  EXPECT_EQ(fs::path(ac[0].media).filename(), "abc_30.flac");
  EXPECT_EQ(ac[0].captions.size(), 2u);

  fs::create_directories(dir.file("coco"));
  fs::create_directories(dir.file("m"));
  write_bytes(dir.file("coco/dataset_coco.json"),
              R"({"images":[{"filepath":"val2014","filename":"x.jpg","split":"test","sentences":[{"raw":"A cat."}]},)"
              R"({"filepath":"train2014","filename":"y.jpg","split":"restval","sentences":[{"raw":"A dog."}]}]})");
  EXPECT_EQ(read_dataset("coco", dir.file("coco"), "test").size(), 1u);
  EXPECT_EQ(read_dataset("coco", dir.file("coco"), "train").size(), 1u);  // restval counts as train

  write_bytes(dir.file("m/manifest.jsonl"), "{\"media\": \"clips/a.wav\", \"captions\": [\"one\", \"two\"]}\n\n");
  auto m = read_dataset("manifest", dir.file("m/manifest.jsonl"), "");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].media, dir.file("m/clips/a.wav"));
  EXPECT_THROW(read_dataset("kinetics", dir.path(), ""), std::invalid_argument);
}

TEST(Datasets, MalformedLinesNameFileAndLine) {
  TempDir dir;
  write_bytes(dir.file("m.jsonl"), "{\"media\": \"a.wav\", \"captions\": [\"x\"]}\n{\"media\": 3}\n");
  try {
    read_dataset("manifest", dir.file("m.jsonl"), "");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("m.jsonl:2:"), std::string::npos) << e.what();
  }
  fs::create_directories(dir.file("c"));
  write_bytes(dir.file("c/clotho_captions_evaluation.csv"), "file_name,caption_1\na.wav,ok\nb.wav,one,too many\n");
  try {
    read_dataset("clotho", dir.file("c"), "evaluation");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("clotho_captions_evaluation.csv:3: expected 2 fields, got 3"), std::string::npos)
        << e.what();
  }
}

TEST(References, CsvQuotingAndPredictionWindows) {
  EXPECT_EQ(parse_csv_line("a,\"b, c\",\"d \"\"e\"\"\""), (std::vector<std::string>{"a", "b, c", "d \"e\""}));
  EXPECT_THROW(parse_csv_line("a,\"b"), std::runtime_error);
  TempDir dir;
  write_bytes(dir.file("p.jsonl"), "{\"path\":\"x/long.wav\",\"caption\":\"c1\",\"start\":0.0}\n{\"path\":\"x/long.wav\",\"caption\":\"c2\",\"start\":10.0}\n");
  auto preds = read_predictions(dir.file("p.jsonl"));
  EXPECT_EQ(preds.size(), 2u);
  EXPECT_EQ(media_key("a/b/clip.final.wav"), "clip.final");
}

// evaluate() tokenizes and scores on several threads; the report must not depend on how many
// (test_reference checks the scores themselves against pycocoevalcap), and an item's error must
// come out of a worker thread as the error it is.
TEST(Evaluate, ScoresDoNotDependOnTheThreadCountAndErrorsComeThrough) {
  const std::vector<std::string> words = {"a", "Dog", "barks,", "while", "cars", "pass", "by.", "rain", "falls", "on",
                                          "the", "roof", "birds", "chirp!", "in", "distance", "man's", "speaks"};
  std::vector<CaptionItem> items;
  uint32_t state = 7;
  auto sentence = [&] {
    std::string s;
    const int n = 3 + state % 9;
    for (int i = 0; i < n; ++i) {
      state = state * 1664525u + 1013904223u;
      s += (i ? " " : "") + words[(state >> 8) % words.size()];
    }
    return s;
  };
  for (int i = 0; i < 57; ++i) {
    CaptionItem it;
    it.id = std::to_string(i);
    for (int r = 0; r < 1 + i % 5; ++r) it.references.push_back(sentence());
    it.candidate = sentence();
    items.push_back(it);
  }
  EvalOptions one;
  one.threads = 1;
  const EvalReport serial = evaluate(items, one);
  ASSERT_EQ(serial.corpus.size(), 6u);  // BLEU-1..4, ROUGE-L, CIDEr
  for (int threads : {2, 5, 0}) {
    EvalOptions o;
    o.threads = threads;
    const EvalReport r = evaluate(items, o);
    EXPECT_EQ(r.ids, serial.ids) << threads;
    EXPECT_EQ(r.corpus, serial.corpus) << threads;
    EXPECT_EQ(r.per_item, serial.per_item) << threads;
  }
  items[40].references.clear();  // in the last span of 3
  EvalOptions three;
  three.threads = 3;
  EXPECT_NE(prefixcap::testing::message_of([&] { evaluate(items, three); }).find("item '40' has no references"),
            std::string::npos);
  EvalOptions negative;
  negative.threads = -1;
  EXPECT_THROW(evaluate(items, negative), std::invalid_argument);
}
