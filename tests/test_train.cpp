// Training: the loss against upstream golden data, the data pipeline, checkpoints and resume,
// the feature cache, configuration errors, and short real training runs on tiny models.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "core/safetensors.h"
#include "lm/gpt2.h"
#include "lm/loss.h"
#include "pipeline/captioner.h"
#include "pipeline/feature_cache.h"
#include "pipeline/prefetch.h"
#include "pipeline/trainer.h"
#include "test_helpers.h"
#include "train_helpers.h"

using namespace prefixcap;
using namespace prefixcap::testing;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// loss: ClipCap's training loss and its gradient w.r.t. the prefix, from gpt2-tiny's golden data

TEST(TrainLoss, PrefixLossAndGradientEqualTheFixture) {
  Gpt2Model lm = load_gpt2(fixture_dir("gpt2-tiny"));
  SafetensorsFile golden(fixture_dir("gpt2-tiny") + "/golden.safetensors");
  for (const std::string c : {"prefix_embeds", "prefix_embeds_masked"}) {
    SCOPED_TRACE(c);
    at::Tensor prefix = golden.tensor("prefix_embeds.prefix").to(at::kFloat).clone().set_requires_grad(true);
    at::Tensor ids = golden.tensor(c + ".caption_ids").to(at::kLong);
    at::Tensor mask;
    if (golden.contains(c + ".attention_mask")) mask = golden.tensor(c + ".attention_mask").narrow(1, prefix.size(1), ids.size(1));
    at::Tensor loss = prefix_lm_loss(*lm, prefix, ids, mask);
    at::Tensor grad = torch::autograd::grad({loss}, {prefix})[0];
    EXPECT_TRUE(at::allclose(loss.reshape({1}).to(at::kDouble), golden.tensor(c + ".loss").to(at::kDouble), 1e-4, 1e-4))
        << loss.item<double>() << " vs " << golden.tensor(c + ".loss").item<double>();
    EXPECT_TRUE(at::allclose(grad.to(at::kDouble), golden.tensor(c + ".grad_prefix").to(at::kDouble), 1e-4, 1e-4))
        << (grad.to(at::kDouble) - golden.tensor(c + ".grad_prefix").to(at::kDouble)).abs().max().item<double>();
  }
}

// ---------------------------------------------------------------------------------------
// configuration

TEST(TrainConfig, UnknownKeysAndWrongTypesAreRefusedByName) {
  EXPECT_NE(message_of([] { TrainConfig::from_json({{"epoch", 3}}, "cfg.json"); }).find("unknown key 'epoch'"), std::string::npos);
  EXPECT_NE(message_of([] { TrainConfig::from_json({{"epochs", "three"}}, "cfg.json"); }).find("'epochs' must be an integer"),
            std::string::npos);
  EXPECT_NE(message_of([] { TrainConfig::from_json({{"lr", true}}, "cfg.json"); }).find("'lr' must be a number"), std::string::npos);
  TrainConfig c;
  EXPECT_NE(message_of([&] { set_train_option(c, "batch_size", "8x"); }).find("--batch-size: '8x' is not an integer"),
            std::string::npos);
  c.out = "x";
  c.encoder = c.lm = "y";
  c.mapper = {{"type", "mlp"}};
  c.schedule = "exponential";
  EXPECT_NE(message_of([&] { c.validate(); }).find("schedule"), std::string::npos);
  // A config round-trips through JSON.
  TrainConfig d;
  d.lr = 3e-4;
  d.mapper = {{"type", "prefix_aac"}};
  d.resume = true;
  EXPECT_EQ(TrainConfig::from_json(d.to_json(), "x").to_json(), d.to_json());
}

TEST(TrainSchedule, WarmupThenCosineOrLinear) {
  TrainConfig c;
  c.lr = 1.0;
  c.warmup_steps = 10;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 9, 110), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(c, 10, 110), 1.0);
  EXPECT_NEAR(learning_rate(c, 60, 110), 0.55, 1e-12);  // half-way down the cosine: (1 + 0.1) / 2
  EXPECT_NEAR(learning_rate(c, 110, 110), 0.1, 1e-12);
  c.schedule = "linear";
  EXPECT_NEAR(learning_rate(c, 35, 110), 1.0 - 0.9 * 0.25, 1e-12);
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(c, 100, 110), 1.0);
}

// ---------------------------------------------------------------------------------------
// data pipeline

