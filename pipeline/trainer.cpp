#include "pipeline/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>

#include <ATen/autocast_mode.h>
#include <torch/version.h>
#include <set>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include "core/errors.h"
#include "encoders/feature_cuda.h"
#include "core/hash.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "data/datasets.h"
#include "data/references.h"
#include "lm/loss.h"
#include "metrics/evaluate.h"
#include "pipeline/audio_decode.h"
#include "pipeline/captioner.h"
#include "pipeline/feature_cache.h"
#include "pipeline/prefetch.h"

namespace prefixcap {
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------
// small helpers

// bfloat16 autocast on one device type for the life of the scope (the forward pass): matrix
// products and convolutions in bf16, reductions and the loss in fp32; parameters, gradients and
// the optimizer stay fp32, so no loss scaling is needed (fp16 would need it). The setting before
// is restored. LibTorch 2.4 replaced the per-device functions by device-type arguments.
class AutocastScope {
 public:
  AutocastScope(const at::Device& device, bool enabled) : cuda_(device.is_cuda()), enabled_(enabled) {
    if (!enabled_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    const at::DeviceType type = cuda_ ? at::kCUDA : at::kCPU;
    was_enabled_ = at::autocast::is_autocast_enabled(type);
    was_dtype_ = at::autocast::get_autocast_dtype(type);
    at::autocast::set_autocast_dtype(type, at::kBFloat16);
    at::autocast::set_autocast_enabled(type, true);
#else
    was_enabled_ = cuda_ ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
    was_dtype_ = cuda_ ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
    if (cuda_) {
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
      at::autocast::set_enabled(true);
    } else {
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
      at::autocast::set_cpu_enabled(true);
    }
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    const at::DeviceType type = cuda_ ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_enabled(type, was_enabled_);
    at::autocast::set_autocast_dtype(type, was_dtype_);
#else
    if (cuda_) {
      at::autocast::set_enabled(was_enabled_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    } else {
      at::autocast::set_cpu_enabled(was_enabled_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    }
#endif
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool cuda_, enabled_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

std::string weights_hash(const torch::nn::Module& m) {
  Hasher h;
  for (const auto& [k, v] : module_tensors(m)) {
    h.update(k);
    at::Tensor t = v.to(at::kCPU).contiguous();
    h.update(t.data_ptr(), t.numel() * t.element_size());
  }
  return h.hex();
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

// One line that rewrites itself on a terminal; plain lines otherwise.
class Progress {
 public:
  explicit Progress(bool enabled) : tty_(enabled && ::isatty(2)) {}
  bool tty() const { return tty_; }
  void update(const std::string& line) {
    if (!tty_) return;
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
    std::fflush(stderr);
    open_ = true;
  }
  void print(const std::string& line) {
    if (open_) std::fprintf(stderr, "\r\033[K");
    open_ = false;
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }
  void done() {
    if (open_) std::fprintf(stderr, "\n");
    open_ = false;
  }

 private:
  bool tty_;
  bool open_ = false;
};

std::string bar(double fraction, int width = 24) {
  fraction = std::clamp(fraction, 0.0, 1.0);
  const int full = static_cast<int>(fraction * width + 0.5);
  return "[" + std::string(full, '#') + std::string(width - full, '.') + "]";
}

class JsonLog {
 public:
  explicit JsonLog(const std::string& path) : path_(path) {}
  // Keeps only records with step <= `step` (a resumed run rewrites what follows).
  void truncate_after(int64_t step) {
    if (!fs::exists(path_)) return;
    std::ifstream in(path_);
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        Json j = Json::parse(line);
        if (j.value("step", int64_t{0}) <= step) kept += line + "\n";
      } catch (const Json::exception&) {  // a line cut by a crash
      }
    }
    write_file_atomic(path_, kept);
  }
  void write(const Json& j) {
    std::ofstream out(path_, std::ios::app);
    out << json_dump(j) << "\n";
    out.flush();
    if (!out) throw FileError(path_, "cannot write the training log");
  }

 private:
  std::string path_;
};

// ---------------------------------------------------------------------------------------
// data

struct Example {
  int64_t item;
  std::vector<int64_t> ids;
};

std::string finish_caption(std::string text, const std::string& caption_end) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.erase(0, 1);
  if (caption_end == "period" && !text.empty() && text.back() != '.') text += ".";
  return text;
}

std::vector<int64_t> caption_ids(const Gpt2Tokenizer& tok, const std::string& caption, const TrainConfig& c, bool lm_task) {
  std::vector<int64_t> ids = tok.encode(finish_caption(caption, c.caption_end));
  const bool eos = c.caption_end == "eos" || lm_task;
  const size_t limit = static_cast<size_t>(c.max_caption_tokens);
  if (ids.size() + (eos ? 1 : 0) > limit) ids.resize(limit - (eos ? 1 : 0));
  if (eos) ids.push_back(tok.eos_token_id());
  if (lm_task) ids.insert(ids.begin(), tok.eos_token_id());  // <|endoftext|> opens every text, as in GPT-2's training
  return ids;
}

std::vector<DatasetItem> load_split(const TrainConfig& c, const std::string& split, bool check) {
  std::vector<DatasetItem> items;
  if (c.dataset == "manifest") {
    fs::path p = split;
    if (p.is_relative() && !c.data_root.empty()) p = fs::path(c.data_root) / p;
    items = read_dataset("manifest", p.string(), "");
  } else {
    items = read_dataset(c.dataset, c.data_root, split);
  }
  if (items.empty()) throw ConfigError("split '" + split + "' of " + c.dataset + " dataset '" + c.data_root + "' has no items");
  if (!check) return items;
  auto problems = check_media(items);
  if (problems.empty()) return items;
  std::string msg = std::to_string(problems.size()) + " of " + std::to_string(items.size()) + " media files of split '" + split +
                    "' cannot be used:";
  for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  " + problems[i].media + ": " + problems[i].reason;
  if (problems.size() > 20) msg += "\n  ... and " + std::to_string(problems.size() - 20) + " more";
  if (!c.skip_missing) throw ConfigError(msg + "\n(fix them, or pass --skip-missing to leave them out)");
  std::cerr << "warning: " << msg << "\nwarning: leaving them out (--skip-missing)\n";
  std::set<std::string> bad;
  for (const auto& p : problems) bad.insert(p.media);
  std::vector<DatasetItem> kept;
  for (auto& it : items)
    if (!bad.count(it.media)) kept.push_back(std::move(it));
  if (kept.empty()) throw ConfigError("split '" + split + "': no usable items left");
  return kept;
}

// Stacks tensors, zero-padding every dimension to the largest.
at::Tensor stack_padded(const std::vector<at::Tensor>& ts) {
  bool same = true;
  for (const auto& t : ts) same = same && t.sizes() == ts[0].sizes();
  if (same) return at::stack(ts);
  std::vector<int64_t> shape = ts[0].sizes().vec();
  for (const auto& t : ts)
    for (size_t d = 0; d < shape.size(); ++d) shape[d] = std::max(shape[d], t.size(static_cast<int64_t>(d)));
  std::vector<int64_t> full = {static_cast<int64_t>(ts.size())};
  full.insert(full.end(), shape.begin(), shape.end());
  at::Tensor out = at::zeros(full, ts[0].options());
  for (size_t i = 0; i < ts.size(); ++i) {
    at::Tensor dst = out[static_cast<int64_t>(i)];
    for (int64_t d = 0; d < ts[i].dim(); ++d) dst = dst.narrow(d, 0, ts[i].size(d));
    dst.copy_(ts[i]);
  }
  return out;
}

void pad_ids(const std::vector<const std::vector<int64_t>*>& rows, at::Tensor* ids, at::Tensor* mask) {
  size_t longest = 0;
  for (auto* r : rows) longest = std::max(longest, r->size());
  *ids = at::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(longest)}, at::kLong);
  *mask = at::zeros_like(*ids);
  auto a = ids->accessor<int64_t, 2>();
  auto m = mask->accessor<int64_t, 2>();
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t t = 0; t < rows[i]->size(); ++t) {
      a[i][t] = (*rows[i])[t];
      m[i][t] = 1;
    }
}

// Decoded media ready for the encoder.
struct Media {
  std::vector<float> wave;              // cnn14
  Captioner::VisualInput visual;        // clip
};

struct Batch {
  std::vector<int64_t> examples;
  TensorMap features;                   // from the cache (frozen encoder)
  std::vector<Media> media;             // raw inputs (the encoder trains)
  at::Tensor ids, mask;
};

// ---------------------------------------------------------------------------------------
// the captioner being trained and where its features come from

class CaptionTask {
 public:
  CaptionTask(const TrainConfig& c) : c_(c) {
    at::manual_seed(static_cast<uint64_t>(c.seed));
    if (!c.init.empty()) {
      cap_ = Captioner::load(c.init);
    } else {
      load_parts();
    }
    cap_.normalize_prefix = c.normalize_prefix || (!c.init.empty() && cap_.normalize_prefix);
    if (cap_.encoder_kind_ == "none") throw ConfigError("the captioner to train needs an encoder (cnn14 or clip)");
    for (auto& p : cap_.mapper->parameters()) p.set_requires_grad(true);
    if (cap_.kv_head)
      for (auto& p : cap_.kv_head->parameters()) p.set_requires_grad(true);
    cap_.lm->freeze();
    cap_.lm->eval();
    if (c.train_lm_head) untie_head();
    if (c.lm_dtype == "bfloat16") {
      if (cap_.kv_head) throw ConfigError("lm_dtype bfloat16 is for prefix-embedding mappers, not kv_prefix ones");
      // A bfloat16 copy computes the loss; the float32 LM stays for captions and the bundle.
      train_lm_ = Gpt2Model(cap_.lm->config());
      train_lm_->load_weights(cap_.lm->hf_state_dict(), "bfloat16 copy of the LM");
      train_lm_->to(at::kBFloat16);
      train_lm_->freeze();
      train_lm_->eval();
    } else {
      train_lm_ = cap_.lm;
    }
    encoder_module().eval();
    for (auto& p : encoder_module().parameters()) p.set_requires_grad(false);
    cap_.decoding_.beam_size = static_cast<int>(c.beam_size);
    cap_.decoding_.max_tokens = static_cast<int>(c.max_tokens);
    cap_.stop_strings = c.caption_end == "eos" ? std::vector<std::string>{"<|endoftext|>"} : std::vector<std::string>{"."};
    cap_.decoding_.stop_token_ids = cap_.stop_ids(cap_.stop_strings);
    cap_.source = "prefixcap caption-train " + now_iso();
    const at::Device device = train_device(c);
    if (!device.is_cpu()) {
      cap_.to(device);
      if (train_lm_.ptr() != cap_.lm.ptr()) train_lm_->to(device);
    }
  }

