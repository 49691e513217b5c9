// scripts/get_dataset.sh offline: miniature Clotho, AudioCaps and COCO served on loopback in the
// published layouts, downloaded, checked, laid out as caption-train reads them (read_dataset),
// idempotent on a rerun, a corrupt archive caught by its checksum, AudioCaps videos that are gone
// or hang reported and retried.
#include <gtest/gtest.h>

#include <sndfile.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include <httplib.h>

#include "data/datasets.h"
#include "pipeline/audio_decode.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;
using prefixcap::testing::run;
using prefixcap::testing::q;
namespace fs = std::filesystem;

namespace {

const std::string kScript = std::string(PREFIXCAP_SOURCE_DIR) + "/scripts/get_dataset.sh";



void write_wav(const std::string& path, double seconds, int rate, float f) {
  std::vector<float> x(static_cast<size_t>(seconds * rate));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.3f * std::sin(f * static_cast<float>(i));
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* s = sf_open(path.c_str(), SFM_WRITE, &info);
  ASSERT_NE(s, nullptr);
  sf_writef_float(s, x.data(), static_cast<sf_count_t>(x.size()));
  sf_close(s);
}

// Serves a folder over HTTP on loopback, counting the requests.
class Mirror {
 public:
  explicit Mirror(const std::string& folder) {
    server_.set_mount_point("/", folder);
    server_.set_logger([this](const httplib::Request&, const httplib::Response&) { ++requests; });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~Mirror() {
    server_.stop();
    thread_.join();
  }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }
  std::atomic<int> requests{0};

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

// An md5sum-format table of the files in `folder`.
std::string md5_table(const TempDir& dir, const std::string& folder) {
  const std::string table = dir.file("md5.txt");
  EXPECT_EQ(run("cd " + q(folder) + " && md5sum * > " + q(table)), 0);
  return table;
}

}  // namespace

TEST(GetDataset, ClothoDownloadsChecksExtractsAndIsIdempotent) {
  TempDir dir;
  const std::string mirror_dir = dir.file("zenodo");
  fs::create_directories(mirror_dir);
  for (const std::string split : {"development", "validation"}) {
    const std::string staging = dir.file("staging/" + split);
    fs::create_directories(staging);
    std::ofstream captions(mirror_dir + "/clotho_captions_" + split + ".csv");
    captions << "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n";
    for (int i = 0; i < 2; ++i) {
      const std::string name = split + "_" + std::to_string(i) + ".wav";
      write_wav(staging + "/" + name, 1.5, 44100, 0.01f * (i + 1));
      captions << name << ",a dog barks,rain falls,\"birds, then wind\",a car passes,someone speaks\n";
    }
    std::ofstream(mirror_dir + "/clotho_metadata_" + split + ".csv") << "file_name,keywords\n";
    // As published: the archive holds a folder named after the split.
    ASSERT_EQ(run("cd " + q(dir.file("staging")) + " && 7z a -bd " + q(mirror_dir + "/clotho_audio_" + split + ".7z") + " " + split +
                  " > /dev/null"),
              0);
  }
  const std::string md5 = md5_table(dir, mirror_dir);
  Mirror mirror(dir.path());
  const std::string env = "PREFIXCAP_CLOTHO_URL=" + mirror.url("/zenodo") + " PREFIXCAP_DATASET_MD5=" + q(md5) + " ";
  const std::string root = dir.file("clotho");
  const std::string log = dir.file("log");
  ASSERT_EQ(run(env + "bash " + q(kScript) + " clotho " + q(root) + " --splits development,validation > " + q(log) + " 2>&1"), 0)
      << read_bytes(log);
  for (const std::string split : {"development", "validation"}) {
    auto items = read_dataset("clotho", root, split);
    ASSERT_EQ(items.size(), 2u) << split;
    EXPECT_EQ(items[0].captions.size(), 5u);
    EXPECT_EQ(items[0].captions[2], "birds, then wind");
    EXPECT_TRUE(check_media(items).empty()) << split;
  }
  // A rerun downloads nothing and keeps everything.
  const int before = mirror.requests.load();
  ASSERT_EQ(run(env + "bash " + q(kScript) + " clotho " + q(root) + " --splits development,validation > " + q(log) + " 2>&1"), 0)
      << read_bytes(log);
  EXPECT_EQ(mirror.requests.load(), before);
  EXPECT_NE(read_bytes(log).find("clotho validation: 2 audio files"), std::string::npos) << read_bytes(log);

  // A corrupt archive on the mirror: caught by its checksum, deleted, exit 2, nothing laid out.
  std::string bytes = read_bytes(mirror_dir + "/clotho_audio_validation.7z");
  bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x5A);
  write_bytes(mirror_dir + "/clotho_audio_validation.7z", bytes);
  const std::string root2 = dir.file("clotho2");
  EXPECT_EQ(run(env + "bash " + q(kScript) + " clotho " + q(root2) + " --splits validation > " + q(log) + " 2>&1"), 2);
  EXPECT_NE(read_bytes(log).find("clotho_audio_validation.7z is corrupt: MD5"), std::string::npos) << read_bytes(log);
  EXPECT_FALSE(fs::exists(root2 + "/downloads/clotho_audio_validation.7z"));
  EXPECT_FALSE(fs::exists(root2 + "/validation"));
  // Bad arguments.
  EXPECT_EQ(run("bash " + q(kScript) + " clotho " + q(root2) + " --splits training > /dev/null 2>&1"), 1);
  EXPECT_EQ(run("bash " + q(kScript) + " imagenet " + q(root2) + " > /dev/null 2>&1"), 1);
}

