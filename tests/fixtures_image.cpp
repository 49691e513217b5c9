// Fixture kind of the image path: CLIP preprocessing on real photos and the vision transformer.
#include <filesystem>
#include <functional>
#include <map>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "core/json_config.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/clip_image_encoder.h"
#include "encoders/clip_resnet.h"
#include "encoders/clip_vision.h"
#include "encoders/feature_cuda.h"
#include "encoders/feature_kernels_cpu.h"
#include "encoders/image_preprocess.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {

// Preprocessing cases: every crop_u8 value exact (the engine is Pillow-exact), pixel_values
// within the fixture's stated atol (1e-6 when it states none numerically), decoded JPEG
// pixels exact.
void run_preprocess_cases(const std::string& folder, const Json& pre, ClipPreprocessConfig pconfig, const Golden& golden,
                          FixtureReport& report) {
  if (pre.contains("mean")) pconfig.mean = pre["mean"].get<std::vector<double>>();
  if (pre.contains("std")) pconfig.std = pre["std"].get<std::vector<double>>();
  double pixel_atol = 1e-6, pixel_rtol = 0;
  if (pre.contains("tolerance") && pre["tolerance"].contains("pixel_values") && pre["tolerance"]["pixel_values"].is_object())
    tolerance_of(pre["tolerance"]["pixel_values"], &pixel_atol, &pixel_rtol, 1e-6, 0.0);
  if (!pre.contains("images") || pre["images"].empty()) throw std::runtime_error("preprocess case lists no images");
  for (const Json& img : pre.at("images")) {
    report.cases.push_back(run_case("preprocess/" + img.at("name").get<std::string>(), [&]() -> std::string {
      Checks checks;
      ImageDecodeOptions decode;
      decode.apply_exif_orientation = false;  // the reference (PIL.Image.open) ignores EXIF
      Image8 image = decode_image((fs::path(folder) / img.at("file").get<std::string>()).string(), decode);
      if (img.contains("size_wh")) {
        auto wh = img["size_wh"].get<std::vector<int>>();
        checks.require(image.width == wh[0] && image.height == wh[1], "decoded size differs");
      }
      if (img.contains("decoded_u8")) {
        at::Tensor ours = at::from_blob(image.pixels.data(), {image.height, image.width, image.channels}, at::kByte);
        checks.exact("decoded", ours, golden.tensor(first_word(img["decoded_u8"].get<std::string>())));
      }
      at::Tensor crop = clip_crop_u8(image, pconfig);
      const at::Tensor want_crop = golden.tensor(img.at("crop_u8").get<std::string>());
      const at::Tensor want_pixels = golden.tensor(img.at("pixel_values").get<std::string>());
      checks.exact("crop_u8", crop, want_crop);
      const at::Tensor pixels = clip_normalize(crop, pconfig);
      checks.close("pixel_values", pixels, want_pixels, pixel_atol, pixel_rtol);
      // The CUDA kernels' algorithm (feature_kernels.h) on the CPU: the same crop, the same floats
      // as the CPU port; on a GPU when there is one.
      checks.exact("crop_u8 (kernel math)", clip_crop_kernel_math(image, pconfig), want_crop);
      checks.exact("pixel_values (kernel math)", clip_pixels_kernel_math(image, pconfig), pixels);
      if (feature_kernels_compiled() && at::hasCUDA())
        checks.exact("pixel_values (CUDA)", clip_pixels_cuda({&image}, pconfig, at::Device(at::kCUDA, 0))[0].cpu(), pixels);
      return checks.result();
    }));
  }
}

// The cases with pixel_values inputs, for one loaded weight file: `outputs_of` runs the model
// and names what it computed; every output key of a case must be among them.
void run_vision_cases(const std::string& weights, const Json& all, const Golden& golden, FixtureReport& report,
                      const std::function<std::map<std::string, at::Tensor>(const at::Tensor&)>& outputs_of) {
  for (auto c = all.begin(); c != all.end(); ++c) {
    if (!c.value().contains("inputs") || !c.value()["inputs"].contains("pixel_values")) continue;
    report.ran.insert(c.key());
    report.cases.push_back(run_case(weights + "/" + c.key(), [&]() -> std::string {
      torch::NoGradGuard no_grad;
      Checks checks;
      const auto outputs = outputs_of(golden.tensor(c.value()["inputs"]["pixel_values"].get<std::string>()));
      for (auto o = c.value().at("outputs").begin(); o != c.value().at("outputs").end(); ++o) {
        double atol, rtol;
        tolerance_of(o.value(), &atol, &rtol);
        at::Tensor expected = golden.tensor(o.value().at("tensor").get<std::string>());
        auto it = outputs.find(o.key());
        if (it == outputs.end()) checks.require(false, "unknown output '" + o.key() + "'");
        else checks.close(o.key(), it->second, expected, atol, rtol);
      }
      return checks.result();
    }));
  }
}

}  // namespace