  Captioner& captioner() { return cap_; }
  torch::nn::Module& encoder_module() {
    if (cap_.cnn14) return *cap_.cnn14;
    return *cap_.clip;
  }

  std::vector<at::Tensor> head_params() {
    std::vector<at::Tensor> ps = cap_.mapper->parameters();
    if (cap_.kv_head)
      for (auto& p : cap_.kv_head->parameters()) ps.push_back(p);
    if (c_.train_lm_head) ps.push_back(cap_.lm->lm_head->weight);
    return ps;
  }
  std::vector<at::Tensor> encoder_params() { return encoder_module().parameters(); }

  TensorMap state() {
    TensorMap s = module_tensors(*cap_.mapper, "mapper.");
    if (cap_.kv_head) s.merge(module_tensors(*cap_.kv_head, "kv_head."));
    if (c_.train_lm_head) s.merge(module_tensors(*cap_.lm->lm_head, "lm_head."));
    if (c_.encoder_train_epochs > 0) s.merge(module_tensors(encoder_module(), "encoder."));
    return s;
  }
  void load_state(const TensorMap& s, const std::string& source) {
    auto load = [&](torch::nn::Module& m, const std::string& prefix) {
      load_state_strict(m, tensors_under(s, prefix), {{}, {}, source + " (" + prefix + "*)", {}});
    };
    load(*cap_.mapper, "mapper.");
    if (cap_.kv_head) load(*cap_.kv_head, "kv_head.");
    if (c_.train_lm_head) load(*cap_.lm->lm_head, "lm_head.");
    if (c_.encoder_train_epochs > 0) load(encoder_module(), "encoder.");
  }

  // Puts the encoder in the mode of `epoch` (trained in the first encoder_train_epochs).
  void set_epoch(int64_t epoch) {
    const bool was_training = encoder_trains_;
    encoder_trains_ = epoch < c_.encoder_train_epochs;
    for (auto& p : encoder_module().parameters()) p.set_requires_grad(encoder_trains_);
    encoder_module().train(encoder_trains_);
    if (encoder_trains_) {
      cache_.reset();  // its weights, hence its cache folder, change as it learns
    } else if (was_training) {
      // Frozen from here: drop its gradients, or AdamW would go on moving it (weight decay,
      // momentum) with zero gradients; decoded audio is no longer needed.
      for (auto& p : encoder_module().parameters()) p.mutable_grad().reset();
      std::lock_guard<std::mutex> lock(decoded_mutex_);
      decoded_.clear();
      decoded_bytes_ = 0;
    }
  }
  bool encoder_trains() const { return encoder_trains_; }
  void train_mode(bool on) {
    cap_.mapper->train(on);
    if (cap_.kv_head) cap_.kv_head->train(on);
    encoder_module().train(on && encoder_trains_);
  }

  Json encoder_description() {
    Json d = {{"kind", cap_.encoder_kind_}};
    if (cap_.cnn14) {
      d["config"] = cap_.cnn14->config().to_json();
    } else {
      d["config"] = cap_.clip->config_json();
      const auto& p = cap_.clip_preprocess;
      d["preprocess"] = {{"shortest_edge", p.shortest_edge}, {"crop_size", p.crop_size}, {"mean", p.mean}, {"std", p.std}};
    }
    d["weights"] = weights_hash(encoder_module());
    return d;
  }

