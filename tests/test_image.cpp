// Image and video path beyond the golden cases: bad inputs, EXIF, frame sampling, configs.
#include <gtest/gtest.h>

#include <random>

#include <torch/types.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/clip_image_encoder.h"
#include "encoders/clip_vision.h"
#include "encoders/feature_kernels_cpu.h"
#include "encoders/image_preprocess.h"
#include "pipeline/video_decode.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::error_of;
using prefixcap::testing::message_of;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;

namespace {

std::string encode_jpeg(int width, int height) {
  cv::Mat m(height, width, CV_8UC3);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) m.at<cv::Vec3b>(y, x) = cv::Vec3b(x % 256, y % 256, (x + y) % 256);
  std::vector<uchar> out;
  cv::imencode(".jpg", m, out);
  return std::string(out.begin(), out.end());
}

// Inserts an EXIF APP1 segment with the given orientation after SOI.
std::string with_exif_orientation(const std::string& jpeg, int orientation) {
  std::string tiff = std::string("II*\0", 4) + std::string("\x08\0\0\0", 4) + std::string("\x01\0", 2) +
                     std::string("\x12\x01\x03\0\x01\0\0\0", 8) + std::string(1, char(orientation)) +
                     std::string("\0\0\0", 3) + std::string("\0\0\0\0", 4);
  std::string payload = std::string("Exif\0\0", 6) + tiff;
  size_t len = payload.size() + 2;
  std::string app1 = std::string("\xFF\xE1", 2) + char(len >> 8) + char(len & 0xFF) + payload;
  return jpeg.substr(0, 2) + app1 + jpeg.substr(2);
}
}  // namespace

TEST(ImageDecode, BadImagesGiveClearErrors) {
  TempDir dir;
  std::string jpeg = read_bytes(fixture_dir("clip-vit-tiny") + "/rocket.jpg");
  write_bytes(dir.file("cut.jpg"), jpeg.substr(0, jpeg.size() / 2));
  EXPECT_NE(error_of([&] { decode_image(dir.file("cut.jpg")); }).find("truncated JPEG"), std::string::npos);
  std::string png = read_bytes(fixture_dir("clip-vit-tiny") + "/chelsea.png");
  write_bytes(dir.file("cut.png"), png.substr(0, png.size() / 2));
  EXPECT_NE(error_of([&] { decode_image(dir.file("cut.png")); }).find("not a decodable image"), std::string::npos);
  write_bytes(dir.file("text.jpg"), "this is not a picture\n");
  EXPECT_NE(error_of([&] { decode_image(dir.file("text.jpg")); }).find("text.jpg: not a decodable image"), std::string::npos);
  write_bytes(dir.file("empty.png"), "");
  EXPECT_NE(error_of([&] { decode_image(dir.file("empty.png")); }).find("empty file"), std::string::npos);
  // PNG header claiming 0 x 10 and 50000 x 50000 pixels: refused before decoding.
  std::string zero = png.substr(0, 33);
  zero[16] = zero[17] = zero[18] = zero[19] = 0;
  write_bytes(dir.file("zero.png"), zero);
  EXPECT_NE(error_of([&] { decode_image(dir.file("zero.png")); }).find("zero size"), std::string::npos);
  std::string bomb = png.substr(0, 33);
  for (int i : {16, 20}) {
    bomb[i] = 0;
    bomb[i + 1] = 0;
    bomb[i + 2] = char(0xC3);
    bomb[i + 3] = 0x50;  // 50000
  }
  write_bytes(dir.file("bomb.png"), bomb);
  EXPECT_NE(error_of([&] { decode_image(dir.file("bomb.png")); }).find("exceeds the limit"), std::string::npos);
  ImageDecodeOptions small;
  small.max_pixels = 1000;
  EXPECT_NE(error_of([&] { decode_image(fixture_dir("clip-vit-tiny") + "/rocket.jpg", small); }).find("exceeds the limit"),
            std::string::npos);
}