TEST(TrainData, EpochOrderIsAPermutationFixedBySeedAndEpoch) {
  auto a = epoch_order(1000, 1, 0), b = epoch_order(1000, 1, 0), c = epoch_order(1000, 1, 1), d = epoch_order(1000, 2, 0);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 1000u);
  EXPECT_EQ(*std::max_element(a.begin(), a.end()), 999);
}

TEST(TrainData, PrefetcherKeepsOrderBoundsTheWindowAndRethrows) {
  std::atomic<int64_t> consumed{0}, max_ahead{0};
  std::mt19937 rng(3);
  std::vector<int> delays(200);
  for (auto& d : delays) d = static_cast<int>(rng() % 300);
  OrderedPrefetcher<int64_t> p(
      200,
      [&](int64_t i) {
        int64_t ahead = i - consumed.load();
        int64_t m = max_ahead.load();
        while (ahead > m && !max_ahead.compare_exchange_weak(m, ahead)) {
        }
        std::this_thread::sleep_for(std::chrono::microseconds(delays[i]));
        if (i == 150) throw std::runtime_error("item 150 is bad");
        return i * i;
      },
      3, 5);
  for (int64_t i = 0; i < 150; ++i) {
    auto v = p.next();
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(*v, i * i);
    consumed = i + 1;
  }
  EXPECT_THROW(p.next(), std::runtime_error);
  EXPECT_LE(max_ahead.load(), 5);
  for (int64_t i = 151; i < 200; ++i) EXPECT_EQ(*p.next(), i * i);
  EXPECT_FALSE(p.next().has_value());
}

TEST(TrainData, FeatureCacheRoundTripStalenessAndEncoderIdentity) {
  TempDir dir;
  write_bytes(dir.file("a.wav"), "aaaa");
  write_bytes(dir.file("b.wav"), "bbbb");
  at::Tensor fa = at::randn({3, 4}), fb = at::randn({5});
  {
    FeatureCache cache(dir.file("cache"), "enc1", {{"kind", "test"}});
    cache.shard_items = 1;  // a shard per item
    cache.put(dir.file("a.wav"), {{"x", fa}});
    cache.put(dir.file("b.wav"), {{"y", fb}});
    cache.flush();
  }
  FeatureCache cache(dir.file("cache"), "enc1", {{"kind", "test"}});
  EXPECT_EQ(cache.size(), 2u);
  auto a = cache.get(dir.file("a.wav"));
  ASSERT_TRUE(a.has_value());
  EXPECT_TRUE(at::equal(a->at("x"), fa));
  EXPECT_TRUE(at::equal(cache.get(dir.file("b.wav"))->at("y"), fb));
  // A changed file is a stale entry.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  write_bytes(dir.file("a.wav"), "aaaaa");
  EXPECT_FALSE(cache.get(dir.file("a.wav")).has_value());
  EXPECT_EQ(cache.size(), 1u);
  // Another encoder sees nothing of it.
  FeatureCache other(dir.file("cache"), "enc2", {{"kind", "test"}});
  EXPECT_FALSE(other.get(dir.file("b.wav")).has_value());
}

TEST(TrainData, CacheIsRecomputedWhenTheEncoderConfigChanges) {
  TempDir dir;
  make_corpus(dir, 3);
  TrainConfig c = tiny_config(dir, "out");
  c.cache_dir = dir.file("cache");
  EXPECT_EQ(build_cache(c), 3);
  auto folders = [&] {
    std::set<std::string> s;
    for (const auto& e : fs::directory_iterator(dir.file("cache"))) s.insert(e.path().filename().string());
    return s;
  };
  ASSERT_EQ(folders().size(), 1u);
  const std::string first = *folders().begin();
  const auto shards_before = std::distance(fs::directory_iterator(dir.file("cache/" + first)), fs::directory_iterator{});
  build_cache(c);  // nothing new to compute
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.file("cache/" + first)), fs::directory_iterator{}), shards_before);
  // The same weights with another front end (clip length): a new cache.
  fs::create_directories(dir.file("enc"));
  fs::copy_file(fixture_dir("cnn14-tiny") + "/model.safetensors", dir.file("enc/model.safetensors"));
  Json cfg = read_json_file(fixture_dir("cnn14-tiny") + "/config.json");
  cfg["clip_seconds"] = 0.5;
  write_json_file(dir.file("enc/config.json"), cfg);
  c.encoder = dir.file("enc");
  build_cache(c);
  EXPECT_EQ(folders().size(), 2u);
  // The features differ (0.5 s clips instead of 1 s ones).
  std::set<std::string> f = folders();
  f.erase(first);
  FeatureCache a(dir.file("cache"), first, {}), b(dir.file("cache"), *f.begin(), {});
  EXPECT_NE(a.get(dir.file("c0.wav"))->at("conv_block6").size(1), b.get(dir.file("c0.wav"))->at("conv_block6").size(1));
}

