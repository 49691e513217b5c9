// caption --stream end to end: a piped file gives the captions of caption --window on that file,
// raw PCM too; SIGINT finishes the current window; the drop policy bounds the queue; an hour of
// stream keeps memory flat; bad streams and options are refused with a message.
#include <gtest/gtest.h>

#include <signal.h>
#include <sndfile.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "tests/test_bundles.h"
#include "tests/test_helpers.h"
#include "tests/test_process.h"

using namespace prefixcap;
using prefixcap::testing::aac_bundle;
using prefixcap::testing::Child;
using prefixcap::testing::clipcap_bundle;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::run;
using prefixcap::testing::q;
using Json = nlohmann::json;

namespace {

const std::string kCaption = PREFIXCAP_CAPTION_BIN;

// Deterministic noise with a slow tone, as interleaved 16-bit samples.
std::vector<int16_t> noise(int rate, int channels, double seconds, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.15f);
  std::vector<int16_t> out(static_cast<size_t>(rate * seconds) * channels);
  for (size_t i = 0; i < out.size(); ++i) {
    const double t = double(i / channels) / rate;
    const double v = n(rng) + 0.3 * std::sin(2 * M_PI * (200 + 40 * (i % channels)) * t) * std::sin(t);
    out[i] = static_cast<int16_t>(std::lround(std::max(-1.0, std::min(1.0, v)) * 32767));
  }
  return out;
}

void write_wav(const std::string& path, const std::vector<int16_t>& samples, int rate, int channels) {
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = channels;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr);
  sf_writef_short(f, samples.data(), static_cast<sf_count_t>(samples.size() / channels));
  sf_close(f);
}

void write_raw(const std::string& path, const std::vector<int16_t>& samples) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(samples.data()), static_cast<std::streamsize>(samples.size() * 2));
}

std::vector<Json> jsonl(const std::string& path) {
  std::vector<Json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(Json::parse(line));
  return out;
}



// caption --window on the file, as JSON lines.
std::vector<Json> windows_of_file(const TempDir& dir, const std::string& wav, const std::string& extra) {
  const std::string out = dir.file("file.jsonl");
  EXPECT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " " + q(wav) + " -f jsonl -o " + q(out) + " " + extra + " 2>/dev/null"), 0);
  return jsonl(out);
}

void expect_same_windows(const std::vector<Json>& file, const std::vector<Json>& stream, bool exact_scores) {
  ASSERT_EQ(file.size(), stream.size());
  ASSERT_GT(file.size(), 3u);
  for (size_t i = 0; i < file.size(); ++i) {
    SCOPED_TRACE("window " + std::to_string(i));
    EXPECT_DOUBLE_EQ(file[i]["start"].get<double>(), stream[i]["start"].get<double>());
    EXPECT_DOUBLE_EQ(file[i]["end"].get<double>(), stream[i]["end"].get<double>());
    EXPECT_EQ(file[i]["caption"], stream[i]["caption"]);
    if (exact_scores)
      EXPECT_EQ(file[i]["score"].get<double>(), stream[i]["score"].get<double>());
    else  // batches of other sizes: the same math in another BLAS blocking
      EXPECT_NEAR(file[i]["score"].get<double>(), stream[i]["score"].get<double>(), 1e-4);
    EXPECT_TRUE(stream[i].contains("latency_ms"));
    EXPECT_EQ(stream[i]["dropped"].get<int>(), 0);
  }
}

}  // namespace

class CaptionStream : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }
};

TEST_F(CaptionStream, PipedWavGivesTheCaptionsOfWindowedFileCaptioning) {
  TempDir dir;
  const std::string wav = dir.file("a.wav");
  write_wav(wav, noise(16000, 1, 21.3, 1), 16000, 1);
  for (const std::string batch : {"1", "8"}) {
    SCOPED_TRACE("batch " + batch);
    const std::string args = "--window 4 --hop 3 -b " + batch;
    auto file = windows_of_file(dir, wav, args);
    const std::string out = dir.file("stream.jsonl");
    ASSERT_EQ(run("cat " + q(wav) + " | " + kCaption + " -m " + q(aac_bundle()) + " --stream - " + args + " > " + q(out) +
                  " 2>" + q(dir.file("err"))),
              0)
        << read_bytes(dir.file("err"));
    // batch 1: one window at a time on both sides, bit-identical; batch 8: the file path
    // batches 8 windows, the stream those waiting, so scores may differ in the last bits.
    expect_same_windows(file, jsonl(out), batch == "1");
    EXPECT_NE(read_bytes(dir.file("err")).find("stream ended: 7 windows captioned, 0 dropped"), std::string::npos)
        << read_bytes(dir.file("err"));
  }
}

