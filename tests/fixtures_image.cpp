// Fixture kind of the image path: CLIP preprocessing on real photos and the vision transformer.
#include <filesystem>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/clip_vision.h"
#include "encoders/image_preprocess.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {
// Fraction of elements with |got - ref| <= tol (per channel tolerance when tol has 3 values).
std::string within(const std::string& what, const at::Tensor& got_in, const at::Tensor& ref_in, const at::Tensor& tol,
                   double min_fraction, Checks& checks) {
  at::Tensor got = got_in.to(at::kDouble), ref = ref_in.to(at::kDouble);
  if (got.sizes() != ref.sizes()) {
    std::ostringstream s;
    s << what << ": shape " << got.sizes() << ", expected " << ref.sizes();
    checks.failures.push_back(s.str());
    return "";
  }
  at::Tensor diff = (got - ref).abs();
  double fraction = (diff <= tol).to(at::kDouble).mean().item<double>();
  double exact = (diff == 0).to(at::kDouble).mean().item<double>();
  std::ostringstream s;
  s.precision(5);
  s << what << ": " << 100 * fraction << "% within one level (" << 100 * exact << "% exact, max|d| " << diff.max().item<double>() << ")";
  if (fraction < min_fraction) checks.failures.push_back(s.str());
  else checks.notes.push_back(s.str());
  return s.str();
}
}  // namespace

FixtureReport run_clip_vision_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "clip-vision";
  const Json& model = cases.at("model");
  const std::string config_path = (fs::path(folder) / model.at("config").get<std::string>()).string();
  ClipVisionConfig config = ClipVisionConfig::from_file(config_path);
  SafetensorsFile golden((fs::path(folder) / cases.at("golden").at("file").get<std::string>()).string());
  const Json& all = cases.at("cases");

  if (all.contains("preprocess")) {
    const Json& pre = all["preprocess"];
    ClipPreprocessConfig pconfig;
    if (model.contains("preprocessor_config")) {
      const std::string p = (fs::path(folder) / model["preprocessor_config"].get<std::string>()).string();
      pconfig = ClipPreprocessConfig::from_json(read_json_file(p), p);
    }
    if (pre.contains("mean")) pconfig.mean = pre["mean"].get<std::vector<double>>();
    if (pre.contains("std")) pconfig.std = pre["std"].get<std::vector<double>>();
    at::Tensor level_tol = (1.0 / (255.0 * at::tensor(pconfig.std, at::kDouble)) + 1e-6).view({3, 1, 1});
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
          std::string name = img["decoded_u8"].get<std::string>();
          name = name.substr(0, name.find(' '));
          at::Tensor ours = at::from_blob(image.pixels.data(), {image.height, image.width, image.channels}, at::kByte);
          within("decoded", ours, golden.tensor(name), at::tensor(1.0), 0.999, checks);
        }
        at::Tensor crop = clip_crop_u8(image, pconfig);
        within("crop_u8", crop, golden.tensor(img.at("crop_u8").get<std::string>()), at::tensor(1.0), 0.999, checks);
        within("pixel_values", clip_normalize(crop, pconfig), golden.tensor(img.at("pixel_values").get<std::string>()),
               level_tol, 0.999, checks);
        return checks.result();
      }));
    }
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
    for (auto c = all.begin(); c != all.end(); ++c) {
      if (!c.value().contains("inputs") || !c.value()["inputs"].contains("pixel_values")) continue;
      report.cases.push_back(run_case(w.key() + "/" + c.key(), [&]() -> std::string {
        torch::NoGradGuard no_grad;
        Checks checks;
        ClipVisionOutput out = vit->forward(golden.tensor(c.value()["inputs"]["pixel_values"].get<std::string>()));
        for (auto o = c.value().at("outputs").begin(); o != c.value().at("outputs").end(); ++o) {
          double atol, rtol;
          tolerance_of(o.value(), &atol, &rtol);
          at::Tensor expected = golden.tensor(o.value().at("tensor").get<std::string>());
          if (o.key() == "last_hidden_state") checks.close(o.key(), out.last_hidden_state, expected, atol, rtol);
          else if (o.key() == "pooled_output") checks.close(o.key(), out.pooled_output, expected, atol, rtol);
          else if (o.key() == "image_embeds") checks.close(o.key(), out.image_embeds, expected, atol, rtol);
          else checks.require(false, "unknown output '" + o.key() + "'");
        }
        return checks.result();
      }));
    }
  }
  return report;
}

}  // namespace prefixcap::fixtures
