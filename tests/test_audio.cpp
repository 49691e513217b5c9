// Audio path beyond the golden cases: streaming, windows, clip length, bad inputs.
#include <gtest/gtest.h>

#include <sndfile.h>

#include <cmath>

#include <c10/core/InferenceMode.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/feature_kernels_cpu.h"
#include "encoders/log_mel.h"
#include "encoders/cnn14.h"
#include "pipeline/audio_decode.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::error_of;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;

namespace {
std::string audio(const std::string& name) { return fixture_dir("audio-decode") + "/" + name; }

}  // namespace

TEST(AudioDecode, StreamingInChunksEqualsWholeFileDecode) {
  Waveform whole = decode_audio(audio("leaves_48k_s16_stereo.flac"));
  AudioReader reader(audio("leaves_48k_s16_stereo.flac"));
  std::vector<float> streamed;
  size_t calls = 0;
  while (reader.read(streamed, 1000) > 0) ++calls;
  EXPECT_GT(calls, 50u);
  ASSERT_EQ(streamed.size(), whole.samples.size());
  for (size_t i = 0; i < streamed.size(); ++i) ASSERT_EQ(streamed[i], whole.samples[i]) << i;
  EXPECT_EQ(reader.position(), static_cast<int64_t>(streamed.size()));
  EXPECT_EQ(reader.info().sample_rate, 48000);
  EXPECT_NEAR(reader.info().duration_s, 3.0, 1e-9);
}

TEST(AudioDecode, WindowsCutTheRequestedSpan) {
  Waveform whole = decode_audio(audio("leaves_44k1_s16_stereo.wav"), {0});
  AudioDecodeOptions opt;
  opt.target_rate = 0;
  opt.start_s = 1.0;
  opt.duration_s = 0.5;
  Waveform part = decode_audio(audio("leaves_44k1_s16_stereo.wav"), opt);
  ASSERT_EQ(part.samples.size(), 22050u);
  for (size_t i = 0; i < part.samples.size(); ++i) ASSERT_EQ(part.samples[i], whole.samples[44100 + i]);
}

TEST(AudioDecode, DownmixIsTheMeanOfTheChannels) {
  AudioDecodeOptions stereo;
  stereo.target_rate = 0;
  stereo.mono = false;
  Waveform s = decode_audio(audio("leaves_44k1_s16_stereo.wav"), stereo);
  Waveform m = decode_audio(audio("leaves_44k1_s16_stereo.wav"), {0});
  ASSERT_EQ(s.channels, 2);
  ASSERT_EQ(m.samples.size() * 2, s.samples.size());
  for (size_t i = 0; i < m.samples.size(); i += 997)
    EXPECT_FLOAT_EQ(m.samples[i], (s.samples[2 * i] + s.samples[2 * i + 1]) / 2) << i;
}

TEST(AudioDecode, CorruptAndMissingTracksAreReported) {
  TempDir dir;
  // A video (here: a still image stream) without any audio track.
  std::string msg = error_of([&] { decode_audio(fixture_dir("clip-vit-tiny") + "/rocket.jpg"); });
  EXPECT_NE(msg.find("no decodable audio track"), std::string::npos) << msg;
  // MP3 cut in half: the Xing header announces 3 s.
  std::string mp3 = read_bytes(audio("leaves_44k1_stereo.mp3"));
  write_bytes(dir.file("cut.mp3"), mp3.substr(0, mp3.size() / 2));
  msg = error_of([&] { decode_audio(dir.file("cut.mp3")); });
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  // Ogg Vorbis cut in half.
  std::string ogg = read_bytes(audio("leaves_44k1_stereo_vorbis.ogg"));
  write_bytes(dir.file("cut.ogg"), ogg.substr(0, ogg.size() / 2));
  msg = error_of([&] { decode_audio(dir.file("cut.ogg")); });
  EXPECT_FALSE(msg.empty()) << "a cut Ogg file decoded without an error";
  // Garbage in the middle of an Ogg file.
  std::string bad = ogg;
  for (size_t i = bad.size() / 3; i < bad.size() / 3 + 4000; ++i) bad[i] = static_cast<char>(i * 7919);
  write_bytes(dir.file("garbage.ogg"), bad);
  msg = error_of([&] { decode_audio(dir.file("garbage.ogg")); });
  EXPECT_FALSE(msg.empty()) << "a corrupt Ogg file decoded without an error";
  // Missing file, folder.
  EXPECT_NE(error_of([&] { decode_audio(dir.file("nope.wav")); }).find("cannot open"), std::string::npos);
}