  FeatureCache& cache() {
    if (!cache_) {
      Json d = encoder_description();
      const std::string dir = c_.cache_dir.empty() ? (fs::path(c_.out) / "cache").string() : c_.cache_dir;
      cache_ = std::make_unique<FeatureCache>(dir, hash_hex(json_dump(d)), d);
    }
    return *cache_;
  }

  // Decodes one media file for the encoder (thread-safe). While the encoder trains, decoded
  // waveforms are kept in memory (up to decoded_cache_mb) so that later epochs skip decoding.
  Media decode(const std::string& path) {
    Media m;
    if (cap_.cnn14) {
      {
        std::lock_guard<std::mutex> lock(decoded_mutex_);
        if (auto it = decoded_.find(path); it != decoded_.end()) {
          m.wave = it->second;
          return m;
        }
      }
      const auto& cfg = cap_.cnn14->config();
      m.wave = fit_clip_length(decode_audio(path, {cap_.sample_rate()}).samples, cap_.sample_rate(), cfg.clip_seconds);
      if (encoder_trains_) {
        std::lock_guard<std::mutex> lock(decoded_mutex_);
        const size_t bytes = m.wave.size() * sizeof(float);
        if (decoded_bytes_ + bytes <= static_cast<size_t>(c_.decoded_cache_mb) << 20) {
          decoded_.emplace(path, m.wave);
          decoded_bytes_ += bytes;
        }
      }
    } else {
      m.visual = cap_.load_visual(path, detect_modality(path));
    }
    return m;
  }

  // Encoder features of decoded media (one forward per run of equal-length waveforms, so
  // that a clip's features never depend on what it was batched with).
  std::vector<TensorMap> encode(const std::vector<Media>& media) {
    std::vector<TensorMap> out(media.size());
    if (cap_.cnn14) {
      size_t i = 0;
      while (i < media.size()) {
        size_t j = i + 1;
        while (j < media.size() && media[j].wave.size() == media[i].wave.size()) ++j;
        const int64_t n = static_cast<int64_t>(media[i].wave.size());
        if (n == 0) throw std::runtime_error("empty audio");
        at::Tensor w = at::empty({static_cast<int64_t>(j - i), n});
        for (size_t k = i; k < j; ++k) w[static_cast<int64_t>(k - i)].copy_(at::from_blob(const_cast<float*>(media[k].wave.data()), {n}));
        Cnn14Output y = cap_.cnn14->forward(w.to(cap_.device()));
        for (size_t k = i; k < j; ++k) {
          const int64_t r = static_cast<int64_t>(k - i);
          out[k] = {{"embedding", y.embedding[r]}, {"conv_block6", y.conv_block6[r]}, {"clipwise", y.clipwise_output[r]}};
        }
        i = j;
      }
    } else {
      std::vector<Captioner::VisualInput> inputs;
      for (const auto& m : media) inputs.push_back(m.visual);
      // encode_visual runs CLIP without gradients; the encoder-training path uses encode_images_grad
      MapperInput y = encoder_trains_ ? encode_images_grad(inputs) : cap_.encode_visual(inputs);
      for (size_t k = 0; k < media.size(); ++k)
        out[k] = {{"embedding", y.embedding[static_cast<int64_t>(k)]}, {"tokens", y.tokens[static_cast<int64_t>(k)]}};
    }
    return out;
  }

  MapperInput to_mapper_input(const TensorMap& f) {
    MapperInput in;
    in.embedding = f.at("embedding");
    if (f.count("conv_block6")) {
      in.conv_block6 = f.at("conv_block6");
      in.clipwise = f.at("clipwise");
      in.tokens = in.conv_block6.mean(3).transpose(1, 2);
    } else {
      in.tokens = f.at("tokens");
    }
    return in;
  }

  TensorMap collate(const std::vector<TensorMap>& rows) {
    TensorMap out;
    for (const auto& [k, v] : rows[0]) {
      std::vector<at::Tensor> ts;
      for (const auto& r : rows) ts.push_back(r.at(k));
      out[k] = stack_padded(ts);
    }
    return out;
  }

  // Features of a batch: from the cache, or through the (training) encoder.
  MapperInput features(const Batch& b) {
    if (!b.features.empty()) return to_mapper_input(b.features);
    return to_mapper_input(collate(encode(b.media)));
  }

  at::Tensor loss(const Batch& b) {
    at::Tensor prefix = cap_.prefix(features(b));
    at::Tensor ids = b.ids.to(cap_.device()), mask = b.mask.to(cap_.device());
    if (!cap_.kv_head) return prefix_lm_loss(*train_lm_, prefix, ids, mask);
    // Deep key/value prefix: <|endoftext|> then the caption, after the per-layer prefix.
    KvCache cache = make_kv_prefix_cache(cap_.kv_head->forward(prefix));
    at::Tensor bos = at::full({ids.size(0), 1}, cap_.tokenizer->eos_token_id(), ids.options());
    Gpt2Input x;
    x.input_ids = at::cat({bos, ids}, 1);
    x.cache = &cache;
    return token_cross_entropy(cap_.lm->forward(x).logits.narrow(1, 0, ids.size(1)), ids, mask);
  }

 private:
  void load_parts() {
    if (fs::path(c_.encoder).extension() == ".json" && fs::is_regular_file(c_.encoder)) {
      // A config without weights: a new CNN14, initialised from the seed, to train from scratch.
      Cnn14Config ec = Cnn14Config::from_file(c_.encoder);
      cap_.encoder_kind_ = "cnn14";
      cap_.cnn14 = Cnn14(ec);
      if (c_.encoder_train_epochs == 0)
        std::cerr << "warning: " << c_.encoder << " is a new, untrained encoder and encoder_train_epochs is 0: "
                  << "the mapper will see random-projection features\n";
    } else {
      load_encoder_folder();
    }
    load_lm_and_mapper();
  }

  void load_encoder_folder() {
    const std::string enc_cfg = (fs::path(c_.encoder) / "config.json").string();
    if (!fs::exists(enc_cfg)) throw FileError(enc_cfg, "missing (encoder must be a folder with config.json and weights)");
    const std::string model_type = json_get_or<std::string>(read_json_file(enc_cfg), "model_type", "", enc_cfg);
    if (model_type == "cnn14") {
      cap_.encoder_kind_ = "cnn14";
      cap_.cnn14 = load_cnn14(c_.encoder);
    } else {
      cap_.encoder_kind_ = "clip";
      cap_.clip = load_clip_image_encoder(c_.encoder);
      cap_.clip_preprocess = load_clip_preprocess(c_.encoder, *cap_.clip);
    }
  }