TEST_F(CaptionStream, RawPcmStereoAt44kGivesTheSameCaptions) {
  TempDir dir;
  auto samples = noise(44100, 2, 13.7, 2);
  write_wav(dir.file("b.wav"), samples, 44100, 2);
  write_raw(dir.file("b.raw"), samples);
  auto file = windows_of_file(dir, dir.file("b.wav"), "--window 3 -b 1");
  const std::string out = dir.file("stream.jsonl");
  ASSERT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " --stream - --raw s16le --rate 44100 --channels 2 --window 3 -b 1 < " +
                q(dir.file("b.raw")) + " > " + q(out) + " 2>/dev/null"),
            0);
  expect_same_windows(file, jsonl(out), true);
}

TEST_F(CaptionStream, SigintFinishesTheCurrentWindowAndExitsZero) {
  TempDir dir;
  auto samples = noise(16000, 1, 6.5, 3);
  Child child({kCaption, "-m", aac_bundle(), "--stream", "-", "--raw", "s16le", "--rate", "16000", "--channels", "1",
               "--window", "4"},
              dir.file("out"), dir.file("err"), /*pipe_stdin=*/true);
  ASSERT_TRUE(child.write_stdin(samples.data(), samples.size() * 2));  // 6.5 s, then the writer stays silent
  // The first window is complete: its line comes while the stream is still open.
  for (int i = 0; i < 600 && jsonl(dir.file("out")).empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_EQ(jsonl(dir.file("out")).size(), 1u) << read_bytes(dir.file("err"));
  child.signal(SIGINT);
  ASSERT_EQ(child.wait(60), 0) << read_bytes(dir.file("err"));
  auto lines = jsonl(dir.file("out"));
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_DOUBLE_EQ(lines[1]["start"].get<double>(), 4.0);
  EXPECT_DOUBLE_EQ(lines[1]["end"].get<double>(), 6.5);  // the window read so far, cut there
  EXPECT_NE(read_bytes(dir.file("err")).find("stream interrupted: 2 windows captioned"), std::string::npos);
}

TEST_F(CaptionStream, DropPolicyBoundsTheQueueAndCountsWhatItDrops) {
  TempDir dir;
  write_raw(dir.file("c.raw"), noise(16000, 1, 40, 4));
  const std::string out = dir.file("out"), err = dir.file("err");
  // 80 windows of 0.5 s arrive at once from a file: far faster than captioning.
  ASSERT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " --stream - --raw s16le --rate 16000 --channels 1 --window 0.5 "
                           "--overrun drop --max-pending 2 -b 1 < " +
                q(dir.file("c.raw")) + " > " + q(out) + " 2>" + q(err)),
            0);
  auto lines = jsonl(out);
  ASSERT_FALSE(lines.empty());
  const int64_t dropped = lines.back()["dropped"].get<int64_t>();
  const std::string summary = read_bytes(err);
  EXPECT_GT(dropped, 0);
  // Every window is either captioned or counted as dropped; the newest always survives.
  EXPECT_NE(summary.find("stream ended: " + std::to_string(lines.size()) + " windows captioned"), std::string::npos) << summary;
  int64_t total_dropped = std::stoll(summary.substr(summary.find("captioned, ") + 11));
  EXPECT_EQ(static_cast<int64_t>(lines.size()) + total_dropped, 80);
  EXPECT_DOUBLE_EQ(lines.back()["end"].get<double>(), 40.0);
  for (size_t i = 1; i < lines.size(); ++i) EXPECT_LT(lines[i - 1]["start"].get<double>(), lines[i]["start"].get<double>());
}