TEST(TrainData, MalformedManifestAndMissingMediaAreReported) {
  TempDir dir;
  make_corpus(dir, 3);
  write_bytes(dir.file("bad.jsonl"), "{\"media\": \"c0.wav\", \"captions\": [\"x\"]}\n{\"media\": \"c1.wav\", \"captions\": [\"x\"\n");
  TrainConfig c = tiny_config(dir, "out");
  c.train_split = "bad.jsonl";
  EXPECT_NE(message_of([&] { train(c); }).find("bad.jsonl:2"), std::string::npos);
  write_bytes(dir.file("missing.jsonl"),
              "{\"media\": \"c0.wav\", \"captions\": [\"x\"]}\n{\"media\": \"gone1.wav\", \"captions\": [\"x\"]}\n"
              "{\"media\": \"gone2.wav\", \"captions\": [\"x\"]}\n");
  c.train_split = "missing.jsonl";
  const std::string msg = message_of([&] { train(c); });
  EXPECT_NE(msg.find("2 of 3 media files"), std::string::npos) << msg;
  EXPECT_NE(msg.find("gone1.wav: missing"), std::string::npos) << msg;
  EXPECT_NE(msg.find("gone2.wav: missing"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--skip-missing"), std::string::npos) << msg;
  c.skip_missing = true;
  c.epochs = 1;
  EXPECT_EQ(train(c).steps, 1);
}

// ---------------------------------------------------------------------------------------
// training runs

TEST(TrainRun, EightItemsOverfitAndTheBundleReproducesTheirCaptions) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = tiny_config(dir, "out");
  c.epochs = 120;
  TrainResult r = train(c);
  EXPECT_EQ(r.steps, 120);
  EXPECT_LT(r.last_loss, 0.05);
  Captioner cap = Captioner::load(r.bundle);
  DecodingOptions greedy = cap.default_decoding();
  greedy.beam_size = 1;
  std::vector<std::string> files;
  for (int i = 0; i < 8; ++i) files.push_back(dir.file("c" + std::to_string(i) + ".wav"));
  auto out = cap.caption_files(files, greedy);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i][0].text, kCaptions[i]) << files[i];
}

TEST(TrainRun, LossesDoNotDependOnLoaderThreads) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = tiny_config(dir, "a");
  c.epochs = 3;
  c.batch_size = 3;
  c.workers = 0;
  train(c);
  c.out = dir.file("b");
  c.workers = 3;
  c.prefetch = 2;
  train(c);
  auto a = train_losses(dir.file("a/train_log.jsonl")), b = train_losses(dir.file("b/train_log.jsonl"));
  EXPECT_EQ(a.size(), 9u);
  EXPECT_EQ(a, b);
  c.out = dir.file("c");
  c.seed = 43;  // another seed: another order (and initialisation)
  train(c);
  EXPECT_NE(train_losses(dir.file("c/train_log.jsonl")), a);
}

TEST(TrainRun, FailedCheckpointWriteKeepsThePreviousOneAndResumeFinishes) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = tiny_config(dir, "out");
  c.epochs = 6;
  c.batch_size = 4;  // 2 steps per epoch
  TrainHooks hooks;
  int writes = 0;
  hooks.on_checkpoint_write = [&](const std::string&) {
    if (++writes == 3) throw FileError("checkpoint", "No space left on device (simulated)");
  };
  EXPECT_NE(message_of([&] { train(c, hooks); }).find("No space left"), std::string::npos);
  EXPECT_EQ(read_bytes(dir.file("out/checkpoints/latest")), "step-00000004\n");
  EXPECT_FALSE(fs::exists(dir.file("out/checkpoints/step-00000006.partial")));
  c.resume = true;
  EXPECT_EQ(train(c).steps, 12);
}