TEST(AudioDecode, LongFileStreamsWithBoundedMemory) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's quarantine keeps freed memory resident";
#endif
  // 10 minutes of 48 kHz stereo FLAC, read in 1 s chunks at 32 kHz: the reader's buffer
  // never holds more than a few chunks.
  TempDir dir;
  SF_INFO info{};
  info.samplerate = 48000;
  info.channels = 2;
  info.format = SF_FORMAT_FLAC | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(dir.file("long.flac").c_str(), SFM_WRITE, &info);
  ASSERT_NE(f, nullptr);
  std::vector<short> block(48000 * 2);
  for (int s = 0; s < 600; ++s) {
    for (int i = 0; i < 48000; ++i) block[2 * i] = block[2 * i + 1] = static_cast<short>(8000 * std::sin(i * 0.05 + s));
    sf_writef_short(f, block.data(), 48000);
  }
  sf_close(f);
  auto rss_mb = [] {
    long pages = 0, resident = 0;
    FILE* statm = std::fopen("/proc/self/statm", "r");
    if (statm) {
      if (std::fscanf(statm, "%ld %ld", &pages, &resident) != 2) resident = 0;
      std::fclose(statm);
    }
    return resident * 4096.0 / 1e6;
  };
  AudioReader reader(dir.file("long.flac"));
  std::vector<float> chunk;
  int64_t total = 0;
  const double before = rss_mb();
  double peak = before;
  while (true) {
    chunk.clear();
    size_t n = reader.read(chunk, 32000);
    if (n == 0) break;
    total += n;
    peak = std::max(peak, rss_mb());
  }
  EXPECT_NEAR(static_cast<double>(total), 600.0 * 32000, 2);
  // The whole output would be 77 MB of floats; streaming keeps a few chunks.
  EXPECT_LT(peak - before, 30.0);
}

TEST(Cnn14, ClipLengthPolicyPadsOrCuts) {
  std::vector<float> x(100, 1.0f);
  auto padded = fit_clip_length(x, 50, 3.0);
  ASSERT_EQ(padded.size(), 150u);
  EXPECT_EQ(padded[99], 1.0f);
  EXPECT_EQ(padded[100], 0.0f);
  EXPECT_EQ(fit_clip_length(x, 50, 1.0).size(), 50u);
  EXPECT_EQ(fit_clip_length(x, 50, 0).size(), 100u);
}

TEST(Cnn14, ConfigAndShapeErrorsAreClear) {
  TempDir dir;
  write_bytes(dir.file("config.json"), R"({"model_type":"cnn14","channels":[4,8,16]})");
  EXPECT_THROW(Cnn14Config::from_file(dir.file("config.json")), ConfigError);
  write_bytes(dir.file("config.json"), R"({"model_type":"cnn14","fmin":15000,"fmax":14000})");
  EXPECT_THROW(Cnn14Config::from_file(dir.file("config.json")), ConfigError);
  Cnn14Config c = Cnn14Config::from_file(fixture_dir("cnn14-tiny") + "/config.json");
  c.channels[5] = 256;
  Cnn14 model(c);
  try {
    model->load_weights(load_safetensors(fixture_dir("cnn14-tiny") + "/model.safetensors"), "model.safetensors");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'conv_block6.conv1.weight': expected [256, 64, 3, 3], got [128, 64, 3, 3]"),
              std::string::npos)
        << e.what();
  }
  Cnn14 tiny = load_cnn14(fixture_dir("cnn14-tiny"));
  EXPECT_THROW(tiny->forward(at::zeros({1, 3200})), c10::Error);  // 0.1 s: too short for five poolings
}