FixtureReport run_clip_vision_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "clip-vision";
  const Json& model = cases.at("model");
  const std::string config_path = (fs::path(folder) / first_word(model.at("config").get<std::string>())).string();
  ClipVisionConfig config = ClipVisionConfig::from_file(config_path);
  const Golden& golden = open_golden(report, folder, cases);
  const Json& all = cases.at("cases");

  if (all.contains("preprocess")) {
    report.ran.insert("preprocess");
    ClipPreprocessConfig pconfig;
    if (model.contains("preprocessor_config")) {
      const std::string p = (fs::path(folder) / model["preprocessor_config"].get<std::string>()).string();
      pconfig = ClipPreprocessConfig::from_json(read_json_file(p), p);
    }
    run_preprocess_cases(folder, all["preprocess"], pconfig, golden, report);
  }

  for (auto w = model.at("weights").begin(); w != model.at("weights").end(); ++w) {
    const std::string path = (fs::path(folder) / w.key()).string();
    ClipVisionTransformer vit{nullptr};
    CaseResult load = run_case(w.key() + "/load", [&] {
      vit = ClipVisionTransformer(config);
      vit->load_weights(load_weight_file(path), path);
      vit->freeze();
      return std::string("strict load");
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    run_vision_cases(w.key(), all, golden, report, [&](const at::Tensor& pixels) {
      ClipVisionOutput out = vit->forward(pixels);
      return std::map<std::string, at::Tensor>{
          {"last_hidden_state", out.last_hidden_state}, {"pooled_output", out.pooled_output}, {"image_embeds", out.image_embeds}};
    });
  }
  return report;
}

// CLIP ModifiedResNet (clip-rn-tiny): the same preprocessing rules at the model's resolution;
// every weight file (OpenAI-named safetensors, a TorchScript archive of a whole CLIP) through
// the same loader users call, the configuration derived from the weights and checked against
// the fixture's config.json.
FixtureReport run_clip_resnet_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "clip-resnet";
  const Json& model = cases.at("model");
  const std::string config_path = (fs::path(folder) / first_word(model.at("config").get<std::string>())).string();
  const ClipResNetConfig config = ClipResNetConfig::from_json(read_json_file(config_path), config_path);
  const Golden& golden = open_golden(report, folder, cases);
  const Json& all = cases.at("cases");

  if (all.contains("preprocess")) {
    report.ran.insert("preprocess");
    ClipPreprocessConfig pconfig;
    pconfig.shortest_edge = pconfig.crop_size = config.image_resolution;
    run_preprocess_cases(folder, all["preprocess"], pconfig, golden, report);
  }
  if (model.at("weights").empty()) throw std::runtime_error("cases.json: model.weights lists no weight file");
  for (auto w = model.at("weights").begin(); w != model.at("weights").end(); ++w) {
    const std::string path = (fs::path(folder) / w.key()).string();
    std::shared_ptr<ClipModifiedResNetImpl> resnet;
    CaseResult load = run_case(w.key() + "/load", [&] {
      ClipImageEncoder encoder = load_clip_image_encoder(path);
      resnet = std::dynamic_pointer_cast<ClipModifiedResNetImpl>(encoder);
      if (!resnet) return std::string("FAIL:loaded as a ") + encoder->architecture() + ", not a ResNet";
      Checks checks;
      checks.require(resnet->config().to_json() == config.to_json(),
                     "derived config " + resnet->config().to_json().dump() + " differs from " + config.to_json().dump());
      return checks.result().empty() ? "strict load, config derived from the weights" : checks.result();
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    run_vision_cases(w.key(), all, golden, report, [&](const at::Tensor& pixels) {
      ClipResNetOutput out = resnet->forward_all(pixels);
      // image_embeds also through the interface the captioner uses; both must agree with the reference
      const at::Tensor via_interface = resnet->forward(pixels).image_embeds;
      if (!at::equal(via_interface, out.image_embeds)) throw std::runtime_error("forward() and forward_all() differ");
      return std::map<std::string, at::Tensor>{{"stem", out.stem}, {"layer4", out.layer4}, {"image_embeds", via_interface}};
    });
  }
  return report;
}

}  // namespace prefixcap::fixtures