TEST(TrainRun, KilledAtFixedStepsAndResumedGivesTheSameLosses) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = tiny_config(dir, "full");
  c.mapper = {{"type", "transformer"}, {"prefix_length", 4}, {"clip_length", 4}, {"num_layers", 2}};
  c.epochs = 40;
  c.batch_size = 3;
  c.grad_accum = 2;  // 3 batches per epoch: a partial accumulation group at each epoch's end
  c.lr = 1e-3;
  c.save_every_steps = 3;
  write_json_file(dir.file("cfg.json"), c.to_json());
  // Every run goes through the binary, so that all three use the same thread setup (sums
  // split over another number of threads round differently).
  const std::string train_cmd = std::string(PREFIXCAP_TRAIN_BIN) + " --config '" + dir.file("cfg.json") + "' 2>/dev/null --out ";
  ASSERT_EQ(std::system((train_cmd + "'" + dir.file("full") + "'").c_str()), 0);

  // Killed at fixed steps: 7 (between checkpoints, mid accumulation group), then, resumed,
  // at 30 (an epoch's last step) and at 61; every resume must continue exactly.
  const std::string out = dir.file("killed");
  const std::string log = out + "/train_log.jsonl";
  bool resume = false;
  for (int kill_at : {7, 30, 61}) {
    const std::string command = "PREFIXCAP_FAULT_KILL_AT_STEP=" + std::to_string(kill_at) + " " + train_cmd + "'" + out + "'" +
                                (resume ? " --resume" : "");
    const int status = std::system(command.c_str());
    // sh either execs the binary (killed by the signal) or reports it as exit status 128 + 9
    const bool killed = (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) || (WIFEXITED(status) && WEXITSTATUS(status) == 137);
    ASSERT_TRUE(killed) << "the run was not killed at step " << kill_at << " (status " << status << ")";
    ASSERT_EQ(train_losses(log).rbegin()->first, kill_at);
    resume = true;
  }
  ASSERT_EQ(std::system((train_cmd + "'" + out + "' --resume").c_str()), 0);
  const auto full = train_losses(dir.file("full/train_log.jsonl"));
  EXPECT_EQ(full.size(), 80u);
  EXPECT_EQ(train_losses(log), full);
  // A changed run cannot resume from the checkpoint.
  TrainConfig r = c;
  r.out = out;
  r.resume = true;
  r.lr = 2e-3;
  EXPECT_NE(message_of([&] { train(r); }).find("lr (was"), std::string::npos);
  // Every option that shapes the learning-rate schedule or the batches is named when it changed.
  r = c;
  r.out = out;
  r.resume = true;
  r.epochs = 50;
  r.max_steps = 90;
  r.warmup_steps = 5;
  r.batch_size = 4;
  const std::string message = message_of([&] { train(r); });
  for (const char* key : {"epochs (was", "max_steps (was", "warmup_steps (was", "batch_size (was"})
    EXPECT_NE(message.find(key), std::string::npos) << key << " not named in: " << message;
}

TEST(TrainRun, LanguageModelTaskWritesAHuggingFaceFolder) {
  TempDir dir;
  std::string text;
  for (const auto& cap : kCaptions) text += cap + "\n";
  write_bytes(dir.file("text.txt"), text);
  TrainConfig c;
  c.task = "lm";
  c.text = dir.file("text.txt");
  c.val_split = dir.file("text.txt");
  c.tokenizer = fixture_dir("gpt2-tokenizer");
  c.lm_config = {{"n_layer", 1}, {"n_embd", 32}, {"n_head", 2}, {"n_positions", 32}};
  c.out = dir.file("out");
  c.epochs = 60;
  c.batch_size = 8;
  c.lr = 1e-2;
  c.progress = false;
  TrainResult r = train(c);
  EXPECT_LT(r.last_loss, 1.5);  // from ln(50257) = 10.8
  Gpt2Model lm = load_gpt2(r.bundle);
  EXPECT_EQ(lm->config().n_embd, 32);
  auto tok = Gpt2Tokenizer::from_folder(r.bundle);
  EXPECT_EQ(tok.encode("a dog barks."), Gpt2Tokenizer::from_folder(fixture_dir("gpt2-tokenizer")).encode("a dog barks."));
  EXPECT_TRUE(fs::exists(dir.file("out/best/model.safetensors")));
}

TEST(TrainRun, NewEncoderTrainsFirstThenStaysFrozen) {
  TempDir dir;
  make_corpus(dir);
  Json cfg = read_json_file(fixture_dir("cnn14-tiny") + "/config.json");
  cfg["clip_seconds"] = 1.0;
  write_json_file(dir.file("new-cnn14.json"), cfg);
  TrainConfig c = tiny_config(dir, "out");
  c.encoder = dir.file("new-cnn14.json");  // a config alone: a new CNN14
  c.encoder_train_epochs = 2;
  c.epochs = 4;
  c.batch_size = 4;
  c.val_split = "train.jsonl";
  c.val_max_items = 2;
  TrainResult r = train(c);
  EXPECT_EQ(r.steps, 8);
  // Features were cached once, after the encoder froze (a moving encoder would need a new
  // cache every epoch).
  int folders = 0;
  for (const auto& e : fs::directory_iterator(dir.file("out/cache"))) folders += e.is_directory();
  EXPECT_EQ(folders, 1);
  // The bundle's encoder is the trained one, not the initial one.
  Captioner a = Captioner::load(r.bundle);
  at::manual_seed(static_cast<uint64_t>(c.seed));
  Cnn14 initial(Cnn14Config::from_file(c.encoder));
  EXPECT_FALSE(at::equal(a.cnn14->fc1->weight, initial->fc1->weight));
}