TEST_F(CaptionStream, AnHourOfStreamKeepsMemoryFlat) {
  TempDir dir;
  Child child({kCaption, "-m", aac_bundle(), "--stream", "-", "--raw", "s16le", "--rate", "16000", "--channels", "1",
               "--window", "10", "-b", "4"},
              dir.file("out"), dir.file("err"), /*pipe_stdin=*/true);
  const auto second = noise(16000, 1, 60, 5);  // one minute, written 60 times
  // RSS after each minute written. A single reading may fall inside a batch's forward pass (a
  // moment of more memory) or just after a free (a dip of 5-10 MiB), so each period is
  // represented by its median reading.
  std::vector<long> rss;
  for (int minute = 0; minute < 60; ++minute) {
    ASSERT_TRUE(child.write_stdin(second.data(), second.size() * 2)) << read_bytes(dir.file("err"));
    rss.push_back(child.status_kib("VmRSS"));
  }
  child.close_stdin();
  ASSERT_EQ(child.wait(600), 0) << read_bytes(dir.file("err"));
  auto lines = jsonl(dir.file("out"));
  ASSERT_EQ(lines.size(), 360u);
  EXPECT_DOUBLE_EQ(lines.back()["end"].get<double>(), 3600.0);
  auto median = [&](int from, int to) {
    std::vector<long> v(rss.begin() + from, rss.begin() + to);
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  const long early = median(10, 20), late = median(50, 60);
  std::printf("VmRSS, median of minutes 10-19: %ld KiB, of minutes 50-59: %ld KiB\n", early, late);
  ASSERT_GT(early, 0);
  // The writer blocks while the reader holds a window or two (Block policy), so every reading is
  // taken mid-stream; growth of more than 8 MiB over 40 minutes would be a leak.
  EXPECT_LT(late - early, 8 * 1024);
}

TEST_F(CaptionStream, BadStreamsAndOptionsAreRefusedWithAMessage) {
  TempDir dir;
  const std::string err = dir.file("err");
  auto expect = [&](const std::string& args, int code, const std::string& message, const std::string& stdin_from = "/dev/null") {
    SCOPED_TRACE(args);
    EXPECT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " " + args + " < " + q(stdin_from) + " > /dev/null 2>" + q(err)), code);
    EXPECT_NE(read_bytes(err).find(message), std::string::npos) << read_bytes(err);
  };
  expect("--stream - --raw s16le", 1, "--raw needs --rate and --channels");
  expect("--stream - --raw mp3 --rate 16000 --channels 1", 1, "not a raw PCM format");
  expect("--stream - --raw s16le --input-format mpegts --rate 1 --channels 1", 1, "give one");
  expect("--stream a b", 1, "--stream takes one SOURCE");
  expect("--raw s16le --rate 16000 --channels 1 x.wav", 1, "are for --stream");
  expect("--stream - --input-format no-such-format", 2, "no input format or capture device named 'no-such-format'");
  expect("--stream " + q(dir.file("missing.wav")), 2, "cannot open the stream");
  expect("--stream http://127.0.0.1:9/none --io-timeout 2", 2, "cannot open the stream");
  {
    std::ofstream junk(dir.file("junk"));
    junk << "this is not audio at all, just text\n";
  }
  expect("--stream -", 2, "stdin: cannot open the stream", dir.file("junk"));
  expect("--stream -", 2, "stdin", "/dev/null");  // empty stdin: nothing to caption
  EXPECT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " --stream - --raw s16le --rate 8000 --channels 1 < /dev/null > /dev/null 2>" + q(err)), 1);
  EXPECT_NE(read_bytes(err).find("--raw is audio"), std::string::npos);
}