TEST(AudioDecode, WindowSpansCoverTheRecording) {
  auto spans = window_spans(25.0, 10.0, 10.0);
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_DOUBLE_EQ(spans[2].first, 20.0);
  EXPECT_DOUBLE_EQ(spans[2].second, 25.0);
  auto overlapping = window_spans(12.0, 10.0, 5.0);
  ASSERT_EQ(overlapping.size(), 2u);
  EXPECT_DOUBLE_EQ(overlapping[1].first, 5.0);
  EXPECT_DOUBLE_EQ(overlapping[1].second, 12.0);
  EXPECT_EQ(window_spans(4.0, 10.0, 10.0).size(), 1u);
  EXPECT_TRUE(window_spans(0.0, 10.0, 10.0).empty());
  EXPECT_THROW(window_spans(10.0, 10.0, 0.0), std::invalid_argument);
}

// Prefix-AAC's encoder is Cnn14(sample_rate=16000, window_size=512, hop_size=320, mel_bins=64,
// fmin=50, fmax=14000): fmax above the 8 kHz Nyquist frequency. librosa accepts it and leaves
// the filters above Nyquist empty; the numbers below are the prefix-aac-tiny fixture's, measured
// with librosa/torchlibrosa (cases.json "checks.melW").
TEST(LogMel, FmaxAboveNyquistFollowsLibrosa) {
  const Json fixture = read_json_file(fixture_dir("prefix-aac-tiny") + "/cases.json");
  const Json& checks = fixture.at("checks").at("melW");
  const Json cfg = {{"sample_rate", 16000}, {"window_size", 512}, {"hop_size", 320}, {"mel_bins", 64}, {"fmin", 50}, {"fmax", 14000}};
  LogMelConfig c = LogMelConfig::from_json(cfg, "prefix-aac config");
  EXPECT_EQ(empty_mel_filters(c), checks.at("constructor_fmax14000_empty_filters").get<std::vector<int64_t>>());
  // The checkpoint stores Cnn14_16k's filterbank (fmax 8000) as melW [freq, mel].
  TensorMap weights = load_weight_file(fixture_dir("prefix-aac-tiny") + "/prefix_aac_tiny.pt");
  const at::Tensor stored = weights.at("audio_encoder.logmel_extractor.melW").to(at::kDouble).t();
  const double vs_constructor = (slaney_mel_filterbank(c) - stored).abs().max().item<double>();
  EXPECT_NEAR(vs_constructor, checks.at("stored_vs_constructor_fmax14000_max_abs").get<double>(), 1e-6);
  LogMelConfig c8 = c;
  c8.fmax = 8000;
  EXPECT_LT((slaney_mel_filterbank(c8) - stored).abs().max().item<double>(), 1e-7);
  // A whole CNN14 with that config loads and runs (the empty filters give -100 dB bands).
  Json cnn = cfg;
  cnn["model_type"] = "cnn14";
  cnn["channels"] = {4, 8, 16, 32, 64, 128};
  cnn["embedding_dim"] = 128;
  Cnn14 model(Cnn14Config::from_json(cnn, "cnn14 config"));
  torch::NoGradGuard no_grad;
  at::Tensor logmel = model->front_end->forward(at::randn({1, 16000}));
  EXPECT_EQ(logmel.size(-1), 64);
  EXPECT_LT((logmel.narrow(-1, 55, 9) + 100).abs().max().item<double>(), 1e-3);
  // Still refused: fmin >= fmax, negative fmin, fmin at or above Nyquist.
  for (const Json& bad : {Json{{"fmin", 9000}, {"fmax", 8000}}, Json{{"fmin", -1}, {"fmax", 8000}},
                          Json{{"fmin", 8000}, {"fmax", 14000}}}) {
    Json j = cfg;
    j.update(bad);
    EXPECT_THROW(LogMelConfig::from_json(j, "bad config"), ConfigError) << bad.dump();
  }
}

// PANNs publish legacy (non-zip) torch.save files: torch-legacy's cnn14-legacy.pth holds
// cnn14-tiny's weights that way and must reproduce cnn14-tiny's golden outputs.
TEST(Cnn14, LegacyTorchSaveCheckpointReproducesTheGoldenOutputs) {
  Cnn14 model(Cnn14Config::from_file(fixture_dir("cnn14-tiny") + "/config.json"));
  const std::string path = fixture_dir("torch-legacy") + "/cnn14-legacy.pth";
  model->load_weights(load_weight_file(path), path);
  model->freeze();
  SafetensorsFile golden(fixture_dir("cnn14-tiny") + "/golden.safetensors");
  torch::NoGradGuard no_grad;
  Cnn14Output out = model->forward(golden.tensor("rec.waveform"));
  for (const auto& [name, got] : std::vector<std::pair<std::string, at::Tensor>>{
           {"rec.embedding", out.embedding}, {"rec.clipwise_output", out.clipwise_output}}) {
    at::Tensor expected = golden.tensor(name);
    const double excess = ((got.to(at::kDouble) - expected).abs() - (1e-4 + 1e-3 * expected.abs())).max().item<double>();
    EXPECT_LE(excess, 0) << name;  // cnn14-tiny's default tolerance: atol 1e-4, rtol 1e-3
  }
}

