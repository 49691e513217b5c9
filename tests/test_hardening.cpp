// Hostile and broken inputs, each a small reproducer: a clear one-line error naming the file and
// the problem, never a signal, a hang or a silently wrong value; folder runs go on past them.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sndfile.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <caffe2/serialize/inline_container.h>
#include <nlohmann/json.hpp>

#include "core/json_config.h"
#include "core/torch_checkpoint.h"
#include "data/references.h"
#include "encoders/log_mel.h"
#include "metrics/evaluate.h"
#include "pipeline/audio_decode.h"
#include "pipeline/captioner.h"
#include "pipeline/checkpoint_import.h"
#include "pipeline/video_decode.h"
#include "tests/test_bundles.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::error_of;
using prefixcap::testing::aac_bundle;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::message_of;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;
using prefixcap::testing::run;
using prefixcap::testing::q;
namespace fs = std::filesystem;

namespace {




void write_wav(const std::string& path, int rate, int64_t frames) {
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr);
  std::vector<short> block(rate);
  for (int64_t done = 0; done < frames; done += rate) {
    for (int i = 0; i < rate; ++i) block[i] = static_cast<short>(3000 * std::sin((done + i) * 0.05));
    sf_write_short(f, block.data(), std::min<int64_t>(rate, frames - done));
  }
  sf_close(f);
}

void write_checkpoint(const std::string& path, const std::string& pickle) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  writer.writeEndOfFile();
}

}  // namespace

// ---------------------------------------------------------------------------- text output

TEST(Hardening, JsonlOutputStaysValidForNonUtf8NamesAndMessages) {
  TempDir dir;
  fs::create_directories(dir.file("in"));
  fs::copy_file(fixture_dir("prefix-aac-tiny") + "/rec_leaves_16k_mono_s16.wav", dir.file("in/caf\xe9.wav"));
  // A WAV whose second chunk id is not UTF-8 (the error message quotes it).
  std::string wav = read_bytes(fixture_dir("prefix-aac-tiny") + "/rec_leaves_16k_mono_s16.wav");
  write_bytes(dir.file("in/z_bad_chunk.wav"), wav.substr(0, 12) + "\xff\xfe\xfd\xfc" + std::string("\x04\0\0\0abcd", 8));
  const std::string out = dir.file("out.jsonl");
  const int rc = run(std::string(PREFIXCAP_CAPTION_BIN) + " -m " + q(aac_bundle()) + " " + q(dir.file("in")) + " -f jsonl -o " +
                     q(out) + " 2>/dev/null");
  EXPECT_EQ(rc, 2);  // one file failed, the run went on
  std::ifstream in(out);
  std::string line;
  int records = 0, errors = 0;
  while (std::getline(in, line)) {
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(line)) << line;
    ++records;
    errors += j.contains("error");
    if (!j.contains("error")) EXPECT_NE(j.at("path").get<std::string>().find("caf\xef\xbf\xbd.wav"), std::string::npos);
  }
  EXPECT_EQ(records, 2);
  EXPECT_EQ(errors, 1);
}

// ---------------------------------------------------------------------------- weight files

TEST(Hardening, DeeplyNestedPickleIsRefusedWithoutCrashing) {
  TempDir dir;
  // A million lists, each appended into the one below: 1,000,000 levels deep.
  const size_t n = 1000000;
  std::string pickle = "\x80\x02" + std::string(n, ']') + std::string(n - 1, 'a') + ".";
  write_checkpoint(dir.file("deep.pt"), pickle);
  EXPECT_NE(error_of([&] { load_torch_checkpoint(dir.file("deep.pt")); }).find("no tensors"), std::string::npos);
  // Dicts nested deeper than any state dict: refused by name.
  std::string dicts = "\x80\x02";
  for (int i = 0; i < 100; ++i) dicts += std::string("}X\x01\0\0\0k", 7);
  dicts += "K\x01";
  for (int i = 0; i < 100; ++i) dicts += "s";
  dicts += ".";
  write_checkpoint(dir.file("dicts.pt"), dicts);
  EXPECT_NE(error_of([&] { load_torch_checkpoint(dir.file("dicts.pt")); }).find("nested too deeply"), std::string::npos);
}