TEST(TrainRun, Bfloat16LmTrainsAndTheBundleStaysFloat32) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = tiny_config(dir, "out");
  c.lm_dtype = "bfloat16";
  c.epochs = 40;
  TrainResult r = train(c);
  auto losses = train_losses(dir.file("out/train_log.jsonl"));
  EXPECT_LT(losses.rbegin()->second, losses.begin()->second / 5);
  Captioner cap = Captioner::load(r.bundle);
  EXPECT_EQ(cap.lm->wte->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(cap.lm->wte->weight, load_gpt2(fixture_dir("gpt2-tiny"))->wte->weight));
}

TEST(TrainCli, HelpShowsDefaultsAndBadConfigsAreRefusedByName) {
  TempDir dir;
  auto run = [&](const std::string& args) {
    const std::string out = dir.file("out.txt");
    int rc = std::system((std::string(PREFIXCAP_TRAIN_BIN) + " " + args + " >" + out + " 2>&1").c_str());
    return std::make_pair(WEXITSTATUS(rc), read_bytes(out));
  };
  auto [rc, text] = run("--help");
  EXPECT_EQ(rc, 0);
  EXPECT_NE(text.find("--batch-size INT=32"), std::string::npos) << text;
  EXPECT_NE(text.find("--schedule TEXT=cosine"), std::string::npos);
  EXPECT_NE(text.find("--resume"), std::string::npos);
  write_bytes(dir.file("cfg.json"), "{\"epochs\": 3, \"batchsize\": 8}");
  std::tie(rc, text) = run("--config " + dir.file("cfg.json"));
  EXPECT_EQ(rc, 1);
  EXPECT_NE(text.find("unknown key 'batchsize'"), std::string::npos) << text;
  write_bytes(dir.file("cfg.json"), "{\"epochs\": \"3\"}");
  std::tie(rc, text) = run("--config " + dir.file("cfg.json"));
  EXPECT_EQ(rc, 1);
  EXPECT_NE(text.find("'epochs' must be an integer"), std::string::npos) << text;
  std::tie(rc, text) = run("--out x --batch-size 8x");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(text.find("'8x' is not an integer"), std::string::npos) << text;
  // The command line wins over the file.
  write_bytes(dir.file("cfg.json"), "{\"epochs\": 3, \"lr\": 0.5}");
  std::tie(rc, text) = run("--config " + dir.file("cfg.json") + " --epochs 7 --print-config");
  EXPECT_EQ(rc, 0);
  Json printed = Json::parse(text);
  EXPECT_EQ(printed["epochs"], 7);
  EXPECT_EQ(printed["lr"], 0.5);
}

// bf16 autocast for the forward pass: it trains (the loss falls as in fp32), its first loss is
// within bf16 rounding of fp32's, and the bundle's weights stay float32.
TEST(TrainRun, Bf16AutocastTrainsCloseToFp32) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig fp32 = tiny_config(dir, "fp32");
  fp32.epochs = 40;
  TrainConfig bf16 = fp32;
  bf16.out = dir.file("bf16");
  bf16.precision = "bf16";
  train(fp32);
  TrainResult r = train(bf16);
  const auto a = train_losses(dir.file("fp32/train_log.jsonl")), b = train_losses(dir.file("bf16/train_log.jsonl"));
  EXPECT_NEAR(b.begin()->second, a.begin()->second, 0.05 * a.begin()->second);
  EXPECT_NE(b.begin()->second, a.begin()->second);  // autocast really ran in bf16
  EXPECT_LT(b.rbegin()->second, b.begin()->second / 5);
  Captioner cap = Captioner::load(r.bundle);
  EXPECT_EQ(cap.mapper->parameters()[0].scalar_type(), at::kFloat);
  bf16.precision = "fp16";
  EXPECT_THROW(bf16.validate(), ConfigError);
}