TEST(ImageDecode, ExifOrientationIsHonouredUnlessDisabled) {
  TempDir dir;
  write_bytes(dir.file("rotated.jpg"), with_exif_orientation(encode_jpeg(64, 32), 6));  // 90 degrees clockwise
  Image8 turned = decode_image(dir.file("rotated.jpg"));
  EXPECT_EQ(turned.width, 32);
  EXPECT_EQ(turned.height, 64);
  ImageDecodeOptions raw;
  raw.apply_exif_orientation = false;
  Image8 stored = decode_image(dir.file("rotated.jpg"), raw);
  EXPECT_EQ(stored.width, 64);
  EXPECT_EQ(stored.height, 32);
}

TEST(ImageDecode, GrayStaysOneChannelAndCropIsRgb) {
  Image8 gray = decode_image(fixture_dir("clip-vit-tiny") + "/camera.png");
  EXPECT_EQ(gray.channels, 1);
  at::Tensor crop = clip_crop_u8(gray, ClipPreprocessConfig{});
  EXPECT_EQ(crop.sizes(), (std::vector<int64_t>{3, 224, 224}));
  EXPECT_TRUE(crop[0].equal(crop[1]) && crop[1].equal(crop[2]));
}

TEST(ImageDecode, PillowResizeIdentityAndUpscaleSizes) {
  Image8 img = decode_image(fixture_dir("clip-vit-tiny") + "/page.png");
  Image8 same = resize_bicubic_pillow(img, img.width, img.height);
  EXPECT_EQ(same.pixels, img.pixels);
  Image8 up = resize_bicubic_pillow(img, img.width * 2, img.height + 7);
  EXPECT_EQ(up.width, img.width * 2);
  EXPECT_EQ(up.height, img.height + 7);
  EXPECT_THROW(resize_bicubic_pillow(img, 0, 5), std::invalid_argument);
}

TEST(Video, FramesAreSampledEvenlyOverTheClip) {
  for (const char* name : {"leaves_video_h264_flac.mkv", "leaves_video_h264_aac.mp4"}) {
    VideoInfo info;
    auto frames = sample_video_frames(fixture_dir("audio-decode") + "/" + name, 4, &info);
    ASSERT_EQ(frames.size(), 4u) << name;
    EXPECT_TRUE(info.has_audio);
    EXPECT_NEAR(info.duration_s, 3.0, 0.05) << name;
    // 4 fps, 12 frames: targets 0.375, 1.125, 1.875, 2.625 s -> frames at 0.5, 1.25, 2.0, 2.75 s.
    const double expected[] = {0.5, 1.25, 2.0, 2.75};
    for (int i = 0; i < 4; ++i) {
      EXPECT_NEAR(frames[i].time_s, expected[i], 1e-6) << name << " frame " << i;
      EXPECT_EQ(frames[i].image.width, 160);
      EXPECT_EQ(frames[i].image.height, 106);
      EXPECT_EQ(frames[i].image.channels, 3);
    }
    auto one = sample_video_frames(fixture_dir("audio-decode") + "/" + name, 1);
    EXPECT_NEAR(one[0].time_s, 1.5, 1e-6);
  }
}

TEST(Video, FilesWithoutFramesAreReported) {
  TempDir dir;
  EXPECT_NE(error_of([&] { sample_video_frames(fixture_dir("audio-decode") + "/leaves_48k_s16_stereo.flac", 4); })
                .find("no decodable video track"),
            std::string::npos);
  write_bytes(dir.file("junk.mp4"), "not a video at all");
  EXPECT_FALSE(error_of([&] { sample_video_frames(dir.file("junk.mp4"), 4); }).empty());
  EXPECT_THROW(sample_video_frames(fixture_dir("audio-decode") + "/leaves_video_h264_flac.mkv", 0), std::invalid_argument);
}

TEST(ClipVision, ConfigErrorsAndShapeChecks) {
  TempDir dir;
  write_bytes(dir.file("config.json"), R"({"vision_config":{"image_size":224,"patch_size":30}})");
  EXPECT_THROW(ClipVisionConfig::from_file(dir.file("config.json")), ConfigError);
  write_bytes(dir.file("config.json"), R"({"vision_config":{"hidden_act":"swish"}})");
  EXPECT_THROW(ClipVisionConfig::from_file(dir.file("config.json")), ConfigError);
  ClipVisionTransformer vit = load_clip_vision(fixture_dir("clip-vit-tiny"));
  EXPECT_THROW(vit->forward(at::zeros({1, 3, 200, 200})), c10::Error);
  ClipVisionConfig wider = vit->config();
  wider.hidden_size = 128;
  wider.intermediate_size = 512;
  ClipVisionTransformer other(wider);
  try {
    other->load_weights(load_safetensors(fixture_dir("clip-vit-tiny") + "/variant-openai.safetensors"), "variant-openai");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("vision_model.embeddings.class_embedding': expected [128], got [64]"),
              std::string::npos)
        << e.what();
  }
}