  void load_lm_and_mapper() {
    cap_.lm = load_gpt2(c_.lm);
    cap_.tokenizer = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(c_.lm));
    Json mj = c_.mapper;
    auto fill = [&](const char* key, int64_t v) {
      if (!mj.contains(key)) mj[key] = v;
    };
    fill("embed_dim", cap_.lm->config().n_embd);
    const std::string type = mj.value("type", "");
    if (cap_.cnn14) {
      const auto& e = cap_.cnn14->config();
      fill("input_dim", type == "mlp" || type == "transformer" ? e.embedding_dim : e.channels.back());
      fill("classes_num", e.classes_num);
    } else {
      fill("input_dim", type == "query_guided" ? cap_.clip->token_dim() : cap_.clip->embed_dim());
    }
    MapperConfig mc = MapperConfig::from_json(mj, "mapper config");
    cap_.mapper = make_mapper(mc);
    if (mc.kv_prefix) cap_.kv_head = KvPrefixHead(mc.embed_dim, cap_.lm->config());
    if (mc.embed_dim != cap_.lm->config().n_embd)
      throw ConfigError("mapper embed_dim " + std::to_string(mc.embed_dim) + " differs from the LM's n_embd " +
                        std::to_string(cap_.lm->config().n_embd));
  }

  void untie_head() {
    if (cap_.lm->lm_head) {
      cap_.lm->lm_head->weight.set_requires_grad(true);
      return;
    }
    Gpt2Config cfg = cap_.lm->config();
    cfg.tie_word_embeddings = false;
    TensorMap w = cap_.lm->hf_state_dict();
    w["lm_head.weight"] = cap_.lm->wte->weight.detach().clone();
    Gpt2Model untied(cfg);
    untied->load_weights(w, "untied LM head");
    untied->freeze();
    untied->eval();
    untied->lm_head->weight.set_requires_grad(true);
    cap_.lm = untied;
  }

  MapperInput encode_images_grad(const std::vector<Captioner::VisualInput>& inputs) {
    std::vector<const Image8*> images;
    for (const auto& in : inputs) {
      if (in.embedding.defined()) throw std::runtime_error("training the CLIP encoder on video is not supported; keep it frozen");
      images.push_back(&in.image);
    }
    ClipVisionOutput y = cap_.clip->forward(clip_pixel_batch(images, cap_.clip_preprocess, cap_.device()));
    MapperInput in;
    in.embedding = y.image_embeds;
    in.tokens = y.last_hidden_state;
    return in;
  }

  const TrainConfig& c_;
  Captioner cap_;
  Gpt2Model train_lm_{nullptr};  // the LM the loss runs through (cap_.lm, or its bfloat16 copy)
  bool encoder_trains_ = false;
  std::unique_ptr<FeatureCache> cache_;
  std::mutex decoded_mutex_;
  std::map<std::string, std::vector<float>> decoded_;
  size_t decoded_bytes_ = 0;
};

// Fills the cache for every item missing from it; returns the number of items computed.
int64_t fill_cache(CaptionTask& task, const std::vector<DatasetItem>& items, const TrainConfig& c, Progress& progress,
                   const std::string& what) {
  FeatureCache& cache = task.cache();
  std::vector<size_t> missing;
  for (size_t i = 0; i < items.size(); ++i)
    if (!cache.contains(items[i].media)) missing.push_back(i);
  if (missing.empty()) return 0;
  progress.print("features: computing " + std::to_string(missing.size()) + " of " + std::to_string(items.size()) + " " + what +
                 " items into " + cache.folder());
  const auto t0 = std::chrono::steady_clock::now();
  OrderedPrefetcher<Media> loader(
      static_cast<int64_t>(missing.size()), [&](int64_t i) { return task.decode(items[missing[i]].media); },
      static_cast<int>(c.workers), std::max<int64_t>(c.encode_batch * 2, 4));
  torch::NoGradGuard no_grad;
  size_t done = 0;
  while (done < missing.size()) {
    std::vector<Media> media;
    std::vector<size_t> which;
    while (media.size() < static_cast<size_t>(c.encode_batch) && done + media.size() < missing.size()) {
      const size_t k = done + media.size();
      try {
        media.push_back(std::move(*loader.next()));
      } catch (const std::exception& e) {
        throw std::runtime_error(items[missing[k]].media + ": " + e.what());
      }
      which.push_back(missing[k]);
    }
    auto feats = task.encode(media);
    for (size_t k = 0; k < feats.size(); ++k) cache.put(items[which[k]].media, feats[k]);
    done += media.size();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[200];
    std::snprintf(line, sizeof line, "features %s %zu/%zu  %.1f items/s  ETA %s", bar(double(done) / missing.size()).c_str(), done,
                  missing.size(), done / std::max(secs, 1e-9), format_duration((missing.size() - done) * secs / done).c_str());
    progress.update(line);
  }
  cache.flush();
  progress.done();
  return static_cast<int64_t>(missing.size());
}

// ---------------------------------------------------------------------------------------
// checkpoints

struct CheckpointState {
  int64_t step = 0, epoch = 0, batch = 0;
  double best = NAN;
  int64_t best_epoch = -1;
  double last_loss = 0;
};

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

// The keys whose change makes a resumed run a different run.
Json run_identity(const TrainConfig& c) {
  Json j = c.to_json();
  // epochs and max_steps stay: they set the total step count that the lr schedule decays over.
  for (const char* k : {"out", "resume", "progress", "log_every", "workers", "prefetch", "num_threads", "device", "save_every_steps", "keep_checkpoints", "val_beam_size", "val_max_items", "sample_captions",
                        "beam_size", "max_tokens", "cache_dir", "encode_batch", "best_metric", "skip_missing", "decoded_cache_mb"})
    j.erase(k);
  return j;
}

void save_checkpoint(const TrainConfig& c, const TensorMap& tensors, torch::optim::Optimizer& opt, const CheckpointState& s,
                     const std::function<void(const std::string&)>& fault_hook) {
  const fs::path dir = fs::path(c.out) / "checkpoints";
  fs::create_directories(dir);
  const std::string name = step_name(s.step);
  const fs::path tmp = dir / (name + ".partial");
  fs::remove_all(tmp);
  try {
    fs::create_directories(tmp);
    save_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});
    if (fault_hook) fault_hook(tmp.string());
    {
      torch::serialize::OutputArchive archive;
      opt.save(archive);
      archive.save_to((tmp / "optimizer.pt").string());
    }
    Json st = {{"step", s.step}, {"epoch", s.epoch}, {"batch", s.batch}, {"best_epoch", s.best_epoch},
               {"last_loss", s.last_loss}, {"run", run_identity(c)}, {"written", now_iso()}};
    st["best"] = std::isnan(s.best) ? Json(nullptr) : Json(s.best);
    write_json_file((tmp / "state.json").string(), st);
    fs::remove_all(dir / name);
    fs::rename(tmp, dir / name);
    write_file_atomic((dir / "latest").string(), name + "\n");
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  // Keep the newest keep_checkpoints.
  std::vector<std::string> all;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && n.find('.') == std::string::npos) all.push_back(n);
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + static_cast<size_t>(c.keep_checkpoints) < all.size(); ++i)
    if (all[i] != name) fs::remove_all(dir / all[i]);
}