TEST_F(CaptionStream, VideoThroughAnImageBundleSamplesFramesPerWindow) {
  TempDir dir;
  const std::string video = prefixcap::testing::fixture_dir("audio-decode") + "/leaves_video_h264_aac.mp4";  // 12 frames at 4 fps
  const std::string file_out = dir.file("file.jsonl"), out = dir.file("stream.jsonl");
  ASSERT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " " + q(video) + " -f jsonl --max-tokens 12 -o " + q(file_out) + " 2>/dev/null"), 0);
  auto file = jsonl(file_out);
  ASSERT_EQ(file.size(), 1u);
  // One window the length of the video: the frames the file path samples, so the same numbers.
  ASSERT_EQ(run("cat " + q(video) + " | " + kCaption + " -m " + q(clipcap_bundle()) + " --stream - --window 3 --max-tokens 12 > " +
                q(out) + " 2>/dev/null"),
            0);
  auto one = jsonl(out);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0]["modality"], "video");
  EXPECT_EQ(one[0]["caption"], file[0]["caption"]);
  EXPECT_EQ(one[0]["score"].get<double>(), file[0]["score"].get<double>());
  // Rolling windows: 1 s every 0.5 s over 3 s of video.
  ASSERT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " --stream " + q(video) + " --window 1 --hop 0.5 --frames 2 > " + q(out) +
                " 2>/dev/null"),
            0);
  auto rolling = jsonl(out);
  ASSERT_EQ(rolling.size(), 6u);
  for (size_t i = 0; i < rolling.size(); ++i) {
    EXPECT_DOUBLE_EQ(rolling[i]["start"].get<double>(), 0.5 * i);
    EXPECT_DOUBLE_EQ(rolling[i]["end"].get<double>(), std::min(3.0, 0.5 * i + 1));
  }
  // The file path's --window for a video cuts the same windows with the same frames.
  ASSERT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " " + q(video) + " --window 1 --hop 0.5 --frames 2 -b 1 -f jsonl -o " +
                q(file_out) + " 2>/dev/null"),
            0);
  auto file_windows = jsonl(file_out);
  ASSERT_EQ(file_windows.size(), rolling.size());
  for (size_t i = 0; i < rolling.size(); ++i) {
    EXPECT_DOUBLE_EQ(file_windows[i]["start"].get<double>(), rolling[i]["start"].get<double>());
    EXPECT_DOUBLE_EQ(file_windows[i]["end"].get<double>(), rolling[i]["end"].get<double>());
    EXPECT_EQ(file_windows[i]["caption"], rolling[i]["caption"]);
    EXPECT_NEAR(file_windows[i]["score"].get<double>(), rolling[i]["score"].get<double>(), 1e-4);
  }
  // An image has no windows.
  EXPECT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " " + q(prefixcap::testing::fixture_dir("clip-vit-tiny") + "/rocket.jpg") +
                " --window 1 > /dev/null 2>" + q(dir.file("err"))),
            2);
  EXPECT_NE(read_bytes(dir.file("err")).find("--window is for audio and video"), std::string::npos);
  // A window longer than the stream: cut at its end.
  ASSERT_EQ(run(kCaption + " -m " + q(clipcap_bundle()) + " --stream " + q(video) + " --window 60 > " + q(out) + " 2>/dev/null"), 0);
  auto cut = jsonl(out);
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_DOUBLE_EQ(cut[0]["end"].get<double>(), 3.0);
}

TEST_F(CaptionStream, UrlsAndCaptureDevicesOpenThroughFfmpeg) {
  TempDir dir;
  const std::string wav = dir.file("u.wav");
  write_wav(wav, noise(16000, 1, 9.5, 6), 16000, 1);
  auto file = windows_of_file(dir, wav, "--window 3 -b 1");
  // An http URL, served on loopback.
  httplib::Server http;
  const std::string body = read_bytes(wav);
  http.Get("/live.wav", [&](const httplib::Request&, httplib::Response& res) { res.set_content(body, "audio/wav"); });
  const int port = http.bind_to_any_port("127.0.0.1");
  std::thread serving([&] { http.listen_after_bind(); });
  const std::string out = dir.file("url.jsonl");
  const int rc = run(kCaption + " -m " + q(aac_bundle()) + " --stream http://127.0.0.1:" + std::to_string(port) +
                     "/live.wav --window 3 -b 1 > " + q(out) + " 2>" + q(dir.file("err")));
  http.stop();
  serving.join();
  ASSERT_EQ(rc, 0) << read_bytes(dir.file("err"));
  expect_same_windows(file, jsonl(out), true);
  // A libavdevice input: lavfi's sine source stands in for a microphone (alsa, pulse).
  ASSERT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " --stream 'sine=frequency=440:duration=7' --input-format lavfi "
                           "--window 3 > " + q(out) + " 2>" + q(dir.file("err"))),
            0)
      << read_bytes(dir.file("err"));
  auto device = jsonl(out);
  ASSERT_EQ(device.size(), 3u);
  EXPECT_DOUBLE_EQ(device.back()["end"].get<double>(), 7.0);
  // Devices that FFmpeg knows but this machine lacks fail with the device's reason.
  EXPECT_EQ(run(kCaption + " -m " + q(aac_bundle()) + " --stream no-such-card --input-format alsa > /dev/null 2>" + q(dir.file("err"))), 2);
  EXPECT_NE(read_bytes(dir.file("err")).find("no-such-card: cannot open the stream"), std::string::npos) << read_bytes(dir.file("err"));
}