// The CUDA log-mel kernels' algorithm (encoders/feature_kernels.h, run on the CPU) equals the CPU
// front end on configs the fixtures do not cover: 16 kHz (Prefix-AAC), fmax above Nyquist (empty
// filters), top_db, ref != 1, silence (the amin floor), lengths not a multiple of the hop, a
// batch. Tolerance: the mel-frontend fixture's 1e-3 dB (the dense and the sparse mel sums add in
// different orders).
TEST(LogMel, KernelMathEqualsTheCpuFrontEnd) {
  std::vector<Json> configs = {
      Json::object(),
      {{"sample_rate", 16000}, {"window_size", 512}, {"hop_size", 160}, {"mel_bins", 64}, {"fmin", 50}, {"fmax", 8000}},
      {{"sample_rate", 16000}, {"window_size", 512}, {"hop_size", 320}, {"mel_bins", 64}, {"fmin", 50}, {"fmax", 14000}},
      {{"top_db", 80.0}, {"ref", 2.0}},
      {{"window_size", 400}, {"hop_size", 123}, {"mel_bins", 40}, {"top_db", 0.0}},
  };
  at::manual_seed(3);
  for (const Json& j : configs) {
    const LogMelConfig c = LogMelConfig::from_json(j, "config");
    const int64_t n = c.sample_rate + 77;
    at::Tensor wave = at::randn({3, n}) * 0.1;
    wave[1].zero_();  // silence
    wave[2] = at::sin(at::arange(n, at::kFloat) * 0.05f);
    LogMelFrontEnd front_end(c);
    const at::Tensor cpu = front_end->forward(wave);
    const at::Tensor kernel = log_mel_kernel_math(wave, c);
    ASSERT_EQ(kernel.sizes(), cpu.sizes()) << j.dump();
    EXPECT_LT((kernel - cpu).abs().max().item<double>(), 1e-3) << j.dump();
    // The sparse filter tables hold exactly the filterbank's non-zero weights.
    const SparseMelFilters mel = sparse_mel_filters(c);
    const at::Tensor dense = slaney_mel_filterbank(c).to(at::kFloat);
    at::Tensor rebuilt = at::zeros_like(dense);
    for (int64_t m = 0; m < c.mel_bins; ++m)
      for (int32_t k = 0; k < mel.count[m]; ++k) rebuilt[m][mel.first[m] + k] = mel.weights[mel.offset[m] + k];
    EXPECT_TRUE(rebuilt.equal(dense)) << j.dump();
  }
}

namespace {
// max(|got - expected| - (atol + rtol |expected|)): <= 0 when within the tolerance.
double excess_over(const at::Tensor& got, const at::Tensor& expected, double atol, double rtol) {
  return ((got.to(at::kDouble) - expected.to(at::kDouble)).abs() - (atol + rtol * expected.to(at::kDouble).abs()))
      .max()
      .item<double>();
}
const std::vector<Cnn14ConvPath> kConvPaths = {Cnn14ConvPath::Reference, Cnn14ConvPath::Nchw, Cnn14ConvPath::ChannelsLast,
                                               Cnn14ConvPath::Gemm, Cnn14ConvPath::Auto};
}  // namespace