TEST(Video, FrameFeaturesEqualPerImageEncoding) {
  ClipVisionTransformer vit = load_clip_vision(fixture_dir("clip-vit-tiny"));
  auto frames = sample_video_frames(fixture_dir("audio-decode") + "/leaves_video_h264_flac.mkv", 3);
  torch::NoGradGuard no_grad;
  VideoFeatures features = encode_video_frames(frames, *vit, ClipPreprocessConfig{});
  ASSERT_EQ(features.frame_embeds.sizes(), (std::vector<int64_t>{3, vit->config().projection_dim}));
  EXPECT_EQ(features.frame_tokens.size(1), 1 + vit->config().num_patches());
  for (int i = 0; i < 3; ++i) {
    at::Tensor alone = vit->forward(clip_pixel_values(frames[i].image, ClipPreprocessConfig{}).unsqueeze(0)).image_embeds[0];
    EXPECT_TRUE(at::allclose(features.frame_embeds[i], alone, 1e-5, 1e-5)) << i;
  }
  EXPECT_TRUE(at::allclose(features.mean_embed, features.frame_embeds.mean(0)));
}

// A weight file named on its own, with our names and a config.json beside it: that file is
// loaded (not the folder's default file name), and the same model comes out as from the folder.
TEST(ClipVision, WeightFileWithAConfigBesideItLoadsThatFile) {
  TempDir dir;
  std::filesystem::copy_file(fixture_dir("clip-vit-tiny") + "/config.json", dir.file("config.json"));
  std::filesystem::copy_file(fixture_dir("clip-vit-tiny") + "/model.safetensors", dir.file("other-name.safetensors"));
  ClipImageEncoder from_file = load_clip_image_encoder(dir.file("other-name.safetensors"));
  ClipImageEncoder from_folder = load_clip_image_encoder(fixture_dir("clip-vit-tiny"));
  EXPECT_EQ(from_file->architecture(), "vit");
  SafetensorsFile golden(fixture_dir("clip-vit-tiny") + "/golden.safetensors");
  torch::NoGradGuard no_grad;
  at::Tensor pixels = golden.tensor("vision.pixel_values");
  EXPECT_TRUE(at::equal(from_file->forward(pixels).image_embeds, from_folder->forward(pixels).image_embeds));
}

// The CUDA preprocessing kernels' algorithm (crop-window-only passes, fused normalisation; run on
// the CPU) equals the CPU port bit for bit on the cases the fixtures do not cover: gray, 1x1,
// images smaller than the crop (zero padding), extreme aspect ratios, upscaling, an image already
// at the target size (no resampling pass), a Resize smaller than the crop.
TEST(ClipPreprocess, KernelMathEqualsTheCpuPortExactly) {
  std::mt19937 rng(5);
  auto image = [&](int w, int h, int c) {
    Image8 im{w, h, c, std::vector<uint8_t>(static_cast<size_t>(w) * h * c)};
    for (auto& p : im.pixels) p = static_cast<uint8_t>(rng() & 255);
    return im;
  };
  ClipPreprocessConfig clip;  // 224 / 224
  ClipPreprocessConfig small_resize = clip;
  small_resize.shortest_edge = 200;  // smaller than the crop: zero padding around the image
  ClipPreprocessConfig rn50x4 = clip;
  rn50x4.shortest_edge = rn50x4.crop_size = 288;
  const std::vector<std::pair<Image8, ClipPreprocessConfig>> cases = {
      {image(640, 480, 3), clip},   {image(480, 640, 1), clip},  {image(1, 1, 3), clip},     {image(3, 500, 3), clip},
      {image(900, 7, 3), clip},     {image(100, 80, 3), clip},   {image(224, 224, 3), clip}, {image(224, 300, 3), clip},
      {image(333, 250, 3), small_resize}, {image(640, 427, 3), rn50x4}, {image(17, 19, 1), rn50x4},
  };
  for (const auto& [im, config] : cases) {
    const std::string what = std::to_string(im.width) + "x" + std::to_string(im.height) + "x" + std::to_string(im.channels) +
                             " -> " + std::to_string(config.crop_size);
    const at::Tensor crop = clip_crop_u8(im, config);
    EXPECT_TRUE(clip_crop_kernel_math(im, config).equal(crop)) << what;
    EXPECT_TRUE(clip_pixels_kernel_math(im, config).equal(clip_normalize(crop, config))) << what;
  }
}