TEST(GetDataset, AudioCapsCutsTenSecondsAndReportsVideosThatAreGone) {
  TempDir dir;
  const std::string mirror_dir = dir.file("github");
  const std::string videos = dir.file("videos");
  fs::create_directories(mirror_dir);
  fs::create_directories(videos);
  write_wav(videos + "/vidA.wav", 40, 22050, 0.02f);
  write_wav(videos + "/vidB.wav", 25, 16000, 0.03f);
  std::ofstream(mirror_dir + "/train.csv") << "audiocap_id,youtube_id,start_time,caption\n"
                                           << "1,vidA,30,a dog barks\n"
                                           << "2,vidA,30,a dog is barking loudly\n"
                                           << "3,vidB,0,rain falls on a roof\n"
                                           << "4,vidGone,10,a train passes\n"
                                           << "5,vidSlow,0,wind blows\n";
  // A stand-in for yt-dlp: copies the "video" from the folder, fails like yt-dlp for a removed
  // one, and hangs for another (the per-video time limit must stop it).
  const std::string fake = dir.file("yt-dlp");
  std::ofstream(fake) << "#!/usr/bin/env bash\n"
                      << "out='' url=''\n"
                      << "while [[ $# -gt 0 ]]; do case $1 in -o) out=$2; shift 2;; -f) shift 2;; -*) shift;; *) url=$1; shift;; esac; done\n"
                      << "id=${url##*=}\n"
                      << "echo \"$id\" >> " << q(dir.file("calls")) << "\n"
                      << "[[ $id == vidGone ]] && { echo 'ERROR: [youtube] vidGone: Video unavailable' >&2; exit 1; }\n"
                      << "[[ $id == vidSlow ]] && sleep 60\n"
                      << "cp " << q(videos) << "/$id.wav \"${out//%(ext)s/wav}\"\n";
  fs::permissions(fake, fs::perms::owner_all);
  Mirror mirror(dir.path());
  const std::string env = "PREFIXCAP_AUDIOCAPS_CSV_URL=" + mirror.url("/github") + " PREFIXCAP_YTDLP=" + q(fake) +
                          " PREFIXCAP_YOUTUBE_URL='https://example.invalid/watch?v=' ";
  const std::string root = dir.file("audiocaps");
  const std::string log = dir.file("log");
  ASSERT_EQ(run(env + "bash " + q(kScript) + " audiocaps " + q(root) + " --splits train --jobs 2 --timeout 3 > " + q(log) + " 2>&1"), 0)
      << read_bytes(log);
  EXPECT_NE(read_bytes(log).find("audiocaps train: 2 of 4 clips"), std::string::npos) << read_bytes(log);
  const std::string missing = read_bytes(root + "/train_missing.csv");
  EXPECT_NE(missing.find("vidGone,10,ERROR: [youtube] vidGone: Video unavailable"), std::string::npos) << missing;
  EXPECT_NE(missing.find("vidSlow,0,"), std::string::npos) << missing;
  // The clip: 10 s from the start time, at the video's rate.
  Waveform a = decode_audio(root + "/train/vidA_30.flac", {0});
  EXPECT_EQ(a.sample_rate, 22050);
  EXPECT_NEAR(static_cast<double>(a.samples.size()) / a.sample_rate, 10.0, 0.05);
  auto items = read_dataset("audiocaps", root, "train");
  ASSERT_EQ(items.size(), 4u);  // vidA's two captions are one clip
  EXPECT_EQ(check_media(items).size(), 2u);
  // A rerun asks only for the videos still missing.
  std::remove(dir.file("calls").c_str());
  ASSERT_EQ(run(env + "bash " + q(kScript) + " audiocaps " + q(root) + " --splits train --jobs 2 --timeout 3 > " + q(log) + " 2>&1"), 0);
  const std::string calls = read_bytes(dir.file("calls"));
  EXPECT_EQ(calls.find("vidA"), std::string::npos) << calls;
  EXPECT_NE(calls.find("vidGone"), std::string::npos) << calls;
}