// Every conv path (BatchNorm folded or not; NCHW, channels-last, im2col + GEMM, and Auto's mix)
// reproduces cnn14-tiny's golden blocks and outputs within its stated tolerance (atol 1e-4,
// rtol 1e-3), on both single-clip cases.
TEST(Cnn14, EveryConvPathReproducesTheGoldenOutputs) {
  Cnn14 model = load_cnn14(fixture_dir("cnn14-tiny"));
  SafetensorsFile golden(fixture_dir("cnn14-tiny") + "/golden.safetensors");
  torch::NoGradGuard no_grad;
  for (Cnn14ConvPath path : kConvPaths) {
    model->set_conv_path(path);
    for (const std::string c : {"rec", "noise"}) {
      SCOPED_TRACE(std::string(cnn14_conv_path_name(path)) + " " + c);
      Cnn14Output out = model->forward(golden.tensor(c + ".waveform"), /*keep_blocks=*/true);
      ASSERT_EQ(out.blocks.size(), 6u);
      for (int i = 0; i < 6; ++i)
        EXPECT_LE(excess_over(out.blocks[i], golden.tensor(c + ".conv_block" + std::to_string(i + 1)), 1e-4, 1e-3), 0) << i + 1;
      EXPECT_LE(excess_over(out.temporal_features.transpose(1, 2), golden.tensor(c + ".temporal_features"), 1e-4, 1e-3), 0);  // upstream [B, C, T']
      EXPECT_LE(excess_over(out.embedding, golden.tensor(c + ".embedding"), 1e-4, 1e-3), 0);
      EXPECT_LE(excess_over(out.clipwise_output, golden.tensor(c + ".clipwise_output"), 1e-4, 1e-3), 0);
    }
  }
}

// Batches take other branches (one GEMM over every clip's positions); each path's batch equals
// the reference path's (itself checked against the golden data) to float32 rounding, and the
// folded weights follow the module: an in-place change to a BatchNorm statistic, a move to
// float64 and a reload are all seen by the next forward.
TEST(Cnn14, FoldedPathsFollowTheReferenceAndItsWeights) {
  Cnn14 model = load_cnn14(fixture_dir("cnn14-tiny"));
  torch::NoGradGuard no_grad;
  torch::manual_seed(3);
  const at::Tensor batch = at::randn({3, 40000}) * 0.2;
  auto reference = [&](const at::Tensor& x) {
    model->set_conv_path(Cnn14ConvPath::Reference);
    return model->forward(x).embedding;
  };
  auto relative_error = [](const at::Tensor& a, const at::Tensor& b) {
    return ((a - b).abs().max() / b.abs().max()).item<double>();
  };
  const at::Tensor expected = reference(batch);
  for (Cnn14ConvPath path : kConvPaths) {
    model->set_conv_path(path);
    EXPECT_LT(relative_error(model->forward(batch).embedding, expected), 1e-5) << cnn14_conv_path_name(path);
  }
  model->set_conv_path(Cnn14ConvPath::Auto);
  model->forward(batch);  // folds
  model->conv_blocks[3]->bn2->running_var.mul_(4.0);
  const at::Tensor changed = reference(batch);
  ASSERT_GT(relative_error(changed, expected), 1e-3);  // the change matters
  model->set_conv_path(Cnn14ConvPath::Auto);
  EXPECT_LT(relative_error(model->forward(batch).embedding, changed), 1e-5);

  model->load_weights(load_weight_file(fixture_dir("cnn14-tiny") + "/model.safetensors"), "model.safetensors");
  EXPECT_LT(relative_error(model->forward(batch).embedding, expected), 1e-5);

  model->to(at::kDouble);
  const at::Tensor in_double = reference(batch.to(at::kDouble));
  model->set_conv_path(Cnn14ConvPath::Auto);
  const at::Tensor auto_double = model->forward(batch.to(at::kDouble)).embedding;
  EXPECT_EQ(auto_double.scalar_type(), at::kDouble);
  EXPECT_LT(relative_error(auto_double, in_double), 1e-12);
}

// A model built and run under c10::InferenceMode (inference tensors carry no version counter)
// folds and runs like any other.
TEST(Cnn14, AModelMadeUnderInferenceModeRunsFolded) {
  c10::InferenceMode inference;
  Cnn14 model = load_cnn14(fixture_dir("cnn14-tiny"));
  SafetensorsFile golden(fixture_dir("cnn14-tiny") + "/golden.safetensors");
  EXPECT_LE(excess_over(model->forward(golden.tensor("rec.waveform")).embedding, golden.tensor("rec.embedding"), 1e-4, 1e-3), 0);
}