TEST(Hardening, OverflowingStridesAreRefused) {
  TempDir dir;
  auto long8 = [](int64_t v) {
    std::string out = "\x8a\x08";
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xFF));
    return out;
  };
  auto unicode = [](const std::string& s) {
    std::string out = "X";
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((s.size() >> (8 * i)) & 0xFF));
    return out + s;
  };
  // {'w': tensor(storage of 4 floats, offset 0, size (3,), stride (2^62,))}: (3-1) * 2^62 overflows int64.
  std::string pickle = std::string("\x80\x02}") + unicode("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" + unicode("storage") +
                       "ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu") + "K\x04tQ" + std::string("K\0", 2) + "(K\x03t(" +
                       long8(int64_t(1) << 62) + "t\x89}tRs.";
  caffe2::serialize::PyTorchStreamWriter writer(dir.file("stride.pt"));
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  const std::string storage(16, '\0');
  writer.writeRecord("data/0", storage.data(), storage.size());
  writer.writeEndOfFile();
  const std::string message = error_of([&] { load_torch_checkpoint(dir.file("stride.pt")); });
  EXPECT_NE(message.find("overflows"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "one line, no backtrace: " << message;
}

// Found by fuzz_torch_checkpoint: LibTorch's zip reader allocates a record at the size the
// central directory claims; a small file claiming a 4 GB record made it allocate 4 GB.
TEST(Hardening, ZipRecordsLargerThanTheFileAreRefusedBeforeReading) {
  TempDir dir;
  write_checkpoint(dir.file("ok.pt"), "\x80\x02}.");
  std::string bytes = read_bytes(dir.file("ok.pt"));
  const size_t central = bytes.find("PK\x01\x02");
  ASSERT_NE(central, std::string::npos);
  for (int i = 0; i < 4; ++i) bytes[central + 24 + i] = static_cast<char>(i == 3 ? 0xF0 : 0x00);  // uncompressed size
  write_bytes(dir.file("claims.pt"), bytes);
  const std::string m = error_of([&] { load_torch_checkpoint(dir.file("claims.pt")); });
  EXPECT_NE(m.find("claims 4026531840 bytes, more than the"), std::string::npos) << m;
}

// ---------------------------------------------------------------------------- configs

TEST(Hardening, ConfigNumbersMustBeWholeAndInRange) {
  EXPECT_THROW(json_get<int>(Json{{"n", 1e12}}, "n", "cfg"), ConfigError);
  EXPECT_THROW(json_get<int>(Json{{"n", int64_t(1000000000000)}}, "n", "cfg"), ConfigError);
  EXPECT_THROW(json_get<int64_t>(Json{{"n", 64.5}}, "n", "cfg"), ConfigError);
  EXPECT_THROW(json_get<int64_t>(Json{{"n", 1e23}}, "n", "cfg"), ConfigError);
  EXPECT_THROW(json_get<uint64_t>(Json{{"n", -1}}, "n", "cfg"), ConfigError);
  EXPECT_THROW(json_get<std::vector<int64_t>>(Json{{"n", {4, 8.5}}}, "n", "cfg"), ConfigError);
  EXPECT_EQ(json_get<int64_t>(Json{{"n", 64.0}}, "n", "cfg"), 64);
  // Found by fuzz_json_configs: a 7-million-sample window (with fmax above Nyquist) built a
  // filterbank of hundreds of millions of values to print a warning. Sizes are bounded now.
  EXPECT_THROW(LogMelConfig::from_json(Json{{"sample_rate", 16005}, {"window_size", 7316005}}, "cfg"), ConfigError);
  EXPECT_EQ(json_get<int>(Json{{"n", -7}}, "n", "cfg"), -7);
  const std::string m = message_of([] { json_get<int>(Json{{"n_embd", 1e12}}, "n_embd", "config.json"); });
  EXPECT_NE(m.find("config.json: key 'n_embd': expected a whole number"), std::string::npos) << m;
  // A bundle from a future version is refused.
  TempDir dir;
  fs::copy(aac_bundle(), dir.file("b"), fs::copy_options::recursive);
  Json j = read_json_file(dir.file("b/captioner.json"));
  j["version"] = 99;
  write_json_file(dir.file("b/captioner.json"), j);
  EXPECT_NE(message_of([&] { Captioner::load(dir.file("b")); }).find("bundle version 99"), std::string::npos);
}

// ---------------------------------------------------------------------------- media

TEST(Hardening, ImageFormatsAreNotMistakenForAudio) {
  TempDir dir;
  write_bytes(dir.file("a.svg"), "<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"/>\n");
  write_bytes(dir.file("a.ppm"), std::string("P6\n2 1\n255\n") + std::string(6, '\x80'));
  write_bytes(dir.file("a.xbm"), "#define a_width 1\n#define a_height 1\nstatic char a_bits[] = {0x00};\n");
  write_bytes(dir.file("a.exr"), std::string("\x76\x2f\x31\x01", 4) + std::string(60, '\0'));
  write_bytes(dir.file("a.sgi"), std::string("\x01\xda\x00\x01", 4) + std::string(60, '\0'));
  write_bytes(dir.file("a.ras"), std::string("\x59\xa6\x6a\x95", 4) + std::string(60, '\0'));
  for (const char* f : {"a.svg", "a.ppm", "a.xbm", "a.exr", "a.sgi", "a.ras"})
    EXPECT_EQ(detect_modality(dir.file(f)), Modality::Image) << f;
  EXPECT_NE(error_of([&] { decode_image(dir.file("a.svg")); }).find("svg image, a format prefixcap does not decode"), std::string::npos);
  // A folder of SVGs: each reported (exit 2), not "no input files".
  fs::create_directories(dir.file("svgs"));
  fs::copy_file(dir.file("a.svg"), dir.file("svgs/b.svg"));
  EXPECT_EQ(run(std::string(PREFIXCAP_CAPTION_BIN) + " -m " + q(aac_bundle()) + " " + q(dir.file("svgs")) + " >/dev/null 2>" +
                q(dir.file("err.txt"))),
            2);
  EXPECT_NE(read_bytes(dir.file("err.txt")).find("is an image"), std::string::npos) << read_bytes(dir.file("err.txt"));
}

// Found by fuzz_image: a PNG header of 0xFFFFFFFF x 0xFFFFFFFF pixels overflowed the pixel-limit
// product (undefined behaviour) before the check.
TEST(Hardening, HugeImageHeadersAreRefusedWithoutOverflow) {
  std::string png("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR", 16);
  png += std::string(8, '\xff') + std::string("\x08\x02\0\0\0", 5) + std::string(4, '\0');
  const std::string m = message_of([&] { decode_image_bytes(png, "huge.png"); });
  EXPECT_NE(m.find("exceeds the limit"), std::string::npos) << m;
}

TEST(Hardening, TruncatedOggSaysWhatHappened) {
  TempDir dir;
  const std::string ogg = read_bytes(fixture_dir("audio-decode") + "/leaves_44k1_stereo_vorbis.ogg");
  write_bytes(dir.file("cut.ogg"), ogg.substr(0, ogg.size() / 2));
  const std::string m = error_of([&] { decode_audio(dir.file("cut.ogg")); });
  if (!m.empty()) {  // libsndfile may also decode what is there without complaint
    EXPECT_EQ(m.find("9223372036854775807"), std::string::npos) << m;
    EXPECT_NE(m.find("cut.ogg"), std::string::npos) << m;
  }
}

TEST(Hardening, VideoSamplingHasLimits) {
  const std::string video = fixture_dir("audio-decode") + "/leaves_video_h264_aac.mp4";
  VideoLimits small;
  small.max_frame_pixels = 100;
  EXPECT_NE(error_of([&] { sample_video_frames(video, 4, nullptr, small); }).find("exceed the limit of 100"), std::string::npos);
  VideoLimits few;
  few.max_decoded_frames = 2;
  EXPECT_NE(error_of([&] { sample_video_frames(video, 4, nullptr, few); }).find("more than 2 video frames"), std::string::npos);
  EXPECT_EQ(sample_video_frames(video, 4).size(), 4u);
}

// caption --window streams: the peak memory of a 20-minute recording is that of a 1-minute one
// (a whole-file decode would add 77 MB of float samples at 16 kHz). Batches of 4 windows, so
// that both runs fill their batches alike.
TEST(Hardening, WindowedCaptioningOfLongAudioHasFlatMemory) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's quarantine keeps freed memory resident";
#endif
  TempDir dir;
  write_wav(dir.file("short.wav"), 16000, 60 * 16000);
  write_wav(dir.file("long.wav"), 16000, 20 * 60 * 16000);
  auto peak_rss_mb = [&](const std::string& file) {
    pid_t pid = fork();
    if (pid == 0) {
      const int null = open("/dev/null", O_WRONLY);
      dup2(null, 1);
      dup2(null, 2);
      execl(PREFIXCAP_CAPTION_BIN, PREFIXCAP_CAPTION_BIN, "-m", aac_bundle().c_str(), file.c_str(), "--window", "10", "--batch-size",
            "4", "--beam", "1", "--max-tokens", "2", "-f", "jsonl", (char*)nullptr);
      _exit(127);
    }
    int status = 0;
    rusage usage{};
    wait4(pid, &status, 0, &usage);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return usage.ru_maxrss / 1024.0;
  };
  const double short_mb = peak_rss_mb(dir.file("short.wav"));
  const double long_mb = peak_rss_mb(dir.file("long.wav"));
  EXPECT_LT(long_mb - short_mb, 40.0) << "1 min: " << short_mb << " MB, 20 min: " << long_mb << " MB";
}

TEST(Hardening, StreamedWindowsEqualWholeFileCuts) {
  TempDir dir;
  write_wav(dir.file("a.wav"), 8000, 8000 * 25 + 123);
  const Waveform whole = decode_audio(dir.file("a.wav"), {16000});
  const double duration = double(whole.samples.size()) / 16000;
  for (auto [window, hop] : std::vector<std::pair<double, double>>{{10, 10}, {10, 5}, {3, 7}, {30, 30}, {7.3, 2.9}}) {
    auto spans = window_spans(duration, window, hop);
    AudioReader reader(dir.file("a.wav"), {16000});
    size_t k = 0;
    stream_windows(reader, window, hop, [&](double start, double end, std::vector<float>&& samples) {
      ASSERT_LT(k, spans.size());
      EXPECT_DOUBLE_EQ(start, spans[k].first);
      EXPECT_DOUBLE_EQ(end, spans[k].second);
      const size_t a = static_cast<size_t>(start * 16000), b = std::min(whole.samples.size(), static_cast<size_t>(end * 16000));
      EXPECT_EQ(samples, std::vector<float>(whole.samples.begin() + a, whole.samples.begin() + b)) << window << "/" << hop << " #" << k;
      ++k;
    });
    EXPECT_EQ(k, spans.size()) << window << "/" << hop;
  }
}

// ---------------------------------------------------------------------------- evaluation

TEST(Hardening, ReferenceAndPredictionFilesAreCheckedWithFileAndLine) {
  TempDir dir;
  write_bytes(dir.file("numeric.jsonl"), "{\"path\": \"a.wav\", \"caption\": 42}\n");
  EXPECT_NE(message_of([&] { read_predictions(dir.file("numeric.jsonl")); }).find("numeric.jsonl:1:"), std::string::npos);
  write_bytes(dir.file("null.jsonl"), "{\"path\": \"a.wav\", \"caption\": \"x\"}\n{\"path\": null, \"caption\": \"y\"}\n");
  EXPECT_NE(message_of([&] { read_predictions(dir.file("null.jsonl")); }).find("null.jsonl:2:"), std::string::npos);
  write_bytes(dir.file("dup.jsonl"), "{\"path\": \"a.wav\", \"caption\": \"x\"}\n{\"path\": \"b/a.flac\", \"caption\": \"y\"}\n");
  const std::string dup = message_of([&] { read_predictions(dir.file("dup.jsonl")); });
  EXPECT_NE(dup.find("dup.jsonl:2: a second prediction for 'a' (the first is on line 1)"), std::string::npos) << dup;
  // A 1 MB "caption" is refused at once, not scored for minutes.
  write_bytes(dir.file("huge.jsonl"), "{\"path\": \"a.wav\", \"caption\": \"" + std::string(1 << 20, 'a') + "\"}\n");
  EXPECT_NE(message_of([&] { read_predictions(dir.file("huge.jsonl")); }).find("exceeds the limit"), std::string::npos);
  // Clotho csv saved with a byte-order mark.
  write_bytes(dir.file("bom.csv"), "\xEF\xBB\xBF" "file_name,caption_1\nclip1.wav,A dog barks\n");
  EXPECT_EQ(read_references(dir.file("bom.csv")).at("clip1").size(), 1u);
  // The official COCO captions file.
  write_bytes(dir.file("captions_val2014.json"),
              R"({"info":{},"images":[{"id":7,"file_name":"COCO_val2014_000000000007.jpg"}],)"
              R"("annotations":[{"image_id":7,"id":1,"caption":"A cat."},{"image_id":7,"id":2,"caption":"A kitten."}]})");
  EXPECT_EQ(read_references(dir.file("captions_val2014.json")).at("COCO_val2014_000000000007").size(), 2u);
  write_bytes(dir.file("karpathy.json"), R"({"images":[{"filename":"x.jpg","sentences":[{"raw":3}]}]})");
  const std::string k = message_of([&] { read_references(dir.file("karpathy.json")); });
  EXPECT_NE(k.find("karpathy.json: images[0] sentences: expected a string \"raw\""), std::string::npos) << k;
}

// METEOR and SPICE through a stand-in `java`: one that exits mid-protocol, one that leaves an
// item out. Both are reported as missing metrics, never as a crash or a score of 0.
TEST(Hardening, JarRunnersThatMisbehaveGiveMissingMetrics) {
  TempDir dir;
  write_bytes(dir.file("meteor.jar"), "");
  write_bytes(dir.file("spice.jar"), "");
  write_bytes(dir.file("java"),
              "#!/bin/sh\n"
              "if [ \"$1\" = -version ]; then echo 'openjdk version \"11.0.20\"' >&2; exit 0; fi\n"
              "case \"$3\" in *spice.jar) out=$8; echo '[{\"image_id\": \"0\", \"scores\": {\"All\": {\"f\": 0.5}}}]' > \"$out\"; exit 0;; esac\n"
              "read line; echo 0.5; exit 0\n");
  fs::permissions(dir.file("java"), fs::perms::owner_all);
  std::vector<CaptionItem> items(3);
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].id = "c" + std::to_string(i);
    items[i].candidate = "a dog barks";
    items[i].references = {"a dog is barking", "dogs bark"};
  }
  EvalOptions o;
  o.java = dir.file("java");
  o.meteor_jar = dir.file("meteor.jar");
  o.spice_jar = dir.file("spice.jar");
  EvalReport r = evaluate(items, o);
  ASSERT_TRUE(r.missing.count("METEOR"));
  EXPECT_NE(r.missing.at("METEOR").find("failed"), std::string::npos);
  ASSERT_TRUE(r.missing.count("SPICE"));
  EXPECT_NE(r.missing.at("SPICE").find("no score for item 'c1'"), std::string::npos) << r.missing.at("SPICE");
  EXPECT_FALSE(r.corpus.count("SPICE"));
  EXPECT_TRUE(r.corpus.count("CIDEr"));
}
