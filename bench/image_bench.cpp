// image_bench: CLIP ViT-B/32 shape (random weights) images/s at batch 1 and 16 beside the anchor
// measured in the same run (transformers' CLIPVisionModelWithProjection of the same shape in
// PyTorch 2.x, float32 eager and bfloat16 autocast: bench/encoder_anchor.py through the PyPI wheel
// in .venv-torch), and CLIP preprocessing (JPEG decode + Pillow bicubic resize + crop +
// normalise) images/s for a 1024x768 JPEG made here, beside Pillow + openai/CLIP's transform on
// the same file (encoder_anchor.py --models preprocess). Prints one JSON object.
// The ViT is timed again with --encoder-dtype int8-dynamic (W8A8 linear layers), beside PyTorch's
// own dynamic int8 quantisation of the same model, with its outputs' cosine to float32's.
// Options: --threads N, --python PATH (the anchor's interpreter), --no-anchor.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/int8_gemm.h"
#include "core/threads.h"
#include "encoders/clip_vision.h"
#include "encoders/image_preprocess.h"

using namespace prefixcap;
using namespace prefixcap::bench;

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  bool anchor = true;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-torch/bin/python";
  if (int rc = parse_anchor_options(argc, argv, "image_bench", &threads.num_threads, &python, &anchor); rc >= 0) return rc;
  ThreadSetup setup = configure_threads(threads);
  nlohmann::json out;
  out["benchmark"] = "image_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  torch::NoGradGuard no_grad;

  // A 1024x768 photo-like JPEG (smooth gradients + texture), quality 90.
  cv::Mat m(768, 1024, CV_8UC3);
  for (int y = 0; y < m.rows; ++y)
    for (int x = 0; x < m.cols; ++x)
      m.at<cv::Vec3b>(y, x) = cv::Vec3b((x / 4 + y / 8) % 256, (y / 3) % 256, ((x * y) / 97) % 256);
  std::vector<uchar> buffer;
  cv::imencode(".jpg", m, buffer, {cv::IMWRITE_JPEG_QUALITY, 90});
  const std::string jpeg(buffer.begin(), buffer.end());
  ClipPreprocessConfig pre;
  clip_pixel_values(decode_image_bytes(jpeg, "bench.jpg"), pre);
  const int n = 40;
  double t = best_time(3, [&] {
    for (int i = 0; i < n; ++i) clip_pixel_values(decode_image_bytes(jpeg, "bench.jpg"), pre);
  });
  out["preprocess_1024x768_jpeg_images_per_s"] = n / t;
  double td = best_time(3, [&] {
    for (int i = 0; i < n; ++i) decode_image_bytes(jpeg, "bench.jpg");
  });
  out["jpeg_decode_only_images_per_s"] = n / td;
  if (anchor) {  // the same JPEG through Pillow and openai/CLIP's transform
    const std::string path = (std::filesystem::temp_directory_path() /
                              ("prefixcap-image-bench-" + std::to_string(::getpid()) + ".jpg")).string();
    std::ofstream(path, std::ios::binary) << jpeg;
    const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/encoder_anchor.py",
                                                      "--models preprocess --jpeg " + path, setup.num_threads);
    std::filesystem::remove(path);
    out["preprocess_anchor"] = py;
    out["preprocess_anchor"]["what"] = "Pillow decode + openai/CLIP's transform (bench/encoder_anchor.py)";
    if (py.contains("preprocess"))
      out["preprocess_speedup_over_pillow"] =
          out["preprocess_1024x768_jpeg_images_per_s"].get<double>() / py["preprocess"]["images_per_s"].get<double>();
  }

  ClipVisionConfig config;  // ViT-B/32
  config.projection_dim = 512;
  torch::manual_seed(0);
  ClipVisionTransformer vit(config);
  vit->freeze();
  at::Tensor one = at::randn({1, 3, 224, 224}), sixteen = at::randn({16, 3, 224, 224});
  vit->forward(one);
  double t1 = best_time(5, [&] { vit->forward(one); });
  double t16 = best_time(3, [&] { vit->forward(sixteen); });
  out["vit_b32_images_per_s_batch1"] = 1.0 / t1;
  out["vit_b32_images_per_s_batch16"] = 16.0 / t16;
  // --encoder-dtype int8-dynamic: the same model with its linear layers as W8A8 integer products,
  // and how far its outputs move from float32's on these 16 inputs.
  const ClipVisionOutput reference = vit->forward(sixteen);
  vit->set_compute_dtype(WeightDtype::Int8Dynamic);
  vit->forward(one);
  t1 = best_time(5, [&] { vit->forward(one); });
  t16 = best_time(3, [&] { vit->forward(sixteen); });
  out["int8_dynamic"]["kernel"] = int8_gemm_isa_name(int8_gemm_isa());
  out["int8_dynamic"]["vit_b32_images_per_s_batch1"] = 1.0 / t1;
  out["int8_dynamic"]["vit_b32_images_per_s_batch16"] = 16.0 / t16;
  out["int8_dynamic"]["speedup_over_our_float32_batch1"] = 1.0 / t1 / out["vit_b32_images_per_s_batch1"].get<double>();
  out["int8_dynamic"]["speedup_over_our_float32_batch16"] = 16.0 / t16 / out["vit_b32_images_per_s_batch16"].get<double>();
  {
    const ClipVisionOutput q = vit->forward(sixteen);
    out["int8_dynamic"]["image_embeds_min_cosine_to_float32"] =
        at::cosine_similarity(q.image_embeds, reference.image_embeds, 1).min().item<double>();
    out["int8_dynamic"]["tokens_min_cosine_to_float32"] =
        at::cosine_similarity(q.last_hidden_state.flatten(0, 1), reference.last_hidden_state.flatten(0, 1), 1).min().item<double>();
  }
  vit->set_compute_dtype(WeightDtype::Float32);
  if (anchor) {
    const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/encoder_anchor.py",
                                                      "--models vit --threads " + std::to_string(setup.num_threads),
                                                      setup.num_threads);
    out["anchor"] = py;
    out["anchor"]["what"] = "transformers CLIPVisionModelWithProjection, ViT-B/32 shape, PyTorch 2.x inference mode, same threads";
    if (py.contains("vit")) {
      nlohmann::json ratios;  // ours / anchor in images per second: above 1 means faster
      nlohmann::json int8_ratios;
      for (const auto& [setting, a] : py["vit"].items()) {
        if (!a.is_object()) continue;  // an anchor setting's error message
        for (const char* b : {"batch1", "batch16"}) {
          const std::string key = std::string("images_per_s_") + b;
          ratios[std::string("vit_b32_") + b + "_speedup_over_torch_" + setting] =
              out["vit_b32_" + key].get<double>() / a[key].get<double>();
          int8_ratios[std::string("vit_b32_") + b + "_speedup_over_torch_" + setting] =
              out["int8_dynamic"]["vit_b32_" + key].get<double>() / a[key].get<double>();
        }
      }
      out["speedups"] = ratios;
      out["int8_dynamic"]["speedups"] = int8_ratios;
    }
  }
  out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