std::optional<fs::path> latest_checkpoint(const TrainConfig& c) {
  const fs::path dir = fs::path(c.out) / "checkpoints";
  std::ifstream in(dir / "latest");
  std::string name;
  if (!(in >> name)) return std::nullopt;
  if (!fs::exists(dir / name / "state.json"))
    throw FileError((dir / "latest").string(), "names checkpoint '" + name + "', which is missing");
  return dir / name;
}

CheckpointState load_checkpoint(const TrainConfig& c, const fs::path& dir, TensorMap* tensors, torch::optim::Optimizer& opt) {
  const std::string state_path = (dir / "state.json").string();
  Json st = read_json_file(state_path);
  Json run = json_get<Json>(st, "run", state_path), now = run_identity(c);
  std::vector<std::string> changed;
  for (const auto& [k, v] : now.items())
    if (!run.contains(k) || run[k] != v) changed.push_back(k);
  if (!changed.empty()) {
    std::string msg = state_path + ": cannot resume, these options differ from the checkpoint's run:";
    for (const auto& k : changed) msg += " " + k + " (was " + (run.contains(k) ? json_dump(run[k]) : "unset") + ", now " + json_dump(now[k]) + ")";
    throw ConfigError(msg);
  }
  *tensors = load_weight_file((dir / "model.safetensors").string());
  torch::serialize::InputArchive archive;
  // The optimizer state onto the parameters' device (a run may resume on another device).
  c10::optional<torch::Device> device;  // c10::optional: std::optional in LibTorch 2.x, its own type in 1.13
  if (!opt.param_groups().empty() && !opt.param_groups()[0].params().empty())
    device = opt.param_groups()[0].params()[0].device();
  archive.load_from((dir / "optimizer.pt").string(), device);
  opt.load(archive);
  CheckpointState s;
  s.step = json_get<int64_t>(st, "step", state_path);
  s.epoch = json_get<int64_t>(st, "epoch", state_path);
  s.batch = json_get<int64_t>(st, "batch", state_path);
  s.best_epoch = json_get<int64_t>(st, "best_epoch", state_path);
  s.last_loss = json_get<double>(st, "last_loss", state_path);
  s.best = st["best"].is_null() ? NAN : st["best"].get<double>();
  return s;
}

// ---------------------------------------------------------------------------------------
// the loop shared by both tasks

struct Task {
  int64_t num_examples = 0;
  std::function<void(int64_t epoch, Progress&)> begin_epoch;
  std::function<Batch(const std::vector<int64_t>& examples)> make_batch;  // runs on loader threads
  std::function<at::Tensor(const Batch&)> loss;
  std::function<void(bool)> train_mode;
  std::function<std::vector<std::vector<at::Tensor>>()> param_groups;  // group 0 at lr, group 1 at encoder_lr
  std::function<TensorMap()> state;
  std::function<void(const TensorMap&, const std::string&)> load_state;
  std::function<Json(int64_t epoch, Progress&)> validate;  // {} when there is no validation
  std::function<void(const std::string& dir)> save_output;
  std::string output_name;
};

bool better(const std::string& metric, double a, double b) {
  if (std::isnan(b)) return true;
  return metric == "loss" ? a < b : a > b;
}

void replace_dir(const std::function<void(const std::string&)>& save, const fs::path& dst) {
  const fs::path tmp = dst.string() + ".partial";
  fs::remove_all(tmp);
  save(tmp.string());
  fs::remove_all(dst);
  fs::rename(tmp, dst);
}