TEST(GetDataset, CocoKarpathySplitAndImages) {
  TempDir dir;
  const std::string mirror_dir = dir.file("coco");
  fs::create_directories(dir.file("staging/train2014"));
  fs::create_directories(dir.file("staging/val2014"));
  fs::create_directories(mirror_dir);
  fs::copy_file(fixture_dir("clip-vit-tiny") + "/rocket.jpg", dir.file("staging/train2014/COCO_train2014_000000000009.jpg"));
  fs::copy_file(fixture_dir("clip-vit-tiny") + "/rocket.jpg", dir.file("staging/val2014/COCO_val2014_000000000042.jpg"));
  std::ofstream(dir.file("staging/dataset_coco.json"))
      << R"({"images": [
  {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "cocoid": 9,
   "sentences": [{"raw": "A rocket on a pad."}, {"raw": "A launch tower."}]},
  {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "cocoid": 42,
   "sentences": [{"raw": "A tall rocket."}]}], "dataset": "coco"})";
  const std::string staging = dir.file("staging");
  ASSERT_EQ(run("cd " + q(staging) + " && 7z a -tzip -bd " + q(mirror_dir + "/caption_datasets.zip") + " dataset_coco.json > /dev/null"), 0);
  for (const std::string set : {"train2014", "val2014"})
    ASSERT_EQ(run("cd " + q(staging) + " && 7z a -tzip -bd " + q(mirror_dir + "/" + set + ".zip") + " " + set + " > /dev/null"), 0);
  const std::string md5 = md5_table(dir, mirror_dir);
  Mirror mirror(dir.path());
  const std::string env = "PREFIXCAP_COCO_IMAGES_URL=" + mirror.url("/coco") + " PREFIXCAP_COCO_KARPATHY_URL=" +
                          mirror.url("/coco/caption_datasets.zip") + " PREFIXCAP_DATASET_MD5=" + q(md5) + " ";
  const std::string root = dir.file("coco-root");
  const std::string log = dir.file("log");
  ASSERT_EQ(run(env + "bash " + q(kScript) + " coco " + q(root) + " > " + q(log) + " 2>&1"), 0) << read_bytes(log);
  auto test = read_dataset("coco", root, "test");
  ASSERT_EQ(test.size(), 1u);
  EXPECT_EQ(test[0].captions[0], "A tall rocket.");
  EXPECT_TRUE(check_media(test).empty());
  auto train = read_dataset("coco", root, "train");
  ASSERT_EQ(train.size(), 1u);
  EXPECT_TRUE(check_media(train).empty());
}