TEST(Cnn14, ConvPathNamesRoundTripAndUnknownOnesAreRefused) {
  for (Cnn14ConvPath path : kConvPaths) EXPECT_EQ(parse_cnn14_conv_path(cnn14_conv_path_name(path)), path);
  EXPECT_NE(prefixcap::testing::message_of([] { parse_cnn14_conv_path("winograd"); }).find("auto, reference"), std::string::npos);
}

// --encoder-dtype int8-dynamic on cnn14-tiny (golden outputs from PANNs' code; its widths are
// 4-128, so the three convs with >= 64 input channels run in integers): per clip the embedding and
// every frame of conv_block6 and of the temporal features within cosine 0.999 of upstream's
// (issue 19's gate; measured 0.99990-0.99997), the embedding's largest difference within 3 % of
// its largest value; a batch of three equals the clips one by one (the early blocks run clip by
// clip); the packed weights follow an in-place change of a statistic; back to float32, the
// fixture's tolerance again; other types are refused by name.
TEST(Cnn14, Int8DynamicStaysWithinTheAccuracyGate) {
  Cnn14 model = load_cnn14(fixture_dir("cnn14-tiny"));
  SafetensorsFile golden(fixture_dir("cnn14-tiny") + "/golden.safetensors");
  torch::NoGradGuard no_grad;
  model->set_compute_dtype(WeightDtype::Int8Dynamic);
  EXPECT_EQ(model->compute_dtype(), WeightDtype::Int8Dynamic);
  auto min_cosine = [](const at::Tensor& a, const at::Tensor& b) {
    return at::cosine_similarity(a.flatten(1).to(at::kDouble), b.flatten(1).to(at::kDouble), 1).min().item<double>();
  };
  for (const std::string c : {"rec", "noise"}) {
    SCOPED_TRACE(c);
    const Cnn14Output out = model->forward(golden.tensor(c + ".waveform"));
    const at::Tensor embedding = golden.tensor(c + ".embedding");
    const double cos_embedding = min_cosine(out.embedding, embedding);
    const double cos_block6 = min_cosine(out.conv_block6, golden.tensor(c + ".conv_block6"));
    const double cos_temporal = min_cosine(out.temporal_features.transpose(1, 2), golden.tensor(c + ".temporal_features"));
    EXPECT_GT(cos_embedding, 0.999);
    EXPECT_GT(cos_block6, 0.999);
    EXPECT_GT(cos_temporal, 0.999);
    EXPECT_LT((out.embedding - embedding).abs().max().item<double>(), 0.03 * embedding.abs().max().item<double>());
    EXPECT_GT(excess_over(out.embedding, embedding, 1e-6, 1e-6), 0);  // it did run the integer products
    std::cout << c << ": int8-dynamic vs upstream cosine: embedding " << cos_embedding << ", conv_block6 " << cos_block6
              << ", temporal " << cos_temporal << "\n";
  }
  torch::manual_seed(5);
  const at::Tensor batch = at::randn({3, 40000}) * 0.2;
  const at::Tensor batched = model->forward(batch).embedding;
  for (int64_t b = 0; b < 3; ++b)
    EXPECT_TRUE(at::allclose(batched[b], model->forward(batch.narrow(0, b, 1)).embedding[0], 1e-5, 1e-6)) << b;
  model->conv_blocks[3]->bn2->running_var.mul_(4.0);
  const at::Tensor changed = model->forward(batch).embedding;
  EXPECT_FALSE(at::allclose(changed, batched, 1e-3, 1e-3));
  model->set_compute_dtype(WeightDtype::Float32);
  model->set_conv_path(Cnn14ConvPath::Reference);
  EXPECT_GT(min_cosine(changed, model->forward(batch).embedding), 0.999);  // the packed weights saw the change
  model->conv_blocks[3]->bn2->running_var.div_(4.0);
  model->set_conv_path(Cnn14ConvPath::Auto);
  EXPECT_LE(excess_over(model->forward(golden.tensor("rec.waveform")).embedding, golden.tensor("rec.embedding"), 1e-4, 1e-3), 0);
  EXPECT_NE(prefixcap::testing::message_of([&] { model->set_compute_dtype(WeightDtype::Int8); }).find("float32 or int8-dynamic"),
            std::string::npos);
}
