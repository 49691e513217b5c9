// Mappers (finite-difference gradients), captioner bundles (round trip through the public
// Captioner API, bad bundles) and the imported anchors' checkpoints captioning fixture media.
#include <gtest/gtest.h>

#include <filesystem>

#include <torch/autograd.h>
#include <torch/types.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "encoders/image_preprocess.h"
#include "mapper/mappers.h"
#include "pipeline/checkpoint_import.h"
#include "tests/test_bundles.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;
namespace fs = std::filesystem;

namespace {

// Checks d(sum(out * w))/d(param) from autograd against central differences, in float64.
void expect_gradients_match(MapperImpl& mapper, const MapperInput& input, const std::string& what) {
  mapper.to(at::kDouble);
  mapper.eval();
  at::Tensor weights = at::randn(mapper.forward(input).sizes(), at::TensorOptions().dtype(at::kDouble));
  auto loss_of = [&] { return (mapper.forward(input) * weights).sum(); };
  for (auto& p : mapper.parameters()) {
    p.set_requires_grad(true);
    p.mutable_grad() = at::Tensor();
  }
  loss_of().backward();
  torch::NoGradGuard no_grad;
  int checked = 0;
  for (const auto& item : mapper.named_parameters()) {
    at::Tensor p = item.value();
    at::Tensor flat = p.view(-1);
    for (int64_t i : {int64_t(0), flat.numel() / 2, flat.numel() - 1}) {
      const double eps = 1e-6, saved = flat[i].item<double>();
      flat[i] = saved + eps;
      double up = loss_of().item<double>();
      flat[i] = saved - eps;
      double down = loss_of().item<double>();
      flat[i] = saved;
      double numeric = (up - down) / (2 * eps);
      double analytic = p.grad().view(-1)[i].item<double>();
      EXPECT_NEAR(analytic, numeric, 1e-6 + 1e-5 * std::fabs(numeric)) << what << " " << item.key() << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << what;
}

MapperInput random_input(const MapperConfig& c, int64_t B) {
  auto o = at::TensorOptions().dtype(at::kDouble);
  MapperInput in;
  in.embedding = at::randn({B, c.input_dim}, o);
  in.tokens = at::randn({B, 5, c.input_dim}, o);
  in.conv_block6 = at::rand({B, c.input_dim, 6, 2}, o);
  in.clipwise = at::rand({B, c.classes_num}, o);
  if (c.context_dim > 0) in.context = at::randn({B, c.context_dim}, o);
  return in;
}

}  // namespace

TEST(Mappers, FiniteDifferenceGradients) {
  torch::manual_seed(3);
  MapperConfig mlp;
  mlp.type = "mlp";
  mlp.input_dim = 6;
  mlp.embed_dim = 8;
  mlp.prefix_length = 3;
  expect_gradients_match(*make_mapper(mlp), random_input(mlp, 2), "mlp");

  MapperConfig tr = mlp;
  tr.type = "transformer";
  tr.clip_length = 3;
  tr.num_layers = 2;
  tr.num_heads = 2;
  expect_gradients_match(*make_mapper(tr), random_input(tr, 2), "transformer");

  MapperConfig aac = tr;
  aac.type = "prefix_aac";
  aac.input_dim = 4;
  aac.temporal_prefix_length = 3;
  aac.global_prefix_length = 2;
  aac.temporal_num_layers = 1;
  aac.global_num_layers = 1;
  aac.classes_num = 9;
  aac.max_positions = 16;
  expect_gradients_match(*make_mapper(aac), random_input(aac, 2), "prefix_aac");

  MapperConfig query = tr;
  query.type = "query_guided";
  query.context_dim = 3;
  expect_gradients_match(*make_mapper(query), random_input(query, 2), "query_guided");
}

// Captioning one or a few inputs, the MLP mapper multiplies with the skinny kernel (no
// gradient wanted); it gives what the Sequential gives with autograd on, at ClipCap COCO's
// widths (the AVX-512 kernel) and at widths that are not multiples of 16 (the tails).
TEST(Mappers, MlpInferenceRowsEqualTheAutogradPath) {
  torch::manual_seed(8);
  for (int64_t input_dim : {int64_t(512), int64_t(37)}) {
    MapperConfig c;
    c.type = "mlp";
    c.input_dim = input_dim;
    c.embed_dim = input_dim == 512 ? 768 : 24;
    c.prefix_length = input_dim == 512 ? 10 : 3;
    auto mapper = make_mapper(c);
    mapper->eval();
    for (int64_t rows : {int64_t(1), int64_t(5)}) {
      MapperInput in;
      in.embedding = at::randn({rows, input_dim});
      at::Tensor inference;
      {
        torch::NoGradGuard no_grad;
        inference = mapper->forward(in);
      }
      const at::Tensor reference = mapper->forward(in);  // parameters want gradients: BLAS through autograd
      ASSERT_TRUE(reference.requires_grad());
      ASSERT_EQ(inference.sizes(), reference.sizes());
      EXPECT_LE((inference - reference.detach()).abs().max().item<double>(), 1e-5) << input_dim << " " << rows;
    }
  }
}

TEST(Mappers, KvPrefixHeadGivesPeftLayout) {
  Gpt2Config lm = Gpt2Config::from_file(fixture_dir("gpt2-tiny") + "/config.json");
  torch::manual_seed(5);
  KvPrefixHead head(8, lm);
  at::Tensor prefix = at::randn({2, 3, 8});
  auto layers = head->forward(prefix);
  ASSERT_EQ(static_cast<int64_t>(layers.size()), lm.n_layer);
  EXPECT_EQ(layers[0].key.sizes(), (std::vector<int64_t>{2, lm.n_head, 3, lm.head_dim()}));
  // Same layout as PEFT's prompt_embeddings for every batch row.
  auto peft = kv_prefix_from_prompt_embeddings(head->proj(prefix[1]), lm, 1);
  // (a batched and a single-row projection may round differently in the last bit)
  for (int64_t l = 0; l < lm.n_layer; ++l) {
    EXPECT_TRUE(at::allclose(layers[l].key[1], peft[l].key[0], 1e-5, 1e-6));
    EXPECT_TRUE(at::allclose(layers[l].value[1], peft[l].value[0], 1e-5, 1e-6));
  }
}

TEST(Mappers, ConfigErrors) {
  EXPECT_THROW(MapperConfig::from_json({{"type", "lstm"}}, "m.json"), ConfigError);
  EXPECT_THROW(MapperConfig::from_json({{"type", "mlp"}, {"prefix_lenght", 4}}, "m.json"), ConfigError);
  EXPECT_THROW(MapperConfig::from_json({{"type", "mlp"}, {"embed_dim", 10}, {"num_heads", 3}}, "m.json"), ConfigError);
  MapperConfig c = MapperConfig::from_json({{"type", "query_guided"}, {"context_dim", 4}, {"input_dim", 6}, {"embed_dim", 8}, {"num_heads", 2}}, "m");
  auto mapper = make_mapper(c);
  MapperInput in;
  in.tokens = at::randn({1, 3, 6});
  EXPECT_THROW(mapper->forward(in), c10::Error);  // context configured but missing
}

namespace {
std::vector<int64_t> golden_row(const std::string& fixture, const std::string& tensor, int64_t row, int64_t beam) {
  SafetensorsFile golden(fixture_dir(fixture) + "/golden.safetensors");
  at::Tensor t = golden.tensor(tensor);
  at::Tensor r = t.dim() == 3 ? t[row][beam] : t[beam];
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < r.numel(); ++i)
    if (r[i].item<int64_t>() >= 0) ids.push_back(r[i].item<int64_t>());
  return ids;
}
}  // namespace

TEST(Captioner, ImportedClipCapBundleCaptionsTheFixtureImage) {
  TempDir dir;
  ImportOptions o;
  o.tokenizer_dir = fixture_dir("gpt2-tiny");
  o.gpt2_config = fixture_dir("gpt2-tiny") + "/config.json";
  o.clip_dir = fixture_dir("clip-vit-tiny");
  for (const char* name : {"coco_weights_tiny.pt", "transformer_weights_tiny.pt"}) {
    import_clipcap(fixture_dir("clipcap-tiny") + "/" + name, o).save(dir.file(name));
    Captioner c = Captioner::load(dir.file(name));
    DecodingOptions d = c.default_decoding();
    d.max_tokens = 20;  // the fixture's entry_length
    auto captions = c.caption_files({fixture_dir("clip-vit-tiny") + "/astronaut.png"}, d);
    const std::string kind = std::string(name).rfind("coco", 0) == 0 ? "mlp" : "transformer";
    EXPECT_EQ(captions[0][0].ids, golden_row("clipcap-tiny", kind + ".beam_sorted_ids", 0, 0)) << name;
    EXPECT_FALSE(captions[0][0].text.empty());
  }
}

TEST(Captioner, ImportedPrefixAacBundleCaptionsTheFixtureRecording) {
  TempDir dir;
  ImportOptions o;
  o.tokenizer_dir = fixture_dir("gpt2-tiny");
  o.model_config = fixture_dir("prefix-aac-tiny") + "/config.json";
  import_prefix_aac(fixture_dir("prefix-aac-tiny") + "/prefix_aac_tiny.pt", o).save(dir.file("aac"));
  Captioner c = Captioner::load(dir.file("aac"));
  DecodingOptions d = c.default_decoding();
  d.num_return = 2;
  auto captions = c.caption_files({fixture_dir("prefix-aac-tiny") + "/rec_leaves_16k_mono_s16.wav"}, d);
  ASSERT_EQ(captions[0].size(), 2u);
  EXPECT_EQ(captions[0][0].ids, golden_row("prefix-aac-tiny", "rec.beam_sorted_ids", 0, 0));
  EXPECT_EQ(captions[0][1].ids, golden_row("prefix-aac-tiny", "rec.beam_sorted_ids", 0, 1));
}

TEST(Captioner, BadBundlesNameTheFileAndTensor) {
  TempDir dir;
  ImportOptions o;
  o.tokenizer_dir = fixture_dir("gpt2-tiny");
  o.gpt2_config = fixture_dir("gpt2-tiny") + "/config.json";
  import_clipcap(fixture_dir("clipcap-tiny") + "/coco_weights_tiny.pt", o).save(dir.file("b"));
  auto message = [&](const std::string& path) -> std::string {
    try {
      Captioner::load(path);
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(dir.path()).find("captioner.json"), std::string::npos);
  Json j = read_json_file(dir.file("b/captioner.json"));
  Json unknown = j;
  unknown["mapper"]["config"]["type"] = "lstm";
  write_json_file(dir.file("b/captioner.json"), unknown);
  EXPECT_NE(message(dir.file("b")).find("unknown mapper type 'lstm'"), std::string::npos);
  Json longer = j;
  longer["mapper"]["config"]["prefix_length"] = 12;
  write_json_file(dir.file("b/captioner.json"), longer);
  std::string m = message(dir.file("b"));
  EXPECT_NE(m.find("mapper.safetensors: tensor 'model.0.weight': expected [384, 32], got [320, 32]"), std::string::npos) << m;
  write_json_file(dir.file("b/captioner.json"), j);
  fs::remove(dir.file("b/mapper.safetensors"));
  m = message(dir.file("b"));
  EXPECT_NE(m.find("mapper.safetensors: missing"), std::string::npos) << m;
  EXPECT_THROW(import_clipcap(fixture_dir("prefix-aac-tiny") + "/prefix_aac_tiny.pt", o), FileError);
}

// ClipCap's transformer weights expect CLIP RN50x4 features: clipcap-tiny's transformer
// checkpoint (32-d input) with clip-rn-tiny's RN50x4-shaped ResNet (32-d output), read from
// OpenAI's TorchScript format, as a bundle that captions a photo.
TEST(Captioner, ClipCapTransformerWeightsCaptionAPhotoThroughAClipResNet) {
  TempDir dir;
  ImportOptions o;
  o.tokenizer_dir = fixture_dir("gpt2-tiny");
  o.gpt2_config = fixture_dir("gpt2-tiny") + "/config.json";
  o.clip_dir = fixture_dir("clip-rn-tiny") + "/model.pt";
  import_clipcap(fixture_dir("clipcap-tiny") + "/transformer_weights_tiny.pt", o).save(dir.file("rn"));
  EXPECT_EQ(read_json_file(dir.file("rn/encoder/config.json")).at("model_type"), "clip_resnet");
  Captioner c = Captioner::load(dir.file("rn"));
  ASSERT_TRUE(c.clip);
  EXPECT_EQ(c.clip->architecture(), "resnet");
  EXPECT_EQ(c.clip_preprocess.crop_size, 288);
  // The photo's embedding through the bundle equals the ResNet on the fixture's golden
  // (Pillow-exact) preprocessing of the same photo.
  SafetensorsFile golden(fixture_dir("clip-rn-tiny") + "/golden.safetensors");
  ImageDecodeOptions decode;
  decode.apply_exif_orientation = false;
  Image8 image = decode_image(fixture_dir("clip-rn-tiny") + "/rocket.jpg", decode);
  at::Tensor ours = c.encode_images({image}).embedding;
  at::Tensor reference;
  {
    torch::NoGradGuard no_grad;
    reference = c.clip->forward(golden.tensor("preprocess.rocket.pixel_values").unsqueeze(0)).image_embeds;
  }
  EXPECT_TRUE(at::allclose(ours, reference, 1e-5, 1e-5));
  DecodingOptions d = c.default_decoding();
  d.max_tokens = 20;
  auto captions = c.caption_files({fixture_dir("clip-rn-tiny") + "/rocket.jpg"}, d);
  MapperInput features;
  features.embedding = reference;
  auto direct = c.caption(features, d);
  ASSERT_FALSE(captions[0].empty());
  EXPECT_EQ(captions[0][0].ids, direct[0][0].ids);
  EXPECT_FALSE(captions[0][0].text.empty());
  // A CLIP whose embedding width does not fit the mapper is refused with both widths named.
  TempDir other;
  Json wider = read_json_file(fixture_dir("clip-rn-tiny") + "/config.json");
  wider["embed_dim"] = 48;
  write_json_file(other.file("config.json"), wider);
  fs::copy_file(fixture_dir("clip-rn-tiny") + "/model.safetensors", other.file("model.safetensors"));
  o.clip_dir = other.path();
  std::string message;
  try {
    import_clipcap(fixture_dir("clipcap-tiny") + "/transformer_weights_tiny.pt", o);
  } catch (const std::exception& e) {
    message = e.what();
  }
  // (the weights themselves say 32: strict loading names the tensor first)
  EXPECT_NE(message.find("attnpool.c_proj.weight"), std::string::npos) << message;
}

// The published Prefix-AAC configurations as presets: no hand-written config. The tiny GPT-2's
// width is not a standard GPT-2 size, so only its config.json is given (real checkpoints need
// nothing: GPT-2 small's heads follow from its width).
TEST(Captioner, PrefixAacPresetsNeedNoHandWrittenConfig) {
  TempDir dir;
  const Json fixture_config = read_json_file(fixture_dir("prefix-aac-tiny") + "/config.json");
  Json gpt2 = fixture_config.at("gpt2");
  gpt2["model_type"] = "gpt2";
  write_json_file(dir.file("gpt2.json"), gpt2);
  ImportOptions o;
  o.tokenizer_dir = fixture_dir("gpt2-tiny");
  o.gpt2_config = dir.file("gpt2.json");
  o.preset = "audiocaps";
  const std::string checkpoint = fixture_dir("prefix-aac-tiny") + "/prefix_aac_tiny.pt";
  import_prefix_aac(checkpoint, o).save(dir.file("audiocaps"));
  Captioner c = Captioner::load(dir.file("audiocaps"));
  auto captions = c.caption_files({fixture_dir("prefix-aac-tiny") + "/rec_leaves_16k_mono_s16.wav"}, c.default_decoding());
  EXPECT_EQ(captions[0][0].ids, golden_row("prefix-aac-tiny", "rec.beam_sorted_ids", 0, 0));
  EXPECT_TRUE(c.mapper->config().relu_after_bn);

  // Clotho: no ReLU after the BatchNorm (the fixture's prefix_clotho_variant), 30 s clips.
  o.preset = "clotho";
  Captioner clotho = import_prefix_aac(checkpoint, o);
  EXPECT_FALSE(clotho.mapper->config().relu_after_bn);
  EXPECT_DOUBLE_EQ(clotho.cnn14->config().clip_seconds, 30.0);
  SafetensorsFile golden(fixture_dir("prefix-aac-tiny") + "/golden.safetensors");
  at::Tensor wave = golden.tensor("rec.waveform");
  const int64_t padded = golden.tensor("rec.num_samples_padded").item<int64_t>();
  torch::NoGradGuard no_grad;
  Cnn14Output enc = clotho.cnn14->forward(at::constant_pad_nd(wave, {0, padded - wave.size(-1)}));
  MapperInput features;
  features.conv_block6 = enc.conv_block6;
  features.clipwise = enc.clipwise_output;
  at::Tensor expected = golden.tensor("rec.prefix_clotho_variant").to(at::kFloat);
  EXPECT_TRUE(at::allclose(clotho.prefix(features), expected, 1e-4, 1e-4));

  o.preset = "wavcaps";
  EXPECT_THROW(import_prefix_aac(checkpoint, o), ConfigError);
  o.preset.clear();
  EXPECT_THROW(import_prefix_aac(checkpoint, o), std::invalid_argument);  // neither preset nor config
}

// Clips of different lengths batched together must caption as they do alone: zero padding to
// the longest clip would change the shorter clips' CNN14 features (bundle without clip_seconds).
TEST(Captioner, AudioCaptionsDoNotDependOnWhatTheyAreBatchedWith) {
  TempDir dir;
  const std::string bundle = dir.file("aac");
  std::filesystem::copy(prefixcap::testing::aac_bundle(), bundle, std::filesystem::copy_options::recursive);
  Json cfg = read_json_file(bundle + "/encoder/config.json");
  ASSERT_TRUE(cfg.contains("clip_seconds"));
  cfg["clip_seconds"] = 0.0;
  write_bytes(bundle + "/encoder/config.json", cfg.dump());
  Captioner c = Captioner::load(bundle);
  std::vector<std::vector<float>> clips;
  for (double seconds : {3.0, 5.5, 3.0, 1.25}) {
    std::vector<float> w(static_cast<size_t>(seconds * c.sample_rate()));
    for (size_t i = 0; i < w.size(); ++i) w[i] = 0.3f * std::sin(0.01f * i * (1 + clips.size())) * std::cos(0.0003f * i);
    clips.push_back(w);
  }
  DecodingOptions o = c.default_decoding();
  auto together = c.caption_waveforms(clips, o);
  ASSERT_EQ(together.size(), clips.size());
  for (size_t i = 0; i < clips.size(); ++i) {
    auto alone = c.caption_waveforms({clips[i]}, o);
    EXPECT_EQ(together[i][0].ids, alone[0][0].ids) << "clip " << i;
    EXPECT_NEAR(together[i][0].score, alone[0][0].score, 1e-5) << "clip " << i;
  }
  // What padding would have done: the 3 s clip inside a batch padded to 5.5 s has other features.
  MapperInput padded = c.encode_waveforms({clips[0], clips[1]});
  MapperInput alone = c.encode_waveforms({clips[0]});
  EXPECT_GT((padded.embedding[0] - alone.embedding[0]).abs().max().item<float>(), 1e-4);
}

// --lm-dtype packs the LM for CPU decoding: the captioner then refuses to move to a GPU (checked
// before anything moves, so no GPU is needed to see it) or to be saved, and captions still.
TEST(Captioner, APackedLmStaysOnTheCpuAndIsNotSaved) {
  TempDir dir;
  Captioner c = Captioner::load(prefixcap::testing::aac_bundle());
  c.set_lm_dtype(WeightDtype::Int8);
  EXPECT_EQ(c.lm->weight_dtype(), WeightDtype::Int8);
  try {
    c.to(at::Device(at::kCUDA));
    FAIL() << "a packed LM moved to CUDA";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("packed as int8 for CPU decoding"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(c.device().is_cpu());
  EXPECT_THROW(c.save(dir.file("copy")), std::logic_error);
  EXPECT_FALSE(std::filesystem::exists(dir.file("copy")));  // no half-written bundle
  EXPECT_THROW(c.set_lm_dtype(WeightDtype::BFloat16), std::logic_error);  // packed once
  auto captions = c.caption_files({fixture_dir("prefix-aac-tiny") + "/rec_leaves_16k_mono_s16.wav"}, c.default_decoding());
  EXPECT_EQ(captions.at(0).at(0).ids, golden_row("prefix-aac-tiny", "rec.beam_sorted_ids", 0, 0));
}

// --encoder-dtype int8-dynamic is CPU arithmetic too: a captioner with it refuses to move to a
// GPU (checked before anything moves); back to float32 the check is gone; bfloat16 is refused.
TEST(Captioner, AnInt8EncoderStaysOnTheCpu) {
  Captioner c = Captioner::load(prefixcap::testing::aac_bundle());
  c.set_encoder_dtype(WeightDtype::Int8Dynamic);
  EXPECT_EQ(c.cnn14->compute_dtype(), WeightDtype::Int8Dynamic);
  try {
    c.to(at::Device(at::kCUDA));
    FAIL() << "an int8-dynamic encoder moved to CUDA";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("encoder computes in int8-dynamic on the CPU"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(c.device().is_cpu());
  EXPECT_TRUE(c.cnn14->fc1->weight.device().is_cpu());
  EXPECT_THROW(c.set_encoder_dtype(WeightDtype::BFloat16), std::invalid_argument);
  c.set_encoder_dtype(WeightDtype::Float32);
  EXPECT_EQ(c.cnn14->compute_dtype(), WeightDtype::Float32);
}