TrainResult run_loop(const TrainConfig& c, Task& task, const TrainHooks& hooks) {
  fs::create_directories(c.out);
  Progress progress(c.progress);
  JsonLog log((fs::path(c.out) / "train_log.jsonl").string());
  const int64_t batches_per_epoch = (task.num_examples + c.batch_size - 1) / c.batch_size;
  const int64_t steps_per_epoch = (batches_per_epoch + c.grad_accum - 1) / c.grad_accum;
  const int64_t total_steps = c.max_steps > 0 ? std::min(c.max_steps, c.epochs * steps_per_epoch) : c.epochs * steps_per_epoch;
  const at::Device device = train_device(c);

  auto groups = task.param_groups();
  std::vector<torch::optim::OptimizerParamGroup> pg;
  pg.emplace_back(groups[0], std::make_unique<torch::optim::AdamWOptions>(
                                 torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay)));
  if (groups.size() > 1 && !groups[1].empty())
    pg.emplace_back(groups[1], std::make_unique<torch::optim::AdamWOptions>(
                                   torch::optim::AdamWOptions(c.encoder_lr > 0 ? c.encoder_lr : c.lr).weight_decay(c.weight_decay)));
  torch::optim::AdamW opt(pg, torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
  std::vector<at::Tensor> all_params;
  for (const auto& g : groups) all_params.insert(all_params.end(), g.begin(), g.end());

  CheckpointState st;
  if (c.resume) {
    auto dir = latest_checkpoint(c);
    if (!dir) {
      progress.print("resume: no checkpoint in " + (fs::path(c.out) / "checkpoints").string() + ", starting from scratch");
    } else {
      TensorMap tensors;
      st = load_checkpoint(c, *dir, &tensors, opt);
      task.load_state(tensors, (*dir / "model.safetensors").string());
      if (tensors.count("rng.cpu")) {
        at::Generator gen = at::detail::getDefaultCPUGenerator();
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(tensors.at("rng.cpu"));
      }
      log.truncate_after(st.step);
      progress.print("resumed from " + dir->string() + " (step " + std::to_string(st.step) + ", epoch " + std::to_string(st.epoch + 1) + ")");
    }
  } else if (fs::exists(fs::path(c.out) / "checkpoints" / "latest")) {
    throw ConfigError(c.out + " already holds a training run: pass --resume to continue it, or choose another --out");
  } else {
    log.truncate_after(-1);
  }
  if (st.step == 0 && !c.resume) log.write({{"type", "start"}, {"step", 0}, {"config", c.to_json()}, {"time", now_iso()},
                                           {"examples", task.num_examples}, {"total_steps", total_steps}});

  TrainResult result;
  result.last_loss = st.last_loss;
  auto checkpoint = [&](const CheckpointState& s) {
    TensorMap tensors = task.state();
    // Nothing after initialisation draws random numbers today; the generator is saved anyway so
    // that a resumed run stays equal if something (dropout, sampling) ever does.
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      tensors["rng.cpu"] = gen.get_state();
    }
    save_checkpoint(c, tensors, opt, s, hooks.on_checkpoint_write);
  };
  auto t_start = std::chrono::steady_clock::now();
  int64_t samples_since = 0, steps_this_run = 0, examples_this_run = 0;
  auto t_last = t_start;
  bool finished = st.step >= total_steps;

  for (int64_t epoch = st.epoch; epoch < c.epochs && !finished; ++epoch) {
    task.begin_epoch(epoch, progress);
    task.train_mode(true);
    const std::vector<int64_t> order = epoch_order(task.num_examples, c.seed, epoch);
    const int64_t first_batch = epoch == st.epoch ? st.batch : 0;
    OrderedPrefetcher<Batch> loader(
        batches_per_epoch - first_batch,
        [&](int64_t i) {
          const int64_t b = first_batch + i;
          const int64_t lo = b * c.batch_size, hi = std::min(task.num_examples, lo + c.batch_size);
          return task.make_batch(std::vector<int64_t>(order.begin() + lo, order.begin() + hi));
        },
        static_cast<int>(c.workers), c.prefetch);
    double group_loss = 0;
    int64_t group_examples = 0;
    for (int64_t b = first_batch; b < batches_per_epoch; ++b) {
      const int64_t group_start = b - (b % c.grad_accum);
      const int64_t group_size = std::min(c.grad_accum, batches_per_epoch - group_start);
      Batch batch = std::move(*loader.next());
      at::Tensor loss;
      {
        const AutocastScope autocast(device, c.precision == "bf16");  // the forward only
        loss = task.loss(batch).to(at::kFloat);
      }
      if (!std::isfinite(loss.item<double>()))
        throw std::runtime_error("the loss became " + std::to_string(loss.item<double>()) + " at step " + std::to_string(st.step + 1) +
                                 " (lower --lr, or check the data)");
      (loss / static_cast<double>(group_size)).backward();
      group_loss += loss.item<double>() / static_cast<double>(group_size);
      group_examples += static_cast<int64_t>(batch.examples.size());
      if (b - group_start + 1 < group_size) continue;

      const double lr = learning_rate(c, st.step, total_steps);
      for (size_t g = 0; g < opt.param_groups().size(); ++g) {
        auto& o = static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[g].options());
        o.lr(g == 0 ? lr : lr * (c.encoder_lr > 0 ? c.encoder_lr : c.lr) / c.lr);
      }
      double grad_norm = NAN;
      if (c.clip_grad_norm > 0) grad_norm = torch::nn::utils::clip_grad_norm_(all_params, c.clip_grad_norm);
      opt.step();
      opt.zero_grad();
      ++st.step;
      ++steps_this_run;
      st.last_loss = group_loss;
      result.last_loss = group_loss;
      samples_since += group_examples;
      examples_this_run += group_examples;
      const auto now = std::chrono::steady_clock::now();
      const double elapsed = std::chrono::duration<double>(now - t_start).count();
      const double eta = elapsed / steps_this_run * (total_steps - st.step);
      if (st.step % c.log_every == 0 || st.step == total_steps || b + 1 == batches_per_epoch) {
        const double dt = std::chrono::duration<double>(now - t_last).count();
        Json rec = {{"type", "train"}, {"step", st.step}, {"epoch", epoch + 1}, {"loss", group_loss}, {"lr", lr},
                    {"samples_per_s", samples_since / std::max(dt, 1e-9)}, {"elapsed_s", elapsed}};
        if (!std::isnan(grad_norm)) rec["grad_norm"] = grad_norm;
        log.write(rec);
        if (!progress.tty()) {
          char line[256];
          std::snprintf(line, sizeof line, "epoch %lld/%lld step %lld/%lld  loss %.4f  lr %.2e  %.1f samples/s  ETA %s",
                        (long long)(epoch + 1), (long long)c.epochs, (long long)st.step, (long long)total_steps, group_loss, lr,
                        samples_since / std::max(dt, 1e-9), format_duration(eta).c_str());
          progress.print(line);
        }
        samples_since = 0;
        t_last = now;
      }
      if (progress.tty()) {
        char line[256];
        const double rate = static_cast<double>(examples_this_run) / std::max(elapsed, 1e-9);
        std::snprintf(line, sizeof line, "epoch %lld/%lld %s %lld/%lld  loss %.4f  lr %.2e  %.1f samples/s  ETA %s",
                      (long long)(epoch + 1), (long long)c.epochs, bar(double(st.step) / total_steps).c_str(), (long long)st.step,
                      (long long)total_steps, group_loss, lr, rate, format_duration(eta).c_str());
        progress.update(line);
      }
      group_loss = 0;
      group_examples = 0;
      if (hooks.on_step) hooks.on_step(st.step, st.last_loss);
      if (st.step >= total_steps) finished = true;
      const bool epoch_end = b + 1 == batches_per_epoch;
      if (!epoch_end && !finished && c.save_every_steps > 0 && st.step % c.save_every_steps == 0) {
        CheckpointState s = st;
        s.epoch = epoch;
        s.batch = b + 1;
        checkpoint(s);
      }
      if (finished) {
        if (!epoch_end) {  // stopped inside an epoch by max_steps: its checkpoint continues there
          CheckpointState s = st;
          s.epoch = epoch;
          s.batch = b + 1;
          checkpoint(s);
        }
        break;
      }
    }
    progress.done();
    // End of the epoch (or of the run): validate, pick the best, checkpoint.
    task.train_mode(false);
    Json metrics = task.validate ? task.validate(epoch, progress) : Json();
    if (!metrics.is_null() && !metrics.empty()) {
      Json rec = {{"type", "val"}, {"step", st.step}, {"epoch", epoch + 1}};
      rec.update(metrics);
      log.write(rec);
      if (metrics.contains(c.best_metric) && metrics[c.best_metric].is_number()) {
        const double v = metrics[c.best_metric].get<double>();
        if (better(c.best_metric, v, st.best)) {
          st.best = v;
          st.best_epoch = epoch + 1;
          replace_dir(task.save_output, fs::path(c.out) / "best");
          progress.print("best " + c.best_metric + " so far (" + std::to_string(v) + "): saved " + (fs::path(c.out) / "best").string());
        }
      }
    }
    CheckpointState s = st;
    const bool completed_epoch = !finished || st.step % steps_per_epoch == 0;
    s.epoch = completed_epoch ? epoch + 1 : epoch;
    if (completed_epoch) {
      s.batch = 0;
      checkpoint(s);
    }
  }
  task.train_mode(false);
  const fs::path final_dir = fs::path(c.out) / task.output_name;
  replace_dir(task.save_output, final_dir);
  log.write({{"type", "end"}, {"step", st.step}, {"output", final_dir.string()}, {"time", now_iso()}});
  progress.print("saved " + final_dir.string());
  result.steps = st.step;
  result.bundle = final_dir.string();
  if (st.best_epoch > 0) {
    result.best = (fs::path(c.out) / "best").string();
    result.best_metrics = {{c.best_metric, st.best}, {"epoch", st.best_epoch}};
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// task: caption

Json caption_validation(CaptionTask& t, const TrainConfig& c, const std::vector<DatasetItem>& val,
                        const std::vector<Example>& val_examples, Progress& progress) {
  torch::NoGradGuard no_grad;
  Captioner& cap = t.captioner();
  auto features_of = [&](const std::vector<size_t>& which) {
    std::vector<TensorMap> rows;
    if (!t.encoder_trains()) {
      for (size_t i : which) rows.push_back(*t.cache().get(val[i].media));
    } else {
      std::vector<Media> media;
      for (size_t i : which) media.push_back(t.decode(val[i].media));
      rows = t.encode(media);
    }
    return rows;
  };
  // teacher-forced loss over every validation caption
  double loss_sum = 0;
  int64_t tokens = 0;
  for (size_t lo = 0; lo < val_examples.size(); lo += static_cast<size_t>(c.batch_size)) {
    const size_t hi = std::min(val_examples.size(), lo + static_cast<size_t>(c.batch_size));
    std::vector<size_t> which;
    std::vector<const std::vector<int64_t>*> rows;
    for (size_t k = lo; k < hi; ++k) {
      which.push_back(static_cast<size_t>(val_examples[k].item));
      rows.push_back(&val_examples[k].ids);
    }
    Batch b;
    b.features = t.collate(features_of(which));
    pad_ids(rows, &b.ids, &b.mask);
    const int64_t n = b.mask.sum().item<int64_t>();
    loss_sum += t.loss(b).item<double>() * static_cast<double>(n);
    tokens += n;
  }
  // captions
  const size_t n_items = c.val_max_items > 0 ? std::min(val.size(), static_cast<size_t>(c.val_max_items)) : val.size();
  DecodingOptions opts = cap.default_decoding();
  opts.beam_size = static_cast<int>(c.val_beam_size);
  opts.max_tokens = static_cast<int>(c.max_tokens);
  std::vector<CaptionItem> items;
  for (size_t lo = 0; lo < n_items; lo += static_cast<size_t>(c.encode_batch)) {
    std::vector<size_t> which;
    for (size_t i = lo; i < std::min(n_items, lo + static_cast<size_t>(c.encode_batch)); ++i) which.push_back(i);
    auto caps = cap.caption(t.to_mapper_input(t.collate(features_of(which))), opts);
    for (size_t k = 0; k < which.size(); ++k)
      if (!val[which[k]].captions.empty())  // an item without references cannot be scored
        items.push_back({val[which[k]].media, val[which[k]].captions, caps[k][0].text});
    progress.update("validation captions " + bar(double(items.size()) / n_items) + " " + std::to_string(items.size()) + "/" +
                    std::to_string(n_items));
  }
  progress.done();
  EvalReport report = items.empty() ? EvalReport{} : evaluate(items, EvalOptions{});
  Json m = {{"loss", tokens ? loss_sum / tokens : NAN}};
  for (const auto& [k, v] : report.corpus) m[k] = v;
  Json samples = Json::array();
  std::string shown;
  for (size_t i = 0; i < items.size() && i < static_cast<size_t>(c.sample_captions); ++i) {
    samples.push_back({{"media", fs::path(items[i].id).filename().string()}, {"caption", items[i].candidate},
                       {"reference", items[i].references.empty() ? "" : items[i].references[0]}});
    shown += "\n  " + fs::path(items[i].id).filename().string() + ": " + items[i].candidate + "   (ref: " +
             (items[i].references.empty() ? "" : items[i].references[0]) + ")";
  }
  m["samples"] = samples;
  char line[256];
  std::snprintf(line, sizeof line, "validation: loss %.4f  BLEU-4 %.4f  ROUGE-L %.4f  CIDEr-D %.4f",
                m["loss"].get<double>(), m.value("Bleu_4", 0.0), m.value("ROUGE_L", 0.0), m.value("CIDEr", 0.0));
  progress.print(line + shown);
  return m;
}

std::vector<Example> make_examples(const std::vector<DatasetItem>& items, const Gpt2Tokenizer& tok, const TrainConfig& c, bool lm_task) {
  std::vector<Example> out;
  for (size_t i = 0; i < items.size(); ++i)
    for (const auto& cap : items[i].captions)
      if (cap.find_first_not_of(" \t\r\n") != std::string::npos)
        out.push_back({static_cast<int64_t>(i), caption_ids(tok, cap, c, lm_task)});
  return out;
}

TrainResult train_caption(const TrainConfig& c, const TrainHooks& hooks) {
  Progress progress(c.progress);
  auto train_items = load_split(c, c.train_split, true);
  std::vector<DatasetItem> val_items;
  if (!c.val_split.empty()) val_items = load_split(c, c.val_split, true);
  CaptionTask t(c);
  const auto examples = make_examples(train_items, *t.captioner().tokenizer, c, false);
  const auto val_examples = make_examples(val_items, *t.captioner().tokenizer, c, false);
  if (examples.empty()) throw ConfigError("the training split has no captions");
  progress.print("training on " + std::to_string(train_items.size()) + " items / " + std::to_string(examples.size()) +
                 " captions" + (val_items.empty() ? "" : ", validating on " + std::to_string(val_items.size()) + " items"));

  Task task;
  task.num_examples = static_cast<int64_t>(examples.size());
  task.output_name = "bundle";
  task.begin_epoch = [&](int64_t epoch, Progress& p) {
    t.set_epoch(epoch);
    if (t.encoder_trains()) {
      if (epoch == 0 || c.resume) p.print("epoch " + std::to_string(epoch + 1) + ": the encoder trains with the mapper");
      return;
    }
    fill_cache(t, train_items, c, p, "training");
    if (!val_items.empty()) fill_cache(t, val_items, c, p, "validation");
  };
  task.make_batch = [&](const std::vector<int64_t>& ex) {
    Batch b;
    b.examples = ex;
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t e : ex) rows.push_back(&examples[e].ids);
    pad_ids(rows, &b.ids, &b.mask);
    if (t.encoder_trains()) {
      for (int64_t e : ex) b.media.push_back(t.decode(train_items[examples[e].item].media));
    } else {
      std::vector<TensorMap> feats;
      for (int64_t e : ex) {
        const std::string& media = train_items[examples[e].item].media;
        auto f = t.cache().get(media);
        if (!f) throw std::runtime_error(media + ": features vanished from the cache (was it changed during training?)");
        feats.push_back(std::move(*f));
      }
      b.features = t.collate(feats);
    }
    return b;
  };
  task.loss = [&](const Batch& b) { return t.loss(b); };
  task.train_mode = [&](bool on) { t.train_mode(on); };
  task.param_groups = [&] {
    std::vector<std::vector<at::Tensor>> g = {t.head_params()};
    if (c.encoder_train_epochs > 0) g.push_back(t.encoder_params());
    return g;
  };
  task.state = [&] { return t.state(); };
  task.load_state = [&](const TensorMap& s, const std::string& src) { t.load_state(s, src); };
  if (!val_items.empty())
    task.validate = [&](int64_t, Progress& p) {  // begin_epoch cached the validation features
      return caption_validation(t, c, val_items, val_examples, p);
    };
  task.save_output = [&](const std::string& dir) { t.captioner().save(dir); };
  return run_loop(c, task, hooks);
}