// --encoder-dtype int8-dynamic on the clip-vit-tiny fixture (golden outputs from openai/CLIP in
// float64): every image embedding within cosine 0.999 of upstream's (issue 19's gate; measured
// 0.99908), every token within 0.998 (measured 0.99875: this model is 64 wide, so each product
// sums few terms; ViT-B/32 in image_bench: 0.9999), the embeddings' largest difference within 3 %
// of their range; back to float32, the fixture's own tolerance
// (1e-4) again; a reload repacks; the ResNet refuses the type by name.
TEST(ClipVision, Int8DynamicStaysWithinTheAccuracyGate) {
  SafetensorsFile golden(fixture_dir("clip-vit-tiny") + "/golden.safetensors");
  torch::NoGradGuard no_grad;
  const at::Tensor pixels = golden.tensor("vision.pixel_values");
  const at::Tensor embeds = golden.tensor("vision.image_embeds").to(at::kFloat);
  const at::Tensor tokens = golden.tensor("vision.last_hidden_state").to(at::kFloat);
  ClipImageEncoder vit = load_clip_image_encoder(fixture_dir("clip-vit-tiny"));
  vit->set_compute_dtype(WeightDtype::Int8Dynamic);
  EXPECT_EQ(vit->compute_dtype(), WeightDtype::Int8Dynamic);
  ClipVisionOutput q = vit->forward(pixels);
  const double embed_cos = at::cosine_similarity(q.image_embeds, embeds, 1).min().item<double>();
  const double token_cos = at::cosine_similarity(q.last_hidden_state.flatten(0, 1), tokens.flatten(0, 1), 1).min().item<double>();
  EXPECT_GT(embed_cos, 0.999);
  EXPECT_GT(token_cos, 0.998);
  EXPECT_LT((q.image_embeds - embeds).abs().max().item<double>(), 0.03 * (embeds.max() - embeds.min()).item<double>());
  EXPECT_FALSE(at::allclose(q.image_embeds, embeds, 1e-6, 1e-6));  // it did run the integer products
  std::cout << "int8-dynamic vs upstream: image_embeds min cosine " << embed_cos << ", tokens " << token_cos << "\n";
  // Reloading the weights repacks them: zeroed weights give a different embedding, the originals the same one.
  const TensorMap original = load_weight_file(fixture_dir("clip-vit-tiny") + "/model.safetensors");
  TensorMap zeroed = original;
  zeroed["vision_model.encoder.layers.0.mlp.fc1.weight"] = at::zeros_like(zeroed["vision_model.encoder.layers.0.mlp.fc1.weight"]);
  vit->load_weights(zeroed, "zeroed");
  EXPECT_FALSE(at::allclose(vit->forward(pixels).image_embeds, q.image_embeds, 1e-3, 1e-3));
  vit->load_weights(original, "original");
  EXPECT_TRUE(at::equal(vit->forward(pixels).image_embeds, q.image_embeds));
  vit->set_compute_dtype(WeightDtype::Float32);
  EXPECT_TRUE(at::allclose(vit->forward(pixels).image_embeds, embeds, 1e-4, 1e-4));
  EXPECT_NE(message_of([&] { vit->set_compute_dtype(WeightDtype::BFloat16); }).find("float32 or int8-dynamic"), std::string::npos);
  ClipImageEncoder rn = load_clip_image_encoder(fixture_dir("clip-rn-tiny"));
  EXPECT_NE(message_of([&] { rn->set_compute_dtype(WeightDtype::Int8Dynamic); }).find("resnet encoder computes in float32 only"),
            std::string::npos);
}
