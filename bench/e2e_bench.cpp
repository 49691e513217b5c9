// e2e_bench: one 10 s clip captioned end to end (CNN14 at 16 kHz + the Prefix-AAC mapping
// networks + GPT-2 124M with its untied language header, random weights of the published
// shapes; beam 5, exactly --tokens tokens), and a batch of 64 clips against the same clips one
// by one, beside the anchor measured in the same run: Prefix-AAC's own inference algorithm on
// PyTorch 2.x (bench/e2e_anchor.py through the PyPI wheel in .venv-torch: GPT-2 rerun over the
// whole sequence at every step, clips one at a time). For each configuration given: an
// --lm-dtype, or LM/ENCODER for an --lm-dtype and an --encoder-dtype (float32 encoder otherwise;
// the key in "dtypes" is that name). Prints JSON.
// --image does the same for ClipCap's COCO model on one 640x480 image (CLIP preprocessing + CLIP
// ViT-B/32 + the MLP mapper, 10 prefix vectors + GPT-2 124M with its tied header) against
// ClipCap's own generate_beam on PyTorch 2.x (the anchor script's --image).
// Options: --threads N, --tokens N, --batch N, --dtypes float32,int8,int8-dynamic,int8-dynamic/int8-dynamic (the
// default), --image, --python PATH, --no-anchor.
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/threads.h"
#include "encoders/clip_vision.h"
#include "lm/skinny_matmul.h"
#include "pipeline/captioner.h"

using namespace prefixcap;
using namespace prefixcap::bench;

namespace {
// What both models share below the encoder: GPT-2 124M (random weights; `tie_header` as
// GPT2LMHeadModel, else Prefix-AAC's separate language_header), the mapper `mc` frozen, the GPT-2
// tokenizer, beam 5 and every caption exactly `tokens` long (no stop token), as in the anchor.
void add_lm_and_mapper(Captioner& c, bool tie_header, const MapperConfig& mc, const std::string& fixtures, int tokens) {
  Gpt2Config lc;
  lc.tie_word_embeddings = tie_header;
  c.lm = Gpt2Model(lc);
  c.lm->init_weights();
  c.lm->freeze();
  c.mapper = make_mapper(mc);
  c.mapper->eval();
  for (auto& p : c.mapper->parameters()) p.set_requires_grad(false);
  c.tokenizer = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(fixtures + "/gpt2-tokenizer"));
  c.decoding_.beam_size = 5;
  c.decoding_.max_tokens = tokens;
  c.decoding_.stop_token_ids = {};
}

// Prefix-AAC's AudioCaps model at the published shapes, random weights.
Captioner make_captioner(const std::string& fixtures, int tokens) {
  Captioner c;
  Cnn14Config ec;
  ec.front_end.sample_rate = 16000;
  ec.front_end.window_size = 512;
  ec.front_end.hop_size = 320;
  ec.front_end.mel_bins = 64;
  ec.front_end.fmin = 50;
  ec.front_end.fmax = 8000;
  ec.max_pool_frames = 46;
  ec.clip_seconds = 10;
  c.encoder_kind_ = "cnn14";
  c.cnn14 = Cnn14(ec);
  c.cnn14->freeze();
  MapperConfig mc;
  mc.type = "prefix_aac";
  mc.input_dim = 2048;
  mc.prefix_length = mc.temporal_prefix_length + mc.global_prefix_length;
  add_lm_and_mapper(c, /*tie_header=*/false, mc, fixtures, tokens);
  return c;
}

// ClipCap's COCO model at the published shapes (CLIP ViT-B/32, MLP mapper 512 -> 10 x 768,
// GPT2LMHeadModel with its header tied to the token embeddings), random weights.
Captioner make_image_captioner(const std::string& fixtures, int tokens) {
  Captioner c;
  ClipVisionConfig vc;  // ViT-B/32
  vc.projection_dim = 512;
  c.encoder_kind_ = "clip";
  c.clip = ClipVisionTransformer(vc).ptr();
  c.clip->freeze();
  MapperConfig mc;
  mc.type = "mlp";
  mc.input_dim = 512;
  mc.prefix_length = 10;
  add_lm_and_mapper(c, /*tie_header=*/true, mc, fixtures, tokens);
  return c;
}