// ---------------------------------------------------------------------------------------
// task: lm

// The non-blank lines of a text file (data/'s line reader: CRLF handled).
std::vector<std::string> text_lines(const std::string& path) {
  if (!fs::is_regular_file(path)) throw FileError(path, "cannot open");
  std::vector<std::string> out;
  for (auto& line : read_text_lines(path))
    if (line.find_first_not_of(" \t") != std::string::npos) out.push_back(std::move(line));
  if (out.empty()) throw FileError(path, "has no text");
  return out;
}

TrainResult train_lm(const TrainConfig& c, const TrainHooks& hooks) {
  Progress progress(c.progress);
  at::manual_seed(static_cast<uint64_t>(c.seed));
  std::vector<std::string> train_text, val_text;
  if (!c.text.empty()) {
    train_text = text_lines(c.text);
    if (!c.val_split.empty()) val_text = text_lines(c.val_split);
  } else {
    for (const auto& it : load_split(c, c.train_split, false)) train_text.insert(train_text.end(), it.captions.begin(), it.captions.end());
    if (!c.val_split.empty())
      for (const auto& it : load_split(c, c.val_split, false)) val_text.insert(val_text.end(), it.captions.begin(), it.captions.end());
  }
  std::string tok_dir = c.tokenizer.empty() ? c.lm : c.tokenizer;
  if (tok_dir.empty()) {  // learn one from the training text
    tok_dir = (fs::path(c.out) / "tokenizer").string();
    if (!fs::exists(fs::path(tok_dir) / "vocab.json")) {
      progress.print("tokenizer: learning a " + std::to_string(c.tokenizer_vocab) + "-entry byte-level BPE vocabulary");
      train_bpe_tokenizer(train_text, c.tokenizer_vocab, tok_dir);
    }
  }
  auto tok = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(tok_dir));
  Gpt2Model lm{nullptr};
  if (!c.lm.empty()) {
    lm = load_gpt2(c.lm);
  } else {
    Json j = c.lm_config;
    if (!j.contains("vocab_size")) j["vocab_size"] = tok->vocab_size();
    if (!j.contains("model_type")) j["model_type"] = "gpt2";
    Gpt2Config cfg = Gpt2Config::from_json(j, "lm_config");
    if (cfg.vocab_size < tok->vocab_size())
      throw ConfigError("lm_config vocab_size " + std::to_string(cfg.vocab_size) + " is smaller than the tokenizer's " +
                        std::to_string(tok->vocab_size()));
    lm = Gpt2Model(cfg);
    lm->init_weights();
  }
  const at::Device device = train_device(c);
  lm->to(device);
  for (auto& p : lm->parameters()) p.set_requires_grad(true);
  const int64_t max_len = lm->config().n_positions;
  auto to_examples = [&](const std::vector<std::string>& lines) {
    std::vector<Example> out;
    for (const auto& l : lines) {
      Example e{0, caption_ids(*tok, l, c, true)};
      if (static_cast<int64_t>(e.ids.size()) > max_len) e.ids.resize(static_cast<size_t>(max_len));
      out.push_back(std::move(e));
    }
    return out;
  };
  const auto examples = to_examples(train_text), val_examples = to_examples(val_text);
  progress.print("language model: " + std::to_string(lm->config().n_layer) + " layers, n_embd " + std::to_string(lm->config().n_embd) +
                 ", training on " + std::to_string(examples.size()) + " texts");

  auto lm_loss = [&](const Batch& b) {
    const at::Tensor ids = b.ids.to(device), mask = b.mask.to(device);
    Gpt2Input x;
    x.input_ids = ids;
    x.logits = LogitsMode::None;
    const int64_t T = ids.size(1);
    at::Tensor hidden = lm->forward(x).last_hidden_state.narrow(1, 0, T - 1);
    return token_cross_entropy(lm->head(hidden), ids.narrow(1, 1, T - 1), mask.narrow(1, 1, T - 1));
  };
  auto batch_of = [&](const std::vector<Example>& ex, const std::vector<int64_t>& which) {
    Batch b;
    b.examples = which;
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t e : which) rows.push_back(&ex[e].ids);
    pad_ids(rows, &b.ids, &b.mask);
    return b;
  };
  auto save_lm = [&](const std::string& dir) {
    fs::create_directories(dir);
    write_json_file((fs::path(dir) / "config.json").string(), lm->config().to_json());
    save_safetensors((fs::path(dir) / "model.safetensors").string(), lm->hf_state_dict(), {{"format", "pt"}});
    tok->save(dir);
  };

  Task task;
  task.num_examples = static_cast<int64_t>(examples.size());
  task.output_name = "lm";
  task.begin_epoch = [](int64_t, Progress&) {};
  task.make_batch = [&](const std::vector<int64_t>& ex) { return batch_of(examples, ex); };
  task.loss = lm_loss;
  task.train_mode = [&](bool on) { lm->train(on); };
  task.param_groups = [&] { return std::vector<std::vector<at::Tensor>>{lm->parameters()}; };
  task.state = [&] { return module_tensors(*lm, "lm."); };
  task.load_state = [&](const TensorMap& s, const std::string& src) {
    load_state_strict(*lm, tensors_under(s, "lm."), {{}, {}, src + " (lm.*)", {}});
  };
  if (!val_examples.empty())
    task.validate = [&](int64_t, Progress& p) {
      torch::NoGradGuard no_grad;
      double sum = 0;
      int64_t n = 0;
      for (size_t lo = 0; lo < val_examples.size(); lo += static_cast<size_t>(c.batch_size)) {
        std::vector<int64_t> which;
        for (size_t k = lo; k < std::min(val_examples.size(), lo + static_cast<size_t>(c.batch_size)); ++k)
          which.push_back(static_cast<int64_t>(k));
        Batch b = batch_of(val_examples, which);
        const int64_t toks = b.mask.narrow(1, 1, b.mask.size(1) - 1).sum().item<int64_t>();
        sum += lm_loss(b).item<double>() * static_cast<double>(toks);
        n += toks;
      }
      const double loss = n ? sum / n : NAN;
      char line[128];
      std::snprintf(line, sizeof line, "validation: loss %.4f  perplexity %.2f", loss, std::exp(loss));
      p.print(line);
      return Json{{"loss", loss}, {"perplexity", std::exp(loss)}};
    };
  task.save_output = save_lm;
  TrainConfig lc = c;
  lc.best_metric = "loss";
  return run_loop(lc, task, hooks);
}

}  // namespace

TrainResult train(const TrainConfig& config, const TrainHooks& hooks) {
  config.validate();
  if (config.task == "lm") return train_lm(config, hooks);
  return train_caption(config, hooks);
}

int64_t build_cache(const TrainConfig& c) {
  c.validate();
  if (c.task != "caption") throw ConfigError("build-cache is for task caption");
  Progress progress(c.progress);
  auto train_items = load_split(c, c.train_split, true);
  CaptionTask t(c);
  t.set_epoch(c.encoder_train_epochs);  // the frozen encoder
  int64_t n = fill_cache(t, train_items, c, progress, "training");
  size_t total = train_items.size();
  if (!c.val_split.empty()) {
    auto val_items = load_split(c, c.val_split, true);
    n += fill_cache(t, val_items, c, progress, "validation");
    total += val_items.size();
  }
  progress.print("feature cache " + t.cache().folder() + ": " + std::to_string(n) + " computed, " + std::to_string(total - n) +
                 " already there");
  return static_cast<int64_t>(total);
}

}  // namespace prefixcap