// Random 8-bit RGB images (what a decoded photo is before CLIP's preprocessing).
std::vector<Image8> random_images(int n, int width, int height, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  std::vector<Image8> images;
  for (int i = 0; i < n; ++i) {
    at::Tensor t = at::randint(0, 256, {height * width * 3}, g, at::kByte);
    Image8 im;
    im.width = width;
    im.height = height;
    im.channels = 3;
    im.pixels.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
    images.push_back(std::move(im));
  }
  return images;
}

std::vector<std::vector<float>> random_clips(int n, int samples, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  std::vector<std::vector<float>> clips;
  for (int i = 0; i < n; ++i) {
    at::Tensor t = at::randn({samples}, g) * 0.1;
    clips.emplace_back(t.data_ptr<float>(), t.data_ptr<float>() + samples);
  }
  return clips;
}
}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  int tokens = 15, batch = 64;
  bool anchor = true, image = false;
  std::string python = std::string(PREFIXCAP_SOURCE_DIR) + "/.venv-torch/bin/python";
  std::string fixtures = std::string(PREFIXCAP_SOURCE_DIR) + "/../shared/fixtures";
  // (LM, encoder) per configuration, and its name
  struct Config {
    WeightDtype lm, encoder;
    std::string name;
  };
  auto parse_config = [](const std::string& name) {
    const size_t slash = name.find('/');
    return Config{parse_weight_dtype(name.substr(0, slash)),
                  slash == std::string::npos ? WeightDtype::Float32 : parse_weight_dtype(name.substr(slash + 1)), name};
  };
  std::vector<Config> dtypes;
  for (const char* name : {"float32", "int8", "int8-dynamic", "int8-dynamic/int8-dynamic"}) dtypes.push_back(parse_config(name));
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--threads") threads.num_threads = std::stoi(next());
      else if (a == "--tokens") tokens = std::stoi(next());
      else if (a == "--batch") batch = std::stoi(next());
      else if (a == "--python") python = next();
      else if (a == "--fixtures") fixtures = next();
      else if (a == "--no-anchor") anchor = false;
      else if (a == "--image") image = true;
      else if (a == "--dtypes") {
        dtypes.clear();
        for (const std::string& name : split_list(next())) dtypes.push_back(parse_config(name));
      } else {
        std::fprintf(stderr, "usage: e2e_bench [--threads N] [--tokens N] [--batch N] [--dtypes LM[/ENCODER],...]\n"
                             "                 [--image] [--fixtures DIR] [--python PATH] [--no-anchor]\n");
        return a == "--help" ? 0 : 1;
      }
    }
    if (tokens < 2 || batch < 2) throw std::invalid_argument("--tokens and --batch must be at least 2");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "e2e_bench: %s\n", e.what());
    return 1;
  }
  ThreadSetup setup = configure_threads(threads);
  nlohmann::json out;
  out["benchmark"] = "e2e_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  out["tokens"] = tokens;
  out["beam"] = 5;
  out["model"] = image ? "ClipCap COCO: CLIP ViT-B/32 + MLP mapper (10 prefix vectors) + GPT-2 124M, tied header"
                       : "Prefix-AAC AudioCaps: CNN14 16 kHz + Prefix-AAC mapper (26 prefix vectors) + GPT-2 124M, untied header";
  if (image) out["image_size"] = {640, 480};
  else out["clip_seconds"] = 10;
  torch::NoGradGuard no_grad;

  // One input ("clip" of audio or "image"), a batch of them, and the captioner's calls on them.
  const std::string unit = image ? "image" : "clip";
  const int samples = 10 * 16000;
  const auto one_clip = image ? std::vector<std::vector<float>>{} : random_clips(1, samples, 7);
  const auto many_clips = image ? std::vector<std::vector<float>>{} : random_clips(batch, samples, 8);
  const auto one_image = image ? random_images(1, 640, 480, 7) : std::vector<Image8>{};
  const auto many_images = image ? random_images(batch, 640, 480, 8) : std::vector<Image8>{};
  const int one_by_one = std::min(batch, 8);  // inputs timed one at a time (per input, then scaled)
  for (const Config& config : dtypes) {
    torch::manual_seed(0);
    Captioner c = image ? make_image_captioner(fixtures, tokens) : make_captioner(fixtures, tokens);
    c.set_lm_dtype(config.lm);
    c.set_encoder_dtype(config.encoder);
    const DecodingOptions o = c.default_decoding();
    auto encode = [&](bool many, int index) -> MapperInput {
      if (image) return many ? c.encode_images(many_images) : c.encode_images({many_images[index]});
      return many ? c.encode_waveforms(many_clips) : c.encode_waveforms({many_clips[index]});
    };
    auto encode_one = [&]() { return image ? c.encode_images(one_image) : c.encode_waveforms(one_clip); };
    // Input to captions, as the captioner's own entry points do it.
    auto caption_one = [&]() { return c.caption(encode_one(), o); };
    nlohmann::json d;
    caption_one();  // warm-up
    MapperInput features;
    at::Tensor prefix;
    d["encoder_ms"] = best_time(3, [&] { features = encode_one(); }) * 1e3;
    d["mapper_ms"] = best_time(3, [&] { prefix = c.prefix(features); }) * 1e3;
    d["decode_ms"] = best_time(3, [&] { c.caption(features, o); }) * 1e3 - d["mapper_ms"].get<double>();
    std::vector<std::vector<Caption>> captions;
    const double t1 = best_time(3, [&] { captions = caption_one(); });
    d[unit + "_ms"] = t1 * 1e3;
    if (captions.size() != 1 || captions[0].empty() || captions[0][0].ids.size() != static_cast<size_t>(tokens))
      throw std::runtime_error("e2e_bench: the caption does not have " + std::to_string(tokens) + " tokens");
    double t_single = now_seconds();
    for (int i = 0; i < one_by_one; ++i) c.caption(encode(false, i), o);
    t_single = (now_seconds() - t_single) / one_by_one;
    const double t_batch = best_time(1, [&] { c.caption(encode(true, 0), o); });
    d["one_by_one_ms_per_" + unit] = t_single * 1e3;
    d["batch_ms_per_" + unit] = t_batch * 1e3 / batch;
    // the batch's parts, timed once more each: encoder, mapper, decoding (the rest of caption())
    MapperInput batch_features;
    const double t_batch_encoder = best_time(1, [&] { batch_features = encode(true, 0); });
    const double t_batch_mapper = best_time(1, [&] { c.prefix(batch_features); });
    const double t_batch_caption = best_time(1, [&] { c.caption(batch_features, o); });
    d["batch_parts_ms_per_" + unit] = {{"encoder", t_batch_encoder * 1e3 / batch},
                                       {"mapper", t_batch_mapper * 1e3 / batch},
                                       {"decode", (t_batch_caption - t_batch_mapper) * 1e3 / batch}};
    d["batch_speedup_over_one_by_one"] = t_single * batch / t_batch;
    out["dtypes"][config.name] = d;
  }
  out["batch"] = batch;
  out["peak_rss_MB"] = peak_rss_bytes() / 1e6;
  if (anchor) {
    const auto py = run_python_anchor<nlohmann::json>(python, std::string(PREFIXCAP_SOURCE_DIR) + "/bench/e2e_anchor.py",
                                                      std::string(image ? "--image " : "") + "--tokens " +
                                                          std::to_string(tokens) + " --threads " +
                                                          std::to_string(setup.num_threads),
                                                      setup.num_threads);
    const std::string original = image ? "clipcap" : "prefix_aac";
    out["anchor"] = py;
    out["anchor"]["what"] = std::string(image ? "ClipCap's generate_beam" : "Prefix-AAC's inference algorithm") +
                            " (bench/e2e_anchor.py), PyTorch 2.x, same shapes, same threads";
    if (py.contains(unit + "_ms"))
      for (auto& [name, d] : out["dtypes"].items()) {
        d[unit + "_speedup_over_" + original] = py[unit + "_ms"].get<double>() / d[unit + "_ms"].get<double>();
        d["decode_speedup_over_" + original] = py["decode_ms"].get<double>() / d["decode_ms"].get<double>();
        d["encoder_speedup_over_" + original] = py["encoder_ms"].get<double>() / d["encoder_ms"].get<double>();
      }
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
